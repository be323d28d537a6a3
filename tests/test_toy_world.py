"""Tests for toy_world.py: determinism, the stamp, and that every file reads with the published-format readers and
agrees with the scene it was drawn from. Small sizes (n_train=16, n_eval=8) keep the whole file fast."""
import csv
import hashlib
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import toy_world
from conftest import run_script

N_TRAIN, N_EVAL = 16, 8


def file_hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return toy_world.ensure_toy_world(tmp_path_factory.mktemp("a") / "toy", seed=0, n_train=N_TRAIN, n_eval=N_EVAL,
                                      n_bench=N_EVAL)


def palette_counts(image, box):
    """Pixels of each palette colour inside a pixel box."""
    pixels = np.asarray(image.convert("RGB"))[box[1]:box[3], box[0]:box[2]]
    return {name: int(np.all(pixels == rgb, axis=-1).sum()) for name, rgb in toy_world.ALL_PALETTE.items()}


def to_pixels(bbox, size):
    W, H = size
    return [int(np.floor(bbox[0] * W)), int(np.floor(bbox[1] * H)), int(np.ceil(bbox[2] * W)), int(np.ceil(bbox[3] * H))]


def replay_training_items(seed, n):
    """The generator's own training scenes, re-drawn from the same RNG stream."""
    rng = np.random.default_rng([seed, toy_world.STREAMS["train"]])
    return [toy_world._training_item(rng) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# Determinism and the stamp
# ---------------------------------------------------------------------------------------------------------------
def test_same_seed_gives_identical_files_and_another_seed_differs(world, tmp_path):
    again = toy_world.ensure_toy_world(tmp_path / "b", seed=0, n_train=N_TRAIN, n_eval=N_EVAL, n_bench=N_EVAL)
    other = toy_world.ensure_toy_world(tmp_path / "c", seed=1, n_train=N_TRAIN, n_eval=N_EVAL, n_bench=N_EVAL)
    reference = file_hashes(world)
    assert len(reference) > 50
    assert file_hashes(again) == reference
    different = file_hashes(other)
    assert different["lvr_train.json"] != reference["lvr_train.json"]
    assert different["images/train_00000.png"] != reference["images/train_00000.png"]


def test_second_call_rewrites_nothing(world):
    before = {p: p.stat().st_mtime_ns for p in world.rglob("*")}
    assert toy_world.ensure_toy_world(world, seed=0, n_train=N_TRAIN, n_eval=N_EVAL, n_bench=N_EVAL) == world
    assert {p: p.stat().st_mtime_ns for p in world.rglob("*")} == before


def test_stamp_change_or_missing_stamp_regenerates(tmp_path):
    root = tmp_path / "toy"
    toy_world.ensure_toy_world(root, seed=0, n_train=N_TRAIN, n_eval=N_EVAL, n_bench=N_EVAL)
    toy_world.ensure_toy_world(root, seed=0, n_train=N_TRAIN + 2, n_eval=N_EVAL, n_bench=N_EVAL)
    manifest = json.loads((root / "MANIFEST.json").read_text())
    assert manifest["n_train"] == N_TRAIN + 2 and manifest["format_version"] == toy_world.FORMAT_VERSION
    assert len(json.loads((root / "lvr_train.json").read_text())) == N_TRAIN + 2
    assert manifest["n_files"] == sum(1 for p in root.rglob("*") if p.is_file())
    # an interrupted run leaves a half-written folder without the stamp (written last): regenerate everything
    (tmp_path / ".toy.partial").mkdir()
    (tmp_path / ".toy.partial" / "lvr_train.json").write_text("[")
    (root / "MANIFEST.json").unlink()
    (root / "lvr_train.json").unlink()
    toy_world.ensure_toy_world(root, seed=0, n_train=N_TRAIN, n_eval=N_EVAL, n_bench=N_EVAL)
    assert len(json.loads((root / "lvr_train.json").read_text())) == N_TRAIN
    assert json.loads((root / "MANIFEST.json").read_text())["n_train"] == N_TRAIN
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["toy"]


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        toy_world.ensure_toy_world(tmp_path / "mine", seed=0, n_train=N_TRAIN, n_eval=N_EVAL, n_bench=N_EVAL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------------
def test_scenes_have_one_small_target_of_a_unique_shape_drawn_in_its_colour():
    rng = np.random.default_rng(123)
    sizes = set()
    for _ in range(40):
        image, objects = toy_world.make_scene(rng)
        sizes.add(image.size)
        W, H = image.size
        assert 112 <= W <= 196 and 112 <= H <= 196      # within the toy budget of 64 merged tokens: native resolution
        target = objects[0]
        assert target["size"] == "small" and target["target"] and len(objects) >= 2
        assert [o["shape"] for o in objects].count(target["shape"]) == 1
        side = target["bbox"][2] - target["bbox"][0]
        assert 24 <= side <= 40 and side * side <= 0.13 * W * H
        assert all(o["size"] == "large" and o["bbox"][2] - o["bbox"][0] > side for o in objects[1:])
        for obj in objects:
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
            assert obj["shape"] in toy_world.SHAPES and obj["colour"] in toy_world.ALL_COLOURS
            assert (obj["colour"] in toy_world.COLOURS) == (obj is target)  # answer colours only on the target
            counts = palette_counts(image, obj["bbox"])
            assert max(counts, key=counts.get) == obj["colour"]
            assert counts[obj["colour"]] >= 0.4 * (x1 - x0) * (y1 - y0)
    assert len(sizes) > 30  # sizes vary, so token counts vary
    image, objects = toy_world.make_scene(np.random.default_rng(0), size=(300, 250), target_shape="triangle",
                                          target_colour="blue")
    assert image.size == (300, 250) and objects[0]["shape"] == "triangle" and objects[0]["colour"] == "blue"


# ---------------------------------------------------------------------------------------------------------------
# Training sets
# ---------------------------------------------------------------------------------------------------------------
def test_lvr_records_bboxes_and_answers_agree_with_the_pixels_and_the_scene(world):
    records = json.loads((world / "lvr_train.json").read_text())
    replay = replay_training_items(0, len(records))
    assert len(records) == N_TRAIN
    kinds = set()
    for record, (image_again, objects, q) in zip(records, replay):
        assert set(record) == {"id", "image", "conversations", "bboxes"}
        human, gpt = record["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert human["value"].endswith("Answer with the option's letter from the given choices directly.")
        letter = re.fullmatch(r"<lvr>\n<answer> ([A-D]) </answer>", gpt["value"]).group(1)
        options = dict(re.findall(r"^\(([A-D])\) (.+)$", human["value"], flags=re.M))
        image = Image.open(world / record["image"][0])
        assert np.array_equal(np.asarray(image), np.asarray(image_again))  # the replay is the same scene
        (bbox,) = record["bboxes"]
        assert all(0.0 <= v <= 1.0 for v in bbox) and bbox[0] < bbox[2] and bbox[1] < bbox[3]
        box = to_pixels(bbox, image.size)
        target = objects[0]
        assert box[0] <= target["bbox"][0] and box[1] <= target["bbox"][1]
        assert box[2] >= target["bbox"][2] and box[3] >= target["bbox"][3]
        kinds.add(q["kind"])
        if q["kind"] == "colour":
            shape = re.search(r"colour of the (\w+)\?", human["value"]).group(1)
            assert [o["shape"] for o in objects].count(shape) == 1 and shape == target["shape"]
            # the answered colour is what the pixels inside the bbox show, and the bbox is tight (a crop helps)
            counts = palette_counts(image, box)
            assert options[letter] == max(counts, key=counts.get) == target["colour"]
            side = target["bbox"][2] - target["bbox"][0]          # margin: 4 px + 15 % a side (+ rounding)
            assert max(box[2] - box[0], box[3] - box[1]) <= 1.3 * side + 8 + 2
        else:
            partner = next(o for o in objects[1:] if f"the {o['colour']} {o['shape']}?" in human["value"])
            side = "left" if (target["bbox"][0] + target["bbox"][2]) < (partner["bbox"][0] + partner["bbox"][2]) \
                else "right"
            assert f"on the {side} side" in options[letter]
            assert box[0] <= partner["bbox"][0] and box[2] >= partner["bbox"][2]
    assert kinds == {"colour", "relative"}


def test_grpo_records_have_no_bboxes_and_valid_answers(world):
    records = json.loads((world / "lvr_grpo.json").read_text())
    assert len(records) == N_TRAIN // 2
    for record in records:
        assert set(record) == {"id", "image", "conversations"} and isinstance(record["image"], str)
        assert (world / record["image"]).is_file()
        assert re.fullmatch(r"<answer> [A-D] </answer>", record["conversations"][1]["value"])


def test_pixelreasoner_trajectories_are_consistent(world):
    records = json.loads((world / "pixelreasoner_train.json").read_text())
    assert records
    for record in records:
        messages = record["message_list"]
        assert [m["role"] for m in messages[:2]] == ["system", "user"] and messages[-1]["role"] == "assistant"
        assert "crop_image" in messages[0]["content"][0]["text"]
        images = [Image.open(world / messages[1]["content"][0]["image"])]
        for k, message in enumerate(messages[2:-1]):
            if message["role"] == "assistant":
                call = json.loads(re.search(r"<tool_call>\n(.+)\n</tool_call>", message["content"][0]["text"]).group(1))
                assert call["name"] == "crop_image"
                assert 1 <= call["arguments"]["target_image"] <= len(images)
                x0, y0, x1, y1 = call["arguments"]["bbox_2d"]
                assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            else:
                text, image_item = message["content"]
                crop = Image.open(world / image_item["image"])
                assert f"(Image Size: {crop.width}x{crop.height})" in text["text"]
                images.append(crop)
        assert len(images) - 1 <= 3
        assert messages[-1]["content"][0]["text"].endswith(f"\\boxed{{{record['answer']}}}.")


def test_pixelreasoner_has_zero_to_three_crops_and_crops_of_crops(tmp_path):
    items = [(f"images/x_{i}.png", *toy_world._training_item(np.random.default_rng([5, i]))) for i in range(60)]
    toy_world._write_pixelreasoner(tmp_path, 0, items)
    records = json.loads((tmp_path / "pixelreasoner_train.json").read_text())
    n_crops = {sum(m["role"] == "assistant" for m in r["message_list"]) - 1 for r in records}
    assert n_crops == {0, 1, 2, 3}
    targets = [json.loads(re.search(r"<tool_call>\n(.+)\n</tool_call>", m["content"][0]["text"]).group(1))
               ["arguments"]["target_image"] for r in records for m in r["message_list"][2:-1] if m["role"] == "assistant"]
    assert max(targets) >= 2  # a later crop acts on an earlier crop's output


def test_thinkmorph_parquet_has_the_published_columns(world):
    frame = pd.read_parquet(world / "thinkmorph_train.parquet")
    for column in ("problem_image_0", "question", "resoning_thought_0", "reasoning_image_0", "resoning_thought_1",
                   "answer"):
        assert column in frame.columns
    row = frame.iloc[0]
    problem = Image.open(io.BytesIO(row["problem_image_0"]["bytes"]))
    reasoning = Image.open(io.BytesIO(row["reasoning_image_0"]["bytes"]))
    assert problem.size == reasoning.size and not np.array_equal(np.asarray(problem), np.asarray(reasoning))
    assert set(frame["answer"]) <= set("ABCD")


# ---------------------------------------------------------------------------------------------------------------
# Published-format readers
# ---------------------------------------------------------------------------------------------------------------
def test_json_and_parquet_files_load_with_datasets(world, tmp_path):
    datasets = pytest.importorskip("datasets")
    cache = str(tmp_path / "hf_cache")
    for name, n in (("lvr_train.json", N_TRAIN), ("lvr_grpo.json", N_TRAIN // 2),
                    ("pixelreasoner_train.json", N_TRAIN // 2)):
        assert len(datasets.load_dataset("json", data_files=str(world / name), split="train", cache_dir=cache)) == n
    blink = datasets.load_dataset("parquet", data_files=str(world / "eval/blink/Jigsaw/val-00000-of-00001.parquet"),
                                  split="train", cache_dir=cache)
    assert isinstance(blink[0]["image_1"], Image.Image) and isinstance(blink[0]["image_3"], Image.Image)
    assert blink[0]["image_4"] is None


def test_coco_captions_follow_the_official_layout(world):
    for split, n in (("train", N_TRAIN), ("val", N_EVAL)):
        data = json.loads((world / f"coco/annotations/captions_{split}2017.json").read_text())
        categories = json.loads((world / f"coco/annotations/categories_{split}2017.json").read_text())
        assert len(data["images"]) == n and set(categories) == {str(im["id"]) for im in data["images"]}
        by_image = {}
        for ann in data["annotations"]:
            assert set(ann) == {"id", "image_id", "caption"}
            by_image.setdefault(ann["image_id"], []).append(ann["caption"])
        assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
        for im in data["images"]:
            assert Image.open(world / f"coco/{split}2017" / im["file_name"]).size == (im["width"], im["height"])
            captions = by_image[im["id"]]
            assert len(captions) == 5 and len(set(captions)) == 5
            assert all(any(c in cap for c in toy_world.ALL_COLOURS) and any(s in cap for s in toy_world.SHAPES)
                       for cap in captions)
            assert categories[str(im["id"])] in toy_world.ALL_COLOURS


def test_gqa_and_scienceqa_layouts(world):
    for split, n in (("train", N_TRAIN // 2), ("testdev", N_EVAL)):
        questions = pd.read_parquet(world / f"gqa/{split}_balanced_instructions.parquet")
        images = pd.read_parquet(world / f"gqa/{split}_balanced_images.parquet")
        assert list(questions.columns) == ["id", "imageId", "question", "answer", "fullAnswer"] and len(questions) == n
        assert list(images.columns) == ["id", "image"] and set(questions["imageId"]) <= set(images["id"])
        Image.open(io.BytesIO(images.iloc[0]["image"]["bytes"])).verify()
    for split, n in (("train", N_TRAIN // 2), ("test", N_EVAL)):
        frame = pd.read_parquet(world / f"scienceqa/{split}.parquet")
        assert len(frame) == n
        for column in ("image", "question", "choices", "answer", "hint", "task", "grade", "subject", "category"):
            assert column in frame.columns
        for _, row in frame.iterrows():
            assert 0 <= row["answer"] < len(row["choices"])
            assert row["choices"][row["answer"]] in row["solution"]


def test_vstar_jsonl_and_images(world):
    rows = [json.loads(line) for line in (world / "eval/vstar/test_questions.jsonl").read_text().splitlines()]
    assert len(rows) == N_EVAL
    assert {r["category"] for r in rows} == {"direct_attributes", "relative_position"}
    for row in rows:
        assert set(row) == {"image", "text", "category", "question_id", "label"}
        assert row["image"].startswith(row["category"] + "/sa_") and (world / "eval/vstar" / row["image"]).is_file()
        n_options = len(re.findall(r"^\([A-D]\) ", row["text"], flags=re.M))
        assert n_options == (4 if row["category"] == "direct_attributes" else 2)
        assert row["label"] in "ABCD" and isinstance(row["question_id"], int)
    assert len({r["label"] for r in rows}) > 1  # an always-"A" model must not score 100 on the toy copy


def test_mmvp_pairs_share_the_question_and_differ_in_the_answer(world):
    with open(world / "eval/mmvp/Questions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["Index", "Question", "Options", "Correct Answer"]
    assert [int(r["Index"]) for r in rows] == list(range(1, len(rows) + 1)) and len(rows) % 2 == 0
    for first, second in zip(rows[::2], rows[1::2]):
        assert first["Question"] == second["Question"] and first["Options"] == second["Options"]
        assert first["Correct Answer"] != second["Correct Answer"]
        assert re.fullmatch(r"\(a\) \w+ \(b\) \w+", first["Options"])
        assert {first["Correct Answer"], second["Correct Answer"]} == {"(a)", "(b)"}
    for row in rows:
        assert (world / "eval/mmvp/MMVP Images" / f"{row['Index']}.jpg").is_file()


def test_blink_subtasks_have_the_published_fields_and_different_counts(world):
    counts = {}
    for folder in sorted((world / "eval/blink").iterdir()):
        frame = pd.read_parquet(folder / "val-00000-of-00001.parquet")
        counts[folder.name] = len(frame)
        for column in ("idx", "question", "sub_task", "choices", "answer", "prompt", "image_1", "image_2", "image_3",
                       "image_4", "explanation", "isReal"):
            assert column in frame.columns
        for k, row in frame.iterrows():
            assert row["idx"] == f"val_{folder.name}_{k + 1}" and row["sub_task"] == folder.name
            letter = re.fullmatch(r"\(([A-D])\)", row["answer"]).group(1)
            assert "ABCD".index(letter) < len(row["choices"])
            assert row["prompt"].startswith(row["question"]) and f"({letter}) " in row["prompt"]
            assert row["image_4"] is None and row["image_1"] is not None
            assert (row["image_2"] is not None) == (folder.name == "Jigsaw")
    assert set(counts) == {"Counting", "Spatial_Relation", "Jigsaw"}
    assert len(set(counts.values())) == 3 and counts == toy_world.blink_counts(N_EVAL)


def test_eval_scenes_never_repeat_training_scenes(world):
    train = {hashlib.sha256(np.asarray(Image.open(p)).tobytes()).hexdigest() for p in (world / "images").glob("*.png")}
    vstar = {hashlib.sha256(np.asarray(Image.open(p)).tobytes()).hexdigest()
             for p in (world / "eval/vstar").rglob("*.jpg")}
    assert train and vstar and not (train & vstar)
    assert len(toy_world.STREAMS) == len(set(toy_world.STREAMS.values()))


def test_cli_prints_what_it_wrote(tmp_path):
    out = run_script("toy_world.py", "--root", tmp_path / "cli", "--seed", 0, "--n-train", 4, "--n-eval", 4,
                     "--n-bench", 4, env={"PYTHONDONTWRITEBYTECODE": "1"}).stdout
    assert "lvr_train.json" in out and "eval/blink/Jigsaw" in out and (tmp_path / "cli" / "MANIFEST.json").is_file()


def test_a_crop_genuinely_helps_and_the_crop_task_is_learnable():
    """The design claim, as a regression guard (bench/bench_toy_learnability.py measures the full curves): 60 steps
    of plain SFT on the random-init toy learn the colour question from the oracle crop, while from the full image
    they are still on the plateau at chance."""
    from bench import bench_toy_learnability as B
    args = B.Args(steps=60, n_train=240, n_eval=100, eval_every=60)
    crop = B.run(args, "crop")[-1][3]["all"]
    full = B.run(args, "full")[-1][3]["all"]
    assert crop >= 0.9 and full <= 0.45, (crop, full)
