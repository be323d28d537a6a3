# Docs: docs/sft.md
"""Plain SFT: the "vanilla SFT" row of every table in these papers, and the loop every method file follows.

An image and a question in, the answer out; next-token cross-entropy on the answer tokens only. No latents, no
extra views, no auxiliary loss. Each method file (pearl.py, lvr.py, latent_pretrain.py) is this loop plus its
method: `diff sft.py lvr.py` shows the method.

Launch (the same file runs under python and torchrun; FSDP2 shards under torchrun):
    python sft.py                                                  # CPU toy: toy world, train, export, eval
    torchrun --nproc_per_node 8 sft.py --model Qwen/Qwen2.5-VL-7B-Instruct --data VisualCoT/lvr_train.json \\
        --image-root VisualCoT --run-dir runs/sft7b                # the LVR paper's SFT baseline (same data, budget)
    python eval.py --benchmark vstar --data-dir data/vstar_bench --model runs/sft7b/export --prompt answer-tag

Data: LVR / Visual-CoT JSON (the `<lvr>` marker and the bbox are dropped: the answer is learned from the whole
image) or canonical `{"messages": [...]}` chats with image paths.

Defaults are LVR stage 1's recipe (docs/lvr.md), so that this is the comparison the LVR paper draws: lr 1e-5, 2500
steps, 8 GPUs × 8 accumulation × 3 samples, images 128·28²–5120·28², activation checkpointing, AdamW wd 0.1, cosine
with 3 % warmup. On the toy backbone (or an export of it) TOY_PRESET replaces the fields not given on the command
line and is printed; run_config.json records what the run used.

| choice | default | flag | source |
|---|---|---|---|
| loss | mean CE over supervised tokens of the micro-batch | — | LVR's L_CE |
| batches | padding-free packing | `--no-pack` | engineering.md |
| micro-batch | `--per-micro` samples (as the papers count) | `--micro-tokens N`: equal work per rank | papers / repo |
| data | token counts at start-up (no pixels); samples encoded in DataLoader workers | `--data-workers` | this repo |
| precision | fp32 master weights, bf16 compute on CUDA | `--dtype` | this repo |
| vision tower | frozen (as LVR stage 1) | `--train-vision` | LVR released scripts |
"""
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

import common as C
import dataloader as D
import runtime as R


# ----------------------------------------------------------------------------------------------------------------
# Args
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Args:
    model: str = field(default="toy-base", metadata=R.MODEL_HELP)
    data: str = field(default="toy", metadata={"help": "LVR / Visual-CoT JSON or canonical messages (.json/.jsonl); "
                                                       "'toy' = the toy world's LVR records"})
    image_root: str = field(default="", metadata={"help": "folder image paths are relative to (default: data's)"})
    run_dir: str = field(default="runs/sft", metadata={"help": "output directory"})
    steps: int = field(default=2500, metadata={"help": "optimizer steps"})
    grad_accum: int = field(default=8, metadata={"help": "micro-batches per rank per step"})
    per_micro: int = field(default=3, metadata={"help": "samples per micro-batch (the papers give batch sizes in "
                                                        "samples; see --micro-tokens)"})
    micro_tokens: int = field(default=0, metadata=R.MICRO_TOKENS_HELP)
    data_workers: int = field(default=4, metadata=R.DATA_WORKERS_HELP)
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "linear warmup fraction, then cosine"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    min_pixels: int = field(default=128 * 28 * 28, metadata={"help": "image pixel budget, min (128 tokens)"})
    max_pixels: int = field(default=5120 * 28 * 28, metadata={"help": "image pixel budget, max (5120 tokens)"})
    max_tokens: int = field(default=16384, metadata={"help": "drop (count) samples longer than this"})
    pack: bool = field(default=True, metadata={"help": "padding-free packing (--no-pack: the padded baseline)"})
    train_vision: bool = field(default=False, metadata={"help": "also train the vision tower and merger"})
    activation_checkpointing: bool = field(default=True, metadata={"help": "recompute activations per block"})
    dtype: str = field(default="auto", metadata=R.DTYPE_HELP)
    seed: int = field(default=0, metadata={"help": "seed of data order and init"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = never)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "keep the newest N resume checkpoints (0 = all)"})
    resume: bool = field(default=False, metadata={"help": "resume from the latest checkpoint in run_dir"})
    stop_after: int = field(default=0, metadata={"help": "testing aid: exit after this step (0 = never)"})
    eval: str = field(default="", metadata={"help": "benchmarks of the eval sets next to --data to evaluate the "
                                                    "export on (toy: vstar,mmvp,blink; '' = none)"})
    eval_limit: int = field(default=0, metadata={"help": "items per benchmark (0 = all)"})


# A tiny model needs a large lr, small images and few steps to move in a CPU minute: applied (and printed) only when
# the model is the toy backbone or an export of it, and only to the fields not given on the command line.
TOY_PRESET = dict(lr=1e-3, steps=60, per_micro=8, grad_accum=1, min_pixels=16 * 28 * 28, max_pixels=64 * 28 * 28,
                  activation_checkpointing=False, train_vision=True, eval="vstar,mmvp,blink", data_workers=0)


def resolve(args: Args, explicit: set[str] | None = None) -> Args:
    if C.is_toy(args.model):
        R.apply_preset(args, TOY_PRESET, R.changed_fields(args) if explicit is None else explicit,
                       "toy preset", "model is the toy backbone")
    if args.data == "toy":
        from toy_world import ensure_toy_world
        args.data = str(Path(ensure_toy_world("data/toy", seed=0)) / "lvr_train.json")
    args.image_root = args.image_root or os.path.dirname(args.data)
    return R.check_args(args)


# ----------------------------------------------------------------------------------------------------------------
# Data: a published record → a chat (image + question → answer)
# ----------------------------------------------------------------------------------------------------------------
def to_chat(rec: dict, image_root: str) -> list[dict]:
    """LVR / Visual-CoT (`conversations`, one image; the `<lvr>` marker removed) or canonical `messages`."""
    if "messages" in rec:
        if not isinstance(rec["messages"], list):
            raise C.SkipSample("messages is not a list")
        out = []
        for m in rec["messages"]:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise C.SkipSample("malformed message")
            parts = m.get("content")
            if isinstance(parts, list):
                parts = [{**p, "image": D.open_image(p["image"], image_root)} if p.get("type") == "image" else p
                         for p in parts if isinstance(p, dict)]
            out.append({**m, "content": parts})
        return out
    question, answer, image = D.visual_cot(rec, image_root)
    answer = answer.replace("<lvr>\n", "").replace("<lvr>", "").strip()
    if not answer.replace("<answer>", "").replace("</answer>", "").strip():
        raise C.SkipSample("empty answer")
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer}]


def load_data(bb: C.Backbone, args: Args, skips: D.Skips) -> D.LazySamples:
    """Every sample's exact token count now (no pixels); the samples themselves when a micro-batch needs them."""
    convert = lambda rec: C.encode_chat(bb, to_chat(rec, args.image_root),  # noqa: E731
                                        min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    max_tokens = min(args.max_tokens, args.micro_tokens or args.max_tokens)      # a sample must fit its micro-batch
    return D.LazySamples(D.Records(args.data, skips), convert, skips, max_tokens, "sft", args.data_workers)


# ----------------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------------
def sft_loss(model, batch: dict, device) -> torch.Tensor:
    """L_CE: next-token cross-entropy over the supervised (answer) tokens of the micro-batch (packed, or padded)."""
    return C.lm_loss(model, batch, device)                       # the LM head only at the supervised positions


# ----------------------------------------------------------------------------------------------------------------
# Evaluation of the export (called at the end of main): eval.py's one seam, in process
# ----------------------------------------------------------------------------------------------------------------
def evaluate_export(args: Args, export_dir: str) -> dict:
    """Plain greedy decoding, answer-tag protocol, on the eval sets next to --data (eval.compare, in process), beside
    the starting model (toy)."""
    import eval as E
    models = {"SFT": export_dir, "start": args.model} if C.is_toy(args.model) else {"SFT": export_dir}
    rows = E.compare({name: {"model": m} for name, m in models.items()}, [b for b in args.eval.split(",") if b],
                     lambda bench: Path(args.data).parent / "eval" / bench, args.run_dir,
                     prompt="answer-tag", min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                     limit=args.eval_limit)
    return {bench: r["SFT"]["overall"] for bench, r in rows.items()}


# ----------------------------------------------------------------------------------------------------------------
# Training loop: setup → for step → for micro-batch → loss → backward → clip/step → log → checkpoint → export → eval
# ----------------------------------------------------------------------------------------------------------------
def main(args: Args, explicit: set[str] | None = None):
    d = R.init_distributed()
    resolve(args, explicit)
    if args.model == "toy-base":                  # the pretrained toy "stage 0" (toy_base.py), built once on first use
        from toy_base import ensure_toy_base
        args.model = ensure_toy_base()
    R.save_run_config(args.run_dir, args)
    R.seed_everything(args.seed)
    bb = C.load_backbone(args.model, d.device, dtype=torch.float32, seed=args.seed,  # fp32 masters; compute: --dtype
                         rank0_only=True)                # other ranks: meta, filled from rank 0 by shard_model
    for p in bb.model.model.visual.parameters():
        p.requires_grad_(args.train_vision)
    skips = D.Skips()
    data = load_data(bb, args, skips)
    C.print0(f"{len(data)} samples from {args.data}; {skips.summary()}")
    if not data:
        raise SystemExit(f"{args.data}: no usable samples ({skips.summary()})")
    order = D.MicroBatches(data.lengths, per_micro=args.per_micro, seed=args.seed, token_budget=args.micro_tokens)
    model = R.shard_model(bb.model, d, args.activation_checkpointing, dtype=args.dtype)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=args.weight_decay)
    start = R.resume(args, model, opt, order)                          # --resume: weights, optimizer, RNG, data
    collate = lambda samples: (C.pack if args.pack else C.pad_batch)(bb, samples)  # noqa: E731 (in the workers)
    loader = D.Loader(data, order, skips, d.rank, d.world, collate, args.data_workers, d.device)
    log = R.RunLogger(args.run_dir, args.steps, d, desc="sft", start_step=start)
    model.train()
    for step in range(start, args.steps):
        for g in opt.param_groups:
            g["lr"] = R.cosine_lr(step, args.steps, args.lr, args.warmup_ratio)
        micro = loader.next(args.grad_accum)                              # this rank's batches, encoded and packed
        loss_sum, tokens, flops = torch.zeros((), device=d.device), 0, 0.0
        for i, batch in enumerate(micro):
            lengths = batch["seq_lens"].tolist()
            with R.grad_sync(model, i == len(micro) - 1):
                with R.compute_context(args.dtype, d.device):              # bf16 compute over fp32 weights
                    loss = sft_loss(model, D.to_device(batch, d.device), d.device)
                (loss / len(micro)).backward()
            loss_sum += loss.detach() / len(micro)                         # no host sync before backward
            tokens += sum(lengths)
            flops += R.step_flops(bb.model, lengths)
        R.check_finite(loss_sum, step)
        gnorm = R.clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.log(step + 1, {"loss": R.all_reduce_mean(loss_sum.item(), d), "lr": opt.param_groups[0]["lr"],
                           "grad_norm": gnorm}, tokens, flops)
        R.checkpoint_every(args, step + 1, model, opt, loader)
        if step + 1 == args.stop_after:
            break
    loader.close()
    log.close()
    C.print0(skips.summary())

    # ------------------------------------------------------------------------------------------------------------
    # Save and evaluate
    # ------------------------------------------------------------------------------------------------------------
    export_dir = os.path.join(args.run_dir, "export")
    R.export_hf(bb, export_dir, state_dict=R.full_state_dict(model), model=model,
                dtype=R.compute_dtype(args.dtype, d.device))
    C.print0(f"exported {export_dir}")
    R.close_distributed(d)
    if args.eval and d.main:                      # after the process group: no rank waits on a collective timeout
        evaluate_export(args, export_dir)
    return bb


if __name__ == "__main__":
    main(*R.parse_args(Args))
