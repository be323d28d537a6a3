# Docs: docs/toy_world.md. Generates the offline default data of every script, and builds the toy model.
"""The offline toy world: data and a tiny model. A deterministic stand-in for every data set the four methods and
eval.py read, and (`toy_model_parts`, loaded by `common.load_backbone("toy" | "toy-qwen3vl")`) the tokenizer and
tiny configs of the real Qwen2.5-VL / Qwen3-VL classes that the tests and toy defaults train.

The task. Each image (width and height drawn from 112..196, so token counts vary from 16 to 49 at the scripts' toy
pixel budget, at native resolution) shows one to three LARGE coloured shapes (44-64 px) and one SMALL one (24-40 px)
on a plain or lightly noisy light-grey background (one fixed tone). Shapes are circle / square / triangle. The small
object - the *target* - is the only one of its shape, so "the triangle" names exactly one object, and is drawn in
one of the answer colours red / green / blue / yellow (`PALETTE`); distractors use a disjoint palette (purple /
cyan / grey / brown), so the answer colour appears only on the target (flat exact RGB values, no anti-aliasing).
Target sizes are graded around the 28-px token: a 24-px target covers about one token, a 40-px one two to four.
Learnability, measured by `python bench/bench_toy_learnability.py` (plain SFT of the random-init toy backbone on
colour questions; numbers in the README): from the oracle crop the task is learned within 250 steps; from the full
image it is learned (99 % by step 2000 on two of three seeds; the third stalls at 46 %) only after a plateau of
500-1250 steps - a crop genuinely helps, and the task is learnable on a CPU in minutes. Design history: 16-25 px targets in 224-448 px images seen at
64 tokens stayed at chance for 3000 steps (the target fell below one token after downscaling), and so did 20-40 px
targets in images up to 224 px within 2000 steps.
Two question templates, answered with option letters:
  colour:   "What is the colour of the triangle?"  (A) red (B) green (C) blue (D) yellow
  relative: "Is the triangle on the left or right side of the purple square?"  (A) The triangle is on the left ...
Training sets list the options in a fixed canonical order (a tiny model can learn colour -> letter in minutes);
so does the V* copy (a deviation from V*'s correct-first convention, below). Eval scenes use other RNG
streams than training scenes (same distribution, no shared images).

Files written under `root` (paths inside records are relative to the folder of the file that holds them):
  MANIFEST.json                    stamp: generator, format version, seed, sizes, file and record counts
  images/train_*.png, grpo_*.png   training images
  lvr_train.json                   LVR / Visual-CoT (VincentLeebang/lvr, deepcs233/Visual-CoT): a JSON list of
                                   {"id", "image": [path], "conversations": [{"from": "human", "value": "<image>\\n
                                   q\\n(A) ..\\nAnswer with the option's letter ..."}, {"from": "gpt", "value":
                                   "<lvr>\\n<answer> B </answer>"}], "bboxes": [[x0, y0, x1, y1]]} (normalised to
                                   [0, 1], the target plus a small margin; the union of both objects for relative)
  lvr_grpo.json                    ViRL39K-style RL records (LVR stage 2): {"id", "image": path, "conversations":
                                   [human q, gpt "<answer> B </answer>"]}, no bboxes
  pixelreasoner_train.json         TIGER-Lab/PixelReasoner-SFT-Data style: {"qid", "question", "answer",
                                   "question_image_path", "message_list"}; message_list is a Qwen chat (system /
                                   user / assistant) whose content items are {"type": "text", "text"} or
                                   {"type": "image", "image": path}. Assistant turns reason and call
                                   <tool_call>{"name": "crop_image", "arguments": {"bbox_2d": [x0, y0, x1, y1],
                                   "target_image": k}}</tool_call> (bbox normalised to image k; k is 1-based:
                                   1 = the question image, 2 = the first crop, ...); the tool output returns as a
                                   user turn "Here is the cropped image (Image Size: WxH):" + the crop's path.
                                   0-3 crops; a later crop may act on an earlier crop; the last assistant turn
                                   ends with \\boxed{letter}.
  pixelreasoner_crops/*.png        the crops, written to disk like the released data
  thinkmorph_train.parquet         ThinkMorph (HF org ThinkMorph, Visual_Search style): pid, problem_image_0,
                                   question, resoning_thought_0, reasoning_image_0 (the image with the target
                                   boxed), resoning_thought_1, answer - field names as published, "resoning" typo
                                   included; images are HF Image structs {"bytes", "path"}
  coco/annotations/captions_{train,val}2017.json   official COCO caption JSON (images[{id, file_name, width,
                                   height}], annotations[{id, image_id, caption}]), 5 captions per image naming
                                   colours, shapes, sizes and positions
  coco/annotations/categories_{train,val}2017.json {str(image_id): dominant colour (most pixels)}, for plots
  coco/{train,val}2017/*.jpg       COCO-style 12-digit file names
  gqa/{train,testdev}_balanced_{instructions,images}.parquet  lmms-lab/GQA layout: instructions (id, imageId,
                                   question, answer, fullAnswer) joined on imageId with images (id, image)
  scienceqa/{train,test}.parquet   lmms-lab/ScienceQA layout: image, question, choices (list), answer (int
                                   index), hint, task, grade, subject, topic, category, skill, lecture, solution
  eval/vstar/test_questions.jsonl  craigwu/vstar_bench layout: {"image": "direct_attributes/sa_N.jpg", "text":
                                   q + options + "Answer with the option's letter from the given choices
                                   directly.", "category", "question_id", "label"} + the two image folders.
                                   Deviation: the released V* always lists the correct option first (label "A");
                                   here options keep the training order, so labels vary and an always-"A" model
                                   scores chance. Relative-position options are sentences, as in V*.
  eval/mmvp/Questions.csv          MMVP layout: Index, Question, Options ("(a) Red (b) Blue"), Correct Answer
                                   ("(a)"); consecutive Index pairs (1, 2), (3, 4) ask the same question of two
                                   images with different answers; images in "eval/mmvp/MMVP Images/{Index}.jpg"
  eval/blink/<Subtask>/val-00000-of-00001.parquet  BLINK-Benchmark/BLINK layout for Counting, Spatial_Relation
                                   and Jigsaw (different item counts): idx ("val_Counting_1"), question, sub_task,
                                   choices, answer ("(A)"), prompt (question + "Select from the following
                                   choices." + options), image_1..image_4 (HF Image struct, null when unused),
                                   explanation, isReal

The tiny model (`toy_model_parts`): a byte-level BPE tokenizer trained in memory on a fixed corpus (deterministic)
that carries Qwen's special tokens and chat template; LLM 64 wide x 2 layers, vision 64 x 2 blocks. The Qwen2.5-VL
toy keeps 32 spare embedding rows (like the 7B's 152064 rows for ~151665 tokens); the Qwen3-VL toy has none and ties
its embeddings, so both surgery paths of `common.add_special_tokens` (reuse / resize) get exercised.

Usage: `ensure_toy_world()` from any script (idempotent; regenerates when seed, sizes or FORMAT_VERSION change),
or `python toy_world.py --root data/toy --seed 0 [--n-train 400 --n-eval 48 --n-bench 400]`.

Deviations and choices: one small target per image (the real sets have varied object scales); small images
(112-196 px, seen at native resolution) where V* is high-resolution - what makes a target hard is its size in
tokens, and small images keep CPU steps fast; canonical option order in training (learnability) and in the V* copy
(V* lists the correct option first); JPEG for the COCO / V* / MMVP copies (as published) and PNG elsewhere; all
bytes deterministic for a given Pillow / pyarrow version.
"""
import argparse
import contextlib
import csv
import fcntl
import io
import json
import os
import pathlib
import random
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

FORMAT_VERSION = 8  # bump whenever the bytes written change (8: V* / MMVP / BLINK sized by n_bench, 400)
GENERATOR = "toy_world"
SHAPES = ("circle", "square", "triangle")
PALETTE = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 90, 220), "yellow": (240, 200, 30)}
COLOURS = tuple(PALETTE)  # target colours = the answer options of colour questions
# Distractors use a disjoint palette: the answer colour appears in the image only on the small target (finding it is
# the whole task), while at low resolution the target still blurs into its 28-px token (a crop helps).
DISTRACTOR_PALETTE = {"purple": (140, 60, 170), "cyan": (40, 190, 200), "grey": (105, 105, 105),
                      "brown": (140, 90, 40)}
ALL_PALETTE = {**PALETTE, **DISTRACTOR_PALETTE}
ALL_COLOURS = tuple(ALL_PALETTE)
LETTERS = "ABCD"
LMMS_SUFFIX = "Answer with the option's letter from the given choices directly."
# [low, high) side lengths of the images, the target and the distractors. Images stay within the scripts' toy pixel
# budget (64 merged 28-px tokens = 224²), so the model sees them at native resolution: a 24-px target covers under
# one token (hard without a crop), a 40-px one two to four (learnable from the full view).
IMAGE_PX, SMALL_PX, LARGE_PX = (112, 197), (24, 41), (44, 65)
# One RNG stream per data set; eval streams (>= 100) never share scenes with training streams.
STREAMS = {"train": 1, "grpo": 2, "pixelreasoner": 3, "thinkmorph": 4, "coco_train": 5, "gqa_train": 6,
           "scienceqa_train": 7, "vstar": 101, "mmvp": 102, "blink_counting": 103, "blink_spatial": 104,
           "coco_val": 105, "gqa_testdev": 106, "scienceqa_test": 107, "blink_jigsaw": 108}


# ----------------------------------------------------------------------------------------------------------------
# Scenes and questions
# ----------------------------------------------------------------------------------------------------------------
def make_scene(rng, size=None, *, target_shape=None, target_colour=None):
    """Draw one scene. Returns (PIL RGB image, objects); objects[0] is the small target (the only object of its
    shape, "target": True), the rest are large distractors. bbox = pixel [x0, y0, x1, y1], x1/y1 exclusive.
    size=(W, H); None draws both from IMAGE_PX. A layout whose target does not fit is redrawn (same size)."""
    W, H = (int(v) for v in (size if size is not None else rng.integers(*IMAGE_PX, size=2)))
    target_shape = target_shape or SHAPES[rng.integers(len(SHAPES))]
    target_colour = target_colour or COLOURS[rng.integers(4)]
    other_shapes = [s for s in SHAPES if s != target_shape]
    while (placed := _layout(rng, W, H, target_shape, target_colour, other_shapes)) is None:
        pass
    # A fixed light-grey tone: a random per-image shade (never named in any caption or question) carried 96 % of the
    # variance of the random toy tower's latents and drowned the small target's signal.
    pixels = np.broadcast_to(np.array([222, 222, 222]), (H, W, 3)).astype(np.float32)
    noisy = bool(rng.random() < 0.5)
    if noisy:  # light noise in 8x8 cells: a visible texture that still compresses to small PNGs
        cells = rng.normal(0.0, 6.0, size=(H // 8 + 1, W // 8 + 1, 3)).astype(np.float32)
        pixels = pixels + np.repeat(np.repeat(cells, 8, axis=0), 8, axis=1)[:H, :W]
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    image.info["background"] = "noisy" if noisy else "plain"
    draw = ImageDraw.Draw(image)
    for obj in placed:
        _draw_shape(draw, obj["shape"], obj["bbox"], ALL_PALETTE[obj["colour"]])
    return image, [placed[-1]] + placed[:-1]


def _layout(rng, W, H, target_shape, target_colour, other_shapes):
    """1-3 large distractors (any that do not fit after 300 tries are dropped), then the small target, all at least
    6 px apart; None when the target does not fit."""
    specs = [(other_shapes[rng.integers(2)], tuple(DISTRACTOR_PALETTE)[rng.integers(4)], int(rng.integers(*LARGE_PX)),
              "large") for _ in range(int(rng.integers(1, 4)))]
    specs.append((target_shape, target_colour, int(rng.integers(*SMALL_PX)), "small"))
    placed = []
    for shape, colour, side, size_name in specs:  # large ones first: they are the hard ones to fit
        for _ in range(300):
            x0, y0 = int(rng.integers(0, W - side + 1)), int(rng.integers(0, H - side + 1))
            box = [x0, y0, x0 + side, y0 + side]
            if all(box[0] >= b[2] + 6 or b[0] >= box[2] + 6 or box[1] >= b[3] + 6 or b[1] >= box[3] + 6
                   for b in (o["bbox"] for o in placed)):
                placed.append({"shape": shape, "colour": colour, "bbox": box, "size": size_name,
                               "target": size_name == "small"})
                break
        else:
            if size_name == "small":
                return None
    return placed


def _draw_shape(draw, shape, bbox, rgb):
    x0, y0, x1, y1 = bbox[0], bbox[1], bbox[2] - 1, bbox[3] - 1  # PIL boxes are inclusive
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=rgb)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=rgb)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=rgb)


def _centre_x(obj):
    return (obj["bbox"][0] + obj["bbox"][2]) / 2


def _relative_partner(objects):
    """A distractor that its colour + shape name uniquely and whose x-range is disjoint from the target's."""
    target = objects[0]
    names = [(o["colour"], o["shape"]) for o in objects]
    for obj in objects[1:]:
        disjoint = obj["bbox"][0] >= target["bbox"][2] or target["bbox"][0] >= obj["bbox"][2]
        if disjoint and names.count((obj["colour"], obj["shape"])) == 1:
            return obj
    return None


def _scene_with_partner(rng):
    while True:
        image, objects = make_scene(rng)
        partner = _relative_partner(objects)
        if partner is not None:
            return image, objects, partner


def _colour_question(objects):
    target = objects[0]
    options = list(COLOURS)
    return {"kind": "colour", "question": f"What is the colour of the {target['shape']}?", "options": options,
            "answer": options.index(target["colour"]), "region": list(target["bbox"]), "referent": target}


def _relative_question(objects, partner):
    target = objects[0]
    other = f"{partner['colour']} {partner['shape']}"
    side = "left" if _centre_x(target) < _centre_x(partner) else "right"
    sides = ["left", "right"]
    options = [f"The {target['shape']} is on the {s} side of the {other}." for s in sides]
    region = [min(target["bbox"][0], partner["bbox"][0]), min(target["bbox"][1], partner["bbox"][1]),
              max(target["bbox"][2], partner["bbox"][2]), max(target["bbox"][3], partner["bbox"][3])]
    return {"kind": "relative", "question": f"Is the {target['shape']} on the left or right side of the {other}?",
            "options": options, "answer": sides.index(side), "region": region, "referent": target}


def _answer_sentence(q):
    if q["kind"] == "colour":
        return f"The {q['referent']['shape']} is {q['referent']['colour']}."
    return q["options"][q["answer"]]


def _training_item(rng, relative_fraction=0.25):
    """One training scene and question: colour (75 %) or relative position (25 %), canonical option order."""
    if rng.random() < relative_fraction:
        image, objects, partner = _scene_with_partner(rng)
        return image, objects, _relative_question(objects, partner)
    image, objects = make_scene(rng)
    return image, objects, _colour_question(objects)


def _options_text(options, style="upper"):
    if style == "lower":  # MMVP: "(a) Red (b) Blue" on one line
        return " ".join(f"({chr(97 + i)}) {o}" for i, o in enumerate(options))
    return "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))


def _mc_prompt(q):
    return f"{q['question']}\n{_options_text(q['options'])}\n{LMMS_SUFFIX}"


def normalised_bbox(box, size, margin_px=4, margin_frac=0.15):
    """Pixel box -> [x0, y0, x1, y1] in [0, 1] with a small margin, rounded outwards to 3 decimals."""
    W, H = size
    m = margin_px + margin_frac * max(box[2] - box[0], box[3] - box[1])
    x0, y0 = max(0.0, (box[0] - m) / W), max(0.0, (box[1] - m) / H)
    x1, y1 = min(1.0, (box[2] + m) / W), min(1.0, (box[3] + m) / H)
    return [float(np.floor(x0 * 1000) / 1000), float(np.floor(y0 * 1000) / 1000),
            float(np.ceil(x1 * 1000) / 1000), float(np.ceil(y1 * 1000) / 1000)]


# ----------------------------------------------------------------------------------------------------------------
# Deterministic writers
# ----------------------------------------------------------------------------------------------------------------
def _png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6, optimize=False)
    return buffer.getvalue()


def _save_png(image, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png_bytes(image))


def _save_jpg(image, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, subsampling=0, optimize=False, progressive=False)
    path.write_bytes(buffer.getvalue())


def _write_json(obj, path, indent=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_HF_TYPES = {pa.string(): {"dtype": "string", "_type": "Value"}, pa.int64(): {"dtype": "int64", "_type": "Value"},
             pa.bool_(): {"dtype": "bool", "_type": "Value"}}


def _write_parquet(columns, fields, path):
    """Write with a fixed schema plus the `huggingface` metadata that makes `datasets` decode Image columns."""
    features = {}
    for name, arrow_type in fields:
        if arrow_type == IMAGE_STRUCT:
            features[name] = {"_type": "Image"}
        elif pa.types.is_list(arrow_type):
            features[name] = {"feature": _HF_TYPES[arrow_type.value_type], "_type": "Sequence"}
        else:
            features[name] = _HF_TYPES[arrow_type]
    schema = pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict(columns, schema=schema), path, compression="snappy")


def _image_cell(image, name):
    return {"bytes": _png_bytes(image), "path": name}


# ----------------------------------------------------------------------------------------------------------------
# Training sets: LVR / Visual-CoT, ViRL39K-style GRPO, PixelReasoner, ThinkMorph
# ----------------------------------------------------------------------------------------------------------------
def _write_lvr_and_grpo(root, seed, n_train):
    rng, items = np.random.default_rng([seed, STREAMS["train"]]), []
    lvr = []
    for i in range(n_train):
        image, objects, q = _training_item(rng)
        rel = f"images/train_{i:05d}.png"
        _save_png(image, root / rel)
        lvr.append({"id": f"toy_lvr_{i:05d}", "image": [rel],
                    "conversations": [{"from": "human", "value": "<image>\n" + _mc_prompt(q)},
                                      {"from": "gpt", "value": f"<lvr>\n<answer> {LETTERS[q['answer']]} </answer>"}],
                    "bboxes": [normalised_bbox(q["region"], image.size)]})
        items.append((rel, image, objects, q))
    _write_json(lvr, root / "lvr_train.json")

    rng, grpo = np.random.default_rng([seed, STREAMS["grpo"]]), []
    for i in range(max(1, n_train // 2)):
        image, _, q = _training_item(rng)
        rel = f"images/grpo_{i:05d}.png"
        _save_png(image, root / rel)
        grpo.append({"id": f"toy_grpo_{i:05d}", "image": rel,
                     "conversations": [{"from": "human", "value": "<image>\n" + _mc_prompt(q)},
                                       {"from": "gpt", "value": f"<answer> {LETTERS[q['answer']]} </answer>"}]})
    _write_json(grpo, root / "lvr_grpo.json")
    return items


PIXELREASONER_SYSTEM = (
    "You are a helpful assistant.\n\n# Tools\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + json.dumps({"type": "function", "function": {
        "name": "crop_image", "description": "Zoom in on the image based on the bounding box coordinates.",
        "parameters": {"type": "object", "properties": {
            "bbox_2d": {"type": "array", "items": {"type": "number"}, "description": "coordinates for bounding "
                        "box of the area you want to zoom in. Values should be within [0.0,1.0]."},
            "target_image": {"type": "number", "description": "The index of the image to crop. Index from 1 to "
                             "the number of images. Choose 1 to operate on original image."}},
            "required": ["bbox_2d", "target_image"]}}})
    + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}"
    "\n</tool_call>")


def _crop(image, box):
    """Crop a pixel box, clipped to the image and grown to at least 28 px a side (the crop tool's minimum)."""
    limits, clipped = (image.width, image.height), []
    for axis in (0, 1):
        lo, hi = max(0, int(box[axis])), min(limits[axis], int(box[axis + 2]))
        grow = max(0, 28 - (hi - lo))
        lo = max(0, lo - (grow + 1) // 2)
        hi = min(limits[axis], max(hi + grow // 2, lo + 28))
        lo = max(0, min(lo, hi - 28))
        clipped.append((lo, hi))
    box = [clipped[0][0], clipped[1][0], clipped[0][1], clipped[1][1]]
    return image.crop(box), box


def _tool_call(bbox_norm, target_image):
    call = {"name": "crop_image", "arguments": {"bbox_2d": bbox_norm, "target_image": target_image}}
    return f"<tool_call>\n{json.dumps(call)}\n</tool_call>"


def _write_pixelreasoner(root, seed, items):
    """0-3 sequential crops per trajectory; crop k+1 may act on crop k (target_image = k + 1, 1-based)."""
    rng, records = np.random.default_rng([seed, STREAMS["pixelreasoner"]]), []
    for i, (rel, image, objects, q) in enumerate(items[: max(1, len(items) // 2)]):
        n_crops = int(rng.choice(4, p=[0.2, 0.4, 0.25, 0.15]))
        if len(objects) < 2:  # the 3-crop plan first looks at a distractor
            n_crops = min(n_crops, 2)
        referent, letter = q["referent"]["shape"], LETTERS[q["answer"]]
        user_text = f"{q['question']}\n{_options_text(q['options'])}"
        messages = [{"role": "system", "content": [{"type": "text", "text": PIXELREASONER_SYSTEM}]},
                    {"role": "user", "content": [{"type": "image", "image": rel}, {"type": "text", "text": user_text}]}]
        images, boxes_in_original = [image], [[0, 0, image.width, image.height]]

        def call_crop(box_in_original, on_image, thought):
            # bbox_2d is normalised to the image being cropped (image number `on_image`, 1-based)
            ox0, oy0, ox1, oy1 = boxes_in_original[on_image - 1]
            src = images[on_image - 1]
            local = [box_in_original[0] - ox0, box_in_original[1] - oy0,
                     box_in_original[2] - ox0, box_in_original[3] - oy0]
            crop, local = _crop(src, local)
            norm = [round(local[0] / src.width, 3), round(local[1] / src.height, 3),
                    round(local[2] / src.width, 3), round(local[3] / src.height, 3)]
            crop_rel = f"pixelreasoner_crops/pr_{i:05d}_{len(images)}.png"
            _save_png(crop, root / crop_rel)
            images.append(crop)
            boxes_in_original.append([local[0] + ox0, local[1] + oy0, local[2] + ox0, local[3] + oy0])
            messages.append({"role": "assistant", "content": [{"type": "text",
                                                              "text": f"{thought}\n{_tool_call(norm, on_image)}"}]})
            messages.append({"role": "user", "content": [
                {"type": "text", "text": f"\nHere is the cropped image (Image Size: {crop.width}x{crop.height}):"},
                {"type": "image", "image": crop_rel}]})

        region = q["region"]
        pad = lambda box, k: [box[0] - k, box[1] - k, box[2] + k, box[3] + k]  # noqa: E731
        if n_crops == 3:  # a wasted look first: crop a distractor
            decoy = objects[1]["bbox"]
            call_crop(pad(decoy, 2), 1, f"The {referent} is small. Let me zoom in on this region first.")
            call_crop(pad(region, 40), 1, f"There is no {referent} in that crop. Let me look elsewhere in the "
                                          "original image.")
            call_crop(pad(region, 6), len(images), f"I can see the {referent} now; zooming in further.")
        elif n_crops == 2:
            call_crop(pad(region, 40), 1, f"The {referent} is small. Let me zoom in on the area around it.")
            call_crop(pad(region, 6), 2, f"The {referent} is in this crop; zooming in further.")
        elif n_crops == 1:
            call_crop(pad(region, 8), 1, f"The {referent} is small. Let me zoom in on it.")
        if n_crops:
            final = f"In the zoomed-in view: {_answer_sentence(q)} So the answer is \\boxed{{{letter}}}."
        else:
            final = f"Looking at the image: {_answer_sentence(q)} So the answer is \\boxed{{{letter}}}."
        messages.append({"role": "assistant", "content": [{"type": "text", "text": final}]})
        records.append({"qid": f"toy_pr_{i:05d}", "question": user_text, "answer": letter,
                        "question_image_path": rel, "message_list": messages})
    _write_json(records, root / "pixelreasoner_train.json")
    return len(records)


def _write_thinkmorph(root, seed, items):
    """Visual-search style rows: the reasoning image is the problem image with the target boxed."""
    rows = {k: [] for k in ("pid", "problem_image_0", "question", "resoning_thought_0", "reasoning_image_0",
                            "resoning_thought_1", "answer")}
    for i, (rel, image, objects, q) in enumerate(items[len(items) // 2:] or items):
        boxed = image.copy()
        x0, y0, x1, y1 = q["region"]
        ImageDraw.Draw(boxed).rectangle([x0 - 4, y0 - 4, x1 + 3, y1 + 3], outline=(0, 0, 0), width=2)
        letter, referent = LETTERS[q["answer"]], q["referent"]["shape"]
        rows["pid"].append(f"toy_tm_{i:05d}")
        rows["problem_image_0"].append(_image_cell(image, pathlib.Path(rel).name))
        rows["question"].append(f"{q['question']}\n{_options_text(q['options'])}")
        rows["resoning_thought_0"].append(f"The {referent} is small, so I will first find it and mark it in the image.")
        rows["reasoning_image_0"].append(_image_cell(boxed, f"toy_tm_{i:05d}_reasoning_0.png"))
        rows["resoning_thought_1"].append(f"In the marked region: {_answer_sentence(q)} "
                                          f"The answer is ({letter}).")
        rows["answer"].append(letter)
    fields = [("pid", pa.string()), ("problem_image_0", IMAGE_STRUCT), ("question", pa.string()),
              ("resoning_thought_0", pa.string()), ("reasoning_image_0", IMAGE_STRUCT),
              ("resoning_thought_1", pa.string()), ("answer", pa.string())]
    _write_parquet(rows, fields, root / "thinkmorph_train.parquet")
    return len(rows["pid"])


# ----------------------------------------------------------------------------------------------------------------
# Image-caption pairs (COCO layout) for latent pretraining
# ----------------------------------------------------------------------------------------------------------------
def _position(obj, size):
    cx, cy = (obj["bbox"][0] + obj["bbox"][2]) / 2 / size[0], (obj["bbox"][1] + obj["bbox"][3]) / 2 / size[1]
    vertical = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre"
    if vertical == "middle" and horizontal == "centre":
        return "centre"
    return f"{vertical} {horizontal}" if vertical != "middle" else f"middle {horizontal}"


def _describe(obj, size, rng):
    adjective = obj["size"] if rng.random() < 0.7 else ("tiny" if obj["size"] == "small" else "big")
    return f"a {adjective} {obj['colour']} {obj['shape']} in the {_position(obj, size)}"


def _captions(objects, size, rng, noisy):
    background = "a noisy grey" if noisy else "a plain grey"
    order = [objects[k] for k in rng.permutation(len(objects))]
    phrases = [_describe(o, size, rng) for o in order]
    listed = ", ".join(phrases[:-1]) + f" and {phrases[-1]}"
    largest = max(objects, key=lambda o: o["bbox"][2] - o["bbox"][0])
    target = objects[0]
    captions = [
        f"{listed[0].upper()}{listed[1:]} on {background} background.",
        f"An image showing {len(objects)} shapes: {listed}.",
        f"There is {phrases[0]}, next to {phrases[1]}.",
        f"A small {target['colour']} {target['shape']} sits in the {_position(target, size)} among larger shapes.",
        f"The biggest shape is a {largest['colour']} {largest['shape']} in the {_position(largest, size)}.",
    ]
    return captions


def _dominant_colour(objects):
    area = {c: 0 for c in ALL_COLOURS}
    for o in objects:
        area[o["colour"]] += (o["bbox"][2] - o["bbox"][0]) * (o["bbox"][3] - o["bbox"][1])
    return max(ALL_COLOURS, key=lambda c: area[c])


def _write_coco(root, seed, split, n_images, first_id):
    rng = np.random.default_rng([seed, STREAMS[f"coco_{split}"]])
    images, annotations, categories = [], [], {}
    for k in range(n_images):
        image, objects = make_scene(rng)
        noisy = image.info["background"] == "noisy"
        image_id = first_id + k
        file_name = f"{image_id:012d}.jpg"
        _save_jpg(image, root / "coco" / f"{split}2017" / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        for j, caption in enumerate(_captions(objects, image.size, rng, noisy)):
            annotations.append({"id": image_id * 10 + j, "image_id": image_id, "caption": caption})
        categories[str(image_id)] = _dominant_colour(objects)
    info = {"description": "toy_world COCO-format captions", "version": str(FORMAT_VERSION)}
    _write_json({"info": info, "licenses": [], "images": images, "annotations": annotations},
                root / "coco" / "annotations" / f"captions_{split}2017.json", indent=None)
    _write_json(categories, root / "coco" / "annotations" / f"categories_{split}2017.json")
    return n_images, len(annotations)


# ----------------------------------------------------------------------------------------------------------------
# Downstream fine-tuning / evaluation sets: GQA and ScienceQA layouts
# ----------------------------------------------------------------------------------------------------------------
def _write_gqa(root, seed, split, n):
    rng = np.random.default_rng([seed, STREAMS[f"gqa_{split}"]])
    instructions = {k: [] for k in ("id", "imageId", "question", "answer", "fullAnswer")}
    images = {"id": [], "image": []}
    for k in range(n):
        image_id = f"toy{split}{k:05d}"
        kind = k % 3
        if kind == 1:
            image, objects, partner = _scene_with_partner(rng)
        else:
            image, objects = make_scene(rng)
        target = objects[0]
        if kind == 0:
            question = f"What colour is the {target['shape']}?"
            answer, full = target["colour"], f"The {target['shape']} is {target['colour']}."
        elif kind == 1:
            other = f"{partner['colour']} {partner['shape']}"
            answer = "left" if _centre_x(target) < _centre_x(partner) else "right"
            question = f"Is the {target['shape']} to the left or to the right of the {other}?"
            full = f"The {target['shape']} is to the {answer} of the {other}."
        else:
            colour, shape = ALL_COLOURS[rng.integers(len(ALL_COLOURS))], SHAPES[rng.integers(3)]
            present = any(o["colour"] == colour and o["shape"] == shape for o in objects)
            question = f"Is there a {colour} {shape} in the image?"
            answer = "yes" if present else "no"
            full = f"{'Yes' if present else 'No'}, there is {'a' if present else 'no'} {colour} {shape}."
        instructions["id"].append(f"{split}{k:07d}")
        instructions["imageId"].append(image_id)
        instructions["question"].append(question)
        instructions["answer"].append(answer)
        instructions["fullAnswer"].append(full)
        images["id"].append(image_id)
        images["image"].append(_image_cell(image, f"{image_id}.png"))
    string_fields = [(name, pa.string()) for name in instructions]
    _write_parquet(instructions, string_fields, root / "gqa" / f"{split}_balanced_instructions.parquet")
    _write_parquet(images, [("id", pa.string()), ("image", IMAGE_STRUCT)],
                   root / "gqa" / f"{split}_balanced_images.parquet")
    return n


def _write_scienceqa(root, seed, split, n):
    rng = np.random.default_rng([seed, STREAMS[f"scienceqa_{split}"]])
    columns = {k: [] for k in ("image", "question", "choices", "answer", "hint", "task", "grade", "subject",
                               "topic", "category", "skill", "lecture", "solution")}
    for k in range(n):
        image, objects = make_scene(rng)
        target = objects[0]
        n_choices = int(rng.integers(2, 5))
        wrong = [c for c in COLOURS if c != target["colour"]]
        choices = [target["colour"]] + [wrong[j] for j in rng.permutation(3)[: n_choices - 1]]
        choices = [choices[j] for j in rng.permutation(n_choices)]
        columns["image"].append(_image_cell(image, f"sqa_{split}_{k:05d}.png"))
        columns["question"].append(f"Which colour is the small {target['shape']}?")
        columns["choices"].append(choices)
        columns["answer"].append(choices.index(target["colour"]))
        columns["hint"].append("The picture shows several shapes; only one of them is small.")
        columns["task"].append("closed choice")
        columns["grade"].append("grade2")
        columns["subject"].append("natural science")
        columns["topic"].append("shapes and colours")
        columns["category"].append("Identify colours")
        columns["skill"].append("Identify the colour of a shape")
        columns["lecture"].append("")
        columns["solution"].append(f"Look closely at the small {target['shape']}: it is {target['colour']}.")
    fields = [("image", IMAGE_STRUCT), ("question", pa.string()), ("choices", pa.list_(pa.string())),
              ("answer", pa.int64())] + [(name, pa.string()) for name in list(columns)[4:]]
    _write_parquet(columns, fields, root / "scienceqa" / f"{split}.parquet")
    return n


# ----------------------------------------------------------------------------------------------------------------
# Evaluation sets: V*, MMVP, BLINK
# ----------------------------------------------------------------------------------------------------------------
def _write_vstar(root, seed, n_eval):
    """direct_attributes (4 options) and relative_position (2 options), ~60/40 like V*'s 115/76. Deviation: the
    released test_questions.jsonl always lists the correct option first (label "A"); here options keep the
    training order, so labels vary and a model that always answers "A" scores chance, not 100 %."""
    rng, rows = np.random.default_rng([seed, STREAMS["vstar"]]), []
    n_direct = (n_eval * 3 + 4) // 5
    for k in range(n_eval):
        if k < n_direct:
            image, objects = make_scene(rng)
            q, category = _colour_question(objects), "direct_attributes"
        else:
            image, objects, partner = _scene_with_partner(rng)
            q, category = _relative_question(objects, partner), "relative_position"
        rel = f"{category}/sa_{k + 1}.jpg"
        _save_jpg(image, root / "eval" / "vstar" / rel)
        text = f"{q['question']}\n{_options_text(q['options'])}\n{LMMS_SUFFIX}"
        rows.append({"image": rel, "text": text, "category": category, "question_id": k,
                     "label": LETTERS[q["answer"]]})
    path = root / "eval" / "vstar" / "test_questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"direct_attributes": n_direct, "relative_position": n_eval - n_direct}


def _write_mmvp(root, seed, n_eval):
    """n_eval // 2 pairs. Even pairs: the target's colour differs between the two images; odd pairs: the second
    image is the mirror of the first, so the target moves to the other side."""
    rng, rows = np.random.default_rng([seed, STREAMS["mmvp"]]), []
    folder = root / "eval" / "mmvp" / "MMVP Images"
    for p in range(max(1, n_eval // 2)):
        if p % 2 == 0:
            colour_a, colour_b = (COLOURS[j] for j in rng.permutation(4)[:2])
            shape = SHAPES[rng.integers(3)]
            image_a, _ = make_scene(rng, target_shape=shape, target_colour=colour_a)
            image_b, _ = make_scene(rng, target_shape=shape, target_colour=colour_b)
            question = f"Is the {shape} {colour_a} or {colour_b}?"
            options = [colour_a.capitalize(), colour_b.capitalize()]
            answers = ["(a)", "(b)"]
        else:
            image_a, objects = make_scene(rng)
            while abs(_centre_x(objects[0]) - image_a.width / 2) < 12:  # keep "left or right" unambiguous
                image_a, objects = make_scene(rng)
            image_b = image_a.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            shape = objects[0]["shape"]
            question = f"Is the {shape} on the left or the right side of the image?"
            options = ["Left", "Right"]
            first = "(a)" if _centre_x(objects[0]) < image_a.width / 2 else "(b)"
            answers = [first, "(b)" if first == "(a)" else "(a)"]
        for image, answer in zip((image_a, image_b), answers):
            index = len(rows) + 1
            _save_jpg(image, folder / f"{index}.jpg")
            rows.append([index, question, _options_text(options, style="lower"), answer])
    with open(root / "eval" / "mmvp" / "Questions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["Index", "Question", "Options", "Correct Answer"])
        writer.writerows(rows)
    return len(rows)


def blink_counts(n_eval):
    """Item counts per BLINK subtask; always three different numbers (n_eval >= 4)."""
    return {"Counting": n_eval, "Spatial_Relation": n_eval - max(1, n_eval // 4), "Jigsaw": max(1, n_eval // 2)}


def _blink_row(subtask, k, question, choices, answer_index, images, explanation=""):
    prompt = f"{question}\nSelect from the following choices.\n{_options_text(choices)}"
    idx = f"val_{subtask}_{k + 1}"
    row = {"idx": idx, "question": question, "sub_task": subtask, "choices": choices,
           "answer": f"({LETTERS[answer_index]})", "prompt": prompt, "explanation": explanation, "isReal": False}
    for j in range(4):
        row[f"image_{j + 1}"] = _image_cell(images[j], f"{idx}_{j + 1}.png") if j < len(images) else None
    return row


def _write_blink(root, seed, n_eval):
    counts, written = blink_counts(n_eval), {}
    for subtask, n in counts.items():
        rng, rows = np.random.default_rng([seed, STREAMS[f"blink_{subtask.split('_')[0].lower()}"]]), []
        for k in range(n):
            if subtask == "Counting":
                image, objects = make_scene(rng)
                colour = ALL_COLOURS[rng.integers(len(ALL_COLOURS))]
                count = sum(o["colour"] == colour for o in objects)
                others = [c for c in range(6) if c != count]
                choices = [str(count)] + [str(others[j]) for j in rng.permutation(len(others))[:3]]
                choices = [choices[j] for j in rng.permutation(4)]
                rows.append(_blink_row(subtask, k, f"How many {colour} shapes are in the image?", choices,
                                       choices.index(str(count)), [image]))
            elif subtask == "Spatial_Relation":
                image, objects, partner = _scene_with_partner(rng)
                target, other = objects[0], f"{partner['colour']} {partner['shape']}"
                asked = "left" if rng.random() < 0.5 else "right"
                truth = "left" if _centre_x(target) < _centre_x(partner) else "right"
                question = f"Is the {target['shape']} to the {asked} of the {other}?"
                rows.append(_blink_row(subtask, k, question, ["yes", "no"], 0 if asked == truth else 1, [image]))
            else:  # Jigsaw: which patch fills the missing lower-right corner of image 1?
                image, _ = make_scene(rng)
                decoy_image, _ = make_scene(rng, size=image.size)
                pw, ph = image.width // 3, image.height // 3
                box = (image.width - pw, image.height - ph, image.width, image.height)
                patch, decoy = image.crop(box), decoy_image.crop(box)
                holed = image.copy()
                holed.paste((0, 0, 0), box)
                correct_first = rng.random() < 0.5
                candidates = [patch, decoy] if correct_first else [decoy, patch]
                question = ("Given the first image with the lower right corner missing, can you tell which one of "
                            "the second image or the third image is the missing part? Imagine which image would be "
                            "more appropriate to place in the missing spot.")
                rows.append(_blink_row(subtask, k, question, ["the second image", "the third image"],
                                       0 if correct_first else 1, [holed] + candidates))
        columns = {name: [r[name] for r in rows] for name in rows[0]}
        fields = [("idx", pa.string()), ("question", pa.string()), ("sub_task", pa.string()),
                  ("choices", pa.list_(pa.string())), ("answer", pa.string()), ("prompt", pa.string()),
                  ("explanation", pa.string()), ("isReal", pa.bool_())] + \
                 [(f"image_{j}", IMAGE_STRUCT) for j in range(1, 5)]
        _write_parquet(columns, fields, root / "eval" / "blink" / subtask / "val-00000-of-00001.parquet")
        written[subtask] = n
    return written


# ----------------------------------------------------------------------------------------------------------------
# The tiny model: tokenizer and configs of the real classes (common.load_backbone builds and seeds the model)
# ----------------------------------------------------------------------------------------------------------------
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def toy_model_parts(name="toy"):
    """(tokenizer, config, image_processor) of the toy backbone `name` ("toy": Qwen2.5-VL, "toy-qwen3vl": Qwen3-VL).
    The config carries `toy_backbone = True` (saved in config.json by save_pretrained: common.is_toy recognises
    exports)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    tokenizer = build_toy_tokenizer()
    config = toy_config(tokenizer, {"toy": "qwen2_5_vl", "toy-qwen3vl": "qwen3_vl"}[name])
    config.toy_backbone = True
    patch = config.vision_config.patch_size
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                               min_pixels=4 * (2 * patch) ** 2, max_pixels=1024 * (2 * patch) ** 2)
    return tokenizer, config, image_processor


def _toy_corpus():
    words = ("what is the colour color of small large tiny big red green blue yellow circle square triangle shape "
             "left right above below top bottom side object image picture answer option letter choices given "
             "directly with from focus on region crop cropped part here relevant a an and or in it this that there "
             "how many are is describe zoom look at into think reason step yes no one two three four five six "
             "seven eight nine zero background plain noisy next to near far behind front").split()
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)]
    lines += ["(A) (B) (C) (D) (a) (b) A. B. C. D. <answer> </answer> <think> </think> 0.123 [0.1, 0.2, 0.3, 0.4]"]
    lines += ["Answer with the option's letter from the given choices directly.", "You are a helpful assistant."]
    return lines


def build_toy_tokenizer(vocab_size=1024):
    """Byte-level BPE trained in memory on a fixed corpus (deterministic), carrying Qwen's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_toy_corpus(), trainer=trainer)
    tok.add_special_tokens(QWEN_SPECIAL_TOKENS)  # appended after the BPE vocabulary, like Qwen's ids 151643+
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, model_max_length=32768)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def toy_config(tokenizer, family="qwen2_5_vl", spare_rows=32):
    """Tiny config of the real classes: Qwen2.5-VL with `spare_rows` spare embedding rows and untied embeddings, or
    Qwen3-VL (patch 16, deepstack) with none and tied embeddings."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    mm_ids = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig
        text.update(vocab_size=len(tokenizer) + spare_rows,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
                      patch_size=14, spatial_merge_size=2, window_size=56, fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **mm_ids)
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig
        text.update(vocab_size=len(tokenizer), head_dim=16,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                     "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
                      patch_size=16, spatial_merge_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0])
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **mm_ids)
    raise ValueError(f"unknown toy family {family!r}")


# ----------------------------------------------------------------------------------------------------------------
# Entry point: generate once, stamp, reuse
# ----------------------------------------------------------------------------------------------------------------
TOP_LEVEL_NAMES = {"MANIFEST.json", "images", "lvr_train.json", "lvr_grpo.json", "pixelreasoner_train.json",
                   "pixelreasoner_crops", "thinkmorph_train.parquet", "coco", "gqa", "scienceqa", "eval"}
# toy_base.ensure_toy_base() keeps the toy base model at <root>/base by default (its own fingerprint and lock): not
# foreign, and carried over when the world is regenerated (the base depends on FORMAT_VERSION only, via its stamp).
BASE_NAMES = {"base", ".base.lock", ".base.partial", ".base.old"}


def _stamp(seed, n_train, n_eval, n_bench):
    return {"generator": GENERATOR, "format_version": FORMAT_VERSION, "seed": seed, "n_train": n_train,
            "n_eval": n_eval, "n_bench": n_bench}


def _read_manifest(root):
    try:
        return json.loads((root / "MANIFEST.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _generate(root, seed, n_train, n_eval, n_bench):
    items = _write_lvr_and_grpo(root, seed, n_train)
    records = {"lvr_train.json": n_train, "lvr_grpo.json": max(1, n_train // 2),
               "pixelreasoner_train.json": _write_pixelreasoner(root, seed, items),
               "thinkmorph_train.parquet": _write_thinkmorph(root, seed, items)}
    for split, n, first_id in (("train", n_train, 1), ("val", n_eval, 1_000_000)):
        n_images, n_captions = _write_coco(root, seed, split, n, first_id)
        records[f"coco/annotations/captions_{split}2017.json"] = {"images": n_images, "captions": n_captions}
    for split, n in (("train", max(1, n_train // 2)), ("testdev", n_eval)):
        records[f"gqa/{split}_balanced_instructions.parquet"] = _write_gqa(root, seed, split, n)
    for split, n in (("train", max(1, n_train // 2)), ("test", n_eval)):
        records[f"scienceqa/{split}.parquet"] = _write_scienceqa(root, seed, split, n)
    records["eval/vstar/test_questions.jsonl"] = _write_vstar(root, seed, n_bench)
    records["eval/mmvp/Questions.csv"] = _write_mmvp(root, seed, n_bench)
    for subtask, n in _write_blink(root, seed, n_bench).items():
        records[f"eval/blink/{subtask}/val-00000-of-00001.parquet"] = n
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    folders = {}
    for f in files:
        folder = f.rsplit("/", 1)[0] if "/" in f else "."
        folders[folder] = folders.get(folder, 0) + 1
    # The stamp is written last: a directory without a matching stamp is never trusted.
    _write_json({**_stamp(seed, n_train, n_eval, n_bench), "n_files": len(files) + 1, "files_per_folder": folders,
                 "records": records}, root / "MANIFEST.json")


@contextlib.contextmanager
def _lock(path):
    with open(path, "w") as handle:  # serialises concurrent callers (e.g. every torchrun rank)
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_toy_world(root="data/toy", seed=0, n_train=400, n_eval=48, n_bench=400):
    """Generate the toy world under `root` unless a matching MANIFEST.json stamp is already there; return the path.
    Generation happens in a sibling temporary folder that replaces `root` only when complete.
    n_eval sizes the COCO val / GQA testdev / ScienceQA test copies; n_bench the V*, MMVP and BLINK copies (400: V*
    400 questions, MMVP 400 questions = 200 pairs, BLINK 400 / 300 / 200; binomial SE <= 2.5 points per 400 items,
    so a 5-point difference between two models is about 1.4 standard errors of the difference)."""
    if n_train < 2 or n_eval < 4 or n_bench < 4:
        raise ValueError("toy world needs n_train >= 2 and n_eval, n_bench >= 4 (three BLINK subtasks of different "
                         "sizes)")
    root = pathlib.Path(root)
    manifest = _read_manifest(root)
    if manifest is not None and {k: manifest.get(k) for k in _stamp(0, 0, 0, 0)} == \
            _stamp(seed, n_train, n_eval, n_bench):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with _lock(root.parent / f".{root.name}.lock"):
        manifest = _read_manifest(root)  # another process may have finished while we waited
        if manifest is not None and {k: manifest.get(k) for k in _stamp(0, 0, 0, 0)} == \
                _stamp(seed, n_train, n_eval, n_bench):
            return root
        foreign = sorted(p.name for p in root.iterdir() if p.name not in TOP_LEVEL_NAMES | BASE_NAMES) \
            if root.exists() else []
        if foreign and (manifest or {}).get("generator") != GENERATOR:
            raise FileExistsError(f"{root} holds files the toy world did not write ({', '.join(foreign[:5])}); "
                                  "refusing to overwrite it")
        partial, old = root.parent / f".{root.name}.partial", root.parent / f".{root.name}.old"
        for leftover in (partial, old):  # from an interrupted run
            shutil.rmtree(leftover, ignore_errors=True)
        partial.mkdir()
        _generate(partial, seed, n_train, n_eval, n_bench)
        for name in sorted(BASE_NAMES):
            if (root / name).exists():
                os.replace(root / name, partial / name)
        if root.exists():
            os.replace(root, old)  # atomic; `root` is then either the old or the new world, never half of one
        os.replace(partial, root)
        shutil.rmtree(old, ignore_errors=True)
    return root


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="data/toy", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="everything is a function of this seed")
    parser.add_argument("--n-train", type=int, default=400, help="training records (LVR); other sets scale with it")
    parser.add_argument("--n-eval", type=int, default=48, help="items of the COCO val / GQA / ScienceQA test copies")
    parser.add_argument("--n-bench", type=int, default=400,
                        help="items per V* / MMVP / BLINK copy (see ensure_toy_world)")
    args = parser.parse_args()
    root = ensure_toy_world(args.root, args.seed, args.n_train, args.n_eval, args.n_bench)
    manifest = _read_manifest(root)
    print(f"toy world at {root}: seed {manifest['seed']}, n_train {manifest['n_train']}, "
          f"n_eval {manifest['n_eval']}, n_bench {manifest['n_bench']}, {manifest['n_files']} files")
    for name, count in manifest["records"].items():
        print(f"  {name:55s} {count}")
    for folder, count in manifest["files_per_folder"].items():
        print(f"  {folder + '/':55s} {count} files")


if __name__ == "__main__":
    main()
