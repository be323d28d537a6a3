# Docs: docs/lvr.md
"""LVR — Latent Visual Reasoning (Li et al., arXiv 2509.24251; released code VincentLeebang/lvr).

After `<|lvr_start|>` the language model "thinks" in the visual embedding space: its final hidden state is fed back
as the next input embedding for a few steps (the latent span), trained (stage 1, SFT) to reconstruct the
post-merger visual tokens of the question's region of interest (ROI bbox): L = L_CE + λ·L_lvr. Then text decoding
gives the answer. Stage 2 (GRPO_latent, lvr_grpo.py) runs GRPO on the text tokens with the latent span as context,
using this file's decoder (latent_generate) for the rollouts.

Launch (the same file runs under python and torchrun; FSDP2 shards under torchrun):
    python lvr.py                                   # CPU toy: stage 1 on data/toy, export runs/lvr/export, eval N=4/8
    python lvr_grpo.py                              # CPU toy: stage 2 (GRPO_latent) from runs/lvr/export
    python lvr.py --model Qwen/Qwen2.5-VL-3B-Instruct --data VisualCoT/lvr_train.json --image-root VisualCoT \\
        --grad-accum 64 --run-dir runs/lvr3b                                      # 1 GPU, the paper's batch (slow)
    torchrun --nproc_per_node 8 lvr.py --model Qwen/Qwen2.5-VL-7B-Instruct --data VisualCoT/lvr_train.json \\
        --image-root VisualCoT --run-dir runs/lvr7b --save-every 250              # 8 GPUs: the paper's stage 1
    python eval.py --benchmark vstar --data-dir data/vstar_bench --model runs/lvr7b/export --mode latent --prompt answer-tag

Defaults are the paper's stage-1 recipe. On the toy backbone (or an export of it) TOY_PRESET replaces the fields
not given on the command line, printed at start-up. Every detail, with the paper's equations, is in docs/lvr.md.

| choice | default | flag | source |
|---|---|---|---|
| latent span layout | `<|lvr_latent_end|>` before `<|lvr_end|>` | `--latent-end-token false` (paper) | released data code |
| L_lvr reduction | MSE over all T·D elements, fp32 | `--lvr-loss mse_token` (paper's ‖·‖², ×D), `mae`, `cosine` | released |
| head on H[p−1] | none | `--lvr-head simple`, `glu` (saved as lvr_head.safetensors) | paper's ablation |
| ROI targets | copied from the `<|image_pad|>` inputs inside the model's forward | — | this repo |
| ROI length | all T tokens | `--max-roi-tokens K` (evenly spaced) | released; repo issue #7 |
| stage-1 batches | padding-free packing | `--no-pack` (same loss and gradients) | this repo |
| decoding | N = 8 fixed latent steps, greedy, KV cache | eval.py `--latent-steps`; `latent_generate(mode="token")` | paper |
| batch, precision | 3 per micro (8 × 8 × 3 ≈ released 200); fp32 masters, bf16 compute | `--per-micro` | this repo |

Qwen3-VL is not supported (deepstack features would need their own ROI taps).
"""
from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common as C
import dataloader as D
import runtime as R

LVR_START, LVR, LVR_LATENT_END, LVR_END = "<|lvr_start|>", "<|lvr|>", "<|lvr_latent_end|>", "<|lvr_end|>"
LVR_TOKENS = [LVR_START, LVR, LVR_LATENT_END, LVR_END]


# ----------------------------------------------------------------------------------------------------------------
# Args
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Args:
    model: str = field(default="toy-base", metadata={"help": "toy-base (the pretrained toy) | toy | hub id | dir"})
    data: str = field(default="toy", metadata={"help": "records, or 'toy' (data/toy/lvr_train.json)"})
    image_root: str = field(default="", metadata={"help": "folder image paths are relative to (default: data's)"})
    run_dir: str = field(default="runs/lvr", metadata={"help": "output directory"})
    steps: int = field(default=2500, metadata={"help": "optimizer steps"})
    grad_accum: int = field(default=8, metadata={"help": "micro-batches per rank per step"})
    per_micro: int = field(default=3, metadata={"help": "samples per micro-batch"})
    micro_tokens: int = field(default=0, metadata=R.MICRO_TOKENS_HELP)
    data_workers: int = field(default=4, metadata=R.DATA_WORKERS_HELP)
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "linear warmup fraction, then cosine"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    min_pixels: int = field(default=128 * 28 * 28, metadata={"help": "image pixel budget, min (128 tokens)"})
    max_pixels: int = field(default=5120 * 28 * 28, metadata={"help": "image pixel budget, max (5120 tokens)"})
    max_tokens: int = field(default=16384, metadata={"help": "drop (count) samples longer than this"})
    pack: bool = field(default=True, metadata={"help": "padding-free stage-1 batches (--no-pack: padded baseline)"})
    lam_lvr: float = field(default=0.1, metadata={"help": "λ in L = L_CE + λ·L_lvr (0 = vanilla SFT baseline)"})
    lvr_loss: str = field(default="mse", metadata={"help": "L_lvr: mse (all elements) | mse_token | mae | cosine",
                                                   "choices": ["mse", "mse_token", "mae", "cosine"]})
    lvr_head: str = field(default="none", metadata={"help": "none | simple | glu head on H[p-1]",
                                                    "choices": ["none", "simple", "glu"]})
    latent_end_token: bool = field(default=True, metadata={"help": "insert <|lvr_latent_end|> (released layout)"})
    max_roi_tokens: int = field(default=0, metadata={"help": "keep at most K evenly spaced ROI tokens (0 = all)"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = never)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "keep the newest N resume checkpoints (0 = all)"})
    resume: bool = field(default=False, metadata={"help": "resume from the latest checkpoint in run_dir"})
    stop_after: int = field(default=0, metadata={"help": "testing aid: exit after this step (0 = never)"})
    activation_checkpointing: bool = field(default=True, metadata={"help": "recompute activations per block"})
    seed: int = field(default=0, metadata={"help": "seed of data order, init and rollouts"})
    eval: bool = field(default=False, metadata={"help": "evaluate the export on the eval sets next to --data"})
    eval_steps: str = field(default="4,8", metadata={"help": "latent steps N to evaluate"})
    eval_benchmarks: str = field(default="vstar,mmvp,blink", metadata={"help": "toy eval sets under data/toy/eval"})
    eval_limit: int = field(default=0, metadata={"help": "items per benchmark (0 = all)"})
    eval_ablations: str = field(default="none", metadata={"help": "none | zeros | noise | shuffle | remove, ..."})
    eval_force_span: bool = field(default=False, metadata={"help": "open the latent span at the answer's start "
                                                                   "(default: the model opens it, as in the paper)"})
    dtype: str = field(default="auto", metadata=R.DTYPE_HELP)


# The toy backbone (or an export of it) only, on the fields not given, printed. At lr 1e-3 the toy never emits
# <|lvr_start|> in 60 steps; at 3e-3 it opens the span on ≤ 36 % of prompts, so it is evaluated with the span forced
# (bench/bench_lvr_guard.py, docs/lvr.md).
TOY_PRESET = dict(lr=3e-3, steps=60, per_micro=8, grad_accum=1, min_pixels=16 * 28 * 28, max_pixels=64 * 28 * 28,
                  activation_checkpointing=False, eval=True, eval_limit=100, eval_force_span=True, data_workers=0)


def resolve(args: Args, explicit: set[str] | None = None) -> Args:
    """The toy preset (toy backbone only) on the fields not in `explicit` (default: the fields still at their
    dataclass default); `--data toy` → the toy world. No model is loaded."""
    explicit = R.changed_fields(args) if explicit is None else explicit
    if C.is_toy(args.model):
        R.apply_preset(args, TOY_PRESET, explicit, "toy preset", "model is the toy backbone")
    if args.data == "toy":
        from toy_world import ensure_toy_world
        args.data = str(Path(ensure_toy_world("data/toy", seed=0)) / "lvr_train.json")
    args.image_root = args.image_root or os.path.dirname(args.data)
    return R.check_args(args)


# ----------------------------------------------------------------------------------------------------------------
# Data: ROI targets and the latent-span layout
# ----------------------------------------------------------------------------------------------------------------
def roi_token_indices(bbox, grid_thw, merge: int = 2) -> list[int]:
    """Raster-order indices of the merged (28-px) image tokens covering a normalised bbox [x0, y0, x1, y1].
    Patch grid: floor the low edge, ceil the high edge (clipped); merged grid: low // 2, ceil(high / 2)."""
    _, h, w = (int(v) for v in grid_thw)
    x0, y0, x1, y1 = bbox
    lo = lambda v, n: min(max(math.floor(v * n), 0), n - 1) // merge                  # noqa: E731
    hi = lambda v, n: (min(max(math.ceil(v * n), 0), n) + merge - 1) // merge        # noqa: E731
    return [yy * (w // merge) + xx for yy in range(lo(y0, h), hi(y1, h)) for xx in range(lo(x0, w), hi(x1, w))]


def read_record(rec, args: Args):
    """An LVR / Visual-CoT record → (user message, answer text, its one image); malformed records are counted skips."""
    question, answer, image = D.visual_cot(rec, args.image_root)
    user = {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}
    return user, answer, image


def convert_sft(rec, bb: C.Backbone, args: Args, with_span: bool = True) -> dict:
    """A Visual-CoT / LVR record → an encoded chat whose `<lvr>` became `<|lvr_start|><|lvr|>×T…<|lvr_end|>`,
    with `roi` = the T merged-token indices (labels: −100 on the prompt and on every `<|lvr|>`).
    `with_span=False` drops the span (the plain-SFT comparison of the benchmark)."""
    user, answer, image = read_record(rec, args)
    if "<lvr>" not in answer or not re.sub(r"<lvr>|<answer>|</answer>|\s", "", answer):
        raise C.SkipSample("answer without <lvr> or empty")
    bbox = D.check_bbox((rec.get("bboxes") or [None])[0])
    patch = bb.model.config.vision_config.patch_size
    rh, rw = C.smart_resize(image.height, image.width, bb.patch_factor, args.min_pixels, args.max_pixels)
    roi = roi_token_indices(bbox, (1, rh // patch, rw // patch))
    if args.max_roi_tokens and len(roi) > args.max_roi_tokens:
        roi = [roi[round(i)] for i in torch.linspace(0, len(roi) - 1, args.max_roi_tokens).tolist()]
    span = LVR_START + LVR * len(roi) + LVR_LATENT_END * args.latent_end_token + LVR_END if with_span else ""
    messages = [user, {"role": "assistant", "content": answer.replace("<lvr>\n" if not with_span else "<lvr>", span)}]
    s = C.encode_chat(bb, messages, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    assert tuple(s["image_grid_thw"][0].tolist()) == (1, rh // patch, rw // patch), "grid != smart_resize grid"
    s["labels"][s["input_ids"] == bb.token_id(LVR)] = C.IGNORE
    s["roi"] = torch.tensor(roi if with_span else [], dtype=torch.long)
    return s


def load_data(bb: C.Backbone, args: Args, skips: D.Skips) -> D.LazySamples:
    """Exact lengths now (no pixels); each sample is encoded when its micro-batch is due (dataloader.Loader)."""
    max_tokens = min(args.max_tokens, args.micro_tokens or args.max_tokens)      # a sample must fit its micro-batch
    return D.LazySamples(D.Records(args.data, skips), lambda rec: convert_sft(rec, bb, args), skips, max_tokens,
                         "sft", args.data_workers)


# ----------------------------------------------------------------------------------------------------------------
# Model surgery: special tokens, optional head, and the input-embedding hook that places latent vectors
# ----------------------------------------------------------------------------------------------------------------
class LatentHead(nn.Module):
    """Ablation heads on H[p−1]: simple = LayerNorm → Linear → GELU → Linear; glu = SwiGLU MLP (LLM's width)."""

    def __init__(self, kind: str, dim: int, dim_ff: int):
        super().__init__()
        self.kind = kind
        if kind == "simple":
            self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        elif kind == "glu":
            self.gate, self.up, self.down = (nn.Linear(i, o, bias=False)
                                             for i, o in ((dim, dim_ff), (dim, dim_ff), (dim_ff, dim)))
        else:
            raise ValueError(f"unknown head {kind!r}")

    def forward(self, h):
        return self.net(h) if self.kind == "simple" else self.down(F.silu(self.gate(h)) * self.up(h))


def prepare_model(bb: C.Backbone, head: str = "none") -> list[int]:
    """Register the four LVR tokens (spare embedding rows reused, mean-initialised) and attach the head."""
    ids = C.add_special_tokens(bb, LVR_TOKENS, init="mean")
    if head != "none" and not hasattr(bb.model, "lvr_head"):
        tc, p = bb.model.config.text_config, next(bb.model.parameters())
        bb.model.lvr_head = LatentHead(head, tc.hidden_size, tc.intermediate_size).to(p.device, p.dtype)
    return ids


def apply_head(model, h):
    return model.lvr_head(h) if hasattr(model, "lvr_head") else h


def attach_saved_head(bb: C.Backbone):
    """Load lvr_head.safetensors written next to an export (nothing to do for the default head 'none')."""
    path = Path(getattr(bb.model.config, "_name_or_path", "") or "/nonexistent")
    if hasattr(bb.model, "lvr_head") or not (path / "lvr_head.safetensors").exists():
        return
    from safetensors.torch import load_file
    prepare_model(bb, json.loads((path / "lvr_config.json").read_text())["head"])
    bb.model.lvr_head.load_state_dict({k.removeprefix("lvr_head."): v for k, v in
                                       load_file(str(path / "lvr_head.safetensors")).items()})


def shard(model, d: R.Dist, ac: bool, dtype: str = "auto", **kw):  # a head: its own FSDP unit (called outside the root)
    return R.shard_model(model, d, ac, extra_units=(model.lvr_head,) if hasattr(model, "lvr_head") else (), dtype=dtype,
                         **kw)


@contextmanager
def latent_inputs(model, dst: torch.Tensor, src: torch.Tensor | None = None, values: torch.Tensor | None = None):
    """Inside this context the language model's input embeddings at `dst` ([n, 2] = (row, col)) are replaced by
    `values` [n, D], or by the embeddings found at `src` — i.e. the post-merger image features at the
    `<|image_pad|>` positions (teacher forcing of the ROI). The yielded dict receives `targets` (what was written,
    detached: constants) and `hidden` (the final-layer hidden states after the final norm, H)."""
    lm = model.model.language_model
    tap = {}

    def pre(_mod, args, kwargs):
        if dst.numel():
            e = kwargs["inputs_embeds"]
            v = e[src[:, 0], src[:, 1]].detach() if src is not None else values.to(e.dtype)
            kwargs["inputs_embeds"] = e.index_put((dst[:, 0], dst[:, 1]), v)
            tap["targets"] = v
        return args, kwargs

    def post(_mod, _args, _kwargs, out):
        tap["hidden"] = out.last_hidden_state

    hooks = [lm.register_forward_pre_hook(pre, with_kwargs=True), lm.register_forward_hook(post, with_kwargs=True)]
    try:
        yield tap
    finally:
        for h in hooks:
            h.remove()


def roi_positions(bb: C.Backbone, samples: list[dict], packed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, dst) as [n, 2] = (row, col): the i-th `<|lvr|>` of a sample (dst) takes the image feature of its i-th
    ROI token (src = that sample's roi-th `<|image_pad|>`). packed: one row, columns offset by the samples before;
    padded (right-padded C.pad_batch): row b holds sample b from column 0."""
    pad_id, lvr_id = bb.token_id("<|image_pad|>"), bb.token_id(LVR)
    src, dst, offset = [], [], 0
    for b, s in enumerate(samples):
        row = 0 if packed else b
        pads, lvrs = ((s["input_ids"] == t).nonzero()[:, 0] + offset for t in (pad_id, lvr_id))
        assert len(lvrs) == len(s["roi"]), "number of <|lvr|> tokens != number of ROI targets"
        src.append(torch.stack([torch.full_like(lvrs, row), pads[s["roi"]]], 1))
        dst.append(torch.stack([torch.full_like(lvrs, row), lvrs], 1))
        offset += len(s["input_ids"]) if packed else 0
    return torch.cat(src), torch.cat(dst)


# ----------------------------------------------------------------------------------------------------------------
# Loss (stage 1): L = L_CE + λ·L_lvr, with H[p_i − 1] ↦ v_i
# ----------------------------------------------------------------------------------------------------------------
def lvr_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """L_lvr in fp32. mse: mean over all T·D elements (released); mse_token: mean_i ||ĥ_i − v_i||² (paper's text)."""
    pred, target = pred.float(), target.float()
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "mse_token":
        return (pred - target).pow(2).sum(-1).mean()
    if kind == "mae":
        return F.l1_loss(pred, target)
    if kind == "cosine":
        return (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
    raise ValueError(f"unknown lvr loss {kind!r}")


def sft_loss(model, samples: list[dict], bb: C.Backbone, args: Args, device) -> tuple[torch.Tensor, dict]:
    """One micro-batch (packed, or padded with --no-pack): ROI features teacher-forced at the `<|lvr|>` positions;
    CE on text (not `<|lvr|>`); L_lvr between head(H[p_i − 1]) and v_i."""
    batch = C.pack(bb, samples) if args.pack else C.pad_batch(bb, samples)
    src, dst = (x.to(device) for x in roi_positions(bb, samples, packed=args.pack))
    with latent_inputs(model, dst, src=src) as tap:
        l_ce = C.lm_loss(model, batch, device)                        # L_CE (LM head at supervised positions only)
    pred = apply_head(model, tap["hidden"][dst[:, 0], dst[:, 1] - 1])                # H[p_i − 1] (→ head)
    l_lvr = lvr_loss(pred, tap["targets"], args.lvr_loss) if dst.numel() else pred.sum() * 0.0   # L_lvr
    loss = l_ce + args.lam_lvr * l_lvr                                                # L = L_CE + λ·L_lvr
    return loss, {"loss_ce": l_ce.detach(), "loss_lvr": l_lvr.detach(), "roi_tokens": dst.shape[0] / len(samples)}


# ----------------------------------------------------------------------------------------------------------------
# Latent decoding: batched, left-padded, per-row latent state, KV cache (one new position per latent step)
# ----------------------------------------------------------------------------------------------------------------
# Valid tokens in a completion: ONE rule, used by the sampler (latent_generate) and by the GRPO log-probs
# (lvr_grpo.completion_logprobs), so the policy π in the loss is exactly the masked distribution the rollout drew from.
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
ABLATIONS = ("none", "zeros", "noise", "shuffle", "remove")


def control_ids(bb: C.Backbone) -> torch.Tensor:
    """The K ids whose validity depends on the place in a completion, in the order of SpanState.blocked():
    the five vision tokens, then `<|lvr|>`, `<|lvr_latent_end|>`, `<|lvr_end|>`, `<|lvr_start|>`."""
    return torch.tensor([bb.token_id(k) for k in VISION_TOKENS + [LVR, LVR_LATENT_END, LVR_END, LVR_START]])


@dataclass
class SpanState:
    """Where a completion stands w.r.t. a latent span (open: inside it; latent_end: `<|lvr_latent_end|>` seen)."""
    open: bool = False
    latent_end: bool = False

    def blocked(self) -> list[bool]:
        """Which control_ids may not be sampled next: vision tokens and `<|lvr|>` never (the decoder writes latent
        slots); `<|lvr_latent_end|>` once inside a span; `<|lvr_end|>` only to close one; `<|lvr_start|>` outside."""
        return [True] * 5 + [True, not self.open or self.latent_end, not self.open, self.open]

    def step(self, k: int, t: dict) -> None:
        """Advance over one fed (sampled or forced) token id k; t = LVR token → id."""
        if k == t[LVR_START]:
            self.open, self.latent_end = True, False
        elif k == t[LVR_LATENT_END]:
            self.latent_end = True
        elif k == t[LVR_END]:
            self.open = False


def mask_invalid(logits: torch.Tensor, blocked: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logits [..., V] with −inf added at the control `ids` [K] where `blocked` [..., K] (differentiable)."""
    pen = torch.zeros(blocked.shape, dtype=logits.dtype, device=logits.device)
    return logits.index_add(-1, ids.to(logits.device), pen.masked_fill(blocked.to(logits.device), float("-inf")))


def derangement(n: int, seed: int = 0) -> list[int]:
    """A fixed permutation p of range(n) without fixed points (n ≥ 2), drawn from `seed`; in the shuffle ablation
    item b is fed the latents of item p[b]."""
    g = torch.Generator().manual_seed(seed)
    while True:
        p = torch.randperm(n, generator=g).tolist()
        if n < 2 or all(p[i] != i for i in range(n)):
            return p


@torch.no_grad()
def latent_generate(bb: C.Backbone, samples, num_latent_steps: int = 8, max_new_tokens: int = 16,
                    mode: str = "fixed", temperature: float = 0.0, max_latent_steps: int = 16,
                    force_end: bool = False, use_cache: bool = True, generator: torch.Generator | None = None,
                    model=None, sync: bool = False, prefix_tokens: list[list[int]] | None = None,
                    ablate: str = "none", ablate_seed: int = 0):
    """Decode a batch with latent reasoning. `samples`: encode_chat(..., add_generation_prompt=True) dicts.
    mode "fixed": after a row emits `<|lvr_start|>`, its next `num_latent_steps` inputs are head(H_prev) instead of
    token embeddings; "token": latent inputs until the model would emit `<|lvr_latent_end|>` / `<|lvr_end|>` (at most
    `max_latent_steps`). `force_end` forces `<|lvr_latent_end|><|lvr_end|>` after the span. `use_cache=False`
    recomputes the whole sequence each step (the reference). `sync`: every FSDP rank makes as many forwards.
    `prefix_tokens[b]`: forced before free decoding (log-prob 0). SpanState-invalid tokens are never picked; the
    log-probs are those of this masked distribution. `ablate` (the tokens unchanged but for remove): zeros; noise at
    the latent's norm (`ablate_seed`); shuffle = item b gets item derangement(B)[b]'s intact latents (a batch of 1:
    noise, warned); remove = the span closes at once. Returns per row {"token_ids" (latent inputs as `<|lvr|>`, EOS
    kept), "latents" [n, D] (the vectors fed), "latent_positions" [n] (completion indices of the latent slots),
    "states" [n, D] (head(H) there, = latents unless ablated), "logprobs" [len(token_ids)] (0 at latent inputs and
    forced tokens), "text" (EOS dropped)}."""
    if ablate not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablate!r}: choose from {ABLATIONS}")
    model = model or bb.model
    attach_saved_head(bb)
    dev = next(model.parameters()).device
    t = {k: bb.token_id(k) for k in LVR_TOKENS}
    ctrl = control_ids(bb).to(dev)
    eos, pad, B = bb.tokenizer.eos_token_id, bb.tokenizer.pad_token_id, len(samples)
    donors = None
    if ablate == "shuffle" and B < 2:
        import warnings
        warnings.warn("latent ablation 'shuffle' with a batch of 1 has no other item: falling back to 'noise'")
        ablate = "noise"
    if ablate == "shuffle":                                         # pass 1: the intact latents of every item
        g_state = generator.get_state() if generator is not None else None
        intact = latent_generate(bb, samples, num_latent_steps, max_new_tokens, mode, temperature, max_latent_steps,
                                 force_end, use_cache, generator, model, sync, prefix_tokens)
        if generator is not None:
            generator.set_state(g_state)                           # pass 2 draws what pass 1 drew
        donors = [intact[j]["latents"] for j in derangement(B, ablate_seed)]
    noise_gen = torch.Generator(dev).manual_seed(ablate_seed)

    def ablated(b: int, i: int, v: torch.Tensor) -> torch.Tensor:  # what row b's i-th latent slot is fed instead of
        """v = head(H_prev), the paper's latent fed back as the next input embedding."""
        if ablate == "zeros":
            return torch.zeros_like(v)
        if ablate == "noise":
            z = torch.randn(v.shape, generator=noise_gen, device=dev, dtype=torch.float32)
            return (z * (v.float().norm() / z.norm())).to(v.dtype)
        if ablate == "shuffle":
            return donors[b][i % len(donors[b])].clone() if len(donors[b]) else torch.zeros_like(v)
        return v.clone()

    prompt = C.pad_batch(bb, samples, side="left")
    attn = prompt["attention_mask"].to(dev)
    next_pos = prompt["position_ids"][:, :, -1].amax(0).to(dev) + 1                 # [B] text position of step 0
    span = num_latent_steps if mode == "fixed" else max_latent_steps
    queue = [list(p) for p in prefix_tokens] if prefix_tokens else [[] for _ in range(B)]
    state = [SpanState(open=int(s["input_ids"][-1]) == t[LVR_START]) for s in samples]
    latent_left = [span if st.open and ablate != "remove" else 0 for st in state]
    for b, st in enumerate(state):
        if st.open and ablate == "remove":
            queue[b][:0] = [t[LVR_LATENT_END], t[LVR_END]]
    fed = [[] for _ in range(B)]                                   # ids fed after the prompt (latents as <|lvr|>)
    lat = [dict() for _ in range(B)]                               # position in fed → latent vector fed there
    own = [[] for _ in range(B)]                                   # head(H) at each latent step (before ablation)
    toks, lps, n_tok, done = [[] for _ in range(B)], [[] for _ in range(B)], [0] * B, [False] * B

    def forward(inputs, dst, values):
        with latent_inputs(model, torch.tensor(dst, dtype=torch.long, device=dev).view(-1, 2), values=values) as tap:
            out = model(**{**inputs, "use_cache": use_cache}, logits_to_keep=1)     # only the next token's logits
        return out.cache if use_cache else None, out.logits[:, -1], tap["hidden"][:, -1]

    cache, logits, hidden = forward(C.model_inputs(prompt, dev), [], None)
    while True:
        latent_vec = apply_head(model, hidden)                      # one head call per step on every row (FSDP-safe)
        blocked = torch.tensor([st.blocked() for st in state], device=dev)
        logp = torch.log_softmax(mask_invalid(logits.float() / (temperature or 1.0), blocked, ctrl), -1)
        tok = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0] if temperature > 0 else logp.argmax(-1)
        lp = logp.gather(-1, tok[:, None])[:, 0]
        tok_h, lp_h, step_ids = tok.tolist(), lp.tolist(), [pad] * B    # ONE device → host copy per step, not 2·B
        for b in range(B):
            if done[b]:
                continue
            k = tok_h[b]
            if latent_left[b] > 0 and (mode == "fixed" or k not in (t[LVR_LATENT_END], t[LVR_END])):
                latent_left[b] -= 1                                 # a latent step: feed the previous state back
                own[b].append(latent_vec[b].clone())
                lat[b][len(fed[b])] = ablated(b, len(own[b]) - 1, latent_vec[b])
                k, lpk = t[LVR], 0.0
                if force_end and latent_left[b] == 0:
                    queue[b] = [t[LVR_LATENT_END], t[LVR_END]]
            else:
                k, lpk = (queue[b].pop(0), 0.0) if queue[b] else (k, lp_h[b])
                state[b].step(k, t)
                latent_left[b] = span if k == t[LVR_START] and ablate != "remove" else 0
                if k == t[LVR_START] and ablate == "remove":        # the span closes at once: no latent slot
                    queue[b][:0] = [t[LVR_LATENT_END], t[LVR_END]]
                n_tok[b] += 1
                done[b] = k == eos or n_tok[b] >= max_new_tokens
            toks[b].append(k), lps[b].append(lpk), fed[b].append(k)
            step_ids[b] = k
        finished = all(done)
        if sync and dist.is_initialized() and dist.get_world_size() > 1:   # every rank: the same number of forwards
            flag = torch.tensor(float(finished), device=dev)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finished = flag.item() == 1.0
        if finished:
            break
        for b in range(B):                                          # done rows keep a dummy column (ignored)
            fed[b] += [pad] * (max(map(len, fed)) - len(fed[b]))
        attn = torch.cat([attn, torch.ones(B, 1, dtype=attn.dtype, device=dev)], 1)
        if use_cache:                                               # one new position per row
            dst = [[b, 0] for b in range(B) if fed[b] and len(fed[b]) - 1 in lat[b]]
            inputs = dict(input_ids=torch.tensor(step_ids, device=dev)[:, None], attention_mask=attn, cache=cache,
                          position_ids=next_pos.view(1, B, 1).expand(3, B, 1))
            vals = [lat[b][len(fed[b]) - 1] for b, _ in dst]
        else:  # recompute the whole sequence: positions come from get_rope_index of the full sequence
            full = [dict(s, input_ids=torch.cat([s["input_ids"], torch.tensor(f, dtype=torch.long)]),
                         labels=torch.full((len(s["input_ids"]) + len(f),), C.IGNORE),
                         mm_token_type_ids=torch.cat([s["mm_token_type_ids"], torch.zeros(len(f), dtype=torch.int32)]))
                    for s, f in zip(samples, fed)]
            inputs = C.model_inputs(C.pad_batch(bb, full, side="left"), dev)
            L = inputs["input_ids"].shape[1]
            dst = [[b, L - len(fed[b]) + j] for b in range(B) for j in sorted(lat[b])]
            vals = [lat[b][j] for b in range(B) for j in sorted(lat[b])]
        cache, logits, hidden = forward(inputs, dst, torch.stack(vals) if vals else None)
        next_pos = next_pos + 1
    dim = model.config.text_config.hidden_size
    stack = lambda vs: torch.stack(vs) if vs else torch.zeros(0, dim, device=dev)   # noqa: E731
    res = [{"token_ids": toks[b], "logprobs": torch.tensor(lps[b]), "text": bb.tokenizer.decode(
                [k for k in toks[b] if k != eos], skip_special_tokens=False),
            "latents": stack([lat[b][j] for j in sorted(lat[b])]),
            "latent_positions": torch.tensor(sorted(lat[b]), dtype=torch.long), "states": stack(own[b])}
           for b in range(B)]
    return res


def generate_latent(bb: C.Backbone, items: list[dict], ea) -> list[str]:
    """eval.py's seam for --mode latent (`ea`: eval.Args): each prompt encoded once, the answers' text."""
    import eval as E
    samples = [E.encode_item(bb, it, ea) for it in items]
    res = latent_generate(bb, samples, num_latent_steps=ea.latent_steps,
                          max_new_tokens=E.settings(ea, ea.benchmark)["max_new_tokens"], ablate=ea.latent_ablation,
                          force_end=ea.latent_force_span)
    return [bb.tokenizer.decode(o["token_ids"], skip_special_tokens=True) for o in res]


# ----------------------------------------------------------------------------------------------------------------
# Export and evaluation (called at the end of main, here and in lvr_grpo.py): eval.py's one seam, in process
# ----------------------------------------------------------------------------------------------------------------
def export(bb: C.Backbone, model, args, d: R.Dist, latent_end_token: bool = True) -> str:
    """run_dir/export: a standard HF directory in the compute dtype (from_pretrained ignores the LVR files), plus
    lvr_config.json (head kind, span layout, tokens) and, if a head was trained, lvr_head.safetensors beside it."""
    export_dir = os.path.join(args.run_dir, "export")
    state = R.full_state_dict(model)
    head = {k: state.pop(k) for k in [k for k in state if k.startswith("lvr_head.")]}
    R.export_hf(bb, export_dir, state_dict=state, model=model, dtype=R.compute_dtype(args.dtype, d.device))
    if d.main:
        Path(export_dir, "lvr_config.json").write_text(json.dumps({"head": model.lvr_head.kind if head else "none",
                                                                   "latent_end_token": latent_end_token,
                                                                   "tokens": LVR_TOKENS}))
        if head:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in head.items()}, str(Path(export_dir, "lvr_head.safetensors")))
    C.print0(f"exported {export_dir}")
    return export_dir


def saved_layout(path: str) -> bool:
    """The latent_end_token layout an export was trained with (True when it has no lvr_config.json)."""
    cfg = Path(path, "lvr_config.json")
    return json.loads(cfg.read_text()).get("latent_end_token", True) if cfg.exists() else True


def evaluate_export(args: Args, export_dir: str, device) -> dict:
    """Latent decoding, answer-tag protocol, with N in --eval-steps and each latent ablation in --eval-ablations, on the
    toy eval sets (eval.compare, in process): eval/<bench>_N<n>[_<ablation>].json; on the toy, beside the starting
    model's plain answers on the same items (eval/<bench>_start.json): does LVR move the score?"""
    import eval as E
    bb = C.load_backbone(export_dir, device)
    attach_saved_head(bb)
    ablations = [x for x in args.eval_ablations.split(",") if x] or ["none"]
    for bad in set(ablations) - set(ABLATIONS):
        raise ValueError(f"--eval-ablations: unknown {bad!r}, choose from {ABLATIONS}")
    columns = {"start": {"model": args.model}} if C.is_toy(args.model) and Path(args.model).is_dir() else {}
    for n in [int(x) for x in args.eval_steps.split(",") if x]:
        for abl in ablations:
            columns[f"N{n}" + (f"_{abl}" if abl != "none" else "")] = dict(
                model=export_dir, backbone=bb, generate=generate_latent, mode="latent", latent_steps=n,
                latent_ablation=abl, latent_force_span=args.eval_force_span, max_new_tokens=32)
    if args.eval_force_span:
        print("LVR columns: the latent span is opened at the start of the answer (--eval-force-span)")
    rows = E.compare(columns, [b for b in args.eval_benchmarks.split(",") if b],
                     lambda bench: Path(args.data).parent / "eval" / bench, args.run_dir,
                     prompt="answer-tag", min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                     limit=args.eval_limit)
    return {f"{bench}/{name.replace('_', '/')}": s["overall"] for bench, row in rows.items()
            for name, s in row.items() if name != "start"}


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
    bb = C.load_backbone(args.model, d.device, dtype=torch.float32,      # fp32 master weights; compute: --dtype
                         rank0_only=True)                                # other ranks: meta, filled from rank 0
    prepare_model(bb, args.lvr_head)                                     # model surgery: the LVR tokens (+ head)
    attach_saved_head(bb)
    for p in bb.model.model.visual.parameters():
        p.requires_grad_(False)                                          # vision tower + merger frozen
    skips = D.Skips()
    data = load_data(bb, args, skips)
    C.print0(f"{len(data)} samples from {args.data}; {skips.summary()}")
    if not data:
        raise SystemExit(f"{args.data}: no usable samples ({skips.summary()})")
    order = D.MicroBatches(data.lengths, per_micro=args.per_micro, seed=args.seed, token_budget=args.micro_tokens)
    model = shard(bb.model, d, args.activation_checkpointing, args.dtype)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=args.weight_decay)
    start = R.resume(args, model, opt, order)                          # --resume: weights, optimizer, RNG, data
    loader = D.Loader(data, order, skips, d.rank, d.world, workers=args.data_workers, device=d.device)
    log = R.RunLogger(args.run_dir, args.steps, d, desc="lvr-sft", start_step=start)
    model.train()
    for step in range(start, args.steps):
        for g in opt.param_groups:
            g["lr"] = R.cosine_lr(step, args.steps, args.lr, args.warmup_ratio)
        batches, sums = loader.next(args.grad_accum), {}                  # this rank's samples, encoded lazily
        for i, batch in enumerate(batches):
            with R.grad_sync(model, i == len(batches) - 1):
                with R.compute_context(args.dtype, d.device):                  # bf16 compute over fp32 weights
                    loss, terms = sft_loss(model, batch, bb, args, d.device)            # L_CE + λ·L_lvr
                (loss / len(batches)).backward()
            for k, v in {"loss": loss.detach(), **terms}.items():              # on the device: no host sync
                sums[k] = sums.get(k, 0.0) + v / len(batches)
        R.check_finite(sums["loss"], step, sums)                          # before the update, after backward
        gnorm = R.clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lens = [len(s["input_ids"]) for b in batches for s in b]
        log.log(step + 1, {**{k: R.all_reduce_mean(v, d) for k, v in sums.items()}, "lr": opt.param_groups[0]["lr"],
                           "grad_norm": gnorm}, sum(lens), R.step_flops(bb.model, lens))
        R.checkpoint_every(args, step + 1, model, opt, loader)
        if step + 1 == args.stop_after:
            break
    loader.close()
    log.close()
    C.print0(skips.summary())

    # ------------------------------------------------------------------------------------------------------------
    # Save and evaluate
    # ------------------------------------------------------------------------------------------------------------
    export_dir = export(bb, model, args, d, latent_end_token=args.latent_end_token)
    R.close_distributed(d)
    if args.eval and d.main:                      # after the process group: no rank waits on a collective timeout
        evaluate_export(args, export_dir, d.device)
    return bb


if __name__ == "__main__":
    main(*R.parse_args(Args))              # (args, the fields given on the command line)
