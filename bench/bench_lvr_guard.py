"""Which toy LVR settings make base + 60 LVR steps beat the base on toy V*? (issue 11's regression guard)

    OMP_NUM_THREADS=1 python bench/bench_lvr_guard.py --seeds 0 --configs "lr=3e-3" "lr=3e-3,lam_lvr=0"
    OMP_NUM_THREADS=1 python bench/bench_lvr_guard.py --seeds 0,1,2 --configs "lr=5e-3" --ablations zeros

Each config is lvr.py flags (name=value, comma-separated) on top of `--model data/toy/base --steps 60`; every run
is the real CLI (`python lvr.py ...`, then `python eval.py --mode latent ...` on all 400 toy V* items), once with
the model opening the span itself and once with `--latent-force-span`. Also printed: the share of V* prompts whose
greedy first token is `<|lvr_start|>`, the mean L_lvr of the first and last 10 steps, and the base's V* (plain
answer-tag protocol, as in toy_table.py). Results append to --out as JSON lines.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIX = ["--min-pixels", str(16 * 28 * 28), "--max-pixels", str(64 * 28 * 28)]


def sh(cmd, log):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "w") as f:
        subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, check=True)


def vstar(model, out: Path, *extra) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    sh(["eval.py", "--benchmark", "vstar", "--data-dir", "data/toy/eval/vstar", "--model", model, "--prompt",
        "answer-tag", "--output", str(out), "--overwrite", "--batch-size", "16", *PIX, *extra], out.with_suffix(".log"))
    s = json.loads(out.read_text())
    return {k: round(s[k], 2) for k in ("overall", "se", "chance", "unanswerable")}


def opens_span(export: str, n: int = 64) -> float:
    """Share of the first n V* prompts (eval.py's latent prompt) whose greedy first token is <|lvr_start|>."""
    import torch
    import common as C
    import eval as E
    bb = C.load_backbone(export, "cpu")
    ea = E.Args(benchmark="vstar", mode="latent", prompt="answer-tag", min_pixels=16 * 28 * 28,
                max_pixels=64 * 28 * 28)
    items = E.load_benchmark("vstar", str(ROOT / "data/toy/eval/vstar"), ea)[0][:n]
    with torch.no_grad():
        logits = bb.model(**C.model_inputs(C.pad_batch(bb, [E.encode_item(bb, it, ea) for it in items],
                                                       side="left"), "cpu")).logits[:, -1]
    return float((logits.argmax(-1) == bb.token_id("<|lvr_start|>")).float().mean())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["lr=1e-3"])
    p.add_argument("--seeds", default="0")
    p.add_argument("--ablations", default="", help="also evaluate these latent ablations (forced span, N 8)")
    p.add_argument("--work", default="/tmp/bench_lvr_guard")
    p.add_argument("--out", default="bench/bench_lvr_guard.jsonl")
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    work = Path(a.work)
    base = str(ROOT / "data/toy/base")
    print("base", vstar(base, work / "base/vstar.json"))
    for cfg in a.configs:
        flags = [f for kv in cfg.split(",") if kv for f in (f"--{kv.split('=')[0]}", kv.split("=")[1])]
        for seed in map(int, a.seeds.split(",")):
            d = work / f"{cfg.replace('=', '').replace(',', '_')}_s{seed}"
            t0 = time.perf_counter()
            sh(["lvr.py", "--model", base, "--steps", "60", "--seed", str(seed), *flags, "--run-dir", str(d),
                "--eval", "false"], d.with_suffix(".log"))
            train_s = time.perf_counter() - t0
            rows = [json.loads(l) for l in open(d / "metrics.jsonl")]
            m = lambda k, rs: round(sum(r[k] for r in rs) / len(rs), 3)   # noqa: E731
            lat = ["--mode", "latent", "--max-new-tokens", "32", "--latent-steps", "8"]
            res = dict(config=cfg, seed=seed, train_s=round(train_s, 1), opens_span=opens_span(str(d / "export")),
                       ce_first=m("loss_ce", rows[:10]), ce_last=m("loss_ce", rows[-10:]),
                       lvr_first=m("loss_lvr", rows[:10]), lvr_last=m("loss_lvr", rows[-10:]),
                       free=vstar(str(d / "export"), d / "ev/free.json", *lat),
                       forced=vstar(str(d / "export"), d / "ev/forced.json", *lat, "--latent-force-span"))
            for abl in [x for x in a.ablations.split(",") if x]:
                res[f"forced_{abl}"] = vstar(str(d / "export"), d / f"ev/forced_{abl}.json", *lat,
                                             "--latent-force-span", "--latent-ablation", abl)
            print(json.dumps(res))
            with open(ROOT / a.out, "a") as f:
                f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
