# Docs: docs/latent_pretrain.md
"""Latent prediction pretraining from image–caption pairs (the proposal "Data-Efficient Latent Reasoning Training").

From the caption ALONE (no image in the context) the MLLM predicts the latent its own frozen vision tower produces for
the paired image: K learnable `<|latent_pad|>` queries follow the caption, a head M_φ maps their hidden states to ẑ_k,
which is pulled towards the frozen target z_k (L_inst) and, pooled, contrasted against the other images of the global
batch (L_batch), next to the caption LM loss (L_NTP):  L = 1.0·L_NTP + 1.0·L_inst + 0.5·L_batch.
`--stage finetune` is the downstream step: sft.py from the pretrained export (or the untouched backbone, the baseline)
on GQA / ScienceQA, then eval.py. `--stage analyze` (also run after pretraining when held-out pairs exist) measures
the latent space: text→image retrieval, cosine histograms, PCA by category (latent_io.py).

Launch (the same file runs under python and torchrun; FSDP2 shards under torchrun):
    python latent_pretrain.py                              # CPU toy: extract targets, pretrain, export, analyze
    python latent_pretrain.py --stage finetune --init runs/latent_pretrain/export --run-dir runs/ft_latent
    python latent_pretrain.py --stage finetune --init toy-base --run-dir runs/ft_base     # the baseline of the pair
    python latent_pretrain.py --model Qwen/Qwen2.5-VL-3B-Instruct --data coco/annotations/captions_train2017.json \
        --image-root coco/train2017                                                     # one GPU
    torchrun --nproc_per_node 8 latent_pretrain.py --model Qwen/Qwen2.5-VL-7B-Instruct \
        --data "cc3m/cc3m-train-{0000..0575}.tar" --steps 10000      # CC3M WebDataset shards, batch 8 × 32 = 256
    torchrun --nproc_per_node 8 latent_pretrain.py --stage finetune --init runs/latent_pretrain/export \
        --gqa-dir GQA --scienceqa-dir ScienceQA --steps 3000

No released code exists: "design" = this repo's choice where the proposal is silent, with its precedent (docs page).

| choice | default | flag | source |
|---|---|---|---|
| targets | frozen tower + merger, 448 px, 2×2 adaptive avg pool → K = 4; z_glob = mean token | `--pool bands` | design; Mirage |
| centring | subtract the dataset mean if mean cos(random pair) > 0.5 | `--center` | design |
| h_k, head M_φ | final normed state; RMSNorm → Linear(D, D·4096/3584) → GELU → Linear | `--latent-layer`, `--head` | design; VIRAL, Mirage |
| new token rows | own parameter at the head lr, written back into the embeddings on export | `--head-lr` | design |
| L_inst | 1 − cos | `--inst-loss` | Mirage, ILVR |
| L_batch | symmetric InfoNCE, τ 0.07 learnable, same-image captions not negatives | `--batch-loss siglip` | CLIP, SigLIP |
| global batch | one micro-step on all ranks (gradient-preserving all-gather) | `--per-micro` | this repo |
| loss weights | 1.0 / 1.0 / 0.5 | `--lam-ntp`, `--lam-inst`, `--lam-batch` | Mirage/ILVR; CoCa, VIRAL |
| schedule | lr 1e-5 (head 1e-4), wd 0.01, 2000 steps, warm-up 0.05 | `--lr`, `--head-lr`, `--steps` | design; steps a choice |
| finetune | sft.py, tower frozen, eval.py's lmms prompts and budget 256–2048·28² | `--min-pixels` | proposal |
"""
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common as C
import dataloader as D
import runtime as R
from latent_io import (TargetCache, cache_fingerprint, latent_report, read_pairs, toy_paths, write_finetune_records,
                       write_target_cache)

LATENT_START, LATENT_PAD, LATENT_END = "<|latent_start|>", "<|latent_pad|>", "<|latent_end|>"
CAPTION_PROMPT = "Describe an image."


# ----------------------------------------------------------------------------------------------------------------
# Args
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Args:
    stage: str = field(default="pretrain", metadata={"help": "pretrain (then analyze) | finetune | analyze | extract",
                                                     "choices": ["pretrain", "finetune", "analyze", "extract"]})
    model: str = field(default="toy-base", metadata=R.MODEL_HELP)
    init: str = field(default="", metadata={"help": "finetune/analyze: start from this export (or 'toy' = original)"})
    run_dir: str = field(default="runs/latent_pretrain", metadata={"help": "output directory"})
    data: str = field(default="toy", metadata={"help": "toy | captions_*.json (COCO) | Karpathy .parquet | "
                                                       "WebDataset shards 'dir/{0000..0099}.tar' or a glob"})
    image_root: str = field(default="", metadata={"help": "image folder of --data (COCO / Karpathy)"})
    val_data: str = field(default="", metadata={"help": "held-out pairs for the analysis (toy: coco val)"})
    val_image_root: str = field(default="", metadata={"help": "image folder of --val-data"})
    categories: str = field(default="", metadata={"help": "JSON {image_id: category} for the PCA plot / NMI"})
    cache_dir: str = field(default="", metadata={"help": "target cache (default <run-dir>/../latent_targets)"})
    shard_size: int = field(default=1024, metadata={"help": "images per cached safetensors shard"})
    image_size: int = field(default=448, metadata={"help": "fixed square image side for the targets (px)"})
    num_latents: int = field(default=4, metadata={"help": "K latent tokens per caption"})
    pool: str = field(default="grid", metadata={"help": "target pooling", "choices": ["grid", "bands"]})
    center: str = field(default="auto", metadata={"help": "subtract the target dataset mean",
                                                  "choices": ["auto", "true", "false"]})
    head: str = field(default="mlp", metadata={"help": "prediction head M_φ", "choices": ["mlp", "none", "attnpool"]})
    head_hidden: int = field(default=0, metadata={"help": "head width D_h (0 = D·4096/3584)"})
    latent_layer: int = field(default=-1, metadata={"help": "hidden_states index read at the pads (-1 = final)"})
    inst_loss: str = field(default="cosine", metadata={"help": "L_inst", "choices": ["cosine", "l2", "l1", "infonce"]})
    batch_loss: str = field(default="infonce", metadata={"help": "L_batch", "choices": ["infonce", "siglip", "none"]})
    lam_ntp: float = field(default=1.0, metadata={"help": "weight of L_NTP"})
    lam_inst: float = field(default=1.0, metadata={"help": "weight of L_inst"})
    lam_batch: float = field(default=0.5, metadata={"help": "weight of L_batch"})
    temperature: float = field(default=0.07, metadata={"help": "initial InfoNCE temperature (learnable)"})
    mask_same_image: bool = field(default=True, metadata={"help": "captions of one image are not negatives"})
    steps: int = field(default=2000, metadata={"help": "optimizer steps (≈ 0.9 COCO epoch at batch 256)"})
    per_micro: int = field(default=32, metadata={"help": "captions (finetune: samples) per micro-batch per rank"})
    micro_tokens: int = field(default=0, metadata={"help": "finetune only: " + R.MICRO_TOKENS_HELP["help"]})
    data_workers: int = field(default=4, metadata=R.DATA_WORKERS_HELP)
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per rank per step"})
    lr: float = field(default=1e-5, metadata={"help": "peak LLM learning rate"})
    head_lr: float = field(default=1e-4, metadata={"help": "head / temperature / new token rows lr"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "linear warmup fraction, then cosine"})
    activation_checkpointing: bool = field(default=True, metadata={"help": "recompute activations per block"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = never)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "keep the newest N resume checkpoints (0 = all)"})
    resume: bool = field(default=False, metadata={"help": "resume from the latest checkpoint in run_dir"})
    seed: int = field(default=0, metadata={"help": "seed of data order and init"})
    max_tokens: int = field(default=4096, metadata={"help": "drop (count) samples longer than this"})
    pack: bool = field(default=True, metadata={"help": "padding-free packing (--no-pack: the padded baseline)"})
    gqa_dir: str = field(default="", metadata={"help": "finetune: GQA folder (lmms-lab layout; toy: data/toy/gqa)"})
    scienceqa_dir: str = field(default="", metadata={"help": "finetune: ScienceQA folder (toy: data/toy/scienceqa)"})
    min_pixels: int = field(default=256 * 28 * 28, metadata={"help": "finetune/eval image pixel budget, min"})
    max_pixels: int = field(default=2048 * 28 * 28, metadata={"help": "finetune/eval image pixel budget, max"})
    eval: bool = field(default=True, metadata={"help": "finetune: evaluate the export on GQA / ScienceQA"})
    eval_limit: int = field(default=0, metadata={"help": "items per benchmark (0 = all)"})
    analyze: bool = field(default=True, metadata={"help": "run the analysis after pretraining"})
    dtype: str = field(default="auto", metadata=R.DTYPE_HELP)


# A tiny model needs a large lr, small images and few steps to move in a CPU minute: applied (and printed) only when
# the model is the toy backbone or an export of it (--init for finetune / analyze), and only to the fields not given.
TOY_PRESET = dict(lr=1e-3, steps=60, head_lr=1e-3, activation_checkpointing=False, min_pixels=16 * 28 * 28,
                  max_pixels=64 * 28 * 28, eval_limit=48, data_workers=0)


def resolve(args: Args, explicit: set[str] | None = None) -> Args:
    """The toy preset on the fields not in `explicit` (default: those still at their dataclass default); `--data toy`
    → the toy world's COCO-format captions, GQA and ScienceQA. No model is loaded."""
    if C.is_toy(args.init if args.stage in ("finetune", "analyze") and args.init else args.model):
        R.apply_preset(args, TOY_PRESET, R.changed_fields(args) if explicit is None else explicit,
                       "toy preset", "model is the toy backbone")
    if args.data == "toy":
        for k, v in toy_paths().items():
            if not getattr(args, k) or k == "data":
                setattr(args, k, v)
    if args.init not in ("", "toy"):
        C.check_model_name(args.init)
    if args.micro_tokens and args.stage == "pretrain":
        R.arg_error("--micro-tokens: pretraining micro-batches count captions (L_batch gathers as many from every "
                    "rank); use --per-micro")
    return R.check_args(args)


# ----------------------------------------------------------------------------------------------------------------
# Data and targets: image–caption pairs (the readers, the toy paths and the target cache are in latent_io.py);
# targets from the frozen vision tower + merger, pooled, cached (the tower never runs during pretraining)
# ----------------------------------------------------------------------------------------------------------------
def pool_targets(tokens: torch.Tensor, grid_hw: tuple[int, int], k: int, mode: str = "grid") -> torch.Tensor:
    """tokens [H·W, D] in raster order → z_tok [K, D]. grid: √K×√K adaptive average pooling of the H×W map
    (K = 4: the four quadrants). bands: Mirage's 1-D averaging of K contiguous chunks of the raster sequence."""
    if mode == "grid":
        s = math.isqrt(k)
        assert s * s == k, "--pool grid needs a square K"
        return F.adaptive_avg_pool2d(tokens.float().T.reshape(1, -1, *grid_hw), s).reshape(-1, k).T
    if mode == "bands":
        return torch.stack([c.float().mean(0) for c in torch.tensor_split(tokens, k, dim=0)])
    raise ValueError(mode)


@torch.no_grad()
def encode_images(bb: C.Backbone, images, size: int, k: int, mode: str):
    """PIL images → (z_tok [n, K, D], z_glob [n, D]) from the frozen tower + merger at a fixed size×size."""
    out = bb.image_processor(images=[im.convert("RGB").resize((size, size)) for im in images], do_resize=False,
                             return_tensors="pt")
    dev = next(bb.model.parameters()).device
    feats = bb.model.model.get_image_features(out["pixel_values"].to(dev, bb.model.dtype),
                                              out["image_grid_thw"].to(dev), return_dict=True).pooler_output
    merge = bb.model.config.vision_config.spatial_merge_size
    z_tok = [pool_targets(f, (int(g[1]) // merge, int(g[2]) // merge), k, mode) for f, g in
             zip(feats, out["image_grid_thw"])]
    return torch.stack(z_tok).cpu(), torch.stack([f.float().mean(0) for f in feats]).cpu()


def extract_targets(bb: C.Backbone, args: Args, d: R.Dist, images: dict, cache_dir: Path) -> Path:
    """(z_tok, z_glob) of every image, computed once into `cache_dir` (latent_io.write_target_cache: fp16 safetensors
    shards with the sums for the dataset mean / std; rank r extracts shards r, r+W, ...; existing shards are reused)."""
    encode = lambda pil: encode_images(bb, pil, args.image_size, args.num_latents, args.pool)  # noqa: E731
    return write_target_cache(encode, images, cache_dir, d, args.shard_size, args.num_latents)


def load_targets(bb, args, d, data: str, image_root: str, skips, root: Path, prefix: str = ""):
    """→ (pairs, cache) of one caption set: its targets in root/<prefix><fingerprint>, extracted where missing, and
    centred per --center."""
    pairs, images = read_pairs(data, image_root, skips)
    cache = TargetCache(extract_targets(bb, args, d, images, root / (prefix + cache_fingerprint(bb, args, images))))
    if pairs is None:             # WebDataset: captions come from the cache; a skipped sample lost its caption
        for key, reason in cache.skipped.items():
            skips.add(reason, key)
        pairs = cache.captions
    for c, k in pairs:            # every caption dropped is a counted sample, on fresh and reused caches alike
        if k not in cache.index:
            skips.add(cache.skipped.get(k, "image without target"), k)
    pairs = [(c, k) for c, k in pairs if k in cache.index]
    cos = cache.random_pair_cosine()
    cache.center = args.center == "true" or (args.center == "auto" and cos > 0.5)
    C.print0(f"targets {cache.dir}: {len(cache.index)} images, mean cos(random pair) {cos:.3f}"
             f"{f' -> centred {cache.random_pair_cosine():.3f}' if cache.center else ' (not centred)'}")
    return pairs, cache


# ----------------------------------------------------------------------------------------------------------------
# Model surgery: latent tokens, caption-only samples, the prediction head
# ----------------------------------------------------------------------------------------------------------------
def encode_caption(bb: C.Backbone, caption: str, k: int) -> dict:
    """<|im_start|>user\\nDescribe an image.<|im_end|>\\n<|im_start|>assistant\\n{caption}<|latent_start|>
    <|latent_pad|>×K<|latent_end|><|im_end|> — no image anywhere; labels on the caption tokens only."""
    span = LATENT_START + LATENT_PAD * k + LATENT_END
    s = C.encode_chat(bb, [{"role": "user", "content": CAPTION_PROMPT},
                           {"role": "assistant", "content": caption + span}], default_system=False)
    special = [bb.token_id(t) for t in (LATENT_START, LATENT_PAD, LATENT_END, "<|im_end|>")]
    s["labels"][torch.isin(s["input_ids"], torch.tensor(special))] = C.IGNORE
    s["caption_mask"] = s["labels"] != C.IGNORE
    return s


class LatentHead(nn.Module):
    """M_φ: per pad token RMSNorm(D) → Linear(D, D_h) → GELU → Linear(D_h, D_z) (`mlp`); identity (`none`, Mirage);
    or K learned queries attending over the caption states, then the MLP (`attnpool`). Also holds the learnable
    InfoNCE logit scale (and SigLIP bias)."""

    def __init__(self, kind: str, d: int, d_z: int, d_h: int, k: int, temperature: float, batch_loss: str):
        super().__init__()
        self.kind = kind
        if kind in ("mlp", "attnpool"):
            self.mlp = nn.Sequential(nn.RMSNorm(d, eps=1e-6), nn.Linear(d, d_h), nn.GELU(), nn.Linear(d_h, d_z))
        elif d != d_z:
            raise ValueError("--head none needs target dim == hidden size")
        if kind == "attnpool":
            self.queries = nn.Parameter(torch.randn(k, d) * d ** -0.5)
            self.key_norm = nn.RMSNorm(d, eps=1e-6)
            self.attn = nn.MultiheadAttention(d, num_heads=max(1, d // 64), batch_first=True)
        scale, bias = (math.log(10.0), -10.0) if batch_loss == "siglip" else (math.log(1 / temperature), 0.0)
        self.logit_scale = nn.Parameter(torch.tensor([scale]))   # 1-D: FSDP2 cannot shard 0-D parameters
        self.logit_bias = nn.Parameter(torch.tensor([bias]))

    def forward(self, pad_states, caption_states=None, caption_pad_mask=None):
        """pad_states [B, K, D]; attnpool reads caption_states [B, L, D] with key padding mask [B, L]."""
        if self.kind == "none":
            return pad_states
        if self.kind == "attnpool":
            q = self.queries.expand(caption_states.shape[0], -1, -1).to(caption_states.dtype)
            kv = self.key_norm(caption_states)
            pad_states, _ = self.attn(q, kv, kv, key_padding_mask=caption_pad_mask, need_weights=False)
        return self.mlp(pad_states)


class LatentPretrainer(nn.Module):
    """The VLM, the head and the latent tokens' embedding rows under one root (one FSDP2 root, one optimizer, one
    checkpoint). The rows are their own parameter (`latent_rows`, so they get their own learning rate): scattered into
    inputs_embeds and, when input and output embeddings are tied, into the logits' columns."""

    def __init__(self, vlm, head, latent_ids: list[int], k: int, latent_layer: int):
        super().__init__()
        self.vlm, self.head, self.latent_ids, self.k, self.latent_layer = vlm, head, latent_ids, k, latent_layer
        self.pad_id = latent_ids[1]
        emb = vlm.get_input_embeddings().weight
        self.tied = vlm.get_output_embeddings().weight is emb
        self.latent_rows = nn.Parameter(emb[latent_ids].detach().clone())
        self._no_split_modules = getattr(vlm, "_no_split_modules", None)

    def forward(self, input_ids, position_ids, caption_mask, seq_lens, attention_mask=None, labels=None):
        """→ (logits [R, T, V], ẑ [B, K, D_z], logit scale, logit bias) for B caption samples: one packed row (R = 1,
        attention_mask None) or B right-padded rows (--no-pack). Given `labels` [R, T], L_NTP takes the logits' place:
        the LM head at the supervised positions only, in chunks (common.chunked_ce), never [R, T, V] logits. The LM
        head and the temperature parameters are used inside forward so FSDP2 has gathered them."""
        ids = torch.tensor(self.latent_ids, device=input_ids.device)
        is_new = input_ids[..., None] == ids                                            # [R, T, 3]
        emb = self.vlm.get_input_embeddings()(input_ids)
        rows = self.latent_rows.to(emb.dtype)
        emb = torch.where(is_new.any(-1, keepdim=True), rows[is_new.int().argmax(-1)], emb)
        out = self.vlm.model(inputs_embeds=emb, position_ids=position_ids, attention_mask=attention_mask,
                             use_cache=False, output_hidden_states=self.latent_layer != -1)
        h = out.last_hidden_state
        logits = self.lm_logits(h, ids, rows) if labels is None else self.ntp_loss(h, ids, rows, labels)
        states = h if self.latent_layer == -1 else out.hidden_states[self.latent_layer]
        B = len(seq_lens)
        pads = states[input_ids == self.pad_id].view(B, self.k, -1)  # h_k at <|latent_pad|> k (row-major = sample order)
        scale, bias = self.head.logit_scale, self.head.logit_bias
        if self.head.kind != "attnpool":
            return logits, self.head(pads), scale, bias
        sample = torch.arange(B, device=input_ids.device)                              # which sample owns each token
        owner = (sample.repeat_interleave(seq_lens.to(input_ids.device))[None] if attention_mask is None
                 else sample[:, None].expand_as(input_ids))
        idx = [caption_mask & (owner == b) for b in range(B)]
        cap = states.new_zeros(B, max(int(i.sum()) for i in idx), states.shape[-1])
        key_pad = torch.ones(cap.shape[:2], dtype=torch.bool, device=states.device)
        for b, i in enumerate(idx):
            n = int(i.sum())
            cap[b, :n], key_pad[b, :n] = states[i], False
        return logits, self.head(pads, cap, key_pad), scale, bias

    def lm_logits(self, h, ids, rows):
        """The LM head, with the latent tokens' output columns from `latent_rows` when the embeddings are tied."""
        logits = self.vlm.lm_head(h)
        return logits.index_copy(-1, ids, h @ rows.T) if self.tied else logits

    def ntp_loss(self, h, ids, rows, labels):
        """L_NTP = next_token_loss(lm_logits(h), labels) without the logits: hidden states at the supervised positions
        [n, D] through chunked_ce, the latent tokens' columns from `rows` when tied (as lm_logits)."""
        keep, target = C.supervised_positions(labels)
        weight, bias = C.lm_head_weight(self.vlm.lm_head)      # tied: the latent columns from `rows`, no [V, D] copy
        return C.chunked_ce(h[keep], weight, target, bias=bias, columns=(ids, rows) if self.tied else None)

    def export_state_dict(self, sd: dict) -> dict:
        """Full module state dict → the plain VLM's, with the trained latent rows written back into the embedding
        matrix (and the tied output matrix)."""
        vlm = {k[4:]: v for k, v in sd.items() if k.startswith("vlm.")}
        for k in [k for k in vlm if k.endswith("embed_tokens.weight") or (self.tied and k == "lm_head.weight")]:
            vlm[k] = vlm[k].clone()                                  # the live (unsharded) weights stay untouched
            vlm[k][self.latent_ids] = sd["latent_rows"].to(vlm[k])
        return vlm


def build_module(bb: C.Backbone, args: Args, d_z: int) -> LatentPretrainer:
    """The surgery: three new tokens, the head, the latent rows; the vision tower frozen (the targets come from it),
    and the temperature parameters the chosen losses do not use frozen (an optimizer state for a never-stepped
    parameter breaks resuming)."""
    ids = C.add_special_tokens(bb, [LATENT_START, LATENT_PAD, LATENT_END])  # no-op on an export that has them
    dim = bb.model.config.text_config.hidden_size
    head = LatentHead(args.head, dim, d_z, args.head_hidden or round(dim * 4096 / 3584), args.num_latents,
                      args.temperature, args.batch_loss).to(bb.model.device, bb.model.dtype)
    for p in bb.model.model.visual.parameters():
        p.requires_grad_(False)
    head.logit_bias.requires_grad_(args.batch_loss == "siglip")
    head.logit_scale.requires_grad_(args.batch_loss != "none" or args.inst_loss == "infonce")
    return LatentPretrainer(bb.model, head, ids, args.num_latents, args.latent_layer)


def param_groups(model: LatentPretrainer, args: Args) -> list[dict]:
    """LLM at --lr; head, temperature and the new token rows at --head-lr. Built from the (sharded) model's own
    parameters: FSDP2 replaces the parameter objects, so an optimizer must be built after sharding."""
    new = [model.latent_rows] + [p for p in model.head.parameters() if p.requires_grad]
    return [{"params": [p for p in model.vlm.parameters() if p.requires_grad], "lr": args.lr},
            {"params": new, "lr": args.head_lr}]


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------
class GatherGlobal(torch.autograd.Function):
    """Concatenate x over ranks (rank order), gradient-preserving: backward hands each rank its rows of the
    rank-summed gradient (all_reduce, then slice). torch.distributed.nn's all_gather does the same but is deprecated
    in torch 2.13 and, with gloo, aborts now and then at process-group teardown (measured: 4 of 15 runs)."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_global(x: torch.Tensor) -> torch.Tensor:
    return GatherGlobal.apply(x) if dist.is_initialized() and dist.get_world_size() > 1 else x


def instance_loss(z_hat: torch.Tensor, z_tok: torch.Tensor, kind: str, cache: TargetCache | None = None,
                  logit_scale: torch.Tensor | None = None) -> torch.Tensor:
    """L_inst over [B, K, D]. cosine: mean_k (1 − cos(ẑ_k, z_k)) (Mirage/ILVR); l2 / l1: on standardised targets
    (z − μ)/σ; infonce: each ẑ_k against all B·K target tokens of the micro-batch."""
    z_hat = z_hat.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(z_hat, z_tok, dim=-1)).mean()
    if kind in ("l2", "l1"):
        mu = 0.0 if cache is None or cache.center else cache.tok_mean.to(z_tok)
        target = (z_tok - mu) / (1.0 if cache is None else cache.tok_std.to(z_tok))
        return F.mse_loss(z_hat, target) if kind == "l2" else F.l1_loss(z_hat, target)
    if kind == "infonce":
        p, g = F.normalize(z_hat.flatten(0, 1), dim=-1), F.normalize(z_tok.flatten(0, 1), dim=-1)
        logits = logit_scale.float().exp().clamp(max=100) * p @ g.T
        return F.cross_entropy(logits, torch.arange(len(p), device=p.device))
    raise ValueError(kind)


def batch_contrastive_loss(pred: torch.Tensor, target: torch.Tensor, image_ids: torch.Tensor,
                           logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None, kind: str = "infonce",
                           mask_same_image: bool = True) -> torch.Tensor:
    """L_batch over the GLOBAL batch. pred = mean_k ẑ_k [B, D], target = z_glob [B, D] (this rank's rows).
    infonce (CLIP): ½(CE(s·p̂ Ĝᵀ) + CE(s·ĝ P̂ᵀ)), s = exp(logit_scale) ≤ 100, local rows against all gathered columns;
    captions sharing an image are removed from each other's negatives. siglip: −mean log σ(y·(s·p̂ĝᵀ + b)) with
    same-image pairs labelled +1. Each rank returns the mean over its own rows, so the rank-average (what FSDP's
    gradient mean computes) equals the single-process loss on the concatenated batch."""
    p, g = F.normalize(pred.float(), dim=-1), F.normalize(target.float(), dim=-1)
    P, G, ids = gather_global(p), gather_global(g), gather_global(image_ids)
    rank = dist.get_rank() if dist.is_initialized() else 0
    rows = torch.arange(len(p), device=p.device) + rank * len(p)
    s = logit_scale.float().exp().clamp(max=100)
    same = image_ids[:, None] == ids[None, :]
    own = torch.zeros_like(same)
    own[torch.arange(len(p)), rows] = True
    if kind == "siglip":
        labels = torch.where(same, 1.0, -1.0)          # own pairs included
        return -F.logsigmoid(labels * (s * p @ G.T + logit_bias.float())).sum(1).mean()
    blocked = same & ~own if mask_same_image else torch.zeros_like(same)
    t2i = (s * p @ G.T).masked_fill(blocked, float("-inf"))
    i2t = (s * g @ P.T).masked_fill(blocked, float("-inf"))
    return (F.cross_entropy(t2i, rows) + F.cross_entropy(i2t, rows)) / 2


def pretrain_loss(model: LatentPretrainer, batch: dict, z_tok, z_glob, image_ids, args: Args, cache, device):
    """L = λ_ntp·L_NTP + λ_inst·L_inst + λ_batch·L_batch on one micro-batch (packed, or padded with --no-pack)."""
    mask = batch.get("attention_mask")                                  # None: packed row; else --no-pack rows
    with R.compute_context(args.dtype, device):                      # bf16 forward; the losses below in fp32
        l_ntp, z_hat, scale, bias = model(*(batch[k].to(device) for k in ("input_ids", "position_ids",
                                                                          "caption_mask")),
                                          batch["seq_lens"], None if mask is None else mask.to(device),
                                          labels=batch["labels"].to(device))   # L_NTP: caption tokens, chunked CE
    terms = {"loss_ntp": l_ntp,
             "loss_inst": instance_loss(z_hat, z_tok, args.inst_loss, cache, scale)}     # L_inst: ẑ_k vs z_k
    total = args.lam_ntp * terms["loss_ntp"] + args.lam_inst * terms["loss_inst"]
    if args.batch_loss != "none":                                # L_batch: pooled mean_k ẑ_k vs z_glob, global batch
        terms["loss_batch"] = batch_contrastive_loss(z_hat.float().mean(1), z_glob, image_ids, scale, bias,
                                                     args.batch_loss, args.mask_same_image)
        total = total + args.lam_batch * terms["loss_batch"]
    return total, terms


# ----------------------------------------------------------------------------------------------------------------
# Export and analysis: the head beside the HF export; retrieval, cosine histograms, PCA by category
# ----------------------------------------------------------------------------------------------------------------
def save_head(args: Args, sd: dict, cache: TargetCache, export_dir: str):
    """M_φ and what the analysis needs to rebuild it, beside the plain HF export (which never needs it)."""
    from safetensors.torch import save_file
    keep = ("head", "head_hidden", "num_latents", "latent_layer", "image_size", "pool", "batch_loss", "temperature")
    save_file({k[5:]: v.contiguous() for k, v in sd.items() if k.startswith("head.")},
              os.path.join(export_dir, "latent_head.safetensors"),
              metadata={"args": json.dumps({k: getattr(args, k) for k in keep}),
                        "center": json.dumps(bool(cache.center)), "cache_dir": cache.dir})


@torch.no_grad()
def analyze(args: Args, d: R.Dist, skips: D.Skips, export: str | Path | None = None):
    """--stage analyze (and after pretraining): retrieval R@k of ẑ against z on held-out pairs, matched vs random
    cosines, k-means NMI by category, analysis.png and analysis.json in --run-dir."""
    if not d.main:
        return None
    from safetensors import safe_open
    from safetensors.torch import load_file
    export = Path(export or args.init)
    with safe_open(str(export / "latent_head.safetensors"), "pt") as f:
        meta = f.metadata()
    for k, v in json.loads(meta["args"]).items():
        setattr(args, k, v)
    bb = C.load_backbone(str(export), d.device)
    pairs, cache = load_targets(bb, args, R.Dist(device=d.device), args.val_data, args.val_image_root, skips,
                                Path(meta["cache_dir"]).parent, "val-")
    cache.center = json.loads(meta["center"])
    if cache.center:  # centre by the TRAINING mean, as during pretraining
        train_cache = TargetCache(meta["cache_dir"])
        cache.tok_mean, cache.glob_mean = train_cache.tok_mean, train_cache.glob_mean
    model = build_module(bb, args, cache.glob_mean.numel())
    model.head.load_state_dict(load_file(str(export / "latent_head.safetensors")))
    model.eval()
    keys = sorted({k for _, k in pairs})
    z_tok, z_glob = cache.get(keys)
    pred_tok = []
    for i in range(0, len(pairs), 32):
        batch = C.pack(bb, [encode_caption(bb, c, args.num_latents) for c, _ in pairs[i:i + 32]], ("caption_mask",))
        pred_tok.append(model(*(batch[k].to(d.device) for k in ("input_ids", "position_ids", "caption_mask")),
                              batch["seq_lens"])[1].float().cpu())                              # ẑ [B, K, D_z]
    gt = torch.tensor([keys.index(k) for _, k in pairs])
    cats = json.load(open(args.categories)) if args.categories and os.path.exists(args.categories) else {}
    labels = [cats.get(k, "?") for _, k in pairs] + [cats.get(k, "?") for k in keys]   # queries, then gallery
    return latent_report(torch.cat(pred_tok), z_tok, z_glob, gt, labels, Path(args.run_dir))


# ----------------------------------------------------------------------------------------------------------------
# Downstream stage: GQA / ScienceQA as sft.py records (latent_io.py) → sft.py from --init → eval.py on their tests
# ----------------------------------------------------------------------------------------------------------------
def finetune(args: Args, d: R.Dist, skips: D.Skips):
    """--stage finetune: plain SFT (sft.py: answer CE only, vision tower frozen) from --init on GQA / ScienceQA, then
    eval.py on their test splits. The baseline of the comparison is the same command from the untouched backbone."""
    import eval as E
    import sft
    records = Path(args.run_dir) / "finetune_data" / "records.jsonl"
    if d.main:
        write_finetune_records(args, records, skips)
        C.print0(f"finetune records: {records}; {skips.summary()}")
    if d.world > 1:
        dist.barrier()                                               # the records exist before any rank reads them
    same = ("run_dir", "steps", "per_micro", "micro_tokens", "data_workers", "grad_accum", "lr", "warmup_ratio",
            "weight_decay", "min_pixels", "max_pixels", "max_tokens", "pack", "activation_checkpointing", "dtype",
            "seed", "save_every",
            "keep_checkpoints", "resume")
    sft_args = sft.Args(model=args.init or args.model, data=str(records), train_vision=False, eval="",
                        **{k: getattr(args, k) for k in same})
    sft.main(sft_args, explicit={f.name for f in fields(sft_args)})  # every field given: no second toy preset
    export_dir = os.path.join(args.run_dir, "export")
    if args.eval and d.main:
        for bench, folder in (("gqa", args.gqa_dir), ("scienceqa", args.scienceqa_dir)):
            if folder:
                E.evaluate(E.Args(benchmark=bench, data_dir=folder, model=export_dir, limit=args.eval_limit,
                                  min_pixels=args.min_pixels, max_pixels=args.max_pixels, overwrite=True,
                                  output=os.path.join(args.run_dir, f"{bench}_summary.json")))


# ----------------------------------------------------------------------------------------------------------------
# Training loop: setup → for step → for micro-batch → loss → backward → clip/step → log → checkpoint → export → eval
# ----------------------------------------------------------------------------------------------------------------
def main(args: Args, explicit: set[str] | None = None):
    d = R.init_distributed()
    resolve(args, explicit)
    uses_model = not (args.stage in ("finetune", "analyze") and args.init)
    if args.init == "toy-base" or (uses_model and args.model == "toy-base"):  # the pretrained toy "stage 0"
        from toy_base import ensure_toy_base                                   # (toy_base.py), built once
        args.model, args.init = ((ensure_toy_base() if v == "toy-base" else v) for v in (args.model, args.init))
    R.save_run_config(args.run_dir, args, "run_config.json" if args.stage == "pretrain"
                      else f"run_config_{args.stage}.json")               # finetune: sft.py writes run_config.json
    R.seed_everything(args.seed)
    skips = D.Skips()
    cache_root = Path(args.cache_dir or Path(args.run_dir).parent / "latent_targets")
    if args.stage != "pretrain":
        if args.stage == "extract":
            load_targets(C.load_backbone(args.model, d.device, seed=args.seed), args, d, args.data, args.image_root,
                         skips, cache_root)
        else:
            {"finetune": finetune, "analyze": analyze}[args.stage](args, d, skips)
        C.print0(skips.summary())
        R.close_distributed(d)     # (finetune: sft.py has already torn the process group down)
        return
    bb = C.load_backbone(args.model, d.device, dtype=torch.float32, seed=args.seed,  # fp32 masters; compute: --dtype
                         rank0_only=True)                # other ranks: meta, filled from rank 0 by shard_model
    R.replicate_from_rank0(bb.model.model.visual, d)     # but the tower whole on every rank: each extracts targets
    pairs, cache = load_targets(bb, args, d, args.data, args.image_root, skips, cache_root)  # frozen z_tok, z_glob
    model = build_module(bb, args, cache.glob_mean.numel())
    image_number = {k: i for i, k in enumerate(sorted(cache.index))}
    data = D.LazySamples(pairs, lambda pair: {**encode_caption(bb, pair[0], args.num_latents), "image_key": pair[1],
                                              "image_id": image_number[pair[1]]}, skips, args.max_tokens, "pretrain",
                         args.data_workers)                      # text only: every caption encodes as it measured
    C.print0(f"pretrain: {len(data)} captions of {len(image_number)} images; {skips.summary()}")
    if not data:
        raise SystemExit(f"{args.data}: no usable samples ({skips.summary()})")
    order = D.MicroBatches(data.lengths, per_micro=args.per_micro, seed=args.seed)  # captions: as many on every rank
    if args.activation_checkpointing:
        bb.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = R.shard_model(model, d, dtype=args.dtype)
    opt = torch.optim.AdamW(param_groups(model, args), weight_decay=args.weight_decay)
    start = R.resume(args, model, opt, order)                          # --resume: weights, optimizer, RNG, data

    def collate(samples):           # in the workers: the packed (or padded) row, its captions' image keys and numbers
        return {"batch": (C.pack if args.pack else C.pad_batch)(bb, samples, extra_keys=("caption_mask",)),
                "image_keys": [s["image_key"] for s in samples],
                "image_ids": torch.tensor([s["image_id"] for s in samples])}
    loader = D.Loader(data, order, skips, d.rank, d.world, collate, args.data_workers, d.device)
    log = R.RunLogger(args.run_dir, args.steps, d, desc="pretrain", start_step=start)
    model.train()
    for step in range(start, args.steps):
        for g, peak in zip(opt.param_groups, (args.lr, args.head_lr)):
            g["lr"] = R.cosine_lr(step, args.steps, peak, args.warmup_ratio)
        micro = loader.next(args.grad_accum)                              # this rank's captions, encoded and packed
        loss_sum, tokens, flops = torch.zeros((), device=d.device), 0, 0.0
        term_sums = {}
        for i, item in enumerate(micro):
            z_tok, z_glob = (t.to(d.device) for t in cache.get(item["image_keys"]))
            image_ids, batch = item["image_ids"].to(d.device), item["batch"]
            lengths = batch["seq_lens"].tolist()
            with R.grad_sync(model, i == len(micro) - 1):
                loss, terms = pretrain_loss(model, batch, z_tok, z_glob, image_ids, args, cache, d.device)
                (loss / len(micro)).backward()
            loss_sum += loss.detach() / len(micro)                         # no host sync before backward
            for k, v in terms.items():
                term_sums[k] = term_sums.get(k, 0.0) + v.detach() / len(micro)
            tokens += sum(lengths)
            flops += R.step_flops(bb.model, lengths)
        R.check_finite(loss_sum, step, term_sums)
        gnorm = R.clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.log(step + 1, {"loss": R.all_reduce_mean(loss_sum.item(), d),
                           **{k: R.all_reduce_mean(v.item(), d) for k, v in term_sums.items()},
                           "lr": opt.param_groups[0]["lr"], "grad_norm": gnorm}, tokens, flops)
        R.checkpoint_every(args, step + 1, model, opt, loader)
    loader.close()
    log.close()

    # ------------------------------------------------------------------------------------------------------------
    # Save and evaluate
    # ------------------------------------------------------------------------------------------------------------
    export_dir = os.path.join(args.run_dir, "export")
    sd = R.full_state_dict(model)
    R.export_hf(bb, export_dir, state_dict=model.export_state_dict(sd), model=bb.model,
                dtype=R.compute_dtype(args.dtype, d.device))                # a plain HF model: latent rows written back
    if d.main:
        save_head(args, sd, cache, export_dir)
    C.print0(f"exported {export_dir} (+ latent_head.safetensors)")
    if args.analyze and args.val_data and d.main:
        analyze(args, d, skips, export_dir)
    C.print0(skips.summary())
    R.close_distributed(d)         # rank 0 may still be analysing: nobody tears gloo down under it


if __name__ == "__main__":
    main(*R.parse_args(Args))              # (args, the fields given on the command line)
