# Docs: docs/pearl.md
"""Pearl — Predictive Embedding Alignment for Reasoning in Latent space (Adhikari & Lapata, arXiv 2604.08065).

A VLM learns from expert tool-use trajectories (crops, marked images, multi-step zooms) without calling tools at
inference. Each example is seen in three views by the same weights: the *full* conversation carries the ordinary
next-token loss (L_VLM); the *input* view ⟨I0, Q, K predictor tokens⟩ must predict (L_JEPA) the embedding of the
*trajectory* view (the conversation with the question removed), held under stop-gradient; a NextLat dynamics head
regularises the full view's hidden states toward belief states (L_NextLat). L = L_VLM + λ·(L_JEPA + L_NextLat).
The export is a plain Qwen-VL model: no special decoding, no tools (`eval.py --prompt answer-tag`).

Launch (the same file runs under python and torchrun; FSDP2 shards under torchrun):
    python pearl.py                                     # CPU toy: toy world, train, export, eval beside the start model
    python pearl.py --lam 0 --run-dir runs/pearl_sft    # the SFT baseline (λ = 0); `python pearl.py` then evaluates it
    python pearl.py --model Qwen/Qwen2.5-VL-7B-Instruct --data lvr.json --image-root DIR --grad-accum 16  # one GPU
    torchrun --nproc_per_node 8 pearl.py --model Qwen/Qwen2.5-VL-7B-Instruct --data lvr.json --image-root DIR
Defaults: the released recipe (LoRA r 64 / α 128 / dropout 0.1 on all linear layers but the LM head; AdamW wd 0.1,
lr 1e-5, cosine, warmup 0.05); on a toy model TOY_PRESET fills the fields not given. Every detail: docs/pearl.md.

| choice | default | flag | source |
|---|---|---|---|
| view embedding | `<|im_end|>` closing its last turn | `--embed-position last_predictor` | released code / paper |
| D in L_JEPA | 1 − cos | `--jepa-metric smoothl1\|l2\|mse` | released README / paper text (SmoothL1) |
| trajectory view | keeps I0 in the first user turn | `--traj-drop-i0` | released code / paper text |
| NextLat token target | labels[t+1] (off by one, *inferred*) | `--nextlat-token shifted\|off` | released / NextLat |
| NextLat horizon | d = 1 | `--nextlat-horizon` | released code / NextLat paper |
| predictor rows, dynamics head | trained (rows by peft, head fully) | `--released-quirks` | this repo (released: frozen) |
| view layout | images encoded once, views packed, trajectory no-grad | `--naive-views` | this repo (tested equal) |
| precision | fp32 trained weights, bf16 compute, bf16 export | `--dtype` | this repo / released |
| data conversion | crop turns, tool prompt dropped, missing crops re-executed | — | *inferred* |
"""
import copy
import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import ConcatDataset

import common as C
import dataloader as D
import runtime as R
from common import IGNORE


# ----------------------------------------------------------------------------------------------------------------
# Args
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Args:
    model: str = field(default="toy-base", metadata=R.MODEL_HELP)
    data: str = field(default="toy", metadata={"help": "comma-separated: LVR / Visual-CoT JSON, PixelReasoner "
                                                       "message_list, ThinkMorph parquet, {messages}; or 'toy'"})
    image_root: str = field(default="", metadata={"help": "folder image paths are relative to (default: data's)"})
    run_dir: str = field(default="runs/pearl", metadata={"help": "output directory"})
    # Pearl
    lam: float = field(default=0.2, metadata={"help": "λ in L = L_VLM + λ(L_JEPA + L_NextLat); 0 = the SFT baseline"})
    no_jepa: bool = field(default=False, metadata={"help": "ablation: drop L_JEPA"})
    no_nextlat: bool = field(default=False, metadata={"help": "ablation: drop L_NextLat"})
    jepa_metric: str = field(default="cosine", metadata={"help": "D in L_JEPA",
                                                         "choices": ["cosine", "smoothl1", "l2", "mse"]})
    num_predictors: int = field(default=4, metadata={"help": "K predictor tokens appended to the input view"})
    embed_position: str = field(default="im_end", metadata={"help": "the position that represents a view",
                                                            "choices": ["im_end", "last_predictor"]})
    traj_drop_i0: bool = field(default=False, metadata={"help": "drop I0 from the trajectory view"})
    nextlat_token: str = field(default="released", metadata={"help": "NextLat token-CE target",
                                                             "choices": ["released", "shifted", "off"]})
    nextlat_horizon: int = field(default=1, metadata={"help": "d: roll the dynamics head forward d steps"})
    released_quirks: bool = field(default=False, metadata={"help": "untrained predictor rows, LoRA-only dynamics head"})
    naive_views: bool = field(default=False, metadata={"help": "the released layout: stacked padded views"})
    # training
    steps: int = field(default=2500, metadata={"help": "optimizer steps (LVR data: 2500)"})
    per_micro: int = field(default=4, metadata={"help": "examples per micro-batch (each becomes three views)"})
    micro_tokens: int = field(default=0, metadata=R.MICRO_TOKENS_HELP)   # Pearl: full-view tokens
    data_workers: int = field(default=4, metadata=R.DATA_WORKERS_HELP)
    grad_accum: int = field(default=2, metadata={"help": "micro-batches per rank per step (8 GPUs × 4 × 2 = 64)"})
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "linear warmup fraction, then cosine"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank (0 = full fine-tuning)"})
    lora_alpha: int = field(default=128, metadata={"help": "LoRA α"})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout"})
    min_pixels: int = field(default=128 * 28 * 28, metadata={"help": "image pixel budget, min"})
    max_pixels: int = field(default=5120 * 28 * 28, metadata={"help": "image pixel budget, max"})
    max_tokens: int = field(default=16384, metadata={"help": "drop (count) examples whose full view is longer"})
    max_examples: int = field(default=0, metadata={"help": "use only the first N records per file (0 = all)"})
    activation_checkpointing: bool = field(default=True, metadata={"help": "recompute activations per block"})
    dtype: str = field(default="auto", metadata=R.DTYPE_HELP)
    seed: int = field(default=42, metadata={"help": "seed of data order, init and dropout"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = never)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "keep the newest N resume checkpoints (0 = all)"})
    resume: bool = field(default=False, metadata={"help": "resume from the latest checkpoint in run_dir"})
    stop_after: int = field(default=0, metadata={"help": "testing aid: exit after this step (0 = never)"})
    export: bool = field(default=True, metadata={"help": "merge LoRA, drop the dynamics head, save a plain HF model"})
    eval: str = field(default="", metadata={"help": "eval sets next to --data, a,b,... (toy: vstar,mmvp,blink)"})
    eval_limit: int = field(default=0, metadata={"help": "items per benchmark (0 = all)"})
    sft_dir: str = field(default="runs/pearl_sft", metadata={"help": "an SFT run (λ = 0) whose export is scored beside"})


# The toy backbone (or an export of it) only, on the fields not given, printed: a tiny model, a CPU minute.
TOY_PRESET = dict(lr=2e-3, steps=40, grad_accum=1, lora_r=8, lora_alpha=16, min_pixels=16 * 28 * 28,
                  max_pixels=64 * 28 * 28, activation_checkpointing=False, eval="vstar,mmvp,blink", data_workers=0)


def resolve(args: Args, explicit: set[str] | None = None) -> Args:
    if C.is_toy(args.model):
        R.apply_preset(args, TOY_PRESET, R.changed_fields(args) if explicit is None else explicit,
                       "toy preset", "model is the toy backbone")
    if args.data == "toy":
        from toy_world import ensure_toy_world
        args.data = str(Path(ensure_toy_world("data/toy", seed=0)) / "lvr_train.json")
    return R.check_args(args)


# ----------------------------------------------------------------------------------------------------------------
# Data: a published trajectory record → one episode {"system", "images0", "question", "steps": [{"role", "text",
# "images", "train"}]} → its three views (full, input, trajectory), tokenised
# ----------------------------------------------------------------------------------------------------------------
TOOL_CALL = re.compile(r"\s*<tool_call>.*?</tool_call>\s*", re.S)


def crop_normalised(image, bbox):
    """Execute a crop tool call: a normalised [x0, y0, x1, y1] box on `image` (at least 1 px a side)."""
    x0, y0, x1, y1 = D.check_bbox(bbox)
    W, H = image.size
    box = [math.floor(x0 * W), math.floor(y0 * H), math.ceil(x1 * W), math.ceil(y1 * H)]
    box[2], box[3] = max(box[2], box[0] + 1), max(box[3], box[1] + 1)
    return image.crop(box)


def from_lvr(rec, root):
    """LVR / Visual-CoT: one image, bbox(es) → crop trajectory; only the final answer is supervised."""
    image = D.open_image((rec["image"] if isinstance(rec["image"], str) else rec["image"][0]), root)
    conv = rec["conversations"]
    question = D.text_field(conv[0]["value"], "question").replace("<image>", "").strip()
    answer = D.text_field(conv[-1]["value"], "answer").replace("<lvr>", "").strip()
    if not question or not re.sub(r"</?answer>|\s", "", answer):  # "<answer>  </answer>" is empty too
        raise C.SkipSample("empty question or answer")
    if not rec.get("bboxes"):
        raise C.SkipSample("no bbox")
    steps = []
    for b in rec["bboxes"]:
        crop = crop_normalised(image, b)
        steps.append({"role": "assistant", "text": f"Focus on the region [{', '.join(f'{v:.3f}' for v in b)}].",
                      "train": False})
        steps.append({"role": "user", "images": [crop], "text": "Here is the relevant cropped part of the image."})
    steps.append({"role": "assistant", "text": answer, "train": True})
    return {"system": None, "images0": [image], "question": question, "steps": steps}


def from_messages(messages, root):
    """A chat with images (canonical, PixelReasoner): first user turn = ⟨I0, Q⟩, the rest = the trajectory. Tool calls
    and a tool-description system prompt are dropped; a missing crop is re-executed (`target_image`: 1-based)."""
    system, first, steps, all_images, pending_call = None, None, [], [], None
    for m in messages:
        parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
        text = "".join(p.get("text") or "" for p in parts if p["type"] == "text")
        if m["role"] == "system":
            system = None if "<tools>" in text else text
            continue
        images = []
        for p in (p for p in parts if p["type"] == "image"):
            try:
                images.append(D.open_image(p["image"], root))
            except C.SkipSample:
                if pending_call is None:
                    raise
                call_args = pending_call["arguments"]
                images.append(crop_normalised(all_images[int(call_args["target_image"]) - 1], call_args["bbox_2d"]))
        all_images += images
        if m["role"] == "assistant":
            call = re.search(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", text, re.S)
            pending_call = json.loads(call.group(1)) if call else None
            text = TOOL_CALL.sub("\n", text).strip()
            steps.append({"role": "assistant", "text": text, "train": m.get("train", True)})
        elif first is None:
            if not images:
                raise C.SkipSample("first user turn has no image")
            first = {"images0": images, "question": text.strip()}
        else:
            steps.append({"role": "user", "images": images, "text": text})
    if first is None or not first["question"] or not any(s["role"] == "assistant" and s["text"] for s in steps):
        raise C.SkipSample("empty question or answer")
    return {"system": system, **first, "steps": steps}


def from_thinkmorph(rec, root):
    """ThinkMorph: problem_image_0, question, resoning_thought_0, reasoning_image_0, resoning_thought_1, … (field
    names as published, typo included); every assistant turn is supervised."""
    images0 = [D.open_image(rec[k], root) for k in sorted(rec) if k.startswith("problem_image_") and rec[k]]
    if not images0 or not (rec.get("question") or "").strip():
        raise C.SkipSample("empty question or answer")
    steps, i = [], 0
    while rec.get(f"resoning_thought_{i}"):
        steps.append({"role": "assistant", "text": rec[f"resoning_thought_{i}"].strip(), "train": True})
        if rec.get(f"reasoning_image_{i}") and rec.get(f"resoning_thought_{i + 1}"):
            steps.append({"role": "user", "images": [D.open_image(rec[f"reasoning_image_{i}"], root)],
                          "text": "Here is the reasoning image."})
        i += 1
    if not steps:
        raise C.SkipSample("empty question or answer")
    return {"system": None, "images0": images0, "question": rec["question"].strip(), "steps": steps}


def convert_record(rec, root):
    """Detect the published format of one record and convert it."""
    try:
        if "conversations" in rec:
            return from_lvr(rec, root)
        if "resoning_thought_0" in rec or "problem_image_0" in rec:
            return from_thinkmorph(rec, root)
        if "message_list" in rec or "messages" in rec:
            return from_messages(rec.get("message_list") or rec["messages"], root)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:  # malformed shape, bad tool-call JSON
        raise C.SkipSample(f"malformed record ({type(err).__name__})") from err
    raise C.SkipSample("unknown record format")


def predictor_tokens(k: int) -> list[str]:
    """`<|predictor_K|>…<|predictor_1|>` in descending order, as released."""
    return [f"<|predictor_{i}|>" for i in range(k, 0, -1)]


def encode_example(bb, episode, args) -> dict:
    """Tokenise the three views of one episode. Only the full view keeps pixels; the others keep their grids (M-RoPE)
    and `image_index` into the full view's images. `emb_pos`: the position that represents a view."""
    img = lambda ims: [{"type": "image", "image": im} for im in ims]  # noqa: E731
    system = [{"role": "system", "content": episode["system"]}] if episode["system"] else []
    rest = [{"role": "assistant", "content": s["text"], "train": s["train"]} if s["role"] == "assistant" else
            {"role": "user", "content": img(s["images"]) + [{"type": "text", "text": s["text"]}]}
            for s in episode["steps"]]
    images0, preds = episode["images0"], predictor_tokens(args.num_predictors)
    q = [{"type": "text", "text": episode["question"]}]
    n0, n = len(images0), len(images0) + sum(len(s.get("images", [])) for s in episode["steps"])
    chats = {"full": (system + [{"role": "user", "content": img(images0) + q}] + rest, range(n)),
             "input": (system + [{"role": "user", "content": img(images0) + q + [{"type": "text",
                                                                                  "text": "".join(preds)}]}],
                       range(n0)),
             "traj": (system + ([] if args.traj_drop_i0 else [{"role": "user", "content": img(images0)}]) + rest,
                      range(n0 if args.traj_drop_i0 else 0, n))}
    views = {}
    for name, (chat, idx) in chats.items():
        v = C.encode_chat(bb, chat, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
        v["image_index"] = list(idx)
        if name != "full":
            grid = v["image_grid_thw"] if v["image_grid_thw"] is not None else torch.zeros(0, 3, dtype=torch.long)
            assert torch.equal(grid, views["full"]["image_grid_thw"][v["image_index"]]), "view images differ"
            v["labels"], v["pixel_values"] = torch.full_like(v["input_ids"], IGNORE), None  # labels: full view only
        v["emb_pos"] = int((v["input_ids"] == bb.token_id("<|im_end|>")).nonzero()[-1])  # "unpadded length − 2"
        views[name] = v
    if not (views["full"]["labels"] != IGNORE).any():
        raise C.SkipSample("no supervised tokens")
    if args.embed_position == "last_predictor":
        views["input"]["emb_pos"] = int((views["input"]["input_ids"] == bb.token_id(preds[-1])).nonzero()[-1])
    views["input_ids"] = views["full"]["input_ids"]  # length for MicroBatches / the token budget
    return views


def load_data(bb, args, skips: D.Skips) -> D.LazySamples:
    """Every example's exact full-view token count now (no pixels); the examples themselves when a micro-batch needs
    them. The files' records concatenate, each tagged with its file's image root."""
    paths = args.data.split(",")
    records = ConcatDataset([D.Records(p, skips, args.max_examples, tag=args.image_root or os.path.dirname(p))
                             for p in paths])
    convert = lambda item: encode_example(bb, convert_record(item[1], item[0]), args)  # noqa: E731 (root, record)
    max_tokens = min(args.max_tokens, args.micro_tokens or args.max_tokens)      # an example must fit its micro-batch
    return D.LazySamples(records, convert, skips, max_tokens, "+".join(map(os.path.basename, paths)), args.data_workers)


# ----------------------------------------------------------------------------------------------------------------
# Model surgery: predictor tokens, the NextLat dynamics head, a frozen LM-head copy, LoRA
# ----------------------------------------------------------------------------------------------------------------
class DynamicsHead(nn.Module):
    """NextLat: ĥ_{t+1} = h_t + MLP(LayerNorm([h_t ; e_{t+1}])), MLP = Linear(2H→H) GELU Linear(H→H) GELU Linear."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(2 * hidden, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden))

    def forward(self, h, e_next):
        return h + self.mlp(self.norm(torch.cat([h, e_next], dim=-1)))


def setup_model(bb, args):
    """The K predictor tokens (spare rows reused); the dynamics head as `model.pearl_dynamics` and a frozen LM-head
    copy (NextLat token term) as `model.pearl_frozen_head`, so FSDP2 shards both and export drops both; LoRA.
    Returns the frozen LM-head module."""
    ids = C.add_special_tokens(bb, predictor_tokens(args.num_predictors), init="mean")
    model = bb.model
    frozen_lm_head = copy.deepcopy(model.get_output_embeddings()).requires_grad_(False)   # Linear(D, V), no bias
    head = DynamicsHead(model.config.text_config.hidden_size).to(frozen_lm_head.weight.device, torch.float32)  # fp32
    if args.lora_r == 0:
        model.pearl_dynamics, model.pearl_frozen_head = head, frozen_lm_head
        return frozen_lm_head
    from peft import LoraConfig, get_peft_model
    if args.released_quirks:  # head inside the model before peft: base weights frozen, "all-linear" LoRA on it
        model.pearl_dynamics = head
    cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                     target_modules="all-linear", trainable_token_indices=None if args.released_quirks else ids)
    get_peft_model(model, cfg)  # injects adapters in place: bb.model stays the HF model class
    if not args.released_quirks:
        model.pearl_dynamics = head  # trained fully
    model.pearl_frozen_head = frozen_lm_head  # after peft: no adapters on it
    return frozen_lm_head


# ----------------------------------------------------------------------------------------------------------------
# Forward over the views: distinct images encoded once, views packed (full + input with grad, trajectory without)
# ----------------------------------------------------------------------------------------------------------------
@contextmanager
def capture(model):
    """Final-layer hidden states (after the final norm) and the text input embeddings, captured inside the model's
    own forward (so FSDP2 manages every parameter)."""
    lm, captured = model.model.language_model, {}
    hooks = [lm.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("hidden", o)),
             lm.embed_tokens.register_forward_hook(lambda m, i, o: captured.__setitem__("embeds", o))]
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def encode_images_once(model, order: list[int], encoded: dict):
    """Inside the model's forward (where FSDP2's root unit is unsharded) encode the distinct images once and hand back
    their embeddings in placeholder order (`order[j]`: the image behind the j-th placeholder); keep them in `encoded`."""
    inner = model.model
    original = inner.get_image_features

    def shared(pixel_values, image_grid_thw=None, **kw):
        features = original(pixel_values, image_grid_thw, **kw)
        encoded.update(pooled=features.pooler_output, deep=getattr(features, "deepstack_features", None),
                       cls=type(features))
        features.pooler_output = tuple(features.pooler_output[j] for j in order)
        if encoded["deep"] is not None:  # Qwen3-VL: per-layer features, same order
            features.deepstack_features = [tuple(f[j] for j in order) for f in features.deepstack_features]
        return features

    inner.get_image_features = shared
    try:
        yield
    finally:
        del inner.get_image_features


def reuse_images(encoded: dict, order: list[int]) -> dict:
    """`mm_encoder_outputs` for a later forward: `encoded`, detached, in its placeholder order (no parameters run).
    The one seam into transformers' internals (the class `get_image_features` returns): test_reuse_images_seam."""
    pick = lambda feats: tuple(feats[j].detach() for j in order)  # noqa: E731
    fields = {"pooler_output": pick(encoded["pooled"])}
    if encoded["deep"] is not None:  # Qwen3-VL: deepstack features, one tuple per injected layer
        fields["deepstack_features"] = [pick(f) for f in encoded["deep"]]
    return {"image": encoded["cls"](**fields)}


def forward_views(bb, model, examples: list[dict], names: tuple[str, ...], naive: bool = False):
    """Run the views `names` (full first) of every example. Returns per-view lists of final hidden states and input
    embeddings ([L, H] each), and L_VLM: the full views' next-token loss, by the LM head at the supervised positions
    only, in chunks (common.lm_head_returns_loss: no [L, V] logits)."""
    with capture(model) as cap:
        if naive:  # released layout: views stacked along the batch, padded, every view re-encoding its images
            dev, n_views = next(model.parameters()).device, len(names)
            views = [ex[n] for ex in examples for n in names]  # example-major: row i·n_views + j = view j of ex i
            stacked = []
            for ex in examples:
                chunks = ex["full"]["pixel_values"].split(ex["full"]["image_grid_thw"].prod(-1).tolist())
                stacked += [{**ex[n], "pixel_values": torch.cat([chunks[j] for j in ex[n]["image_index"]])
                             if ex[n]["image_index"] else None} for n in names]
            batch = C.pad_batch(bb, stacked)
            keep, target = C.supervised_positions(batch["labels"])  # full views only: the others' labels are IGNORE
            with C.lm_head_returns_loss(model, target.to(dev)):
                l_vlm = model(**C.model_inputs(batch, dev), logits_to_keep=keep.to(dev)).logits
            lens = [len(v["input_ids"]) for v in views]
            hid, emb = ([t[i, :n] for i, n in enumerate(lens)] for t in (cap["hidden"], cap["embeds"]))
            return {n: (hid[i::n_views], emb[i::n_views]) for i, n in enumerate(names)}, l_vlm
        # packed: the full (+ input) views in one row with grad, then the trajectory views in their own row without
        grad_names, encoded = tuple(n for n in names if n != "traj"), {}
        hid, emb, l_vlm = packed_forward(bb, model, cap, examples, grad_names, encoded)
        per_view = {n: (hid[i::len(grad_names)], emb[i::len(grad_names)]) for i, n in enumerate(grad_names)}
        if "traj" in names:  # h_R is a stop-gradient target: no autograd graph, no backward
            with torch.no_grad():
                per_view["traj"] = packed_forward(bb, model, cap, examples, ("traj",), encoded)[:2]
    return per_view, l_vlm


def packed_forward(bb, model, cap, examples: list[dict], names: tuple[str, ...], encoded: dict):
    """One packed row of the views `names` of every example. With the full view (which holds all of an example's
    images) the images are encoded into `encoded` and L_VLM is returned; otherwise `encoded` is reused and the LM head
    runs at one position. Returns (hidden, embeds) split per view, L_VLM or None."""
    dev = next(model.parameters()).device
    views = [ex[n] for ex in examples for n in names]
    batch = C.pack(bb, views)
    inputs = C.model_inputs(batch, dev)
    order, base = [], 0  # the distinct image behind each image placeholder of the packed row
    for ex in examples:
        order += [base + j for n in names for j in ex[n]["image_index"]]
        base += len(ex["full"]["image_index"])
    lens = batch["seq_lens"].tolist()
    l_vlm = None
    if "full" in names:
        inputs["pixel_values"] = torch.cat([ex["full"]["pixel_values"] for ex in examples]).to(dev)
        inputs["image_grid_thw"] = torch.cat([ex["full"]["image_grid_thw"] for ex in examples]).to(dev)
        # only full views carry labels, and pack ignores each view's first label: no loss crosses a view boundary
        keep, target = C.supervised_positions(batch["labels"])
        with encode_images_once(model, order, encoded), C.lm_head_returns_loss(model, target.to(dev)):
            l_vlm = model(**inputs, logits_to_keep=keep.to(dev)).logits                          # L_VLM
    else:
        model(**inputs, mm_encoder_outputs=reuse_images(encoded, order) if order else None, logits_to_keep=1)
    return cap["hidden"][0].split(lens), cap["embeds"][0].split(lens), l_vlm


# ----------------------------------------------------------------------------------------------------------------
# Losses: L = L_VLM + λ·(L_JEPA + L_NextLat)
# ----------------------------------------------------------------------------------------------------------------
JEPA_DISTANCES = {"cosine": lambda p, t: 1 - F.cosine_similarity(p, t, dim=-1),           # D(ĥ_R, h_R) per example
                  "smoothl1": lambda p, t: F.smooth_l1_loss(p, t, reduction="none").mean(-1),
                  "l2": lambda p, t: (p - t).norm(dim=-1), "mse": lambda p, t: ((p - t) ** 2).mean(-1)}


def jepa_loss(pred: torch.Tensor, target: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """L_JEPA = D(ĥ_R, sg[h_R]) per example, averaged over the batch. pred, target: [B, H]."""
    if metric not in JEPA_DISTANCES:
        raise ValueError(f"unknown --jepa-metric {metric!r}")
    return JEPA_DISTANCES[metric](pred.float(), target.detach().float()).mean()


def nextlat_loss(head, hidden: list, embeds: list, labels: list, frozen_lm_head, horizon: int = 1,
                 token_target: str = "released"):
    """L_NextLat on the full views. Anchors t: labels[t+1] supervised. For k = 1..d:
    ĥ_{t+k} = head(ĥ_{t+k-1}, e_{t+k}) (ĥ_t = h_t, not detached); state term SmoothL1(ĥ_{t+k}, sg[h_{t+k}]) averaged
    per example over (anchors × k × H); token term CE(frozen_lm_head(ĥ_{t+k}), labels[t+k]) (released) or
    labels[t+k+1] (shifted), averaged per example over valid targets. Both then averaged over examples."""
    states, tokens = [], []
    for h, e, y in zip(hidden, embeds, labels):
        y, dev = y.cpu(), h.device            # labels stay on the host: the indices and counts cost no device sync
        L = len(y)
        t = torch.nonzero(y[1:L - horizon + 1] != IGNORE)[:, 0]  # t ≤ L-1-d so that t+d exists
        if len(t) == 0:
            continue
        cur, st, ce, n_ce = h[t.to(dev)], [], 0.0, 0
        for k in range(1, horizon + 1):
            cur = head(cur, e[(t + k).to(dev)])
            st.append(F.smooth_l1_loss(cur.float(), h[(t + k).to(dev)].detach().float(), reduction="none").mean(-1))
            if token_target != "off":
                tgt = y[t + k] if token_target == "released" else F.pad(y, (0, 1), value=IGNORE)[t + k + 1]
                logits = (frozen_lm_head(cur) if callable(frozen_lm_head)   # the module, or a [V, H] weight
                          else F.linear(cur, frozen_lm_head.to(cur.dtype))).float()
                ce = ce + F.cross_entropy(logits, tgt, ignore_index=IGNORE, reduction="sum")
                n_ce += int((tgt != IGNORE).sum())
        states.append(torch.stack(st).mean())
        if token_target != "off" and n_ce:
            tokens.append(ce / n_ce)
    zero = hidden[0].sum() * 0
    return (torch.stack(states).mean() if states else zero), (torch.stack(tokens).mean() if tokens else zero)


def views_that_run(args) -> tuple[str, ...]:
    """L_JEPA needs the input and trajectory views; without it (λ = 0, --no-jepa) only the full views run."""
    return ("full", "input", "traj") if args.lam > 0 and not args.no_jepa else ("full",)


def pearl_loss(bb, model, frozen_lm_head, examples: list[dict], args, naive: bool = False):
    """L = L_VLM + λ·(L_JEPA + L_NextLat). With λ = 0 (or both terms off) only the full views run: exactly SFT."""
    names = views_that_run(args)
    use_jepa, use_nextlat = "input" in names, args.lam > 0 and not args.no_nextlat
    per_view, l_vlm = forward_views(bb, model, examples, names, naive=naive)  # L_VLM
    labels = [ex["full"]["labels"] for ex in examples]
    terms, loss = {"loss_vlm": l_vlm}, l_vlm
    if use_jepa:
        pred = torch.stack([h[ex["input"]["emb_pos"]] for h, ex in zip(per_view["input"][0], examples)])  # ĥ_R
        target = torch.stack([h[ex["traj"]["emb_pos"]] for h, ex in zip(per_view["traj"][0], examples)])  # h_R
        terms["loss_jepa"] = jepa_loss(pred, target, args.jepa_metric)
        loss = loss + args.lam * terms["loss_jepa"]  # + λ·L_JEPA
    if use_nextlat and args.nextlat_token != "off" and hasattr(frozen_lm_head, "unshard"):
        frozen_lm_head.set_reshard_after_forward(False, recurse=False)  # FSDP2: gathered once per step on every rank
        frozen_lm_head.unshard()          # (however many calls its examples make), kept through backward, then freed
    if use_nextlat:
        state, token = nextlat_loss(model.pearl_dynamics, *per_view["full"], labels, frozen_lm_head,
                                    args.nextlat_horizon, args.nextlat_token)
        terms.update(loss_nextlat=state + token, loss_state=state, loss_token=token)
        loss = loss + args.lam * terms["loss_nextlat"]  # + λ·L_NextLat
    terms["loss"] = loss
    return loss, terms


# ----------------------------------------------------------------------------------------------------------------
# Export (merge LoRA, drop the dynamics head: a plain HF checkpoint) and evaluate (a plain VLM, eval.py in process)
# ----------------------------------------------------------------------------------------------------------------
def merge_lora_state_dict(sd: dict, scale: float, token_ids: list[int]) -> dict:
    """W = W0 + (α/r)·B·A for every LoRA layer; trainable-token rows written into their matrix; `pearl_dynamics.*`
    and `pearl_frozen_head.*` dropped. Keys come back as the plain model class names them."""
    merged = {}
    for k, v in sd.items():
        if k.startswith(("pearl_dynamics.", "pearl_frozen_head.")) or ".lora_" in k or ".trainable_tokens_delta" in k:
            continue
        if ".token_adapter.base_layer." in k:  # an embedding matrix with trainable predictor rows
            prefix = k.split(".token_adapter.")[0]
            delta = sd[f"{prefix}.token_adapter.trainable_tokens_delta.default"]
            k, v = f"{prefix}.weight", v.index_copy(0, torch.tensor(token_ids), delta.to(v.dtype))
        elif ".base_layer." in k:
            prefix, name = k.split(".base_layer.")
            if name == "weight" and f"{prefix}.lora_A.default.weight" in sd:
                lora_a, lora_b = sd[f"{prefix}.lora_A.default.weight"], sd[f"{prefix}.lora_B.default.weight"]
                v = (v.float() + scale * lora_b.float() @ lora_a.float()).to(v.dtype)
            k = f"{prefix}.{name}"
        merged[k] = v
    return merged


def export(bb, model, args: Args, d: R.Dist) -> str:
    """On every rank (gathering the state dict is collective); rank 0 writes run_dir/export in the compute dtype."""
    sd = R.full_state_dict(model)
    export_dir = os.path.join(args.run_dir, "export")
    if d.main:
        token_ids = [bb.token_id(t) for t in predictor_tokens(args.num_predictors)]
        merged = merge_lora_state_dict(sd, args.lora_alpha / max(args.lora_r, 1), token_ids)
        with torch.device("meta"):
            plain = type(bb.model)(bb.model.config)
        plain.load_state_dict(merged, strict=False, assign=True)
        missing = [n for n, p in plain.named_parameters() if p.is_meta]
        assert not missing, f"export: parameters missing from the merged state dict: {missing[:5]}"
        R.export_hf(bb, export_dir, state_dict=merged, model=plain, dtype=R.compute_dtype(args.dtype, d.device))
        C.print0(f"exported a plain {type(plain).__name__} to {export_dir}")
    return export_dir


EVAL_DIRS = {"vstar": "eval/vstar", "mmvp": "eval/mmvp", "blink": "eval/blink", "gqa": "gqa", "scienceqa": "scienceqa"}


def evaluate_export(args: Args, export_dir: str) -> dict:
    """Plain greedy decoding, answer-tag protocol, on the eval sets next to --data (eval.compare, in process), beside
    the starting model (toy) and the SFT baseline's export in --sft-dir (λ = 0), when there is one."""
    import eval as E
    models = {"Pearl": export_dir, "start": args.model} if C.is_toy(args.model) else {"Pearl": export_dir}
    if (sft := Path(args.sft_dir, "export")).is_dir() and sft.resolve() != Path(export_dir).resolve():
        models["SFT"] = str(sft)
    rows = E.compare({name: {"model": m} for name, m in models.items()}, [b for b in args.eval.split(",") if b],
                     lambda bench: Path(args.data.split(",")[0]).parent / EVAL_DIRS[bench], args.run_dir,
                     prompt="answer-tag", min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                     limit=args.eval_limit)
    return {bench: r["Pearl"]["overall"] for bench, r in rows.items()}


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
    # trained weights: fp32 masters; LoRA's frozen base: the compute dtype (memory arithmetic: docs/pearl.md)
    bb = C.load_backbone(args.model, d.device, rank0_only=True,   # other ranks: meta, filled from rank 0 by shard_model
                         dtype=torch.float32 if args.lora_r == 0 else R.compute_dtype(args.dtype, d.device))
    frozen_lm_head = setup_model(bb, args)
    skips = D.Skips()
    data = load_data(bb, args, skips)
    C.print0(f"{len(data)} examples from {args.data}; {skips.summary()}")
    if not data:
        raise SystemExit(f"{args.data}: no usable examples ({skips.summary()})")
    order = D.MicroBatches(data.lengths, per_micro=args.per_micro, seed=args.seed, token_budget=args.micro_tokens)
    model = R.shard_model(bb.model, d, args.activation_checkpointing, dtype=args.dtype,
                          extra_units=(bb.model.pearl_dynamics, bb.model.pearl_frozen_head))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=args.weight_decay)
    start = R.resume(args, model, opt, order)                          # --resume: weights, optimizer, RNG, data
    loader = D.Loader(data, order, skips, d.rank, d.world, workers=args.data_workers, device=d.device)
    log = R.RunLogger(args.run_dir, args.steps, d, desc="pearl", start_step=start)
    views = views_that_run(args)                                       # tokens / FLOPs: only what runs
    model.train()
    for step in range(start, args.steps):
        for g in opt.param_groups:
            g["lr"] = R.cosine_lr(step, args.steps, args.lr, args.warmup_ratio)
        micro = loader.next(args.grad_accum)                              # this rank's examples, encoded
        loss_sum, tokens, flops = {}, 0, 0.0                               # loss_sum: every logged term
        for i, examples in enumerate(micro):
            on_device = D.to_device(examples, d.device, keys=("pixel_values",))  # the views pack on the host
            torch.manual_seed((args.seed * 100_003 + step) * 1_009 + i * d.world + d.rank)  # dropout per global micro
            with R.grad_sync(model, i == len(micro) - 1):
                with R.compute_context(args.dtype, d.device):              # bf16 compute over fp32 weights
                    loss, terms = pearl_loss(bb, model, frozen_lm_head, on_device, args, naive=args.naive_views)
                (loss / len(micro)).backward()
            for name, value in terms.items():                              # no host sync before backward
                loss_sum[name] = loss_sum.get(name, 0.0) + value.detach() / len(micro)
            tokens += sum(len(ex[n]["input_ids"]) for ex in examples for n in views)
            flops += R.step_flops(bb.model, [len(ex[n]["input_ids"]) for ex in examples for n in views if n != "traj"],
                                  weight_grads=args.lora_r == 0)         # LoRA: the frozen base forms no weight grads
            flops += R.step_flops(bb.model, [len(ex["traj"]["input_ids"]) for ex in examples if "traj" in views],
                                  backward=False)                        # h_R: forward only
        R.check_finite(loss_sum["loss"], step, loss_sum)
        gnorm = R.clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.log(step + 1, {**{name: R.all_reduce_mean(value.item(), d) for name, value in loss_sum.items()},
                           "lr": opt.param_groups[0]["lr"], "grad_norm": gnorm}, tokens, flops)
        R.checkpoint_every(args, step + 1, model, opt, loader)
        if step + 1 == args.stop_after:
            break
    loader.close()
    log.close()
    C.print0(skips.summary())

    # ------------------------------------------------------------------------------------------------------------
    # Save and evaluate
    # ------------------------------------------------------------------------------------------------------------
    export_dir = export(bb, model, args, d) if args.export else None
    R.close_distributed(d)
    if args.eval and export_dir and d.main:       # after the process group: no rank waits on a collective timeout
        evaluate_export(args, export_dir)
    return bb


if __name__ == "__main__":
    main(*R.parse_args(Args))
