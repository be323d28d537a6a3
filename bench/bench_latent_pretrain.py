"""Benchmark of latent_pretrain.py on the CPU toy backbone (a script, not a test):

  1. step-time ratio: one latent-pretraining step (L_NTP + L_inst + L_batch, targets read from the safetensors
     cache) / one plain caption-LM step (L_NTP only) on the SAME packed batch — interleaved repeats, median.
     Target: ≤ 1.15 (spec/engineering.md).
  2. target-extraction throughput of the frozen vision tower + merger (images/s, preprocessing included).

    python bench/bench_latent_pretrain.py [--repeats 15] [--per-micro 32] [--image-size 448]
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common as C  # noqa: E402
import dataloader as D  # noqa: E402
import runtime as R  # noqa: E402
import latent_pretrain as L  # noqa: E402


clock = time.perf_counter   # bench/run_all.py --device cuda swaps in a clock that synchronises the GPU first


def measure(bb, args, repeats: int, n_images: int) -> dict:
    """Target extraction time (s) of the first `n_images` toy COCO images (a fresh cache), then `repeats`
    interleaved rounds (after one warm-up) of the two steps on the same packed batch of `args.per_micro` captions.
    `args`: resolved L.Args."""
    dev = next(bb.model.parameters()).device
    paths = L.toy_paths()
    skips = D.Skips()
    pairs, images = L.read_pairs(paths["data"], paths["image_root"], skips)
    keys = sorted(images)[:n_images]

    # 2. target extraction throughput (a fresh cache, so the tower really runs)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = clock()
        L.extract_targets(bb, args, R.Dist(device=dev), {k: images[k] for k in keys}, Path(tmp))
        extract_s = clock() - t0
        cache = L.TargetCache(Path(tmp))
        cache.center = True

        # 1. step-time ratio on the same packed batch
        module = L.build_module(bb, args, cache.glob_mean.numel())
        batch_pairs = [p for p in pairs if p[1] in cache.index][: args.per_micro]
        samples = [L.encode_caption(bb, c, args.num_latents) for c, _ in batch_pairs]
        image_ids = torch.tensor([keys.index(k) for _, k in batch_pairs])
        groups = L.param_groups(module, args)
        opt = torch.optim.AdamW(groups, weight_decay=0.01)

        def latent_step():
            batch = C.pack(bb, samples, extra_keys=("caption_mask",))
            z_tok, z_glob = cache.get([k for _, k in batch_pairs])
            loss, _ = L.pretrain_loss(module, batch, z_tok, z_glob, image_ids, args, cache, dev)
            loss.backward()
            R.clip_grad_norm(module, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        def plain_step():
            batch = C.pack(bb, samples, extra_keys=("caption_mask",))
            with R.compute_context(args.dtype, dev):                    # as pretrain_loss's forward
                logits = bb.model(**C.model_inputs(batch, dev)).logits
            loss = C.next_token_loss(logits, batch["labels"].to(dev))
            loss.backward()
            R.clip_grad_norm(module, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for f in (latent_step, plain_step):  # warm-up
            f()
        times = {"latent": [], "plain": []}
        for _ in range(repeats):
            for name, f in (("plain", plain_step), ("latent", latent_step)):
                t0 = clock()
                f()
                times[name].append(clock() - t0)
    return {"times": times, "extract_s": extract_s, "images": len(keys), "captions": len(samples),
            "tokens": sum(len(s["input_ids"]) for s in samples)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--per-micro", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--n-images", type=int, default=32)
    cli = ap.parse_args()
    torch.manual_seed(0)
    args = L.resolve(L.Args(per_micro=cli.per_micro, image_size=cli.image_size))   # the toy preset
    m = measure(C.load_backbone("toy"), args, cli.repeats, cli.n_images)
    times, extract_s = m["times"], m["extract_s"]
    lat, plain = statistics.median(times["latent"]), statistics.median(times["plain"])
    ratios = [a / b for a, b in zip(times["latent"], times["plain"])]
    print(f"batch: {m['captions']} captions, {m['tokens']} tokens packed in one row, K={args.num_latents}")
    print(f"step time (median of {cli.repeats}, interleaved): latent-pretrain {lat * 1e3:.1f} ms, "
          f"plain caption-LM {plain * 1e3:.1f} ms, ratio {lat / plain:.3f} (median of per-pair ratios "
          f"{statistics.median(ratios):.3f}; target <= 1.15)")
    print(f"target extraction: {m['images']} images at {cli.image_size}x{cli.image_size} in {extract_s:.2f} s = "
          f"{m['images'] / extract_s:.1f} images/s (decode + resize + tower + merger + pooling + fp16 write)")


if __name__ == "__main__":
    main()
