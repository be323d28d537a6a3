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
import runtime as R  # noqa: E402
import pearl as P  # noqa: E402
from toy_world import ensure_toy_world  # noqa: E402


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
    bb = C.load_backbone(opts.model)
    frozen = P.setup_model(bb, args)
    skips = C.Skips()
    examples = P.load_data(bb, args, skips)
    model = bb.model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, weight_decay=0.1)

    def step(lam, naive=False):
        args.lam = lam
        t = time.perf_counter()
        loss, _ = P.pearl_loss(bb, model, frozen, examples, args, naive=naive)
        loss.backward()
        R.clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    kinds = {"sft": (0.0, False), "pearl": (0.2, False), "pearl_naive": (0.2, True)}
    for k in kinds.values():  # warm-up
        step(*k)
    times = {k: [] for k in kinds}
    for _ in range(opts.repeats):
        for k, v in kinds.items():
            times[k].append(step(*v))
    med = {k: statistics.median(v) for k, v in times.items()}
    n_full = sum(len(e["full"]["input_ids"]) for e in examples)
    n_all = sum(len(e[v]["input_ids"]) for e in examples for v in ("full", "input", "traj"))
    n_img = sum(len(e["full"]["image_grid_thw"]) for e in examples)
    n_img_naive = sum(len(e[v]["image_index"]) for e in examples for v in ("full", "input", "traj"))
    print(f"model {opts.model}, data {opts.data}, {len(examples)} examples/step, tokens: full views {n_full}, all views "
          f"{n_all}; images encoded: shared {n_img}, naive {n_img_naive}; {opts.repeats} interleaved repeats, "
          f"{torch.get_num_threads()} threads")
    for k in kinds:
        print(f"{k:12s} median step {med[k] * 1000:8.1f} ms  (min {min(times[k]) * 1000:.1f}, "
              f"max {max(times[k]) * 1000:.1f})")
    print(f"Pearl / SFT step time = {med['pearl'] / med['sft']:.2f} (target <= 1.8; paper ~2x); "
          f"released layout / SFT = {med['pearl_naive'] / med['sft']:.2f}")


if __name__ == "__main__":
    main()
