"""LVR benchmarks (a script, not a test; CPU toy backbone).

(a) LVR SFT step (λ = 0.1, ROI span teacher-forced) / plain SFT step (sft.py's sft_loss: no <|lvr|> span, CE only)
    on the same toy batch: forward + backward + AdamW step, vision tower frozen (as lvr.py trains), interleaved
    repeats, median. Target ≤ 1.15.
(b) Latent decoding with the KV cache vs recomputing the whole prefix every step, at 512- and 2048-token prompts:
    per-latent-step cost = (time with 36 latent steps − time with 4) / 32 (fastest of the repeats: the
    CPU is shared, noise only adds), and the whole-call ratio. Target ≥ 5×
    at 512, growing with length; cached per-step cost ~independent of the prompt length.

    python bench/bench_lvr.py [--repeats 7] [--batch 8]
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
import lvr  # noqa: E402
import runtime as R  # noqa: E402


clock = time.perf_counter   # bench/run_all.py --device cuda swaps in a clock that synchronises the GPU first


def sft_times(bb, args, repeats: int, batch: int) -> dict:
    """Step times (s) of `repeats` interleaved rounds after one warm-up, on the same `batch` records of args.data:
    lvr.sft_loss (ROI span teacher-forced) and sft.sft_loss on them without the span (sft.py's step). Both with the
    vision tower frozen (lvr.py always, sft.py by default; its toy preset trains it), fp32 weights, compute in
    args.dtype. `args`: resolved lvr.Args."""
    import sft
    device = next(bb.model.parameters()).device
    recs = list(D.read_records(args.data))[:batch]
    with_span = [lvr.convert_sft(r, bb, args) for r in recs]
    plain = [lvr.convert_sft(r, bb, args, with_span=False) for r in recs]
    for p in bb.model.model.visual.parameters():
        p.requires_grad_(False)                                          # vision tower + merger frozen
    opt = torch.optim.AdamW([p for p in bb.model.parameters() if p.requires_grad], lr=1e-6)

    def lvr_step():
        with R.compute_context(args.dtype, device):
            loss, _ = lvr.sft_loss(bb.model, with_span, bb, args, device)
        loss.backward()
        opt.step(), opt.zero_grad(set_to_none=True)

    def plain_step():   # sft.py's step: its collate (pack, done in sft.py's loader workers) + sft_loss
        with R.compute_context(args.dtype, device):
            loss = sft.sft_loss(bb.model, (C.pack if args.pack else C.pad_batch)(bb, plain), device)
        loss.backward()
        opt.step(), opt.zero_grad(set_to_none=True)

    for f in (lvr_step, plain_step):
        f()
    times = {"lvr": [], "plain": []}
    for _ in range(repeats):
        for name, f in (("lvr", lvr_step), ("plain", plain_step)):
            t0 = clock()
            f()
            times[name].append(clock() - t0)
    return {"times": times, "tokens_lvr": sum(len(s["input_ids"]) for s in with_span),
            "tokens_plain": sum(len(s["input_ids"]) for s in plain), "roi": sum(len(s["roi"]) for s in with_span)}


def sft_benchmark(bb, repeats: int, batch: int):
    from toy_world import ensure_toy_world
    data = ensure_toy_world("data/toy", seed=0) / "lvr_train.json"
    m = sft_times(bb, lvr.resolve(lvr.Args(data=str(data))), repeats, batch)
    med = {k: statistics.median(v) for k, v in m["times"].items()}
    tok_lvr, tok_plain = m["tokens_lvr"], m["tokens_plain"]
    print(f"(a) SFT step, batch {batch} packed: LVR {med['lvr'] * 1e3:.1f} ms ({tok_lvr} tokens, "
          f"{m['roi']} ROI), plain {med['plain'] * 1e3:.1f} ms ({tok_plain} tokens); "
          f"ratio {med['lvr'] / med['plain']:.3f} (target <= 1.15); per token {med['lvr'] / tok_lvr / (med['plain'] / tok_plain):.3f}")


def long_prompt(bb, n_tokens: int):
    img = [{"type": "image", "image": lvr_image()}]
    words = 10
    while True:
        text = " ".join(["look at the red circle"] * words)
        s = C.encode_chat(bb, [{"role": "user", "content": img + [{"type": "text", "text": text}]}],
                          add_generation_prompt=True, assistant_prefix=lvr.LVR_START,
                          min_pixels=16 * 784, max_pixels=64 * 784)
        if len(s["input_ids"]) >= n_tokens:
            return s
        words = int(words * n_tokens / len(s["input_ids"])) + 1


def lvr_image():
    from PIL import Image
    return Image.new("RGB", (224, 224), (40, 90, 220))


def decode_times(bb, repeats: int, sizes=(512, 2048)) -> list[dict]:
    """Per prompt size: whole-call times (s) of lvr.latent_generate with 4 and 36 latent steps, with the KV cache
    and recomputing the prefix, the four interleaved in each of `repeats` rounds (after one warm-up call each way)."""
    out = []
    for n_tok in sizes:
        s = long_prompt(bb, n_tok)
        runs = {(cache, steps): [] for cache in (True, False) for steps in (4, 36)}
        for cache in (True, False):                     # warm-up
            lvr.latent_generate(bb, [s], num_latent_steps=4, max_new_tokens=1, use_cache=cache)
        for _ in range(repeats):
            for cache, steps in runs:
                t0 = clock()
                lvr.latent_generate(bb, [s], num_latent_steps=steps, max_new_tokens=1, use_cache=cache)
                runs[cache, steps].append(clock() - t0)
        out.append({"prompt_tokens": len(s["input_ids"]),
                     **{f"{'cached' if c else 'recompute'}_{n}": v for (c, n), v in runs.items()}})
    return out


def decode_benchmark(bb, repeats: int):
    for m in decode_times(bb, repeats):
        t = {k: min(v) for k, v in m.items() if k != "prompt_tokens"}    # fastest: the CPU is shared, noise only adds
        per = {c: (t[f"{c}_36"] - t[f"{c}_4"]) / 32 for c in ("cached", "recompute")}
        print(f"(b) prompt {m['prompt_tokens']} tokens: per latent step cached {per['cached'] * 1e3:.2f} ms, "
              f"recompute {per['recompute'] * 1e3:.2f} ms -> {per['recompute'] / per['cached']:.1f}x; whole call "
              f"(36 latent steps) cached {t['cached_36'] * 1e3:.0f} ms vs recompute {t['recompute_36'] * 1e3:.0f} ms "
              f"-> {t['recompute_36'] / t['cached_36']:.1f}x")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    torch.manual_seed(0)
    bb = C.load_backbone("toy")
    lvr.prepare_model(bb)
    print(f"torch threads {torch.get_num_threads()}")
    sft_benchmark(bb, args.repeats, args.batch)
    bb.model.eval()
    decode_benchmark(bb, max(3, args.repeats // 2))
