"""Is the toy task learnable on a CPU in minutes, and does a crop genuinely help? (toy_world.py's design claims)

Plain SFT of the random-init toy backbone (full fine-tuning, the real Qwen2.5-VL classes) on the toy world's colour
questions, in two conditions that differ only in the image the model sees:
  full   the whole scene (what a plain VLM sees)
  crop   the oracle crop: the target's bbox with the LVR records' margin (what a zoom-in tool call returns)
Training and held-out scenes come from toy_world.make_scene on their own RNG streams (not the files' streams), at the
scripts' toy pixel budget (16-64 merged tokens). Accuracy = argmax over the four option letters at the answer
position, on held-out scenes, overall and per target-size band. Chance is 25 %.

    python bench/bench_toy_learnability.py                       # both conditions, 2000 steps each (~6 min, 2 cores)
    python bench/bench_toy_learnability.py --conditions full --steps 3000
"""
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import runtime as R  # noqa: E402
import toy_world as T  # noqa: E402


@dataclass
class Args:
    conditions: str = field(default="full,crop", metadata={"help": "comma list of full | crop"})
    steps: int = field(default=2000, metadata={"help": "optimizer steps per condition"})
    per_micro: int = field(default=8, metadata={"help": "samples per step"})
    lr: float = field(default=2e-3, metadata={"help": "peak lr (20 warmup steps, then cosine)"})
    n_train: int = field(default=2000, metadata={"help": "training scenes"})
    n_eval: int = field(default=300, metadata={"help": "held-out scenes"})
    eval_every: int = field(default=250, metadata={"help": "evaluate every N steps"})
    min_pixels: int = field(default=16 * 28 * 28, metadata={"help": "image budget, min (the scripts' toy value)"})
    max_pixels: int = field(default=64 * 28 * 28, metadata={"help": "image budget, max (the scripts' toy value)"})
    seed: int = field(default=0, metadata={"help": "seed of scenes, init and data order"})


def make_items(bb, args: Args, stream: int, n: int, crop: bool) -> list[dict]:
    """n colour questions as encoded chats; `side` = the target's side in px (for the per-band breakdown)."""
    rng, items = np.random.default_rng([args.seed, stream]), []
    for _ in range(n):
        image, objects = T.make_scene(rng)
        q = T._colour_question(objects)
        if crop:
            x0, y0, x1, y1 = T.normalised_bbox(objects[0]["bbox"], image.size)
            image = image.crop((round(x0 * image.width), round(y0 * image.height),
                                round(x1 * image.width), round(y1 * image.height)))
        chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": T._mc_prompt(q)}]},
                {"role": "assistant", "content": T.LETTERS[q["answer"]]}]
        s = C.encode_chat(bb, chat, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
        items.append({**s, "answer": q["answer"], "side": objects[0]["bbox"][2] - objects[0]["bbox"][0]})
    return items


@torch.no_grad()
def accuracy(bb, items: list[dict], letter_ids: list[int]) -> dict:
    """Held-out accuracy: the answer letter is the first supervised token; compare the four letters' logits there."""
    bb.model.eval()
    hits, sides = [], []
    for i in range(0, len(items), 32):
        chunk = items[i:i + 32]
        logits = bb.model(**C.model_inputs(C.pack(bb, chunk), "cpu")).logits[0]
        offset = 0
        for s in chunk:
            first = int((s["labels"] != C.IGNORE).nonzero()[0])
            hits.append(int(logits[offset + first - 1, letter_ids].argmax()) == s["answer"])
            sides.append(s["side"])
            offset += len(s["input_ids"])
    bb.model.train()
    hits, sides = np.array(hits), np.array(sides)
    out = {"all": hits.mean()}
    for lo, hi in ((24, 32), (32, 41)):  # under ~1 token (28 px) / one or more
        band = (sides >= lo) & (sides < hi)
        out[f"{lo}-{hi - 1}px"] = hits[band].mean() if band.any() else float("nan")
    return out


def run(args: Args, condition: str) -> list[tuple]:
    R.seed_everything(args.seed)
    bb = C.load_backbone("toy", seed=args.seed)
    crop = condition == "crop"
    train, held_out = make_items(bb, args, 201, args.n_train, crop), make_items(bb, args, 202, args.n_eval, crop)
    letter_ids = [bb.tokenizer.encode(x, add_special_tokens=False)[0] for x in T.LETTERS]
    opt = torch.optim.AdamW(bb.model.parameters(), lr=args.lr, weight_decay=0.0)
    rng, rows, t0 = np.random.default_rng(args.seed), [], time.perf_counter()
    tokens = np.mean([len(s["input_ids"]) for s in train])
    print(f"[{condition}] {len(train)} training scenes, {tokens:.0f} tokens/sample on average")
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = R.cosine_lr(step, args.steps, args.lr, 20 / args.steps)
        batch = C.pack(bb, [train[j] for j in rng.choice(len(train), args.per_micro, replace=False)])
        loss = C.next_token_loss(bb.model(**C.model_inputs(batch, "cpu")).logits, batch["labels"])
        R.check_finite(loss, step, {})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bb.model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            acc = accuracy(bb, held_out, letter_ids)
            rows.append((condition, step, loss.item(), acc, time.perf_counter() - t0))
            print(f"[{condition}] step {step:5d}  loss {loss.item():.3f}  held-out acc " +
                  "  ".join(f"{k} {100 * v:5.1f}" for k, v in acc.items()) + f"  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    return rows


def main():
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses()
    rows = [r for c in args.conditions.split(",") for r in run(args, c.strip())]
    print("\n| condition | step | held-out acc (%) | 24-31 px | 32-40 px | wall time (s) |\n|---|---|---|---|---|---|")
    for condition, step, _, acc, secs in rows:
        print(f"| {condition} | {step} | {100 * acc['all']:.1f} | {100 * acc['24-31px']:.1f} | "
              f"{100 * acc['32-40px']:.1f} | {secs:.0f} |")
    print("chance: 25.0")


if __name__ == "__main__":
    main()
