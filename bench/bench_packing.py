"""Packing efficiency on a Visual-CoT-like length mix: real tokens / computed tokens.

    python bench/bench_packing.py [--budget 16384] [--batch 8] [--n 20000]

Length model (documented, not measured from the real data): one image per sample with width and height drawn
log-uniformly in [320, 1600] px, resized by Qwen's smart-resize rule under LVR's SFT budget (128·28² to 5120·28²
pixels, one token per 28×28 px), plus 30–150 text tokens. Packed rows come from dataloader.MicroBatches with a token
budget (every method's `--micro-tokens`: first-fit-decreasing inside windows of 512 shuffled samples, rows shuffled;
2 ranks × k see the rows of 1 rank × 2k, tests/test_common.py); computed
tokens for packing count every row as a full budget (the cost if rows were padded to a static shape; varlen
attention computes only real tokens, so this is a lower bound on its efficiency). The padded baseline batches
`--batch` shuffled samples and pads each to the longest.
"""
import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import dataloader as D  # noqa: E402


def visual_cot_like_lengths(n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = np.exp(rng.uniform(math.log(320), math.log(1600), 2))
        rh, rw = C.smart_resize(int(h), int(w), 28, 128 * 28 * 28, 5120 * 28 * 28)
        out.append(rh * rw // 784 + 2 + int(rng.integers(30, 151)))
    return out


def measure(budget: int = 16384, batch: int = 8, n: int = 20000) -> dict:
    """Real / computed tokens of the packed rows and of the padded baseline on `n` Visual-CoT-like lengths."""
    lengths = visual_cot_like_lengths(n)
    real = sum(lengths)
    rows = D.MicroBatches(lengths, token_budget=budget, seed=0).micro
    assert sorted(i for r in rows for i in r) == list(range(n))
    order = np.random.default_rng(0).permutation(n)
    padded_cost = sum(len(b) * max(lengths[i] for i in b) for b in np.array_split(order, math.ceil(n / batch)))
    return {"packed": real / (len(rows) * budget), "padded": real / padded_cost, "rows": len(rows),
            "mean_len": float(np.mean(lengths)), "min_len": min(lengths), "max_len": max(lengths)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=int, default=16384, help="tokens per packed row")
    ap.add_argument("--batch", type=int, default=8, help="samples per padded batch (baseline)")
    ap.add_argument("--n", type=int, default=20000, help="samples")
    a = ap.parse_args()
    m = measure(a.budget, a.batch, a.n)
    print(f"samples {a.n}  tokens/sample mean {m['mean_len']:.0f} (min {m['min_len']}, max {m['max_len']})")
    print(f"packed  (budget {a.budget}, {m['rows']} rows): real/computed = {m['packed']:.4f}")
    print(f"padded  (batch {a.batch}, pad to longest):      real/computed = {m['padded']:.4f}")


if __name__ == "__main__":
    main()
