"""Pearl step time / plain SFT step time on the same toy batch (CPU), target ≤ 1.8 (the paper: ≈ 2×).

Both steps use the same model (toy backbone, the default LoRA), the same examples and the same optimizer step; SFT is
`pearl_loss` with λ = 0 (only the full views run: exactly the SFT step). Pearl = the default (shared image encoding,
three views packed in one row); the released layout (`--naive-views`: stacked padded views, images re-encoded) is
timed beside it. Repeats are interleaved (SFT, Pearl, naive, SFT, …) and the median is reported.

    python bench/bench_pearl.py [--model toy|toy-qwen3vl] [--data lvr|pixelreasoner] [--repeats 7] [--per-micro 4]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import dataloader as D  # noqa: E402
import runtime as R  # noqa: E402
import pearl as P  # noqa: E402
from toy_world import ensure_toy_world  # noqa: E402


clock = time.perf_counter   # bench/run_all.py --device cuda swaps in a clock that synchronises the GPU first


def measure(bb, args, repeats: int, naive: bool = True) -> dict:
    """Step times (s) of `repeats` interleaved rounds after one warm-up: sft (λ = 0), pearl, and, with `naive`,
    pearl_naive (the released layout), on the same `args.max_examples` examples. `args`: resolved P.Args."""
    device = next(bb.model.parameters()).device
    frozen = P.setup_model(bb, args)
    skips = D.Skips()
    examples = P.load_data(bb, args, skips)
    model = bb.model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, weight_decay=0.1)

    def step(lam, naive=False):
        args.lam = lam
        t = clock()
        with R.compute_context(args.dtype, device):
            loss, _ = P.pearl_loss(bb, model, frozen, examples, args, naive=naive)
        loss.backward()
        R.clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return clock() - t

    kinds = {"sft": (0.0, False), "pearl": (0.2, False), "pearl_naive": (0.2, True)}
    kinds = kinds if naive else {k: v for k, v in kinds.items() if k != "pearl_naive"}
    for k in kinds.values():  # warm-up
        step(*k)
    times = {k: [] for k in kinds}
    for _ in range(repeats):
        for k, v in kinds.items():
            times[k].append(step(*v))
    return {"times": times, "examples": len(examples),
            "tokens_full": sum(len(e["full"]["input_ids"]) for e in examples),
            "tokens_all": sum(len(e[v]["input_ids"]) for e in examples for v in ("full", "input", "traj")),
            "images": sum(len(e["full"]["image_grid_thw"]) for e in examples),
            "images_naive": sum(len(e[v]["image_index"]) for e in examples for v in ("full", "input", "traj"))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="toy")
    ap.add_argument("--data", default="lvr", choices=["lvr", "pixelreasoner"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--per-micro", type=int, default=4)
    opts = ap.parse_args()
    root = ensure_toy_world("data/toy", seed=0)
    data = str(root / ("lvr_train.json" if opts.data == "lvr" else "pixelreasoner_train.json"))
    args = P.Args(model=opts.model, data=data, max_examples=opts.per_micro)
    P.resolve(args)                                # the toy preset (toy backbone): lr, LoRA r 8, small images
    m = measure(C.load_backbone(opts.model), args, opts.repeats)
    times = m["times"]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {opts.model}, data {opts.data}, {m['examples']} examples/step, tokens: full views {m['tokens_full']}, "
          f"all views {m['tokens_all']}; images encoded: shared {m['images']}, naive {m['images_naive']}; "
          f"{opts.repeats} interleaved repeats, {torch.get_num_threads()} threads")
    for k in times:
        print(f"{k:12s} median step {med[k] * 1000:8.1f} ms  (min {min(times[k]) * 1000:.1f}, "
              f"max {max(times[k]) * 1000:.1f})")
    print(f"Pearl / SFT step time = {med['pearl'] / med['sft']:.2f} (target <= 1.8; paper ~2x); "
          f"released layout / SFT = {med['pearl_naive'] / med['sft']:.2f}")


if __name__ == "__main__":
    main()
