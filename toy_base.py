# Docs: docs/toy_base.md. Builds the "stage 0" model every toy default can start from.
"""The toy base model ("stage 0"): a stand-in for Qwen2.5-VL-Instruct on the toy world.

Real methods start from an instruction-tuned VLM that already reads images and answers in format; a random-init toy
model trained for 60 steps learns neither. `ensure_toy_base()` trains the toy backbone once, with plain SFT (full
fine-tuning, vision tower included) on a GENERIC toy curriculum, and exports it as a normal Hugging Face folder
(`runtime.export_hf`, `config.toy_backbone = True`) that `common.load_backbone(path)` and `eval.py --model path` load.

The curriculum (`curriculum_sample`), drawn fresh from its own RNG streams (never the files' scenes), in two kinds
of scene: the toy world's own scenes (`toy_world.make_scene`: large distractors plus one small target) and generic
scenes of 1-4 large shapes in any of the 8 colours (so colour words are grounded for every colour). Every question is
about a LARGE object or about the whole image, or asks where the small object is (never its colour or side):
  caption    "Describe the image briefly." -> "3 large shapes: a purple square on the left, ..."
  colour     "What is the colour of the large square?" (4 options: the answer palette or the distractor palette)
  binary     "Is the large square purple or cyan?" (MMVP's two-option wording)
  shape      "What is the shape of the purple object?"
  count      "How many large shapes are in the image?" / "How many cyan shapes are in the image?" (BLINK wording)
  position   "Is the purple square on the left or the right side of the image?"
  relative   "Is the purple square on the left or right side of the cyan circle?" (two large objects; V* wording)
  yes/no     "Is there a purple square in the image?" (A) yes (B) no
  small      "What is the shape of the small object?", "Is the small triangle in the top or the bottom half of the
             image?", "Is there a small shape in the image?" (finding the small object, never its colour or side)
Answer formats as the evaluation reads them: options rendered the toy world's way ("(A) red" lines, "(a) Red"
one-liners) or eval.py's way ("A. red" lines), a bare letter ("B", lmms preset) or the answer tag ("<answer> B
</answer>", the LVR / answer-tag protocol; eval.py forces "<answer>" and reads 4 tokens). Not trained: the small
target's colour or its side (the skill V*, MMVP and BLINK's spatial subtask evaluate).

Cache: `ensure_toy_base(out_dir)` reuses out_dir when its TOY_BASE.json carries the fingerprint of the recipe
(every hyper-parameter, toy_world.FORMAT_VERSION, BASE_CODE_VERSION); otherwise it trains in a sibling temporary
folder and swaps it in with os.replace (atomic; a file lock serialises concurrent callers).

Size choice and measurement (README, "The toy base model"). The base keeps the toy backbone's size (`load_backbone
("toy")`: LLM 64 wide x 2 layers, vision 64 x 2 blocks, 0.40 M parameters); a 128-wide variant (`Recipe(hidden_size=
128)`, 0.72 M) cost 1.6x the CPU per step and scored no better on the toy sets after the same 1000 steps, so no
larger named variant was kept. What mattered was the curriculum and its length: 1000 steps with 12 % captions gave a
format-only model (its own large-object colour questions at 37 %, 4 options) that 60 fine-tuning steps could not
move (V* 32.8 -> 33.8); 2000 steps with 40 % captions (dense supervision: every large object's colour, shape
and position in words) is the recipe kept, after which 60 steps move V* by +11 to +27 points (README). Build: 258 s
of CPU time (one thread, 4000 samples encoded + 2000 steps + export: about 4.3 minutes unshared); wall 546 s and
394 s on this 2-core machine while 4 other agents' jobs shared it (load average 1-5). Under contention use one
thread: two OMP threads spin-wait and were slower than one. Two builds gave bit-identical weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import resource
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

import common as C
import dataloader as D
import runtime as R
import toy_world as T

BASE_CODE_VERSION = 2  # bump whenever the curriculum or the training loop changes what a recipe produces
STREAM_BASE, STREAM_GENERIC = 301, 302  # RNG streams of the curriculum (toy_world uses 1-7 and 101-108)
ANSWER_PALETTE, DISTRACTOR_COLOURS = tuple(T.COLOURS), tuple(T.DISTRACTOR_PALETTE)


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the base model's weights (its fingerprint)."""
    hidden_size: int = 64             # LLM width (vision out_hidden_size follows)
    num_layers: int = 2               # LLM decoder layers
    vision_depth: int = 2             # vision blocks
    steps: int = 2000                 # optimizer steps of plain SFT
    per_micro: int = 8                # samples per step (one packed row)
    lr: float = 2e-3                  # peak lr (warm-up 3 %, then cosine to 10 %)
    weight_decay: float = 0.0
    n_scenes: int = 4000              # curriculum samples drawn (cycled, reshuffled each epoch)
    generic_fraction: float = 0.5     # share of generic all-colour scenes (rest: toy-world scenes)
    small_fraction: float = 0.3       # share of questions that locate the small object (shape, top/bottom, presence)
    caption_fraction: float = 0.4     # share of captions (dense supervision: every large object's colour and shape)
    tag_fraction: float = 0.5         # share of answers in the <answer> tag format
    min_pixels: int = 16 * 28 * 28    # the scripts' toy pixel budget
    max_pixels: int = 64 * 28 * 28


RECIPE = Recipe()
TINY_RECIPE = Recipe(steps=3, per_micro=2, n_scenes=8)  # for tests of the cache (seconds)


# ----------------------------------------------------------------------------------------------------------------
# Scenes and the generic curriculum
# ----------------------------------------------------------------------------------------------------------------
def make_generic_scene(rng):
    """1-4 large shapes (44-64 px, any shape, any of the 8 colours; no small target) on the toy world's background.
    Returns (image, objects) with objects in the toy world's format (size "large", target False)."""
    W, H = (int(v) for v in rng.integers(*T.IMAGE_PX, size=2))
    n = int(rng.integers(1, 5))
    placed = []
    for _ in range(n):
        side = int(rng.integers(*T.LARGE_PX))
        for _ in range(300):
            x0, y0 = int(rng.integers(0, W - side + 1)), int(rng.integers(0, H - side + 1))
            box = [x0, y0, x0 + side, y0 + side]
            if all(box[0] >= b[2] + 6 or b[0] >= box[2] + 6 or box[1] >= b[3] + 6 or b[1] >= box[3] + 6
                   for b in (o["bbox"] for o in placed)):
                placed.append({"shape": T.SHAPES[rng.integers(3)], "colour": T.ALL_COLOURS[rng.integers(8)],
                               "bbox": box, "size": "large", "target": False})
                break
    if not placed:
        return make_generic_scene(rng)
    # the toy world's background process: one light-grey tone, light noise in 8x8 cells on half the images
    pixels = np.full((H, W, 3), 222.0, dtype=np.float32)
    if rng.random() < 0.5:
        cells = rng.normal(0.0, 6.0, size=(H // 8 + 1, W // 8 + 1, 3)).astype(np.float32)
        pixels = pixels + np.repeat(np.repeat(cells, 8, axis=0), 8, axis=1)[:H, :W]
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for o in placed:
        T._draw_shape(draw, o["shape"], o["bbox"], T.ALL_PALETTE[o["colour"]])
    return image, placed


def _side(obj, size):
    return "left" if (obj["bbox"][0] + obj["bbox"][2]) / 2 < size[0] / 2 else "right"


def _where(obj, size):
    cx = (obj["bbox"][0] + obj["bbox"][2]) / 2 / size[0]
    cy = (obj["bbox"][1] + obj["bbox"][3]) / 2 / size[1]
    v = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    h = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    return f"{v} {h}".strip() or "centre"


def _questions(rng, image, large, has_small):
    """All generic questions answerable from the large objects of one scene: [(question, options, answer index)]."""
    size, out = image.size, []
    names = [(o["colour"], o["shape"]) for o in large]
    shapes, colours = [o["shape"] for o in large], [o["colour"] for o in large]
    for o in large:
        if shapes.count(o["shape"]) == 1:   # colour of the large <shape>
            palette = list(ANSWER_PALETTE if o["colour"] in ANSWER_PALETTE else DISTRACTOR_COLOURS)
            out.append((f"What is the colour of the large {o['shape']}?", palette, palette.index(o["colour"])))
            other = [c for c in T.ALL_COLOURS if c != o["colour"]][int(rng.integers(7))]
            pair = [o["colour"], other] if rng.random() < 0.5 else [other, o["colour"]]
            out.append((f"Is the large {o['shape']} {pair[0]} or {pair[1]}?", [c.capitalize() for c in pair],
                        pair.index(o["colour"])))
        if colours.count(o["colour"]) == 1:  # shape of the <colour> object
            out.append((f"What is the shape of the {o['colour']} object?", list(T.SHAPES), T.SHAPES.index(o["shape"])))
        if names.count((o["colour"], o["shape"])) == 1:
            name = f"{o['colour']} {o['shape']}"
            cx = (o["bbox"][0] + o["bbox"][2]) / 2
            if abs(cx - size[0] / 2) >= 12:
                out.append((f"Is the {name} on the left or the right side of the image?", ["Left", "Right"],
                            ["left", "right"].index(_side(o, size))))
            for p in large:  # relative side of two large objects (V* wording)
                if p is not o and names.count((p["colour"], p["shape"])) == 1 and \
                        (p["bbox"][0] >= o["bbox"][2] or o["bbox"][0] >= p["bbox"][2]):
                    other = f"{p['colour']} {p['shape']}"
                    sides = ["left", "right"]
                    truth = "left" if cx < (p["bbox"][0] + p["bbox"][2]) / 2 else "right"
                    out.append((f"Is the {name} on the left or right side of the {other}?",
                                [f"The {name} is on the {s} side of the {other}." for s in sides], sides.index(truth)))
    n = len(large)
    out.append(("How many large shapes are in the image?", ["1", "2", "3", "4"], n - 1))
    pool = T.ALL_COLOURS if not has_small else DISTRACTOR_COLOURS  # never count the small target's colour
    colour = pool[int(rng.integers(len(pool)))]
    count = colours.count(colour)
    choices = [str(count)] + [str(c) for c in rng.permutation([c for c in range(5) if c != count])[:3]]
    choices = [choices[j] for j in rng.permutation(4)]
    out.append((f"How many {colour} shapes are in the image?", choices, choices.index(str(count))))
    asked_shape = T.SHAPES[int(rng.integers(3))]
    asked_colour = pool[int(rng.integers(len(pool)))] if rng.random() < 0.5 else colours[int(rng.integers(n))]
    present = (asked_colour, asked_shape) in names
    out.append((f"Is there a {asked_colour} {asked_shape} in the image?", ["yes", "no"], 0 if present else 1))
    return out


def _small_questions(image, small):
    """Questions that make the model find the small object without naming its colour or its side (the evaluated
    skill): its shape, whether it is in the top or bottom half, whether there is one. `small` None: there is none."""
    out = [("Is there a small shape in the image?", ["yes", "no"], 0 if small else 1)]
    if small is None:
        return out
    out.append(("What is the shape of the small object?", list(T.SHAPES), T.SHAPES.index(small["shape"])))
    cy = (small["bbox"][1] + small["bbox"][3]) / 2
    if abs(cy - image.height / 2) >= 12:
        out.append((f"Is the small {small['shape']} in the top or the bottom half of the image?", ["Top", "Bottom"],
                    0 if cy < image.height / 2 else 1))
    return out


def _caption(large, size, small_shape=None):
    parts = [f"a {o['colour']} {o['shape']} in the {_where(o, size)}" for o in large]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + f" and {parts[-1]}"
    n = len(large)
    text = f"{n} large shape{'s' if n > 1 else ''}: {listed}."
    return text + (f" There is also a small {small_shape}." if small_shape else "")


def _render_options(rng, options):
    """The three ways options reach the model: toy world "(A) x" lines, MMVP "(a) X (b) Y", eval.py "A. x" lines."""
    style = int(rng.integers(3))
    if style == 0:
        return "\n".join(f"({T.LETTERS[i]}) {o}" for i, o in enumerate(options))
    if style == 1 and len(options) == 2:
        return " ".join(f"({chr(97 + i)}) {o}" for i, o in enumerate(options))
    return "\n".join(f"{T.LETTERS[i]}. {o}" for i, o in enumerate(options))


def curriculum_sample(rng, recipe: Recipe = RECIPE):
    """One chat of the generic curriculum: [user (image + text), assistant answer]."""
    if rng.random() < recipe.generic_fraction:
        image, large = make_generic_scene(rng)
        small = None
    else:
        image, objects = T.make_scene(rng)
        large, small = objects[1:], objects[0]["shape"]
    kinds = _questions(rng, image, large, small is not None)
    if rng.random() < recipe.small_fraction:
        kinds = _small_questions(image, None if small is None else objects[0])
    if rng.random() < recipe.caption_fraction:
        text, answer = "Describe the image briefly.", _caption(large, image.size, small)
    else:
        q, options, k = kinds[int(rng.integers(len(kinds)))]
        tail = T.LMMS_SUFFIX if rng.random() < 0.8 else "Select from the following choices."
        text = f"{q}\n{_render_options(rng, options)}\n{tail}"
        letter = T.LETTERS[k]
        answer = f"<answer> {letter} </answer>" if rng.random() < recipe.tag_fraction else letter
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]},
            {"role": "assistant", "content": answer}]


# ----------------------------------------------------------------------------------------------------------------
# Model, training, export
# ----------------------------------------------------------------------------------------------------------------
def build_model(recipe: Recipe, seed: int) -> C.Backbone:
    """The toy backbone (`load_backbone("toy")`) resized to the recipe: same tokenizer, image processor, heads of 16."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    bb = C.load_backbone("toy", seed=seed, attn_implementation="sdpa")
    if (recipe.hidden_size, recipe.num_layers, recipe.vision_depth) == (64, 2, 2):
        return bb
    d = bb.model.config.to_dict()
    text, vision = d["text_config"], d["vision_config"]
    h = recipe.hidden_size
    text.update(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=recipe.num_layers,
                num_attention_heads=h // 16, num_key_value_heads=max(1, h // 32))
    text.pop("layer_types", None)
    vision.update(out_hidden_size=h, depth=recipe.vision_depth,
                  fullatt_block_indexes=[recipe.vision_depth - 1])
    keep = ("text_config", "vision_config", "image_token_id", "video_token_id", "vision_start_token_id",
            "vision_end_token_id", "tie_word_embeddings")
    config = Qwen2_5_VLConfig(**{k: d[k] for k in keep})
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    bb.model = Qwen2_5_VLForConditionalGeneration(config)
    return bb


def fingerprint(recipe: Recipe, seed: int) -> str:
    blob = json.dumps({"recipe": dataclasses.asdict(recipe), "seed": seed, "world": T.FORMAT_VERSION,
                       "code": BASE_CODE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sft(bb: C.Backbone, samples: list[dict], steps: int, per_micro: int, lr: float, seed: int,
        weight_decay: float = 0.0, params=None, log_every: int = 0, desc: str = "sft") -> list[float]:
    """Plain SFT (packed rows of `per_micro` samples, AdamW, 3 % warm-up then cosine to 10 %, clip 1.0) on encoded
    samples; returns the loss per step. The data order is a function of `seed` only."""
    model = bb.model
    model.train()
    params = [p for p in (params or model.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    order = D.MicroBatches([len(s["input_ids"]) for s in samples], per_micro=min(per_micro, len(samples)), seed=seed)
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = R.cosine_lr(step, steps, lr, 0.03, 0.1)
        batch = C.pack(bb, [samples[j] for j in order.next()[0]])
        loss = C.next_token_loss(model(**C.model_inputs(batch, model.device)).logits, batch["labels"].to(model.device))
        R.check_finite(loss, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            recent = losses[-log_every:]
            print(f"[{desc}] step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    return losses


def train_base(recipe: Recipe, seed: int, log_every: int = 100) -> tuple[C.Backbone, dict]:
    R.seed_everything(seed)
    bb = build_model(recipe, seed)
    t0 = time.perf_counter()
    rngs = (np.random.default_rng([seed, STREAM_BASE]),)
    samples = [C.encode_chat(bb, curriculum_sample(rngs[0], recipe), min_pixels=recipe.min_pixels,
                             max_pixels=recipe.max_pixels) for _ in range(recipe.n_scenes)]
    t_data = time.perf_counter() - t0
    if log_every:
        print(f"[toy base] {len(samples)} curriculum samples encoded in {t_data:.0f} s", flush=True)
    losses = sft(bb, samples, recipe.steps, recipe.per_micro, recipe.lr, seed, recipe.weight_decay,
                 log_every=log_every, desc="toy base")
    tail = losses[-max(1, len(losses) // 10):]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    stats = {"data_s": round(t_data, 1), "train_s": round(time.perf_counter() - t0 - t_data, 1),
             "process_cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
             "final_loss": round(sum(tail) / len(tail), 4), "first_loss": round(losses[0], 4),
             "params": sum(p.numel() for p in bb.model.parameters()),
             "tokens_per_sample": round(float(np.mean([len(s["input_ids"]) for s in samples])), 1)}
    return bb, stats


def _read_stamp(path: pathlib.Path):
    try:
        return json.loads((path / "TOY_BASE.json").read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _lock(path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_toy_base(out_dir: str = "data/toy/base", seed: int = 0, recipe: Recipe | None = None,
                    log_every: int = 100) -> str:
    """Path of the toy base model's HF export, trained on first use (or when the recipe's fingerprint changed)."""
    recipe = recipe or RECIPE
    out = pathlib.Path(out_dir)
    fp = fingerprint(recipe, seed)
    stamp = _read_stamp(out)
    if stamp and stamp.get("fingerprint") == fp:
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out.parent / f".{out.name}.lock"):
        stamp = _read_stamp(out)
        if stamp and stamp.get("fingerprint") == fp:
            return str(out)
        if out.exists() and stamp is None and any(out.iterdir()):
            raise FileExistsError(f"{out} holds files the toy base did not write; refusing to overwrite it")
        partial, old = out.parent / f".{out.name}.partial", out.parent / f".{out.name}.old"
        for leftover in (partial, old):
            shutil.rmtree(leftover, ignore_errors=True)
        print(f"building the toy base model in {out} (fingerprint {fp}; done once)", flush=True)
        t0 = time.perf_counter()
        bb, stats = train_base(recipe, seed, log_every)
        bb.model.config.toy_backbone = True
        R.export_hf(bb, partial, state_dict={k: v.detach().clone() for k, v in bb.model.state_dict().items()})
        stats["wall_s"] = round(time.perf_counter() - t0, 1)
        (partial / "TOY_BASE.json").write_text(json.dumps(
            {"fingerprint": fp, "seed": seed, "recipe": dataclasses.asdict(recipe), "world_format": T.FORMAT_VERSION,
             "code_version": BASE_CODE_VERSION, "torch_threads": torch.get_num_threads(), **stats}, indent=1) + "\n")
        if out.exists():
            os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old, ignore_errors=True)
        print(f"toy base ready in {stats['wall_s']:.0f} s (final loss {stats['final_loss']})", flush=True)
    return str(out)


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning on the toy LVR records (the "does it still learn" check)
# ----------------------------------------------------------------------------------------------------------------
def lvr_records_as_sft(bb: C.Backbone, records_path: str, min_pixels: int, max_pixels: int) -> list[dict]:
    """The toy LVR / Visual-CoT records as plain SFT samples on the full image: "<lvr>\\n" dropped from the answer
    (LVR with λ = 0 and no span), so the target is "<answer> B </answer>"."""
    root = os.path.dirname(records_path)
    out = []
    for rec in D.read_records(records_path):
        q = rec["conversations"][0]["value"].replace("<image>\n", "").strip()
        answer = rec["conversations"][1]["value"].replace("<lvr>\n", "").replace("<lvr>", "").strip()
        image = D.open_image(rec["image"][0] if isinstance(rec["image"], list) else rec["image"], root)
        chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": q}]},
                {"role": "assistant", "content": answer}]
        out.append(C.encode_chat(bb, chat, min_pixels=min_pixels, max_pixels=max_pixels))
    return out


def finetune_base(base_dir: str, out_dir: str, records_path: str, steps: int = 60, per_micro: int = 8,
                  lr: float = 1e-3, seed: int = 0, freeze_vision: bool = False) -> str:
    """Base + `steps` of plain SFT on the toy LVR records (full image, `<lvr>` dropped; full fine-tuning: with the
    vision tower frozen, as lvr.py does, 60 steps do not move the toy scores - README); exported to out_dir."""
    R.seed_everything(seed)
    bb = C.load_backbone(base_dir)
    if freeze_vision:
        for p in bb.model.model.visual.parameters():
            p.requires_grad_(False)
    cfg = json.loads((pathlib.Path(base_dir) / "TOY_BASE.json").read_text())["recipe"] \
        if (pathlib.Path(base_dir) / "TOY_BASE.json").exists() else dataclasses.asdict(RECIPE)
    samples = lvr_records_as_sft(bb, records_path, cfg["min_pixels"], cfg["max_pixels"])
    sft(bb, samples, steps, per_micro, lr, seed, desc="finetune")
    R.export_hf(bb, out_dir, state_dict={k: v.detach().clone() for k, v in bb.model.state_dict().items()})
    return out_dir


def main():
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default="data/toy/base")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=100)
    for f in dataclasses.fields(Recipe):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = parser.parse_args()
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})
    path = ensure_toy_base(args.out_dir, args.seed, recipe, args.log_every)
    print(json.dumps(_read_stamp(pathlib.Path(path)), indent=1))


if __name__ == "__main__":
    main()
