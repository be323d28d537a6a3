"""Every performance measurement side by side in one run: one table of ratios, the median and the spread over repeats.

    python bench/run_all.py                                             # CPU toy, 5 repeats
    python bench/run_all.py --quick                                     # 1 repeat, smallest sizes: does every row run?
    python bench/run_all.py --model random:qwen2.5-vl-3b --num-layers 2 # real widths on a CPU, the toy's images
    python bench/run_all.py --model Qwen/Qwen2.5-VL-3B-Instruct --device cuda --out results/bench/run_all_3b.json

The rows reuse the measurement functions of bench/bench_*.py (each still runs alone, with more detail); eval items/s
is timed here, through eval.evaluate. A repeat is one interleaved round (the method's step, then SFT's step on the
same samples; ULR, then plain generation on the same prompt; ...) after a warm-up round, and a row's number is the
median of its per-repeat ratios, with their min-max: a ratio of two short times swings from run to run (LVR's cached
decoding at 2k tokens went from 7.7x to 30.7x on an idle machine), so the spread belongs to the number. Packing is
arithmetic (one repeat); the loss memory runs each loss in its own process (peak RSS is per process) at the real
Qwen2.5-VL-3B widths and vocabulary for --model toy, once by default (`--memory-repeats`): a high-water mark, not a
time; --quick skips it.

stdout is the table only (the methods' own output goes to stderr). A row that fails shows "error: <one line>" and the
others still run; the exit status is 1 only when no row produced a number. --out: JSON with every raw timing and the
provenance (date, machine, torch / transformers versions, git commit, arguments).
"""
import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_lean_loss import LOSSES  # noqa: E402  (stdlib only at import: the test reads the rows cheaply)


# ----------------------------------------------------------------------------------------------------------------
# The rows: key, measurement that produces it, what is measured, what the number means
# ----------------------------------------------------------------------------------------------------------------
ROWS = [
    ("packing", "packing", "packing efficiency, Visual-CoT-like mix, 16k-token rows",
     "real / computed tokens of the packed rows (1 = no padding); arithmetic, no timing"),
    ("padding", "packing", "padded batches of 8 (the baseline packing replaces)",
     "real / computed tokens when each batch pads to its longest sample"),
    ("pearl", "pearl", "Pearl step / SFT step (pearl_loss λ = 0), same examples",
     "forward + backward + AdamW step; > 1 = Pearl's extra views cost this much (target ≤ 1.8)"),
    ("pearl_naive", "pearl", "Pearl step, released layout / SFT step",
     "views stacked and padded, images re-encoded per view, as released"),
    ("lvr", "lvr", "LVR SFT step / sft.py step, same records",
     "ROI span teacher-forced + L_lvr vs plain CE without the span (target ≤ 1.15)"),
    ("latent_pretrain", "latent_pretrain", "latent_pretrain step / plain caption-LM step, same batch",
     "L_NTP + L_inst + L_batch from cached targets vs L_NTP only (target ≤ 1.15)"),
    ("decode_step_512", "decode", "LVR latent decoding, recompute / cached, per latent step, ~512-token prompt",
     "(t(36 steps) − t(4 steps)) / 32 without the KV cache over the same with it; > 1 = the cache saves"),
    ("decode_call_512", "decode", "LVR latent decoding, recompute / cached, whole call, ~512-token prompt",
     "one latent_generate call with 36 latent steps, prefill included"),
    ("decode_step_2048", "decode", "LVR latent decoding, recompute / cached, per latent step, ~2048-token prompt",
     "as above; should grow with the prompt (the cached step is ~independent of it)"),
    ("decode_call_2048", "decode", "LVR latent decoding, recompute / cached, whole call, ~2048-token prompt",
     "as above, whole call"),
    ("ulr", "ulr", "ULR / plain generation, per sample (slots mode, 5 + 15 steps)",
     "whole ULR (prefill + relevance, Stage I, Stage II, answer) over model.generate, same prompt and new tokens"),
    ("eval", "eval", "eval.py items/s (V*, plain greedy, batch 8)",
     "items per second end to end: encode, generate, score, write (a rate, not a ratio)"),
] + [(f"memory_{mode}", "memory", f"loss memory, plain / {mode}, one row at 1 % supervised",
      f"step memory (peak above resident) of the full-logits loss over {mode}'s; > 1 = {mode} saves")
     for mode in LOSSES if mode != "plain"]       # a new entry in bench_lean_loss.LOSSES adds its row here

# sizes: (full run, --quick)
SIZES = dict(packing_n=(20000, 2000), pearl_examples=(4, 2), lvr_batch=(8, 2), decode_prompts=((512, 2048), (512,)),
             pretrain_captions=(32, 8), pretrain_images=(32, 8), pretrain_image_size=(448, 224), ulr_items=(4, 1),
             ulr_new_tokens=(32, 8), eval_items=(16, 4), memory_tokens=(4096, None))


class Skip(Exception):
    """A row not measured in this run, with the reason shown in its cell."""


# ----------------------------------------------------------------------------------------------------------------
# Shared set-up: the backbone, the clock, ratios per repeat
# ----------------------------------------------------------------------------------------------------------------
def backbone(cfg, dtype=None, **kw):
    """--model on --device, cut to --num-layers decoder layers (random: models), seeded."""
    import torch

    import common as C
    torch.manual_seed(0)
    return C.load_backbone(cfg.model, cfg.device, dtype=dtype, num_layers=cfg.num_layers, **kw)


def images(cfg) -> dict:
    """The image budget of every row: a random: model keeps the toy presets' (16-64 x 28² px; the targets of
    latent_pretrain at 224 px): the widths are real, and its 32-block vision tower at the recipes' budgets does not
    fit a CPU step in 24 GB. The toy and checkpoints keep each file's own."""
    return dict(min_pixels=16 * 28 * 28, max_pixels=64 * 28 * 28) if cfg.model.startswith("random:") else {}


def clock_for(device):
    """time.perf_counter, after waiting for the GPU's queued work on CUDA (else a step would time its launches)."""
    import torch
    if torch.device(device).type != "cuda":
        return time.perf_counter

    def clock():
        torch.cuda.synchronize()
        return time.perf_counter()
    return clock


def ratios(times: dict, num: str, den: str) -> list[float]:
    """Per-repeat ratio of two interleaved timing lists."""
    return [a / b for a, b in zip(times[num], times[den])]


def toy_file(name: str) -> str:
    from toy_world import ensure_toy_world
    return str(ensure_toy_world(str(ROOT / "data/toy"), seed=0) / name)


# ----------------------------------------------------------------------------------------------------------------
# Measurements: each returns ({row key: per-repeat values | Skip}, raw) for its rows in ROWS
# ----------------------------------------------------------------------------------------------------------------
def packing(cfg):
    from bench import bench_packing
    m = bench_packing.measure(n=cfg.size("packing_n"))
    return {"packing": [m["packed"]], "padding": [m["padded"]]}, m


def pearl(cfg):
    import torch

    import pearl as P
    import runtime as R
    from bench import bench_pearl
    args = P.resolve(P.Args(model=cfg.model, data=toy_file("lvr_train.json"), max_examples=cfg.size("pearl_examples"),
                            **images(cfg)))
    dtype = torch.float32 if args.lora_r == 0 else R.compute_dtype(args.dtype, cfg.device)   # as pearl.py loads
    m = bench_pearl.measure(backbone(cfg, dtype), args, cfg.repeats, naive=not cfg.quick)
    values = {"pearl": ratios(m["times"], "pearl", "sft"),
              "pearl_naive": ratios(m["times"], "pearl_naive", "sft") if not cfg.quick else Skip("--quick")}
    return values, m


def lvr_sft(cfg):
    import torch

    import lvr
    from bench import bench_lvr
    args = lvr.resolve(lvr.Args(model=cfg.model, data=toy_file("lvr_train.json"), **images(cfg)))
    bb = backbone(cfg, torch.float32)                           # fp32 master weights, as lvr.py and sft.py load
    lvr.prepare_model(bb, args.lvr_head)
    m = bench_lvr.sft_times(bb, args, cfg.repeats, cfg.size("lvr_batch"))
    return {"lvr": ratios(m["times"], "lvr", "plain")}, m


def latent_pretrain(cfg):
    import torch

    import latent_pretrain as L
    from bench import bench_latent_pretrain
    given = dict(model=cfg.model, per_micro=cfg.size("pretrain_captions"),
                 image_size=224 if images(cfg) else cfg.size("pretrain_image_size"))
    args = L.resolve(L.Args(**given), explicit=set(given))             # the toy preset on the other fields
    m = bench_latent_pretrain.measure(backbone(cfg, torch.float32), args, cfg.repeats, cfg.size("pretrain_images"))
    return {"latent_pretrain": ratios(m["times"], "latent", "plain")}, m


def decode(cfg):
    import lvr
    from bench import bench_lvr
    bb = backbone(cfg)                                          # inference weights (bf16 on CUDA), as eval loads
    lvr.prepare_model(bb)
    bb.model.eval()
    sizes = cfg.size("decode_prompts")
    runs = bench_lvr.decode_times(bb, cfg.repeats, sizes)
    values = {}
    for n in (512, 2048):
        if n not in sizes:
            values[f"decode_step_{n}"] = values[f"decode_call_{n}"] = Skip("--quick")
            continue
        m = runs[sizes.index(n)]
        per = {c: [(a - b) / 32 for a, b in zip(m[f"{c}_36"], m[f"{c}_4"])] for c in ("cached", "recompute")}
        values[f"decode_step_{n}"] = ratios(per, "recompute", "cached")
        values[f"decode_call_{n}"] = ratios(m, "recompute_36", "cached_36")
    return values, runs


def ulr(cfg):
    import torch

    import eval as E
    import lvr
    import unsilence as U
    from bench import bench_unsilence
    args = U.resolve(U.Args(model=cfg.model, **images(cfg)))
    bb = backbone(cfg, getattr(torch, args.dtype), attn_implementation="eager" if args.attn == "eager" else None)
    lvr.prepare_model(bb)                                       # the LVR tokens, as unsilence.load_latent_model
    bb.model.eval().requires_grad_(False)
    items = E.load_benchmark("vstar", "", U.eval_args("vstar", args))[0][:cfg.size("ulr_items")]
    times = bench_unsilence.measure(bb, args, items, cfg.repeats, cfg.size("ulr_new_tokens"),
                                    names=("plain generation", "ULR, this file"))
    per_repeat = {k: [sum(sum(split) for split in v[i:i + len(items)]) for i in range(0, len(v), len(items))]
                  for k, v in times.items()}                   # one repeat = every item once
    return {"ulr": ratios(per_repeat, "ULR, this file", "plain generation")}, times


def eval_rate(cfg):
    import eval as E
    bb = backbone(cfg)
    n, rate, clock = cfg.size("eval_items"), [], clock_for(cfg.device)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(cfg.repeats + 1):                        # round 0 warms up
            ea = E.Args(benchmark="vstar", model=cfg.model, limit=n, output=f"{tmp}/vstar_{r}.json", **images(cfg))
            t0 = clock()
            E.evaluate(ea, backbone=bb)                         # a fresh predictions file: every item predicted
            rate.append(n / (clock() - t0))
    return {"eval": rate[1:]}, {"items": n, "items_per_s": rate}


def memory(cfg):
    """Each loss in its own process (bench_lean_loss.py --one): peak memory is per process."""
    if cfg.quick:                 # two fresh processes (~10 s of imports each) would double --quick's time
        raise Skip("--quick: one process per loss")
    model = "random:qwen2.5-vl-3b" if cfg.model == "toy" else cfg.model    # the saving needs a real vocabulary
    layers, tokens = cfg.num_layers or 2, cfg.size("memory_tokens")
    runs = {mode: [] for mode in LOSSES}
    for _ in range(cfg.memory_repeats):
        for mode in LOSSES:
            out = subprocess.run([sys.executable, str(ROOT / "bench/bench_lean_loss.py"), "--one",
                                  f"{mode}:{tokens}:0.01", "--layers", str(layers), "--model", model,
                                  "--device", cfg.device], capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                raise RuntimeError(f"bench_lean_loss.py --one {mode}: " + last_line(out.stderr))
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    step = {mode: [r["step_gb"] for r in v] for mode, v in runs.items()}
    values = {f"memory_{mode}": ratios(step, "plain", mode) for mode in LOSSES if mode != "plain"}
    return values, {"model": model, "layers": layers, "tokens": tokens, "runs": runs}


MEASUREMENTS = {"packing": packing, "pearl": pearl, "lvr": lvr_sft, "latent_pretrain": latent_pretrain,
                "decode": decode, "ulr": ulr, "eval": eval_rate, "memory": memory}


# ----------------------------------------------------------------------------------------------------------------
# Running the rows, one table
# ----------------------------------------------------------------------------------------------------------------
def last_line(text: str) -> str:
    lines = [x.strip() for x in str(text).strip().splitlines() if x.strip()]
    return lines[-1][:200] if lines else "(no message)"


def run_rows(cfg, measurements: dict) -> tuple[list[dict], dict]:
    """Every row of ROWS, each measurement once; a measurement that raises marks its rows error (one line) and the
    others still run. Returns (rows, raw by measurement)."""
    rows, raw = [], {}
    for name, measure in measurements.items():
        keys = [r for r in ROWS if r[1] == name]
        if not keys:
            continue
        t0 = time.perf_counter()
        print(f"run_all: {name} ...", file=sys.stderr, flush=True)
        try:
            with contextlib.redirect_stdout(sys.stderr):        # stdout carries the table only
                values, raw[name] = measure(cfg)
            error = None
        except Skip as e:                                       # the whole measurement left out, said why
            values, error = {key: e for key, *_ in keys}, None
        except Exception as e:  # noqa: BLE001  (any failure is that row's cell, never the whole run's)
            traceback.print_exc(file=sys.stderr)
            values, error = {}, f"{type(e).__name__}: {last_line(e)}"
        gc.collect()
        seconds = time.perf_counter() - t0
        for key, _, label, meaning in keys:
            v = values.get(key, Skip("not measured")) if error is None else None
            row = {"key": key, "measurement": name, "label": label, "meaning": meaning, "seconds": round(seconds, 1)}
            if error is not None:
                row.update(status="error", error=error)
            elif isinstance(v, Skip):
                row.update(status="skipped", reason=str(v))
            else:
                row.update(status="ok", values=v, median=statistics.median(v), min=min(v), max=max(v), repeats=len(v))
            rows.append(row)
    order = {r[0]: i for i, r in enumerate(ROWS)}
    return sorted(rows, key=lambda r: order[r["key"]]), raw


def fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def table(rows: list[dict]) -> str:
    out = ["| measurement | ratio (median) | spread (min–max) | repeats | what the ratio means |", "|---|---|---|---|---|"]
    for r in rows:
        if r["status"] == "ok":
            cells = [fmt(r["median"]), f"{fmt(r['min'])}–{fmt(r['max'])}" if r["repeats"] > 1 else "(one run)",
                     str(r["repeats"])]
        elif r["status"] == "skipped":
            cells = [f"skipped ({r['reason']})", "", "0"]
        else:
            cells = [f"error: {r['error']}".replace("|", "/"), "", "0"]
        out.append(f"| {r['label']} | " + " | ".join(cells) + f" | {r['meaning']} |")
    return "\n".join(out)


def provenance(cfg) -> dict:
    import torch
    import transformers

    def git(*a):
        r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    device = torch.cuda.get_device_name() if cfg.device == "cuda" and torch.cuda.is_available() else None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": device},
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "args": {k: v for k, v in vars(cfg).items() if k != "size"}, "images": images(cfg) or "each file's own",
            "argv": sys.argv}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 repeat, smallest sizes, no memory rows (for the tests)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats per row (default 5; --quick 1)")
    p.add_argument("--memory-repeats", type=int, default=1, help="processes per loss for the memory rows")
    p.add_argument("--model", default="toy", help="toy | random:qwen2.5-vl-3b | random:qwen2.5-vl-7b | a checkpoint")
    p.add_argument("--num-layers", type=int, default=None, help="random: models: keep the first k decoder layers")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--only", default="", help=f"comma-separated measurements (default all): {', '.join(MEASUREMENTS)}")
    p.add_argument("--out", default="results/bench/run_all.json", help="JSON: raw timings and provenance")
    cfg = p.parse_args(argv)
    cfg.repeats = cfg.repeats or (1 if cfg.quick else 5)
    cfg.size = lambda k: SIZES[k][cfg.quick]
    unknown = set(filter(None, cfg.only.split(","))) - set(MEASUREMENTS)
    if unknown:
        p.error(f"--only: unknown {sorted(unknown)}; choose from {', '.join(MEASUREMENTS)}")
    return cfg


def main(argv=None) -> int:
    cfg = parse_args(argv)
    os.chdir(ROOT)                                              # the toy world and the methods' relative paths
    import torch
    torch.manual_seed(0)
    from bench import bench_latent_pretrain, bench_lvr, bench_pearl, bench_unsilence
    for module in (bench_pearl, bench_lvr, bench_latent_pretrain, bench_unsilence):
        module.clock = clock_for(cfg.device)
    chosen = [m for m in cfg.only.split(",") if m] or list(MEASUREMENTS)
    rows, raw = run_rows(cfg, {k: f for k, f in MEASUREMENTS.items() if k in chosen})
    print(table(rows))
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"provenance": provenance(cfg), "rows": rows, "raw": raw}, indent=1, default=str))
    print(f"run_all: wrote {out}", file=sys.stderr)
    return exit_status(rows)


def exit_status(rows: list[dict]) -> int:
    """0 when at least one row has a number: a failed row is reported in its cell, not by the exit status."""
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
