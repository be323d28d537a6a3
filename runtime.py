# Docs: docs/common.md ("runtime.py")
"""The machinery every training script shares, around the method (details and tests: docs/common.md).

  precision     --dtype: compute_dtype, compute_context (fp32 master weights, bf16 compute)
  distributed   init_distributed (python or torchrun) / close_distributed, shard_model (FSDP2, weights from rank 0),
                meta_copy, replicate_from_rank0, grad_sync, all_reduce_mean, cosine_lr, clip_grad_norm
  checkpoints   save_checkpoint / load_checkpoint / latest_checkpoint (torch.distributed.checkpoint), resume and
                checkpoint_every (the loop's two calls), export_hf
  run config    parse_args (warns once outside TESTED_VERSIONS), check_args, apply_preset, save_run_config
  logging       RunLogger (one dense line per step, metrics.jsonl, loss_curve.png), step_flops (MFU), check_finite

common.py holds what the methods share about the model and the data; this file imports it, never the reverse.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common import Backbone, _rank, check_model_name, print0

# --dtype is the compute dtype; trainable weights and AdamW state stay fp32 master weights (docs/common.md).
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_HELP = {"help": "compute dtype: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32; trainable weights and the "
                      "optimizer state stay fp32, losses are computed in fp32", "choices": ["auto", *DTYPES]}
# --help of the fields every training file shares, written once
MODEL_HELP = {"help": "toy-base (the pretrained toy) | toy (random init) | toy-qwen3vl | hub id | local dir"}
MICRO_TOKENS_HELP = {"help": "tokens per micro-batch: 0 = --per-micro samples (the papers' batches); N = at most N "
                             "tokens, so ranks do equal work (longer samples are counted skips)"}
DATA_WORKERS_HELP = {"help": "DataLoader processes per rank that encode samples (decode, resize, tokenise, pack); "
                             "0 = in the training process"}


def compute_dtype(name: str, device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def compute_context(dtype: str | torch.dtype, device):
    """Wrap forward + loss in this: autocast in one process; under FSDP2 (world > 1) shard_model's
    MixedPrecisionPolicy casts instead, so nothing (torchtitan's maybe_enable_amp). Losses upcast with .float()."""
    dtype = compute_dtype(dtype, device) if isinstance(dtype, str) else dtype
    if dtype == torch.float32 or (dist.is_initialized() and dist.get_world_size() > 1):
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# Distributed: the same file runs under python and torchrun
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> Dist:
    """One process under `python`; under `torchrun` nccl on CUDA, gloo on CPU."""
    cuda = torch.cuda.is_available() and device != "cpu"
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local, torch.device(f"cuda:{local}" if cuda else "cpu"))


def close_distributed(d: Dist):
    """The end of a run: every rank waits for the others (rank 0 may still be exporting), then the group is torn down."""
    if dist.is_initialized():                      # (torchrun with one process initialises a group too)
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def shard_model(model: torch.nn.Module, d: Dist, activation_checkpointing: bool = False,
                extra_units: tuple = (), dtype: str | torch.dtype = "auto",
                weights_from: torch.nn.Module | None = None) -> torch.nn.Module:
    """FSDP2 in torchtitan's order: activation checkpointing per block → fully_shard each block named in
    model._no_split_modules → `extra_units` (modules run outside the model's forward, e.g. a method's head) → the
    root. fp32 shards (the master weights AdamW steps) gathered in the compute `dtype`, gradients reduced in fp32.
    One process: left unsharded (compute_context autocasts instead).
    Start-up (docs/common.md): the weights come from rank 0 — the other ranks may hold the meta device
    (load_backbone(rank0_only=True)). Every rank shards the structure on the meta device, allocates only its own
    shards and receives them from rank 0 one tensor at a time, so no rank holds a second full copy. `weights_from`:
    a model of the same structure, already sharded, whose weights (cast to this model's dtypes) are copied instead:
    a frozen copy (lvr_grpo's reference, built by meta_copy) that never exists whole."""
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if d.world == 1 and weights_from is None:
        return model
    if d.world == 1:
        with _tied_weights_kept():
            return _copy_weights(model.to_empty(device=d.device), weights_from)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    bad = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    assert not bad, f"trainable parameters must be fp32 master weights (load_backbone(dtype=torch.float32)): {bad[:3]}"
    dtype = compute_dtype(dtype, d.device) if isinstance(dtype, str) else dtype
    mp = MixedPrecisionPolicy() if dtype == torch.float32 else \
        MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    full, buffers = _take_weights(model) if d.main and weights_from is None else ({}, {})
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    for module in [m for m in model.modules() if type(m).__name__ in block_names] + list(extra_units) + [model]:
        fully_shard(module, mp_policy=mp)
    model.to_empty(device=d.device)       # this rank's shards (and every buffer) allocated, not yet filled
    if weights_from is not None:
        return _copy_weights(model, weights_from)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():                 # buffers outside the state dict (rotary inv_freq): rank 0's values
        for name, buf in _nonpersistent_buffers(model).items():
            if d.main:
                buf.copy_(buffers[name])
            dist.broadcast(buf, src=0)
    return model


def _nonpersistent_buffers(model) -> dict:
    keys = model.state_dict().keys()
    return {n: b for n, b in model.named_buffers() if n not in keys}


def _take_weights(model) -> tuple[dict, dict]:
    """Rank 0: (state dict, buffers outside it), then the model itself moves to the meta device like the others."""
    full, buffers = model.state_dict(), _nonpersistent_buffers(model)
    with _tied_weights_kept():
        model.to("meta")
    return full, buffers


@contextlib.contextmanager
def _tied_weights_kept():
    """Module.to / to_empty swap each parameter's contents instead of replacing the object: tied weights stay tied."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


@torch.no_grad()
def replicate_from_rank0(module: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """Every rank gets rank 0's `module` whole, before sharding: for a part each rank runs on its own (latent_pretrain's
    vision tower extracts targets on every rank) while the rest stays on the meta device (load_backbone(rank0_only))."""
    if d.world == 1:
        return module
    if not d.main:
        with _tied_weights_kept():
            module.to_empty(device=d.device)
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t, src=0)
    return module


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The structure of `model` (modules, names, dtypes, tied weights, requires_grad) on the meta device: the
    skeleton of a frozen copy that shard_model(weights_from=...) fills after sharding."""
    import copy
    memo = {id(t): (torch.nn.Parameter(t.to("meta"), t.requires_grad) if isinstance(t, torch.nn.Parameter)
                    else t.to("meta")) for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


@torch.no_grad()
def _copy_weights(model, source):
    """Each parameter and buffer of `model` ← the same-named one of `source` (local shards under FSDP2: the two are
    sharded alike), cast to `model`'s dtype."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    src = {**dict(source.named_parameters(remove_duplicate=False)), **dict(source.named_buffers())}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        local(t).copy_(local(src[name]))
    return model


@contextlib.contextmanager
def grad_sync(model, enabled: bool):
    """Skip FSDP2's reduce-scatter on non-final accumulation micro-steps."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
    yield
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(True)


def all_reduce_mean(x: float, d: Dist) -> float:
    if d.world == 1:
        return float(x)
    t = torch.tensor(float(x), device=d.device)
    dist.all_reduce(t)
    return t.item() / d.world


def cosine_lr(step: int, total: int, lr: float, warmup_ratio: float = 0.03, min_ratio: float = 0.0) -> float:
    """Linear warmup over ceil(warmup_ratio·total) steps, then cosine decay to min_ratio·lr (HF's schedule)."""
    warm = math.ceil(warmup_ratio * total)
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def clip_grad_norm(model, max_norm: float) -> float:
    """Clip; returns the pre-clip total norm (FSDP2 DTensors included)."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints (resume) and the Hugging Face export
# ----------------------------------------------------------------------------------------------------------------
def _write_atomic(path: Path, text: str):
    """Write, flush to disk, then rename: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_id(run_dir: str | Path) -> str:
    """This run directory's id (created on first use); checkpoint sidecars carry it (see load_checkpoint)."""
    path = Path(run_dir) / "run_id"
    if not path.exists() and _rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, os.urandom(8).hex())
    if dist.is_initialized():
        dist.barrier()
    return path.read_text().strip()


def save_checkpoint(path: str | Path, model, optimizer, step: int, extra: dict, keep: int = 0):
    """Model + optimizer with torch.distributed.checkpoint (sharded under FSDP2), then a JSON sidecar (step, data
    position, RNG states, run id) written atomically: a checkpoint without a complete sidecar is never resumed.
    `keep` > 0 deletes all but the newest `keep`. DCP's `.metadata` is a pickle: resume only your own runs."""
    import shutil
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    path = Path(path)
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))
    rid = run_id(path.parent)
    if _rank() == 0:
        rng = {"python": repr(random.getstate()), "numpy": np.random.get_state()[1].tolist(),
               "numpy_pos": int(np.random.get_state()[2]), "torch": torch.get_rng_state().tolist()}
        _write_atomic(path / "trainer_state.json", json.dumps({"step": step, "run_id": rid, "rng": rng, **extra}))
        for old in _checkpoints(path.parent)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def _read_sidecar(ckpt: Path) -> dict | None:
    try:
        meta = json.loads((ckpt / "trainer_state.json").read_text())
        return meta if isinstance(meta, dict) and isinstance(meta.get("step"), int) else None
    except (OSError, ValueError):
        return None


def load_checkpoint(path: str | Path, model, optimizer) -> dict:
    """Restore model, optimizer and RNG states; returns the sidecar. Refuses a checkpoint whose run id differs from
    its run directory's, or that another user owns (its `.metadata` would be unpickled)."""
    import ast
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    path = Path(path)
    meta = _read_sidecar(path)
    if meta is None or meta.get("run_id") != run_id(path.parent) or path.stat().st_uid != os.getuid():
        raise RuntimeError(f"{path}: not a checkpoint written by a run of yours in this run directory; refusing to "
                           "resume from it (its .metadata would be unpickled)")
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = meta.pop("rng")
    random.setstate(ast.literal_eval(rng["python"]))
    np.random.set_state(("MT19937", np.array(rng["numpy"], dtype=np.uint32), rng["numpy_pos"], 0, 0.0))
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    return meta


def _checkpoints(run_dir: str | Path) -> list[Path]:
    """checkpoint-N folders, oldest first (N numeric; other names ignored)."""
    found = [p for p in Path(run_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint with a complete sidecar and shard metadata; a torn newer one is passed over (said)."""
    for ckpt in reversed(_checkpoints(run_dir)):
        if _read_sidecar(ckpt) is not None and (ckpt / ".metadata").exists():
            return ckpt
        print0(f"skipping incomplete checkpoint {ckpt}")
    return None


def resume(args, model, optimizer, order) -> int:
    """--resume: restore model, optimizer, RNG states and the data position (`order`) from the newest complete
    checkpoint in args.run_dir and return its step; 0 without --resume or without a checkpoint (said)."""
    ckpt = latest_checkpoint(args.run_dir) if args.resume else None
    if ckpt is None:
        if args.resume:
            print0(f"--resume: no complete checkpoint in {args.run_dir}; training from step 0")
        return 0
    meta = load_checkpoint(ckpt, model, optimizer)
    order.load_state(meta["data"])
    return meta["step"]


def checkpoint_every(args, step: int, model, optimizer, loader):
    """After `step` (1-based) when --save-every divides it: run_dir/checkpoint-<step> with the position of the data
    consumed so far, not prefetched (loader.state())."""
    if args.save_every and step % args.save_every == 0:
        save_checkpoint(Path(args.run_dir, f"checkpoint-{step}"), model, optimizer, step, {"data": loader.state()},
                        keep=args.keep_checkpoints)


def full_state_dict(model) -> dict:
    """Unsharded CPU state dict (collective under FSDP2: call on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_hf(bb: Backbone, out_dir: str | Path, state_dict: dict | None = None, model=None,
              dtype: torch.dtype | None = None):
    """A standard Hugging Face folder (config.json, model.safetensors, tokenizer, image processor) that
    `from_pretrained` loads with no project code; floating weights in `dtype` (config.json names it) when given.
    Call on every rank; rank 0 writes."""
    import copy
    model, out_dir = model or bb.model, Path(out_dir)
    sd = state_dict if state_dict is not None else full_state_dict(model)
    if _rank() != 0:
        return
    if getattr(bb.model.config, "toy_backbone", False):
        model.config.toy_backbone = True   # an export of the toy stays recognisable as one (is_toy)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model.save_pretrained(out_dir, state_dict=sd, safe_serialization=True)
    if dtype is not None:  # save_pretrained wrote the live (fp32) model's dtype into config.json
        config = copy.deepcopy(model.config)
        config.dtype = str(dtype).removeprefix("torch.")
        config.save_pretrained(out_dir)
    bb.tokenizer.save_pretrained(out_dir)
    bb.image_processor.save_pretrained(out_dir)


# ----------------------------------------------------------------------------------------------------------------
# Run configuration: Args defaults are the papers'; a preset (the toy's) fills only what the user did not set
# ----------------------------------------------------------------------------------------------------------------
# The range the suite was run with (constraints.txt pins the exact versions); outside it the scripts say so once:
# transformers changes its multimodal internals between minor releases (5.23 -> 5.24 broke Pearl).
TESTED_VERSIONS = {"torch": ("2.13", "2.14"), "transformers": ("5.24", "5.25")}   # [min, max) by release prefix


def untested_versions() -> list[str]:
    """The installed packages outside TESTED_VERSIONS, as "name X (tested >=a,<b)" strings."""
    from importlib.metadata import version
    from packaging.version import Version
    return [f"{name} {version(name)} (tested >={lo},<{hi})" for name, (lo, hi) in TESTED_VERSIONS.items()
            if not Version(lo) <= Version(version(name)) < Version(hi)]


@functools.cache
def warn_untested_versions():
    """Once per process, at start-up (parse_args; eval.py when it loads a model): one line naming each package."""
    if bad := untested_versions():
        print0(f"warning: untested package versions: {', '.join(bad)}; pip install -r requirements.txt -c "
               "constraints.txt")


def parse_args(cls, argv: list[str] | None = None):
    """HfArgumentParser over the dataclass `cls` → (args, names of the fields given on the command line, in any
    spelling argparse accepts: `--min-pixels 1`, `--min_pixels=1`, `--no-pack`, `--pack false`)."""
    from transformers import HfArgumentParser
    warn_untested_versions()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(cls)
    args, unknown = parser.parse_args_into_dataclasses(argv, look_for_args_file=False, return_remaining_strings=True)
    if unknown:
        arg_error(f"unrecognized arguments: {' '.join(unknown)} (see --help)")
    for action in parser._actions:                 # parse again without defaults: only given fields appear
        action.default = argparse.SUPPRESS
    return args, set(vars(parser.parse_args(argv)))


def changed_fields(args) -> set[str]:
    """For Args built in code (tests, benchmarks): the fields whose value differs from the dataclass default."""
    return {f.name for f in dataclasses.fields(args) if getattr(args, f.name) != (
        f.default if f.default is not dataclasses.MISSING else f.default_factory())}


def arg_error(message: str):
    """A bad argument: one line on stderr and exit code 2 (argparse's convention), never a traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


POSITIVE = ("steps", "per_micro", "grad_accum", "max_tokens", "num_generations", "num_latent_steps")
NON_NEGATIVE = ("save_every", "keep_checkpoints", "stop_after", "eval_limit", "limit", "warmup_ratio", "warmup",
                "weight_decay", "micro_tokens", "data_workers")


def check_args(args):
    """Start-up validation of resolved Args: declared choices, counts ≥ 1, learning rates > 0, a sane pixel budget,
    data files that exist, a model that can be found. One line, exit 2."""
    for f in dataclasses.fields(args):
        value, choices, flag = getattr(args, f.name), f.metadata.get("choices"), "--" + f.name.replace("_", "-")
        if choices and value not in choices:
            arg_error(f"{flag} {value!r}: choose from {', '.join(map(str, choices))}")
        if f.name in POSITIVE and value < 1 or f.name in NON_NEGATIVE and value < 0:
            arg_error(f"{flag} must be {'≥ 1' if f.name in POSITIVE else '≥ 0'} (got {value})")
        if f.name.endswith("lr") and isinstance(value, float) and not value > 0:
            arg_error(f"{flag} must be > 0 (got {value})")
    if hasattr(args, "min_pixels") and not 0 < args.min_pixels <= args.max_pixels:
        arg_error(f"--min-pixels {args.min_pixels} / --max-pixels {args.max_pixels}: need 0 < min ≤ max")
    for path in str(getattr(args, "data", "toy")).split(","):
        if path not in ("toy", "none", "") and not any(c in path for c in "{*?") and not Path(path).exists():
            arg_error(f"--data {path}: no such file")
    try:
        check_model_name(getattr(args, "model", "toy"))
    except SystemExit as e:
        arg_error(str(e))
    return args


def apply_preset(args, preset: dict, explicit: set[str], label: str, why: str) -> dict:
    """Set the preset's fields that are not in `explicit`, print them on one line, return what was applied."""
    applied = {k: v for k, v in preset.items() if k not in explicit}
    for k, v in applied.items():
        setattr(args, k, v)
    if applied:
        print0(f"{label}: " + " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in applied.items())
               + f" ({why}; pass a flag to override)")
    return applied


def save_run_config(run_dir: str | Path, args, name: str = "run_config.json", **extra):
    """The resolved arguments, the command line and the library versions as run_dir/run_config.json (rank 0,
    written to a temporary file and renamed, so a reader never sees half a file)."""
    if (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))) != 0:
        return
    import transformers
    record = {"args": dataclasses.asdict(args), "command": shlex.join([sys.executable, *sys.argv]),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": sys.version.split()[0]}, **extra}
    path = Path(run_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Logging: one dense line per step, FLOPs and MFU
# ----------------------------------------------------------------------------------------------------------------
PEAK_BF16_TFLOPS = {"H200": 989, "H100 PCIe": 756, "H100": 989, "H800": 989, "A100": 312, "A800": 312, "L40S": 362,
                    "4090": 165}   # dense bf16, by device-name substring (first match wins: "H100 PCIe" before "H100")


def matmul_params(model) -> int:
    """N in the FLOPs count: weights of the language model's matmuls (attention and MLP projections of every decoder
    layer, and the LM head). Embedding lookups, norms, biases and the vision tower are not counted."""
    lm = model.model.language_model
    return sum(m.weight.numel() for m in lm.modules() if isinstance(m, torch.nn.Linear)) + model.lm_head.weight.numel()


def step_flops(model, seq_lens, backward: bool = True, weight_grads: bool = True) -> float:
    """Model FLOPs of one forward (+ backward) over samples of these real lengths (a packed row's samples attend only
    to themselves: Σ L², not (Σ L)²). Per sample: 2·N·L + 4·layers·d_attn·L² forward (QKᵀ and AV, non-causal
    convention as PaLM and nanoGPT), d_attn = heads·head_dim. Backward: 2·N·L for the input gradients, 2·N·L more for
    the weight gradients (weight_grads=False when the matmul weights are frozen, e.g. under LoRA: their gradients are
    never formed), and twice the attention forward. So forward + backward = 3× the forward with weight gradients."""
    cfg = model.config.text_config
    d_attn = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    n, layers = matmul_params(model), cfg.num_hidden_layers
    lens = list(map(int, seq_lens))
    mm, attn = sum(2 * n * L for L in lens), sum(4 * layers * d_attn * L * L for L in lens)
    if not backward:
        return mm + attn
    return mm * (3 if weight_grads else 2) + 3 * attn


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


class RunLogger:
    """A tqdm bar, one dense line per logging step, metrics.jsonl and loss_curve.png in the run directory. Quiet on
    non-zero ranks. A resume keeps the rows up to its checkpoint and drops the ones it re-runs."""

    def __init__(self, run_dir: str | Path, total_steps: int, d: Dist, desc: str = "train", start_step: int = 0):
        from tqdm.auto import tqdm
        self.run_dir, self.d = Path(run_dir), d
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, disable=not d.main, dynamic_ncols=True)
        self.t0, self.rows = time.perf_counter(), []
        path = self.run_dir / "metrics.jsonl"
        if d.main and path.exists():
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    if isinstance(row := json.loads(line), dict) and row.get("step", math.inf) <= start_step:
                        self.rows.append(row)
            _write_atomic(path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.file = open(path, "a") if d.main else None

    def log(self, step: int, metrics: dict, tokens: int, flops: float | None = None):
        """`tokens`: tokens this rank processed since the last call (tokens/s per device); `flops`: their model FLOPs
        (`step_flops` on each step's real lengths), for MFU over the device's dense bf16 peak."""
        dt = time.perf_counter() - self.t0
        self.t0 = time.perf_counter()
        m = {"step": step, **{k: float(v) for k, v in metrics.items()}, "tok_per_s": tokens / max(dt, 1e-9)}
        peak = peak_flops(self.d.device)
        if peak and flops:
            m["mfu"] = flops / max(dt, 1e-9) / peak
        if self.d.device.type == "cuda":
            m["mem_gb"] = torch.cuda.max_memory_allocated(self.d.device) / 2 ** 30
        else:  # peak resident memory of this process (Linux reports KiB)
            import resource
            m["mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        self.bar.update(1)
        if not self.d.main:
            return
        self.rows.append(m)
        self.file.write(json.dumps(m) + "\n")
        self.file.flush()
        self.bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()))

    def close(self):
        self.bar.close()
        if not self.d.main:
            return
        self.file.close()
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        keys = [k for k in (self.rows[0] if self.rows else {}) if k.startswith("loss")]
        if not keys:
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        for k in keys:
            ax.plot([r["step"] for r in self.rows], [r[k] for r in self.rows], label=k)
        ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), ax.set_title(self.run_dir.name)
        fig.tight_layout()
        fig.savefig(self.run_dir / "loss_curve.png", dpi=100)
        plt.close(fig)


def check_finite(loss: torch.Tensor, step: int, terms: dict | None = None):
    """A NaN/inf loss is raised with every term, never trained on. `step` is the 0-based loop index; the message
    names step + 1, the step number metrics.jsonl uses."""
    if not torch.isfinite(loss):
        detail = ", ".join(f"{k}={float(v):.4g}" for k, v in (terms or {}).items())
        raise FloatingPointError(f"non-finite loss at step {step + 1}: {float(loss)} ({detail})")

