"""Start-up time and host memory of the data pipeline against data-set size, and the useful-compute fraction of
micro-batches across 8 simulated ranks (issue 15).

    python bench/bench_startup.py [--sizes 1000,10000,100000] [--eager-sizes 16,48] [--workers 2] [--ranks 2]

Start-up: N synthetic LVR / Visual-CoT records (one question, one answer, one bbox) pointing at four real image files
(1000×800 JPEG and PNG, 1600×1200 and 640×480 JPEG, written once), encoded for sft.py at LVR's pixel budget
(128·28² to 5120·28²) with the real Qwen2.5-VL tokenizer (random:qwen2.5-vl-3b on the meta device, no weights).
Each N runs in its own process and reports the time from "backbone ready" to "first micro-batch in hand" (read the
records, the lengths pass, plan the order, encode and pack one micro-batch) and its peak RSS (ru_maxrss). `eager` is
the old path (build_dataset: every sample encoded with its fp32 pixel_values, held in RAM), run only at small N; its
100k row is a linear extrapolation and says so. `lazy` is the pipeline of sft.py, pearl.py and latent_pretrain.py
(LazySamples + Loader). Times depend on the machine and its load (the README's: 2 cores shared with other jobs).

Useful compute: on bench_packing.py's length mix (20,000 samples), 8 simulated ranks take global micro-batches
r, r+8, ... in lockstep (FSDP gathers every layer of every micro-batch, so each step waits for the longest row).
Useful fraction = Σ row tokens / Σ (8 × longest row of the lockstep), for `per_micro` 4 samples (today's default
batches) and for token-budget micro-batches (`--micro-tokens`). Tokens, not FLOPs: attention's L² term is left out.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common as C  # noqa: E402
import dataloader as D  # noqa: E402

IMAGES = [("a.jpg", (1000, 800)), ("b.png", (1000, 800)), ("c.jpg", (1600, 1200)), ("d.jpg", (640, 480))]


# ----------------------------------------------------------------------------------------------------------------
# Synthetic data: a few real image files, N records pointing at them
# ----------------------------------------------------------------------------------------------------------------
def write_images(folder: str):
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(0)
    for name, (w, h) in IMAGES:
        if os.path.exists(os.path.join(folder, name)):
            continue
        yy, xx = np.mgrid[0:h, 0:w]                                   # a photo-like mix: gradients, shapes, grain
        base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], -1).astype(np.int16)
        im = Image.fromarray(np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(30):
            x, y, r = rng.integers(0, w), rng.integers(0, h), rng.integers(10, 120)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        im.save(os.path.join(folder, name), **({"quality": 90} if name.endswith(".jpg") else {}))


def write_records(folder: str, n: int) -> str:
    path = os.path.join(folder, f"records_{n}.jsonl")
    if os.path.exists(path):
        return path
    rng = np.random.default_rng(n)
    words = "what is the colour of the small shape near left right corner top bottom circle square".split()
    with open(path + ".tmp", "w") as f:
        for i in range(n):
            question = " ".join(rng.choice(words, int(rng.integers(6, 40))))
            f.write(json.dumps({"id": i, "image": [IMAGES[i % len(IMAGES)][0]], "bboxes": [[0.1, 0.2, 0.4, 0.6]],
                                "conversations": [{"from": "human", "value": f"<image>\n{question}?"},
                                                  {"from": "gpt", "value": "<lvr>\n<answer> B </answer>"}]}) + "\n")
    os.replace(path + ".tmp", path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# One measurement (a child process): backbone, then data → first micro-batch
# ----------------------------------------------------------------------------------------------------------------
def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def cpu_seconds() -> float:
    """This process and its exited children (the DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(mode: str, path: str, workers: int) -> dict:
    import runtime as R
    import sft
    d = R.init_distributed("cpu")
    bb = C.load_backbone("random:qwen2.5-vl-3b", num_layers=1, device="meta")
    args = sft.Args(data=path, image_root=os.path.dirname(path), data_workers=workers)   # LVR's pixel budget
    before, t0, cpu0 = rss_mib(), time.perf_counter(), cpu_seconds()
    skips = D.Skips()
    if mode == "eager":
        convert = lambda rec: C.encode_chat(bb, sft.to_chat(rec, args.image_root),  # noqa: E731
                                            min_pixels=args.min_pixels, max_pixels=args.max_pixels)
        data = D.build_dataset(D.read_records(path, skips), convert, skips, args.max_tokens, "sft")
        order = D.MicroBatches([len(s["input_ids"]) for s in data], per_micro=args.per_micro, seed=0)
        first = C.pack(bb, [data[j] for j in order.next(d.rank, d.world)[0]])
        t_lengths, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    else:
        data = sft.load_data(bb, args, skips)                          # its workers have exited: their CPU counts
        t_lengths, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        order = D.MicroBatches(data.lengths, per_micro=args.per_micro, seed=0)
        loader = D.Loader(data, order, skips, d.rank, d.world, lambda s: C.pack(bb, s), workers)
        first = loader.next(1)[0]
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if workers else 0.0
    assert first["input_ids"].shape[1] > 0 and not skips.counts, skips.summary()
    return dict(mode=mode, n=len(data), workers=workers, ranks=d.world, seconds=seconds, lengths_seconds=t_lengths,
                cpu_seconds=cpu, rss_before_mib=before, peak_rss_mib=peak, worker_peak_rss_mib=worker_peak,
                pixels_mib=sum(s["pixel_values"].nbytes for s in data) / 2 ** 20 if mode == "eager" else 0.0)


def run_child(mode: str, path: str, workers: int, ranks: int) -> dict:
    launch = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                  str(ranks), "--master_port", str(29500 + os.getpid() % 1000)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    out = subprocess.run(launch + [__file__, "--child", mode, path, str(workers)], env=env, capture_output=True,
                         text=True)
    rows = [json.loads(line[6:]) for line in out.stdout.splitlines() if line.startswith("RESULT")]
    if out.returncode or not rows:
        raise SystemExit(f"child {mode} {path} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return rows[0]


# ----------------------------------------------------------------------------------------------------------------
# Useful compute across 8 simulated ranks
# ----------------------------------------------------------------------------------------------------------------
def useful_fraction(lengths: list[int], world: int = 8, **batches) -> tuple[float, int, int, float]:
    """(Σ tokens / Σ world·max, shortest row, longest row, mean row) over one epoch's lockstep micro-batches."""
    order = D.MicroBatches(lengths, seed=0, **batches)
    rows = [sum(lengths[i] for i in idx) for idx in order.micro]
    steps = [rows[i:i + world] for i in range(0, len(rows) - world + 1, world)]
    useful = sum(sum(s) for s in steps) / sum(world * max(s) for s in steps)
    flat = [r for s in steps for r in s]
    return useful, min(flat), max(flat), float(np.mean(flat))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,100000", help="records for the lazy path")
    ap.add_argument("--eager-sizes", default="16,48", help="records for the eager path (its pixels sit in RAM)")
    ap.add_argument("--workers", type=int, default=2, help="also time the largest size with this many workers")
    ap.add_argument("--ranks", type=int, default=0, help="also time the largest size under torchrun with N ranks")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "bench_startup"), help="data folder")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        row = measure(a.child[0], a.child[1], int(a.child[2]))
        if C._rank() == 0:
            print("RESULT" + json.dumps(row), flush=True)
        return
    os.makedirs(a.dir, exist_ok=True)
    write_images(a.dir)
    eager_sizes, sizes = [int(n) for n in a.eager_sizes.split(",") if n], [int(n) for n in a.sizes.split(",")]
    runs = [("eager", n, 0, 1) for n in eager_sizes] + [("lazy", n, 0, 1) for n in sizes]
    runs += [("lazy", sizes[-1], a.workers, 1)] * bool(a.workers) + [("lazy", sizes[-1], 0, a.ranks)] * bool(a.ranks)
    rows = [run_child(mode, write_records(a.dir, n), w, r) for mode, n, w, r in runs]

    print("\n| path | records | ranks × workers | to first micro-batch | of which records + lengths pass | "
          "CPU per record: encode (eager), lengths pass (lazy; rank 0 + its workers) | RSS before data | "
          "peak RSS (rank 0; a worker) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        built = "—" if r["mode"] == "eager" else f"{r['lengths_seconds']:.2f} s"
        worker = f"; {r['worker_peak_rss_mib']:.0f} MiB" if r["workers"] else ""
        print(f"| {r['mode']} | {r['n']:,} | {r['ranks']} × {r['workers']} | {r['seconds']:.2f} s | {built} | "
              f"{r['cpu_seconds'] / r['n'] * 1e3:.3f} ms | {r['rss_before_mib']:.0f} MiB | "
              f"{r['peak_rss_mib']:.0f} MiB{worker} |")
    if eager_sizes:
        big = max((r for r in rows if r["mode"] == "eager"), key=lambda r: r["n"])
        n, per = sizes[-1], {k: big[k] / big["n"] for k in ("seconds", "cpu_seconds", "pixels_mib")}
        grow = (big["peak_rss_mib"] - big["rss_before_mib"]) / big["n"]
        print(f"| eager, extrapolated ×{n // big['n']:,} from {big['n']} (not run) | {n:,} | 1 × 0 | "
              f"{per['seconds'] * n / 3600:.1f} h | — | {per['cpu_seconds'] * 1e3:.1f} ms | — | "
              f"{grow * n / 2 ** 20:.2f} TiB above the start ({per['pixels_mib']:.1f} MiB of fp32 pixels a sample) |")

    from bench_packing import visual_cot_like_lengths
    lengths = visual_cot_like_lengths(20000)
    print("\nUseful compute across 8 ranks in lockstep (bench_packing.py's length mix, 20,000 samples, one epoch):\n")
    print("| micro-batches | rows: shortest – longest (mean) tokens | useful fraction |")
    print("|---|---|---|")
    for label, kw in (("per_micro 4 samples", dict(per_micro=4)), ("per_micro 8 samples", dict(per_micro=8)),
                      ("--micro-tokens 8192", dict(token_budget=8192)),
                      ("--micro-tokens 16384", dict(token_budget=16384))):
        useful, lo, hi, mean = useful_fraction(lengths, **kw)
        print(f"| {label} | {lo:,} – {hi:,} ({mean:,.0f}) | {useful:.3f} |")


if __name__ == "__main__":
    main()
