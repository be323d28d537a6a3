"""LVR benchmarks (a script, not a test; CPU toy backbone).

(a) LVR SFT step (λ = 0.1, ROI span teacher-forced) / plain SFT step (no <|lvr|> span, CE only) on the same toy
    batch: forward + backward + AdamW step, interleaved repeats, median. Target ≤ 1.15.
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
import lvr  # noqa: E402


def sft_benchmark(bb, repeats: int, batch: int):
    from toy_world import ensure_toy_world
    data = ensure_toy_world("data/toy", seed=0) / "lvr_train.json"
    args = lvr.resolve(lvr.Args(data=str(data)))
    recs = list(C.read_records(str(data)))[:batch]
    with_span = [lvr.convert_sft(r, bb, args) for r in recs]
    plain = [lvr.convert_sft(r, bb, args, with_span=False) for r in recs]
    opt = torch.optim.AdamW(bb.model.parameters(), lr=1e-6)

    def lvr_step():
        loss, _ = lvr.sft_loss(bb.model, with_span, bb, args, "cpu")
        loss.backward()
        opt.step(), opt.zero_grad(set_to_none=True)

    def plain_step():   # sft.py's step
        b = C.pack(bb, plain)
        loss = C.next_token_loss(bb.model(**C.model_inputs(b, "cpu")).logits, b["labels"])
        loss.backward()
        opt.step(), opt.zero_grad(set_to_none=True)

    for f in (lvr_step, plain_step):
        f()
    times = {"lvr": [], "plain": []}
    for _ in range(repeats):
        for name, f in (("lvr", lvr_step), ("plain", plain_step)):
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    tok_lvr = sum(len(s["input_ids"]) for s in with_span)
    tok_plain = sum(len(s["input_ids"]) for s in plain)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"(a) SFT step, batch {batch} packed: LVR {med['lvr'] * 1e3:.1f} ms ({tok_lvr} tokens, "
          f"{sum(len(s['roi']) for s in with_span)} ROI), plain {med['plain'] * 1e3:.1f} ms ({tok_plain} tokens); "
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


def decode_benchmark(bb, repeats: int):
    for n_tok in (512, 2048):
        s = long_prompt(bb, n_tok)
        t = {}
        for cache in (True, False):
            for steps in (4, 36):
                runs = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    lvr.latent_generate(bb, [s], num_latent_steps=steps, max_new_tokens=1, use_cache=cache)
                    runs.append(time.perf_counter() - t0)
                t[cache, steps] = min(runs)
        per = {c: (t[c, 36] - t[c, 4]) / 32 for c in (True, False)}
        print(f"(b) prompt {len(s['input_ids'])} tokens: per latent step cached {per[True] * 1e3:.2f} ms, "
              f"recompute {per[False] * 1e3:.2f} ms -> {per[False] / per[True]:.1f}x; whole call (36 latent steps) "
              f"cached {t[True, 36] * 1e3:.0f} ms vs recompute {t[False, 36] * 1e3:.0f} ms -> "
              f"{t[False, 36] / t[True, 36]:.1f}x")


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
