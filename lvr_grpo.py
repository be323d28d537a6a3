# Docs: docs/lvr.md ("Stage 2: GRPO_latent")
"""GRPO_latent — LVR's stage 2 (Li et al., arXiv 2509.24251; released code VincentLeebang/lvr).

Stage 1 (lvr.py) taught the model to think in the visual embedding space inside `<|lvr_start|>…<|lvr_end|>`. Stage 2
runs GRPO on the text tokens with that latent span as context: G rollouts per prompt decode latents with the KV
cache (lvr.latent_generate) and store them; the rewards (accuracy + format) become group advantages; one packed,
teacher-forced pass writes the stored latents back at their recorded positions and gives log π of every completion
token; the loss is PPO's clipped ratio plus β·KL_k3 to the frozen stage-1 model.

Launch (the same file runs under python and torchrun; FSDP2 shards under torchrun):
    python lvr_grpo.py                              # CPU toy: GRPO_latent from runs/lvr/export (trained if missing)
    torchrun --nproc_per_node 8 lvr_grpo.py --model runs/lvr3b/export --data ViRL39K/lvr_grpo.json \\
        --run-dir runs/lvr3b_grpo                                                 # the paper's stage 2
    python eval.py --benchmark vstar --data-dir data/vstar_bench --model runs/lvr3b_grpo/export --mode latent --prompt answer-tag

Defaults are the released stage-2 recipe; on the toy backbone (an export of it) TOY_PRESET replaces the fields not
given on the command line, printed at start-up. Every detail is in docs/lvr.md.

| choice | default | flag | source |
|---|---|---|---|
| invalid tokens | logit −inf in sampling and in the GRPO log-probs (one rule: lvr.SpanState) | — | this repo (released: none) |
| GRPO latents | stored at rollout, written back at their recorded positions | — | this repo (released: replay) |
| reference model | same images, latents, layout and temperature as the policy | — | fixes the released code |
| lr | 5e-6 (stage 1: 1e-5) | `--lr 1e-5` (paper) | released script |
| rewards | format regex with DOTALL; accuracy = normalised exact match in `<answer>` | `--format-dotall false` | this repo |
| advantages, rollouts | unbiased group std; rollouts seeded per global micro-batch | — | TRL; this repo |
| batch | 2 prompts × G 8 per micro-batch | `--per-micro`, `--num-generations` | this repo (paper: none) |
| precision | fp32 master weights, bf16 compute; the reference in the compute dtype | `--dtype` | this repo |
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

import common as C
import dataloader as D
import lvr
import runtime as R
from lvr import LVR, LVR_START, LVR_TOKENS


# ----------------------------------------------------------------------------------------------------------------
# Args
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Args:
    model: str = field(default="runs/lvr/export", metadata={"help": "the stage-1 export (lvr.py's run_dir/export)"})
    data: str = field(default="toy", metadata={"help": "ViRL39K-style records, or 'toy' (data/toy/lvr_grpo.json)"})
    image_root: str = field(default="", metadata={"help": "folder image paths are relative to (default: data's)"})
    run_dir: str = field(default="runs/lvr_grpo", metadata={"help": "output directory"})
    steps: int = field(default=1500, metadata={"help": "optimizer steps"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per rank per step"})
    per_micro: int = field(default=2, metadata={"help": "prompts per micro-batch (each rolled out G times)"})
    data_workers: int = field(default=4, metadata=R.DATA_WORKERS_HELP)
    lr: float = field(default=5e-6, metadata={"help": "peak learning rate (released script; paper: 1e-5)"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "linear warmup fraction, then cosine"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    min_pixels: int = field(default=128 * 28 * 28, metadata={"help": "image pixel budget, min (128 tokens)"})
    max_pixels: int = field(default=5120 * 28 * 28, metadata={"help": "image pixel budget, max (5120 tokens)"})
    max_tokens: int = field(default=16384, metadata={"help": "drop (count) prompts longer than this"})
    num_latent_steps: int = field(default=8, metadata={"help": "latent steps N for rollouts"})
    num_generations: int = field(default=8, metadata={"help": "GRPO group size G"})
    temperature: float = field(default=0.9, metadata={"help": "rollout sampling temperature"})
    max_new_tokens: int = field(default=512, metadata={"help": "max completion tokens per rollout"})
    beta: float = field(default=0.04, metadata={"help": "k3 KL coefficient β (0: no reference model)"})
    epsilon: float = field(default=0.2, metadata={"help": "PPO clip ε"})
    loss_type: str = field(default="bnpo", metadata={"help": "bnpo | grpo | dr_grpo aggregation",
                                                     "choices": ["bnpo", "grpo", "dr_grpo"]})
    num_iterations: int = field(default=1, metadata={"help": "optimizer passes per rollout batch (μ)"})
    format_dotall: bool = field(default=True, metadata={"help": "format regex with DOTALL (released: false)"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = never)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "keep the newest N resume checkpoints (0 = all)"})
    resume: bool = field(default=False, metadata={"help": "resume from the latest checkpoint in run_dir"})
    stop_after: int = field(default=0, metadata={"help": "testing aid: exit after this step (0 = never)"})
    activation_checkpointing: bool = field(default=True, metadata={"help": "recompute activations per block"})
    seed: int = field(default=0, metadata={"help": "seed of data order, init and rollouts"})
    eval: bool = field(default=False, metadata={"help": "evaluate the export on the eval sets next to --data"})
    eval_steps: str = field(default="8", metadata={"help": "latent steps N to evaluate"})
    eval_benchmarks: str = field(default="vstar,mmvp,blink", metadata={"help": "toy eval sets under data/toy/eval"})
    eval_limit: int = field(default=0, metadata={"help": "items per benchmark (0 = all)"})
    eval_ablations: str = field(default="none", metadata={"help": "none | zeros | noise | shuffle | remove, ..."})
    eval_force_span: bool = field(default=False, metadata={"help": "evaluate with the latent span opened at the start "
                                                                   "of the answer (eval.py --latent-force-span)"})
    dtype: str = field(default="auto", metadata=R.DTYPE_HELP)


# A tiny model needs a large lr, small images, few steps and short rollouts to move in a CPU minute: applied (and
# printed) only when the model is an export of the toy backbone, and only to the fields not given.
TOY_PRESET = dict(lr=1e-4, steps=6, max_new_tokens=48, min_pixels=16 * 28 * 28, max_pixels=64 * 28 * 28,
                  activation_checkpointing=False, eval=True, eval_limit=100, eval_force_span=True, data_workers=0)


TOY_STAGE1 = "runs/lvr/export"       # the default --model: `python lvr.py`'s export, trained first when missing


def missing_toy_stage1(args: Args) -> bool:
    return args.model == TOY_STAGE1 and not Path(args.model, "config.json").exists()


def resolve(args: Args, explicit: set[str] | None = None) -> Args:
    """The toy preset (toy backbone, or the default stage-1 export that main trains when missing) on the fields not
    in `explicit` (default: the fields still at their dataclass default); `--data toy` → the toy world. No model is
    loaded."""
    explicit = R.changed_fields(args) if explicit is None else explicit
    if C.is_toy(args.model) or missing_toy_stage1(args):
        R.apply_preset(args, TOY_PRESET, explicit, "toy preset", "model is the toy backbone")
    if args.data == "toy":
        from toy_world import ensure_toy_world
        args.data = str(Path(ensure_toy_world("data/toy", seed=0)) / "lvr_grpo.json")
    args.image_root = args.image_root or os.path.dirname(args.data)
    R.check_args(dataclasses.replace(args, model="toy") if missing_toy_stage1(args) else args)
    return args


# ----------------------------------------------------------------------------------------------------------------
# Data: prompts with their ground-truth answers
# ----------------------------------------------------------------------------------------------------------------
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def convert_grpo(rec, bb: C.Backbone, args: Args) -> dict:
    """A ViRL39K-style record → the encoded prompt (generation prompt open) plus its ground-truth answer."""
    user, answer, _ = lvr.read_record(rec, args)
    truth = (m.group(1) if (m := ANSWER_RE.search(answer)) else answer).strip()
    if not truth:
        raise C.SkipSample("empty answer")
    s = C.encode_chat(bb, [user], add_generation_prompt=True, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    s["answer"] = truth
    return s


def load_data(bb: C.Backbone, args: Args, skips: D.Skips) -> D.LazySamples:
    """Exact lengths now (no pixels); each prompt is encoded when its micro-batch is due (dataloader.Loader)."""
    return D.LazySamples(D.Records(args.data, skips), lambda rec: convert_grpo(rec, bb, args), skips, args.max_tokens,
                         "grpo", args.data_workers)


# ----------------------------------------------------------------------------------------------------------------
# Rewards and advantages: R = accuracy + format; A = group-normalised R
# ----------------------------------------------------------------------------------------------------------------
def _normalise(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().strip("().").strip()).lower()


def accuracy_reward(text: str, truth: str) -> float:
    """1 if the text inside the first <answer>…</answer> equals the ground truth (normalised), else 0."""
    m = ANSWER_RE.search(text)
    return float(m is not None and _normalise(m.group(1)) == _normalise(truth))


def format_reward(text: str, dotall: bool = True) -> float:
    """1 for `<|lvr_start|>…<|lvr_end|>` followed by `<answer>…</answer>` (whitespace around allowed)."""
    pattern = r"\s*<\|lvr_start\|>.*?<\|lvr_end\|>\s*<answer>.*?</answer>\s*"
    return float(re.fullmatch(pattern, text, re.DOTALL if dotall else 0) is not None)


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """A = (R − mean_group) / (std_group + 1e-4), std unbiased (TRL)."""
    r = rewards.view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()


# ----------------------------------------------------------------------------------------------------------------
# Log-probs: one packed teacher-forced pass, the stored latents written back at their recorded positions
# ----------------------------------------------------------------------------------------------------------------
def completion_logprobs(bb: C.Backbone, model, prompts: list[dict], outs: list[dict], temperature: float,
                        device) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(o_t | q, o_<t) for every completion token, π = softmax(logits / temperature) over the tokens valid at
    that place (SpanState, as latent_generate sampled), from ONE packed teacher-forced forward in which the stored
    latents are written back at the recorded `latent_positions` (constants; never where a `<|lvr|>` id happens to
    be). A token the sampler could not have produced at its place is a ValueError. Returns (logp [B, T], loss mask
    [B, T]): completion tokens up to EOS, excluding `<|lvr_start|>` and the latent slots."""
    t = {k: bb.token_id(k) for k in LVR_TOKENS}
    ctrl = lvr.control_ids(bb)
    where = {k: i for i, k in enumerate(ctrl.tolist())}
    samples, dst, vals, rows, blocked, slots, off = [], [], [], [], [], [], 0
    for i, (p, o) in enumerate(zip(prompts, outs)):
        comp = torch.tensor(o["token_ids"], dtype=torch.long)
        pos = torch.as_tensor(o["latent_positions"], dtype=torch.long).cpu()
        if len(pos) != len(o["latents"]):
            raise ValueError(f"completion {i}: {len(pos)} latent positions but {len(o['latents'])} latents")
        slot = torch.zeros(len(comp), dtype=torch.bool)
        slot[pos] = True
        st, blk = lvr.SpanState(open=int(p["input_ids"][-1]) == t[LVR_START]), []
        for j, k in enumerate(comp.tolist()):                      # replay the sampler's mask, position by position
            blk.append(st.blocked())
            if slot[j]:
                continue
            if k in where and blk[-1][where[k]]:
                raise ValueError(f"completion {i}: token {bb.tokenizer.convert_ids_to_tokens(k)!r} at index {j} "
                                 f"is invalid there (latent_generate never samples it)")
            st.step(k, t)
        n_p = len(p["input_ids"])
        ids = torch.cat([p["input_ids"], comp.masked_fill(slot, t[LVR])])
        samples.append(dict(p, input_ids=ids, labels=torch.full_like(ids, C.IGNORE),
                            mm_token_type_ids=torch.cat([p["mm_token_type_ids"], torch.zeros_like(comp, dtype=torch.int32)])))
        dst.append(pos + off + n_p)
        vals.append(o["latents"].to(device))
        rows.append(torch.arange(len(comp)) + off + n_p - 1)          # logits at t−1 predict token t
        blocked.append(torch.tensor(blk, dtype=torch.bool).view(-1, len(ctrl)))
        slots.append(slot)
        off += len(ids)
    dst = torch.cat(dst)
    dst = torch.stack([torch.zeros_like(dst), dst], 1).to(device)
    with lvr.latent_inputs(model, dst, values=torch.cat(vals)):        # logits at the completion positions only
        keep = torch.cat(rows).to(device)
        logits = model(**C.model_inputs(C.pack(bb, samples), device), logits_to_keep=keep).logits
    logp, mask = [], []
    for o, z, blk, slot in zip(outs, logits[0].split([len(r) for r in rows]), blocked, slots):
        comp = torch.tensor(o["token_ids"], device=device)
        z = lvr.mask_invalid(z.float() / (temperature or 1.0), blk, ctrl)
        logp.append(torch.log_softmax(z, -1).gather(-1, comp[:, None])[:, 0].masked_fill(slot.to(device), 0.0))
        mask.append(~slot.to(device) & (comp != t[LVR_START]))
    return nn.utils.rnn.pad_sequence(logp, batch_first=True), nn.utils.rnn.pad_sequence(mask, batch_first=True)


# ----------------------------------------------------------------------------------------------------------------
# Loss: per token −min(ρ·A, clip(ρ)·A) + β·KL_k3
# ----------------------------------------------------------------------------------------------------------------
def grpo_loss(logp, old_logp, ref_logp, adv, mask, epsilon: float = 0.2, beta: float = 0.04,
              loss_type: str = "bnpo", max_len: int | None = None) -> tuple[torch.Tensor, dict]:
    """Per token: −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) + β·KL_k3, ρ = exp(logp − logp_old),
    KL_k3 = exp(ref − logp) − (ref − logp) − 1. Aggregation: bnpo = Σ/Σmask; grpo = mean over sequences of
    per-sequence means; dr_grpo = Σ / (B · max_len)."""
    m = mask.float()
    ratio = torch.exp(logp - old_logp)
    A = adv[:, None]
    kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1 if beta else torch.zeros_like(logp)   # KL_k3
    per_tok = -torch.min(ratio * A, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * A) + beta * kl  # clipped + β·KL
    if loss_type == "bnpo":
        loss = (per_tok * m).sum() / m.sum().clamp(min=1)
    elif loss_type == "grpo":
        loss = ((per_tok * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        loss = (per_tok * m).sum() / (logp.shape[0] * (max_len or logp.shape[1]))
    else:
        raise ValueError(f"unknown loss type {loss_type!r}")
    clipped = ((ratio < 1 - epsilon) & (A < 0)) | ((ratio > 1 + epsilon) & (A > 0))
    n = m.sum().clamp(min=1)
    return loss, {"kl": (kl.detach() * m).sum() / n, "clip_ratio": (clipped.float() * m).sum() / n}  # device


# ----------------------------------------------------------------------------------------------------------------
# Training loop: setup → for step → rollouts → for micro-batch → loss → backward → clip/step → log → checkpoint →
# export → eval
# ----------------------------------------------------------------------------------------------------------------
def main(args: Args, explicit: set[str] | None = None):
    d = R.init_distributed()
    resolve(args, explicit)
    if missing_toy_stage1(args):                  # the no-argument toy run on a fresh machine: stage 1 first
        if d.world > 1:
            R.arg_error(f"--model {TOY_STAGE1}: no such export; run `python lvr.py` first")
        print(f"no stage-1 export at {TOY_STAGE1}: training the toy one with `python lvr.py --eval false`")
        subprocess.run([sys.executable, str(Path(__file__).with_name("lvr.py")), "--eval", "false"], check=True)
    R.save_run_config(args.run_dir, args)
    R.seed_everything(args.seed)
    bb = C.load_backbone(args.model, d.device, dtype=torch.float32,      # fp32 master weights; compute: --dtype
                         rank0_only=True)                                # other ranks: meta, filled from rank 0
    lvr.prepare_model(bb)                                                # the LVR tokens (present in a stage-1 export)
    lvr.attach_saved_head(bb)                                            # stage 1's head, if it trained one
    for p in bb.model.model.visual.parameters():
        p.requires_grad_(False)                                          # vision tower + merger frozen
    skips = D.Skips()
    data = load_data(bb, args, skips)
    C.print0(f"{len(data)} prompts from {args.data}; {skips.summary()}")
    if not data:
        raise SystemExit(f"{args.data}: no usable prompts ({skips.summary()})")
    order = D.MicroBatches(data.lengths, per_micro=args.per_micro, seed=args.seed)
    ref = None
    if args.beta:                                 # the frozen stage-1 model of the k3 KL, no optimizer: compute dtype
        ref = R.meta_copy(bb.model).requires_grad_(False).to(R.compute_dtype(args.dtype, d.device))   # shapes only
    model = lvr.shard(bb.model, d, args.activation_checkpointing, args.dtype)
    if ref is not None:                           # filled from the policy's own shards: never a whole second copy
        ref = lvr.shard(ref, d, False, args.dtype, weights_from=model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=args.weight_decay)
    start = R.resume(args, model, opt, order)                          # --resume: weights, optimizer, RNG, data
    loader = D.Loader(data, order, skips, d.rank, d.world, workers=args.data_workers, device=d.device)
    log = R.RunLogger(args.run_dir, args.steps, d, desc="lvr-grpo", start_step=start)
    G, mu = args.num_generations, args.num_iterations                  # μ optimizer passes per rollout batch
    for step in range(start, args.steps):
        # Rollouts: G per prompt with latents recorded (no grad), rewards → advantages, reference / old log-probs
        micro, batches, stats, t0 = loader.next(args.grad_accum), [], {}, time.perf_counter()   # encoded lazily
        model.eval()
        for i, samples in enumerate(micro):
            prompts = [s for s in samples for _ in range(G)]
            gen = torch.Generator(d.device).manual_seed(args.seed * 1_000_003 + step * 1009 + i * d.world + d.rank)
            with R.compute_context(args.dtype, d.device):
                outs = lvr.latent_generate(bb, prompts, args.num_latent_steps, args.max_new_tokens, "fixed",
                                           args.temperature, generator=gen, model=model, sync=True)
            acc = torch.tensor([accuracy_reward(o["text"], p["answer"]) for o, p in zip(outs, prompts)])
            fmt = torch.tensor([format_reward(o["text"], args.format_dotall) for o in outs])
            adv = group_advantages(acc + fmt, G).to(d.device)                          # R = accuracy + format
            with torch.no_grad(), R.compute_context(args.dtype, d.device):
                ref_lp = completion_logprobs(bb, ref, prompts, outs, args.temperature, d.device)[0] if ref else None
                old_lp = completion_logprobs(bb, model, prompts, outs, args.temperature, d.device)[0] if mu > 1 else None
            batches.append((prompts, outs, adv, ref_lp, old_lp))
            for k, v in (("reward", (acc + fmt).mean()), ("reward_accuracy", acc.mean()), ("reward_format", fmt.mean()),
                         ("latent_len", sum(len(o["latents"]) for o in outs) / len(outs)),
                         ("completion_len", sum(len(o["token_ids"]) for o in outs) / len(outs))):
                stats[k] = stats.get(k, 0.0) + float(v) / len(micro)
        gen_s, t0 = time.perf_counter() - t0, time.perf_counter()
        model.train()
        sums = {}
        for it in range(mu):
            for g in opt.param_groups:
                g["lr"] = R.cosine_lr(step * mu + it, args.steps * mu, args.lr, args.warmup_ratio)
            for i, (prompts, outs, adv, ref_lp, old_lp) in enumerate(batches):
                with R.grad_sync(model, i == len(batches) - 1):
                    with R.compute_context(args.dtype, d.device):              # bf16 compute over fp32 weights
                        logp, mask = completion_logprobs(bb, model, prompts, outs, args.temperature, d.device)
                    old = old_lp if old_lp is not None else logp.detach()               # μ = 1 ⇒ ρ ≡ 1
                    loss, terms = grpo_loss(logp, old, ref_lp if ref_lp is not None else logp.detach(), adv, mask,
                                            args.epsilon, args.beta if ref is not None else 0.0, args.loss_type,
                                            args.max_new_tokens)                         # clipped ρ·A + β·KL_k3
                    (loss / len(batches)).backward()
                for k, v in {"loss": loss.detach(), **terms}.items():              # on the device: no host sync
                    sums[k] = sums.get(k, 0.0) + v / len(batches) / mu
            R.check_finite(sums["loss"], step, sums)                      # before the update, after backward
            gnorm = R.clip_grad_norm(model, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        # model FLOPs: the rollout (KV-cached decoding ≈ one forward over prompt + completion), the reference and
        # old-policy forwards, and μ forward + backward passes
        lens = [len(p["input_ids"]) + len(o["token_ids"]) for b in batches for p, o in zip(b[0], b[1])]
        forwards = 1 + (ref is not None) + (mu > 1)
        flops = forwards * R.step_flops(bb.model, lens, backward=False) + mu * R.step_flops(bb.model, lens)
        log.log(step + 1, {**{k: R.all_reduce_mean(v, d) for k, v in {**sums, **stats}.items()},
                           "lr": opt.param_groups[0]["lr"], "grad_norm": gnorm, "gen_s": gen_s,
                           "train_s": time.perf_counter() - t0}, sum(lens), flops)
        R.checkpoint_every(args, step + 1, model, opt, loader)
        if step + 1 == args.stop_after:
            break
    loader.close()
    log.close()
    C.print0(skips.summary())

    # ------------------------------------------------------------------------------------------------------------
    # Save and evaluate
    # ------------------------------------------------------------------------------------------------------------
    export_dir = lvr.export(bb, model, args, d, latent_end_token=lvr.saved_layout(args.model))
    R.close_distributed(d)
    if args.eval and d.main:                      # after the process group: no rank waits on a collective timeout
        lvr.evaluate_export(args, export_dir, d.device)
    return bb


if __name__ == "__main__":
    main(*R.parse_args(Args))              # (args, the fields given on the command line)
