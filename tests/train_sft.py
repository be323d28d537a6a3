"""Plain SFT on synthetic chats: the smallest training loop built from common.py's pieces. The infrastructure tests
run it under `python` and `torchrun` (2-process vs 1-process losses, kill-and-resume, export); the method files
duplicate this loop and add their losses.

    python tests/train_sft.py --run-dir runs/sft --steps 6 [--grad-accum 2] [--pack true] [--resume true]
    torchrun --nproc_per_node 2 tests/train_sft.py --run-dir runs/sft2 --steps 6
"""
import json
import os
import sys
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402


@dataclass
class Args:
    run_dir: str = field(default="runs/sft", metadata={"help": "output directory"})
    model: str = field(default="toy", metadata={"help": "toy | toy-qwen3vl | hub id | local dir"})
    steps: int = field(default=6, metadata={"help": "optimizer steps"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per rank per step"})
    per_micro: int = field(default=2, metadata={"help": "samples per micro-batch"})
    pack: bool = field(default=True, metadata={"help": "padding-free packing (else padded)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = never)"})
    stop_after: int = field(default=0, metadata={"help": "exit after this step, simulating a kill (0 = never)"})
    resume: bool = field(default=False, metadata={"help": "resume from the latest checkpoint in run_dir"})
    export: bool = field(default=False, metadata={"help": "write an HF export to run_dir/export"})
    n_samples: int = field(default=24, metadata={"help": "synthetic samples"})


def synthetic_chats(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    colours = ["red", "green", "blue", "yellow"]
    out = []
    for i in range(n):
        c = int(torch.randint(4, (1,), generator=g))
        w, h = (int(v) for v in torch.randint(56, 160, (2,), generator=g))
        rgb = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)][c]
        out.append([{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (w, h), rgb)},
                                                 {"type": "text", "text": "What is the colour?" + " look" * (i % 5)}]},
                    {"role": "assistant", "content": colours[c]}])
    return out


def main(args: Args):
    d = C.init_distributed()
    C.seed_everything(0)
    bb = C.load_backbone(args.model, d.device, dtype=torch.float32)  # fp32 weights (shard_model checks)
    data = [C.encode_chat(bb, m, min_pixels=4 * 784, max_pixels=64 * 784) for m in synthetic_chats(args.n_samples)]
    sampler = C.MicroBatches([len(s["input_ids"]) for s in data], per_micro=args.per_micro, seed=0)
    model = C.shard_model(bb.model, d)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    start = 0
    if args.resume and (ckpt := C.latest_checkpoint(args.run_dir)):
        meta = C.load_checkpoint(ckpt, model, opt)
        start = meta["step"]
        sampler.load_state(meta["data"])
    elif args.resume:
        C.print0(f"--resume: no complete checkpoint in {args.run_dir}; training from step 0")
    log = C.RunLogger(args.run_dir, args.steps, d, start_step=start)
    model.train()
    for step in range(start, args.steps):
        for g in opt.param_groups:
            g["lr"] = C.cosine_lr(step, args.steps, args.lr, 0.1)
        micro = sampler.next(d.rank, d.world, args.grad_accum)
        total, tokens, flops = 0.0, 0, 0.0
        for i, idx in enumerate(micro):
            samples = [data[j] for j in idx]
            batch = C.pack(bb, samples) if args.pack else C.pad_batch(bb, samples)
            with C.grad_sync(model, i == len(micro) - 1):
                loss = C.next_token_loss(model(**C.model_inputs(batch, d.device)).logits, batch["labels"].to(d.device))
                C.check_finite(loss, step)
                (loss / len(micro)).backward()
            total += loss.item() / len(micro)
            tokens += int(batch["input_ids"].numel())
            flops += C.step_flops(bb.model, [len(s["input_ids"]) for s in samples])
        gnorm = C.clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.log(step + 1, {"loss": C.all_reduce_mean(total, d), "lr": opt.param_groups[0]["lr"], "grad_norm": gnorm},
                tokens, flops)
        if args.save_every and (step + 1) % args.save_every == 0:
            C.save_checkpoint(os.path.join(args.run_dir, f"checkpoint-{step + 1}"), model, opt, step + 1,
                              {"data": sampler.state()})
        if args.stop_after and step + 1 == args.stop_after:
            break
    log.close()
    if args.export:
        C.export_hf(bb, os.path.join(args.run_dir, "export"), model=model)
    if d.world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
