"""Tests for toy_base.py (the toy base model, "stage 0") and eval.py's standard error / chance level.

The cache tests build a tiny recipe (3 steps, seconds). The regression guard at the end ("does it still learn")
builds the real base recipe once per session (cached under data/toy/base like the toy world, so later runs reuse it)
and checks that base + 60 SFT steps on the toy LVR records beats the base by the margin measured in the README."""
import json

import numpy as np
import pytest

import eval as ev
import toy_base
import toy_world
from conftest import ROOT


# ---------------------------------------------------------------------------------------------------------------
# The cache: built once, reused, invalidated when the recipe changes
# ---------------------------------------------------------------------------------------------------------------
def test_base_is_built_once_reused_and_rebuilt_when_the_recipe_changes(tmp_path, monkeypatch):
    out = tmp_path / "base"
    path = toy_base.ensure_toy_base(str(out), seed=0, recipe=toy_base.TINY_RECIPE)
    assert path == str(out)
    stamp = json.loads((out / "TOY_BASE.json").read_text())
    assert stamp["fingerprint"] == toy_base.fingerprint(toy_base.TINY_RECIPE, 0)
    assert stamp["world_format"] == toy_world.FORMAT_VERSION and stamp["code_version"] == toy_base.BASE_CODE_VERSION
    assert json.loads((out / "config.json").read_text())["toy_backbone"] is True
    weights = out / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("the cached base was retrained")
    with monkeypatch.context() as m:  # a second call reuses the export without training
        m.setattr(toy_base, "train_base", no_training)
        assert toy_base.ensure_toy_base(str(out), seed=0, recipe=toy_base.TINY_RECIPE) == str(out)
    assert weights.stat().st_mtime_ns == mtime

    changed = toy_base.Recipe(**{**toy_base.dataclasses.asdict(toy_base.TINY_RECIPE), "steps": 4})
    toy_base.ensure_toy_base(str(out), seed=0, recipe=changed)  # a recipe change retrains and swaps atomically
    new_stamp = json.loads((out / "TOY_BASE.json").read_text())
    assert new_stamp["fingerprint"] != stamp["fingerprint"] and new_stamp["recipe"]["steps"] == 4
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["base"]

    # the world's format version and the code version are part of the fingerprint too
    fp = toy_base.fingerprint(changed, 0)
    monkeypatch.setattr(toy_world, "FORMAT_VERSION", toy_world.FORMAT_VERSION + 1)
    assert toy_base.fingerprint(changed, 0) != fp
    monkeypatch.setattr(toy_base, "BASE_CODE_VERSION", toy_base.BASE_CODE_VERSION + 1)
    assert toy_base.fingerprint(changed, 0) != fp and toy_base.fingerprint(changed, 1) != fp


def test_the_export_loads_as_a_normal_backbone_and_generates(tmp_path):
    import common as C
    import torch
    path = toy_base.ensure_toy_base(str(tmp_path / "base"), seed=0, recipe=toy_base.TINY_RECIPE)
    bb = C.load_backbone(path)
    assert bb.family == "qwen2_5_vl" and getattr(bb.model.config, "toy_backbone", False)
    chat = toy_base.curriculum_sample(np.random.default_rng(0))[:1]
    s = C.encode_chat(bb, chat, add_generation_prompt=True, min_pixels=16 * 784, max_pixels=64 * 784)
    batch = C.pad_batch(bb, [s], side="left", with_positions=False)
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
    with torch.no_grad():
        out = bb.model.generate(**{k: batch[k] for k in keys}, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > batch["input_ids"].shape[1]


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        toy_base.ensure_toy_base(str(tmp_path / "base"), recipe=toy_base.TINY_RECIPE)
    assert (tmp_path / "base" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------------------------
# The curriculum: generic, in the evaluation's formats, never about the small target
# ---------------------------------------------------------------------------------------------------------------
def test_curriculum_never_asks_about_the_small_target():
    rng = np.random.default_rng(0)
    for _ in range(200):
        image, objects = toy_world.make_scene(rng)
        target, large = objects[0], objects[1:]
        for question, options, answer in toy_base._questions(rng, image, large, has_small=True):
            # the target's colour is never the answer (it may be the wrong option of "Is the large X grey or blue?")
            assert target["colour"] not in options[answer].lower(), (question, options, answer)
            assert target["colour"] not in question.lower() or " or " in question, question
            # every named object is a large one: the target's shape is unique, so "the <its shape>" never appears
            assert f"large {target['shape']}" not in question
            assert f"{target['colour']} {target['shape']}" not in question
        for question, options, answer in toy_base._small_questions(image, target):  # finding it, not reading it
            assert not {"left", "right"} & set(question.lower().replace("?", "").split())
            assert all(c not in question.lower() and c not in " ".join(options).lower() for c in toy_world.COLOURS)
        caption = toy_base._caption(large, image.size, target["shape"])
        assert target["colour"] not in caption


def test_curriculum_uses_the_evaluation_answer_formats():
    rng = np.random.default_rng(1)
    answers, prompts = [], []
    for _ in range(300):
        user, assistant = toy_base.curriculum_sample(rng)
        answers.append(assistant["content"])
        prompts.append(user["content"][1]["text"])
    assert any(a in "ABCD" and len(a) == 1 for a in answers)
    tagged = [a for a in answers if a.startswith("<answer>")]
    assert tagged and all(ev.answer_span(a) in "ABCD" for a in tagged)
    assert any("\nA. " in p for p in prompts) and any("\n(A) " in p for p in prompts)  # eval.py's and the records'
    assert any(p.endswith(toy_world.LMMS_SUFFIX) for p in prompts)
    assert any(a.startswith("1 large shape") or "large shapes:" in a for a in answers)  # captions


# ---------------------------------------------------------------------------------------------------------------
# eval.py: standard error and chance level on fixed inputs
# ---------------------------------------------------------------------------------------------------------------
def test_standard_error_and_chance_on_fixed_inputs():
    args = ev.Args()
    # V*-like: 3 four-option and 1 two-option items, 3 of 4 right -> 75 %, SE sqrt(.75 * .25 / 4), chance mean(1/n)
    items = [ev.item(i, "q", {k: "x" for k in "ABCD"[:n]}, "A", "c", []) for i, n in enumerate((4, 4, 4, 2))]
    s = ev.score("vstar", items, {"0": "A", "1": "A", "2": "A", "3": "B"}, args)
    assert s["overall"] == pytest.approx(75.0)
    assert s["se"] == pytest.approx(100 * (0.75 * 0.25 / 4) ** 0.5)
    assert s["chance"] == pytest.approx((25 + 25 + 25 + 50) / 4)
    # MMVP: 2 two-option pairs, one pair fully right -> pair accuracy 50 % over 2 pairs; chance 25 % per pair
    items = [ev.item(i + 1, "q", {"A": "x", "B": "y"}, "AB"[i % 2], "mmvp", [], pair=i // 2) for i in range(4)]
    s = ev.score("mmvp", items, {"1": "A", "2": "B", "3": "A", "4": "A"}, args)
    assert s["overall"] == pytest.approx(50.0) and s["se_units"] == 2
    assert s["se"] == pytest.approx(100 * (0.5 * 0.5 / 2) ** 0.5) and s["chance"] == pytest.approx(25.0)
    assert s["question_se"] == pytest.approx(100 * (0.75 * 0.25 / 4) ** 0.5) and s["question_chance"] == 50.0
    # BLINK: unweighted mean of subtasks; SE = sqrt(sum SE_k^2) / K; chance = mean of subtask chances
    items = [ev.item(f"a{i}", "q", {"A": "x", "B": "y"}, "A", "two", []) for i in range(4)] + \
            [ev.item(f"b{i}", "q", {k: "x" for k in "ABCD"}, "A", "four", []) for i in range(2)]
    preds = {"a0": "A", "a1": "A", "a2": "A", "a3": "B", "b0": "A", "b1": "B"}
    s = ev.score("blink", items, preds, args)
    se_a, se_b = 100 * (0.75 * 0.25 / 4) ** 0.5, 100 * (0.5 * 0.5 / 2) ** 0.5
    assert s["overall"] == pytest.approx((75 + 50) / 2)
    assert s["se"] == pytest.approx((se_a ** 2 + se_b ** 2) ** 0.5 / 2) and s["chance"] == pytest.approx(37.5)
    # open answers: chance 0; a perfect or null score has SE 0
    items = [ev.item(i, "q", None, "red", "gqa", []) for i in range(3)]
    s = ev.score("gqa", items, {str(i): "red" for i in range(3)}, args)
    assert s["chance"] == 0.0 and s["se"] == 0.0


def test_evaluate_prints_the_standard_error_and_chance(tmp_path, capsys):
    import csv
    folder = tmp_path / "MMVP"
    (folder / "MMVP Images").mkdir(parents=True)
    with open(folder / "Questions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Index", "Question", "Options", "Correct Answer"])
        w.writerows([[1, "Q", "(a) x (b) y", "(a)"], [2, "Q", "(a) x (b) y", "(b)"]])
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"id": "1", "prediction": "A"}\n{"id": "2", "prediction": "B"}\n')
    ev.main(["--benchmark", "mmvp", "--data-dir", str(folder), "--predictions", str(preds), "--score-only",
             "--output", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert "mmvp: overall 100.00 ± 0.00 (SE; chance 25.0;" in out
    assert "per question 100.00 ± 0.00 (SE; chance 50.0); pair accuracy over 1 pairs" in out


# ---------------------------------------------------------------------------------------------------------------
# Regression guard: the base answers in format, and 60 SFT steps on the toy LVR records beat it
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def base_dir():
    """The default toy base, cached under data/toy/base like the toy world (built once: see README for its time)."""
    return toy_base.ensure_toy_base(str(ROOT / "data" / "toy" / "base"), seed=0)


def _score(model_dir, bench, world, tmp_path, tag):
    import common as C
    bb = C.load_backbone(model_dir)
    out = tmp_path / f"{tag}_{bench}.json"
    args = ev.Args(benchmark=bench, data_dir=str(world / "eval" / bench), model=model_dir, prompt="answer-tag",
                   output=str(out), predictions=str(out.with_suffix(".jsonl")), batch_size=32,
                   min_pixels=toy_base.RECIPE.min_pixels, max_pixels=toy_base.RECIPE.max_pixels)
    return ev.evaluate(args, backbone=bb)


# bench -> (max unanswerable share of the base, min gain in points of base + 60 steps). Measured (README, `python
# bench/bench_toy_base.py`, answer-tag): V* 37.0 -> 48.0 (+11.0 +- 3.5 SE) at fine-tuning seed 0 (seeds 1, 2: 64.3,
# 52.5), no unanswerable item; the guard asks for about half of the smallest gain. MMVP's gain (0.0 -> 12.5 pairs at
# seed 0) did not survive other data orders (0.0 at seeds 1 and 2), so MMVP is not guarded.
REGRESSION = {"vstar": (0.02, 5.0)}


def test_eval_resolves_toy_base(base_dir, monkeypatch):
    """eval.py --model toy-base builds (or reuses) the default base under data/toy/base and loads it; common itself
    refuses the bare name (it may not import toy_base.py, which imports it)."""
    import common as C
    import torch
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match="ensure_toy_base"):
        C.load_backbone("toy-base")
    bb, ref = ev.load_model(ev.Args(model="toy-base")), C.load_backbone(base_dir)
    assert bb.family == "qwen2_5_vl" and getattr(bb.model.config, "toy_backbone", False)
    torch.testing.assert_close(bb.model.lm_head.weight, ref.model.lm_head.weight)


def test_base_answers_in_format_and_60_sft_steps_on_the_lvr_records_beat_it(base_dir, tmp_path, toy_world):
    world = toy_world
    tuned = toy_base.finetune_base(base_dir, str(tmp_path / "tuned"), str(world / "lvr_train.json"), steps=60)
    for bench, (max_unanswerable, min_gain) in REGRESSION.items():
        base = _score(base_dir, bench, world, tmp_path, "base")
        after = _score(tuned, bench, world, tmp_path, "tuned")
        assert base["unanswerable"] <= max_unanswerable * base["n"], (bench, base["unanswerable"])
        assert after["overall"] - base["overall"] >= min_gain, (bench, base["overall"], after["overall"])


def test_the_base_lives_inside_the_toy_world_folder(tmp_path):
    """data/toy/base is the default: building the base before the world, and regenerating the world, keep it."""
    root = tmp_path / "toy"
    toy_base.ensure_toy_base(str(root / "base"), seed=0, recipe=toy_base.TINY_RECIPE)
    toy_world.ensure_toy_world(root, seed=0, n_train=4, n_eval=4, n_bench=4)   # not "foreign"
    weights = (root / "base" / "model.safetensors").stat().st_mtime_ns
    toy_world.ensure_toy_world(root, seed=0, n_train=6, n_eval=4, n_bench=4)   # regenerated around it
    assert (root / "base" / "model.safetensors").stat().st_mtime_ns == weights
    assert json.loads((root / "MANIFEST.json").read_text())["n_train"] == 6
