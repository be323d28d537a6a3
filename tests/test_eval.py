"""Tests for eval.py: loaders on tiny fixtures in the published layouts, the official scoring rules against
hand-computed numbers, the multiple-choice extractor, resuming, --score-only and the markdown table.
No model: a fake predictor returns canned answers."""
import base64
import io
import json
import os
import sys
from types import SimpleNamespace

import pandas as pd
import pytest
from PIL import Image

import eval as ev


def png_bytes(color=(255, 0, 0)):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def hf_image(color=(255, 0, 0)):
    return {"bytes": png_bytes(color), "path": None}


NO_MODEL = SimpleNamespace()  # a fake generator needs no model: evaluate loads --model only when given none


def fake_predictor(answers, log=None):
    """A `generate`-shaped function: the canned answer for each item id (and logs which ids it saw)."""
    def generate(backbone, items, args):
        if log is not None:
            log.extend(str(it["id"]) for it in items)
        return [answers[str(it["id"])] for it in items]
    return generate


def run(tmp_path, benchmark, data_dir, answers, **kw):
    args = ev.Args(benchmark=benchmark, data_dir=str(data_dir), output=str(tmp_path / f"{benchmark}.json"), **kw)
    return ev.evaluate(args, backbone=NO_MODEL, generate=fake_predictor(answers)), args


# ------------------------------------------------------------------ extractor
OPTS4 = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}
EXTRACT_CASES = [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("b", "B"), ("(b)", "B"), ("  C  ", "C"), ("[D]", "D"),
    ("The answer is (C).", "C"), ("The correct answer is D", "D"), ("Answer: A", "A"),
    ("B. blue", "B"), ("Option B is correct.", "B"), ("Based on the image, D", "D"),
    ("A man is standing next to a red car.", "A"),       # no letter; the option text "red" is found
    ("A man is standing next to the car.", None),        # the article is not an answer, no option text
    ("A is correct.", "A"), ("A: red", "A"), ("I think it is (b).", "B"),
    ("<answer> B </answer>", "B"), (" C </answer>", "C"), ("<answer>(A)</answer><|im_end|>", "A"),
    ("It is green.", "C"), ("A or B", None), ("Both B and C could be right.", None),
    ("I cannot tell from the image.", None), ("", None), ("E", None), ("The 3D view shows it", None),
    ("red and blue", None), ("The answer is a blue one", "B"),
    ("the answer is c", "C"), ("The answer is a.", "A"), ("So the answer is d!", "D"),
]
# option texts that end in "." (the toy V* writes such options) and a longer sentence naming one option
SENTENCE_CASES = [
    ("The dog is on the left side of the cat.", {"A": "The dog is on the right side of the cat.",
                                                 "B": "The dog is on the left side of the cat."}, "B"),
    ("Looking again, the lamp is clearly on.", {"A": "on", "B": "off"}, "A"),
    ("Looking again, the lamp is clearly on, not off.", {"A": "on", "B": "off"}, None),
    ("A long answer that mentions nothing relevant at all, really nothing.", {"A": "on", "B": "off"}, None),
]


@pytest.mark.parametrize("text,options,expected", SENTENCE_CASES)
def test_extract_choice_option_sentences(text, options, expected):
    assert ev.extract_choice(text, options) == expected


@pytest.mark.parametrize("text,expected", EXTRACT_CASES)
def test_extract_choice_table(text, expected):
    assert ev.extract_choice(text, dict(OPTS4)) == expected


def test_extract_helpers():
    assert ev.extract_yes_no("Yes, it is.") == "yes" and ev.extract_yes_no("No.") == "no"
    assert ev.extract_yes_no("Not sure") is None and ev.extract_yes_no("No, it is not a yes.") == "no"
    assert ev.normalize_open("Left.") == ev.normalize_open("left") == "left"
    assert ev.normalize_open("  Yes! ") == "yes" and ev.normalize_open("the left") != "left"
    # lmms-eval's MME-RW regex reads the article; the robust extractor does not
    assert ev.extract_choice_mmerw_official("A cat; so B", OPTS4) == "A"
    assert ev.extract_choice("A cat; so B", OPTS4) == "B"


# ------------------------------------------------------------------ MMVP
def write_mmvp(root, rows):
    root.mkdir()
    pd.DataFrame(rows, columns=["Index", "Question", "Options", "Correct Answer"]).to_csv(
        root / "Questions.csv", index=False)
    (root / "MMVP Images").mkdir()


def test_mmvp_pair_vs_question_accuracy(tmp_path):
    write_mmvp(tmp_path / "MMVP", [
        [1, "Is the door open?", "(a) Open (b) Closed", "(a)"],
        [2, "Is the door open?", "(a) Open (b) Closed", "(b)"],
        [3, "Which way does the dog face?", "(a) Left (b) Right", "(b)"],
        [4, "Which way does the dog face?", "(a) Left (b) Right", "(a)"]])
    items, _ = ev.load_benchmark("mmvp", str(tmp_path / "MMVP"), ev.Args(benchmark="mmvp"))
    assert items[0]["options"] == {"A": "Open", "B": "Closed"} and items[1]["answer"] == "B"
    assert items[0]["images"][0].endswith(os.path.join("MMVP Images", "1.jpg"))
    # pair 1 both right, pair 2 one right -> pairs 1/2, questions 3/4
    s, _ = run(tmp_path, "mmvp", tmp_path / "MMVP", {"1": "A", "2": "(b)", "3": "B", "4": "B"})
    assert s["pair_accuracy"] == pytest.approx(50.0) and s["overall"] == pytest.approx(50.0)
    assert s["question_accuracy"] == pytest.approx(75.0)
    assert s["settings"]["mmvp_answers"] == "published Questions.csv as-is"
    assert any("published n is 300" in w for w in s["warnings"])


def test_mmvp_corrections_flag(tmp_path):
    write_mmvp(tmp_path / "MMVP", [[99, "Are the tusks long?", "(a) Long (b) Short", "(a)"],
                                   [100, "Are the tusks long?", "(a) Long (b) Short", "(b)"]])
    answers = {"99": "A", "100": "A"}
    s, _ = run(tmp_path, "mmvp", tmp_path / "MMVP", answers)
    assert s["question_accuracy"] == pytest.approx(50.0) and s["pair_accuracy"] == 0.0
    s2, _ = run(tmp_path, "mmvp", tmp_path / "MMVP", answers, mmvp_corrected=True,
                predictions=str(tmp_path / "p2.jsonl"))
    assert s2["question_accuracy"] == pytest.approx(100.0) and s2["pair_accuracy"] == pytest.approx(100.0)
    assert "corrected" in s2["settings"]["mmvp_answers"]


# ------------------------------------------------------------------ V*
def write_vstar(root, n=4):
    root.mkdir()
    (root / "direct_attributes").mkdir()
    rows = []
    for i in range(n):
        cat = "direct_attributes" if i % 2 == 0 else "relative_position"
        rows.append({"image": f"{cat}/sa_{i}.jpg", "category": cat, "question_id": i, "label": "A" if i < 2 else "B",
                     "text": f"What is the colour of object {i}?\n(A) red\n(B) blue\n"
                             "Answer with the option's letter from the given choices directly."})
    with open(root / "test_questions.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return rows


def test_vstar_per_category_micro_and_unanswerable(tmp_path):
    write_vstar(tmp_path / "vstar")
    items, _ = ev.load_benchmark("vstar", str(tmp_path / "vstar"), ev.Args(benchmark="vstar"))
    assert items[0]["question"] == "What is the colour of object 0?"
    assert items[0]["options"] == {"A": "red", "B": "blue"}
    # ids 0 (DA) right, 1 (RP) right, 2 (DA) unanswerable, 3 (RP) wrong
    s, _ = run(tmp_path, "vstar", tmp_path / "vstar", {"0": "A", "1": "(A)", "2": "I don't know", "3": "A"})
    assert s["overall"] == pytest.approx(50.0) and s["n"] == 4
    assert s["per_category"] == {"direct_attributes": pytest.approx(50.0), "relative_position": pytest.approx(50.0)}
    assert s["unanswerable"] == 1


# ------------------------------------------------------------------ BLINK
def test_blink_macro_over_subtasks(tmp_path):
    root = tmp_path / "BLINK"
    for task, n in (("Counting", 1), ("Jigsaw", 3)):
        (root / task).mkdir(parents=True)
        pd.DataFrame([{"idx": f"val_{task}_{i}", "question": "How many?", "choices": ["1", "2", "3"],
                       "answer": "(B)", "prompt": "...", "sub_task": task, "image_1": hf_image(),
                       "image_2": hf_image((0, 0, 255)) if task == "Jigsaw" else None, "image_3": None,
                       "image_4": None} for i in range(n)]).to_parquet(root / task / "val-00000-of-00001.parquet")
    items, _ = ev.load_benchmark("blink", str(root), ev.Args(benchmark="blink"))
    assert len(items) == 4 and items[0]["options"] == {"A": "1", "B": "2", "C": "3"}
    assert [len(it["images"]) for it in items] == [1, 2, 2, 2] and items[0]["images"][0].size == (8, 8)
    answers = {"val_Counting_0": "B", "val_Jigsaw_0": "B", "val_Jigsaw_1": "A", "val_Jigsaw_2": "C"}
    s, _ = run(tmp_path, "blink", root, answers)
    assert s["per_category"] == {"Counting": pytest.approx(100.0), "Jigsaw": pytest.approx(100 / 3)}
    assert s["overall"] == pytest.approx((100 + 100 / 3) / 2)  # macro 66.7, not micro 50
    assert s["micro"] == pytest.approx(50.0)


# ------------------------------------------------------------------ HR-Bench
def test_hrbench_cycles(tmp_path):
    root = tmp_path / "hr"
    root.mkdir()
    img = base64.b64encode(png_bytes()).decode()
    rows = [  # cycle 0: single right, cross wrong; cycle 1: single right, cross right, single wrong
        (0, "single", 0, "A", "A"), (1, "cross", 0, "B", "A"), (2, "single", 1, "C", "C"), (3, "cross", 1, "D", "D"),
        (4, "single", 1, "A", "B")]
    pd.DataFrame([{"index": i, "question": "q?", "answer": a, "category": c, "A": "x", "B": "y", "C": "z", "D": "w",
                   "cycle_category": f"cycle{cy}", "image": img} for i, c, cy, a, _ in rows]).to_csv(
        root / "hr_bench_4k.tsv", sep="\t", index=False)
    s, _ = run(tmp_path, "hrbench4k", root, {str(i): p for i, _, _, _, p in rows})
    assert s["per_cycle"] == {"cycle0": pytest.approx(50.0), "cycle1": pytest.approx(200 / 3)}
    assert s["overall"] == pytest.approx((50 + 200 / 3) / 2) and s["micro"] == pytest.approx(60.0)
    assert s["per_category"] == {"cross": pytest.approx((0 + 100) / 2), "single": pytest.approx((100 + 50) / 2)}


# ------------------------------------------------------------------ CV-Bench
def test_cvbench_formula(tmp_path):
    root = tmp_path / "cv"
    root.mkdir()
    def rows(sources):
        return pd.DataFrame([{"idx": i, "type": "2D", "task": "Count", "image": hf_image(), "question": "How many?",
                              "choices": ["1", "2"], "prompt": "...", "answer": "(A)", "source": src}
                             for i, src in enumerate(sources)])
    rows(["COCO", "COCO", "ADE20K"]).to_parquet(root / "test_2d.parquet")
    rows(["Omni3D", "Omni3D"]).to_parquet(root / "test_3d.parquet")
    answers = {"test_2d/0": "A", "test_2d/1": "B", "test_2d/2": "A", "test_3d/0": "B", "test_3d/1": "B"}
    s, _ = run(tmp_path, "cvbench", root, answers)
    assert s["per_source"] == {"ADE20K": pytest.approx(100.0), "COCO": pytest.approx(50.0), "Omni3D": 0.0}
    assert s["overall"] == pytest.approx(((100 + 50) / 2 + 0) / 2)
    assert s["micro"] == pytest.approx(40.0)


# ------------------------------------------------------------------ GQA
def test_gqa_join_and_normalisation(tmp_path):
    root = tmp_path / "gqa"
    (root / "testdev_balanced_instructions").mkdir(parents=True)
    (root / "testdev_balanced_images").mkdir()
    pd.DataFrame([{"id": "q1", "imageId": "n1", "question": "Is it red?", "answer": "yes"},
                  {"id": "q2", "imageId": "n2", "question": "Which side?", "answer": "left"},
                  {"id": "q3", "imageId": "n1", "question": "What is it?", "answer": "t-shirt"}]).to_parquet(
        root / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet")
    pd.DataFrame([{"id": "n1", "image": hf_image()}, {"id": "n2", "image": hf_image((0, 255, 0))}]).to_parquet(
        root / "testdev_balanced_images" / "testdev-00000-of-00001.parquet")
    items, _ = ev.load_benchmark("gqa", str(root), ev.Args(benchmark="gqa"))
    assert items[1]["images"][0].getpixel((0, 0)) == (0, 255, 0)
    msgs, _ = ev.build_messages(items[0], ev.Args(benchmark="gqa"))
    assert msgs[1]["content"][-1]["text"] == "Is it red?\nAnswer the question using a single word or phrase."
    s, _ = run(tmp_path, "gqa", root, {"q1": "Yes.", "q2": "the left", "q3": "T-shirt"})
    assert s["overall"] == pytest.approx(200 / 3)


# ------------------------------------------------------------------ ScienceQA
def test_scienceqa_int_answer_and_skip(tmp_path):
    root = tmp_path / "sqa" / "ScienceQA-IMG"
    root.mkdir(parents=True)
    pd.DataFrame([{"image": hf_image(), "question": "Which is a mammal?", "choices": ["frog", "dog", "fish"],
                   "answer": 1, "hint": "Look closely.", "subject": "natural science"},
                  {"image": None, "question": "No picture?", "choices": ["x", "y"], "answer": 0, "hint": "",
                   "subject": "language science"},
                  {"image": hf_image(), "question": "Pick the third.", "choices": ["x", "y", "z"], "answer": 2,
                   "hint": "", "subject": "social science"}]).to_parquet(root / "test-00000-of-00001.parquet")
    items, warnings = ev.load_benchmark("scienceqa", str(tmp_path / "sqa"), ev.Args(benchmark="scienceqa"))
    assert [it["id"] for it in items] == [0, 2] and [it["answer"] for it in items] == ["B", "C"]
    assert items[0]["question"] == "Context: Look closely.\nWhich is a mammal?"
    assert any("1 rows without an image" in w for w in warnings)
    s, _ = run(tmp_path, "scienceqa", tmp_path / "sqa", {"0": "B", "2": "dog"})
    assert s["overall"] == pytest.approx(50.0) and s["unanswerable"] == 1


# ------------------------------------------------------------------ MMStar, MME-RealWorld-Lite, HallusionBench
def test_mmstar_options_in_question(tmp_path):
    root = tmp_path / "mmstar"
    root.mkdir()
    q = "Which is correct?\nOptions: A: The cat is on the mat., B: The cat is under the mat., C: No cat, D: Two cats"
    pd.DataFrame([{"index": 0, "question": q, "image": hf_image(), "answer": "B", "category": "coarse perception",
                   "l2_category": "x"},
                  {"index": 1, "question": q, "image": hf_image(), "answer": "C", "category": "math",
                   "l2_category": "y"}]).to_parquet(root / "mmstar.parquet")
    items, _ = ev.load_benchmark("mmstar", str(root), ev.Args(benchmark="mmstar"))
    assert items[0]["options"] == {"A": "The cat is on the mat.", "B": "The cat is under the mat.",
                                   "C": "No cat", "D": "Two cats"}
    text = ev.build_messages(items[0], ev.Args(prompt="vlmeval"))[0][1]["content"][-1]["text"]
    assert text.startswith("Question: Which is correct?\nOptions:\nA. The cat is on the mat.\n")
    assert text.endswith("Please select the correct answer from the options above.")
    s, _ = run(tmp_path, "mmstar", root, {"0": "B", "1": "D"})
    assert s["overall"] == pytest.approx(50.0) and s["per_category"]["math"] == 0.0


def test_mmerw_lite_perception_reasoning_and_extractor(tmp_path):
    root = tmp_path / "mmerw"
    root.mkdir()
    b64 = base64.b64encode(png_bytes()).decode()
    opts = ["(A) cat", "(B) dog", "(C) bird", "(D) fish", "(E) The image does not feature the object"]
    pd.DataFrame([{"index": "p1", "question": "What animal?", "multi-choice options": opts, "answer": "B",
                   "category": "Perception/OCR", "l2-category": "ocr", "bytes": b64},
                  {"index": "r1", "question": "Why?", "multi-choice options": opts, "answer": "B",
                   "category": "Reasoning/Diagram", "l2-category": "diagram", "bytes": b64}]).to_parquet(
        root / "mme_rw_lite.parquet")
    answers = {"p1": "The best answer is B", "r1": "A dog is shown, so B"}
    s, _ = run(tmp_path, "mmerw_lite", root, answers)
    assert s["per_category"] == {"Perception": pytest.approx(100.0), "Reasoning": pytest.approx(100.0)}
    assert s["settings"]["extractor"] == "robust"
    s2, _ = run(tmp_path, "mmerw_lite", root, answers, extractor="official", predictions=str(tmp_path / "o.jsonl"))
    assert s2["overall"] == pytest.approx(50.0) and s2["settings"]["extractor"] == "official"


def test_hallusionbench_question_figure_pair(tmp_path):
    root = tmp_path / "hb"
    root.mkdir()
    rows = [(0, 0, "1", "Yes, it is."), (0, 1, "0", "No."), (1, 0, "0", "no"), (1, 1, "1", "No")]
    pd.DataFrame([{"category": "VD", "subcategory": "chart", "set_id": 0, "figure_id": fig, "question_id": q,
                   "question": "Is it?", "gt_answer": gt, "image": hf_image()} for fig, q, gt, _ in rows] +
                 [{"category": "VS", "subcategory": "map", "set_id": 1, "figure_id": 0, "question_id": 0,
                   "question": "No image?", "gt_answer": "1", "image": None}]).to_parquet(root / "image.parquet")
    s, _ = run(tmp_path, "hallusionbench", root, {str(i): r[3] for i, r in enumerate(rows)})
    assert s["n"] == 4 and s["aAcc"] == pytest.approx(75.0)
    assert s["fAcc"] == pytest.approx(50.0)  # figure 0 all right, figure 1 not
    assert s["qAcc"] == pytest.approx(50.0)  # question 0 right on both figures, question 1 not


# ------------------------------------------------------------------ resume, --score-only, table, CLI
def test_resume_after_interruption_and_score_only(tmp_path):
    write_vstar(tmp_path / "vstar", n=6)
    answers = {str(i): "A" for i in range(6)}
    args = ev.Args(benchmark="vstar", data_dir=str(tmp_path / "vstar"), output=str(tmp_path / "run.json"))

    args.batch_size = 1
    calls = []

    def dies_after_three(backbone, items, a):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(items[0]["id"])
        return [answers[str(it["id"])] for it in items]
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(args, backbone=NO_MODEL, generate=dies_after_three)
    pred_path = tmp_path / "run.predictions.jsonl"
    lines = pred_path.read_text().splitlines()
    assert len(lines) == 1 + 3 and json.loads(lines[0])["provenance"]["model"] == "toy"  # provenance, 3 predictions
    with open(pred_path, "a") as f:
        f.write('{"id": 3, "predic')  # a torn line from the kill is ignored and re-predicted
    seen = []
    resumed = ev.evaluate(args, backbone=NO_MODEL, generate=fake_predictor(answers, seen))
    assert seen == ["3", "4", "5"]
    (tmp_path / "fresh").mkdir()
    fresh, _ = run(tmp_path / "fresh", "vstar", tmp_path / "vstar", answers)
    for key in ("overall", "per_category", "n", "unanswerable"):
        assert resumed[key] == fresh[key]
    assert resumed["overall"] == pytest.approx(100 * 2 / 6)
    # --score-only re-scores the same file without a model and gives the same summary
    rescored = ev.main(["--benchmark", "vstar", "--data-dir", str(tmp_path / "vstar"), "--score-only",
                        "--predictions", str(pred_path), "--output", str(tmp_path / "rescored.json"), "--batch-size", "1"])
    assert {k: v for k, v in rescored.items() if k != "predictions"} == \
           {k: v for k, v in resumed.items() if k != "predictions"}


def test_predictions_carry_provenance_and_never_mix(tmp_path):
    """The repro of the bug: a second run with the same --output and another model used to score the first model's
    predictions under the new model's name. Now it is refused in one line, or re-predicted with --overwrite."""
    write_vstar(tmp_path / "vstar", n=4)
    answers = {str(i): "A" for i in range(4)}
    common = ["--benchmark", "vstar", "--data-dir", str(tmp_path / "vstar"), "--output", str(tmp_path / "s.json")]
    ev.evaluate(ev.Args(benchmark="vstar", data_dir=str(tmp_path / "vstar"), output=str(tmp_path / "s.json")),
                backbone=NO_MODEL, generate=fake_predictor(answers))
    with pytest.raises(SystemExit, match="no such directory"):                      # a path that does not exist
        ev.main(common + ["--model", "/definitely/not/a/model"])
    other = ev.Args(benchmark="vstar", data_dir=str(tmp_path / "vstar"), output=str(tmp_path / "s.json"),
                    model="toy-qwen3vl")
    with pytest.raises(SystemExit, match="predictions made by model toy .*this run is model toy-qwen3vl"):
        ev.evaluate(other, backbone=NO_MODEL, generate=fake_predictor(answers))
    with pytest.raises(SystemExit, match="max_pixels"):                               # a setting differs too
        ev.evaluate(ev.Args(benchmark="vstar", data_dir=str(tmp_path / "vstar"), output=str(tmp_path / "s.json"),
                            max_pixels=64 * 784), backbone=NO_MODEL, generate=fake_predictor(answers))
    seen = []
    other.overwrite = True
    s = ev.evaluate(other, backbone=NO_MODEL, generate=fake_predictor({k: "B" for k in answers}, seen))
    assert len(seen) == 4 and s["provenance"]["model"] == "toy-qwen3vl" and s["settings"]["model"] == "toy-qwen3vl"
    # a file with no provenance line (written before this check) is not trusted either
    (tmp_path / "old.predictions.jsonl").write_text('{"id": 0, "prediction": "A"}\n')
    with pytest.raises(SystemExit, match="an unknown model"):
        ev.evaluate(ev.Args(benchmark="vstar", data_dir=str(tmp_path / "vstar"), output=str(tmp_path / "old.json")),
                    backbone=NO_MODEL, generate=fake_predictor(answers))


def test_model_fingerprint_sees_retrained_weights(tmp_path):
    from safetensors.torch import save_file
    import torch
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    save_file({"w": torch.zeros(100_000)}, str(tmp_path / "model.safetensors"))
    a = ev.model_fingerprint(str(tmp_path))
    save_file({"w": torch.ones(100_000)}, str(tmp_path / "model.safetensors"))       # same header, new weights
    assert ev.model_fingerprint(str(tmp_path)) != a
    assert ev.model_fingerprint(str(tmp_path)) == ev.model_fingerprint(str(tmp_path))


def test_score_only_reports_missing_and_bad_lines(tmp_path, capsys):
    write_vstar(tmp_path / "vstar", n=5)
    pred = tmp_path / "p.jsonl"
    pred.write_text('{"id": 0, "prediction": "A"}\n[1, 2]\n"text"\n{"id": 1}\n{"id": 1, "prediction": "A"}\n')
    argv = ["--benchmark", "vstar", "--data-dir", str(tmp_path / "vstar"), "--score-only", "--predictions",
            str(pred), "--output", str(tmp_path / "s.json")]
    s = ev.main(argv)
    out = capsys.readouterr().out
    assert s["missing_predictions"] == 3 and "3 of 5 items have no prediction" in out
    assert "no provenance line" in out and s["provenance"] is None
    with pytest.raises(SystemExit, match="--strict: 3 items"):
        ev.main(argv + ["--strict"])


def test_markdown_table(tmp_path, capsys):
    write_vstar(tmp_path / "vstar")
    write_mmvp(tmp_path / "MMVP", [[1, "Q", "(a) x (b) y", "(a)"], [2, "Q", "(a) x (b) y", "(b)"]])
    run(tmp_path, "vstar", tmp_path / "vstar", {str(i): "A" for i in range(4)}, label="base")
    run(tmp_path, "mmvp", tmp_path / "MMVP", {"1": "A", "2": "A"}, label="base")
    capsys.readouterr()
    ev.main(["--table", str(tmp_path / "vstar.json"), str(tmp_path / "mmvp.json")])
    assert capsys.readouterr().out.strip() == "\n".join([
        "| model | vstar | mmvp | mmvp (per question) |", "|---|---|---|---|", "| base | 50.0 | 0.0 | 50.0 |"])


def test_compare_is_one_evaluate_per_column_and_benchmark(tmp_path, capsys, monkeypatch):
    """eval.compare (every method's end-of-run table): the summaries equal separate `evaluate` calls with the same
    settings, files land in run_dir/eval/<bench>_<column>.json, a model without a backbone is loaded once for all its
    benchmarks, and the table's cells are the hand-computed scores ± binomial SE."""
    write_vstar(tmp_path / "vstar")
    write_mmvp(tmp_path / "mmvp", [[1, "Q", "(a) x (b) y", "(a)"], [2, "Q", "(a) x (b) y", "(b)"]])
    right = {"0": "A", "1": "A", "2": "B", "3": "B"}                       # vstar 100; mmvp ids 1, 2: both right
    loads = []
    monkeypatch.setattr(ev, "load_model", lambda a: loads.append(a.model) or NO_MODEL)
    monkeypatch.setattr(ev, "generate_plain", fake_predictor({"0": "A", "1": "B", "2": "B", "3": "A"}))
    columns = {"method": {"model": "test/m1", "backbone": NO_MODEL, "generate": fake_predictor(right)},
               "start": {"model": "test/m0"}}                                    # mode plain: generate_plain, loaded
    rows = ev.compare(columns, ["vstar", "mmvp"], lambda b: tmp_path / b, str(tmp_path / "run"), prompt="answer-tag")
    assert loads == ["test/m0"]
    table = [x for x in capsys.readouterr().out.splitlines() if x.startswith("| ")]
    se50 = 100 * (0.5 * 0.5 / 4) ** 0.5
    assert table == ["| benchmark | chance | method: test/m1 | start: test/m0 |",
                     f"| vstar | 50.0 | 100.0 ± 0.0 | 50.0 ± {se50:.1f} |",
                     "| mmvp | 25.0 | 100.0 ± 0.0 | 0.0 ± 0.0 |"]
    for bench in ("vstar", "mmvp"):
        ref = ev.evaluate(ev.Args(benchmark=bench, data_dir=str(tmp_path / bench), model="test/m1", prompt="answer-tag",
                                  output=str(tmp_path / f"ref_{bench}.json")), NO_MODEL, fake_predictor(right))
        got = json.loads((tmp_path / "run" / "eval" / f"{bench}_method.json").read_text())
        for k in ("overall", "se", "chance", "n"):
            assert got[k] == ref[k] == rows[bench]["method"][k], (bench, k)
        assert got["settings"]["prompt"] == "answer-tag"
        assert (tmp_path / "run" / "eval" / f"{bench}_start.json").exists()


def test_prompts_and_settings(tmp_path):
    write_vstar(tmp_path / "vstar")
    items, _ = ev.load_benchmark("vstar", str(tmp_path / "vstar"), ev.Args(benchmark="vstar"))
    it = dict(items[0], images=[Image.new("RGB", (8, 8))])
    msgs, prefix = ev.build_messages(it, ev.Args())
    assert msgs[0] == {"role": "system", "content": "You are a helpful assistant."} and prefix == ""
    assert msgs[1]["content"][-1]["text"] == ("What is the colour of object 0?\nA. red\nB. blue\n"
                                              "Answer with the option's letter from the given choices directly.")
    assert ev.build_messages(it, ev.Args(prompt="answer-tag"))[1] == "<answer>"
    assert ev.build_messages(it, ev.Args(prompt="answer-tag", mode="latent"))[1] == ""
    assert ev.settings(ev.Args(prompt="answer-tag"), "vstar")["max_new_tokens"] == 4
    st = ev.settings(ev.Args(), "vstar")
    assert (st["max_new_tokens"], st["min_pixels"], st["max_pixels"]) == (16, 256 * 28 * 28, 2048 * 28 * 28)


def test_missing_method_module_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "lvr", None)
    with pytest.raises(ImportError, match="lvr.py"):
        ev.resolve_generator("latent")


def test_toy_generation_batched_equals_one_by_one(tmp_path, toy_bb):
    """End to end on the offline toy backbone: left-padded batches give the same greedy text as one item at a time
    (items have different image sizes, so different prompt lengths), and answer-tag ends the prompt with <answer>."""
    bb = toy_bb
    root = tmp_path / "vstar"
    write_vstar(root, n=3)
    for i, r in enumerate(json.loads(line) for line in open(root / "test_questions.jsonl")):
        os.makedirs(root / os.path.dirname(r["image"]), exist_ok=True)
        Image.new("RGB", (56 + 28 * i, 56), (200, 40 * i, 0)).save(root / r["image"])
    items, _ = ev.load_benchmark("vstar", str(root), ev.Args(benchmark="vstar"))
    args = ev.Args(benchmark="vstar", max_new_tokens=4, min_pixels=28 * 28, max_pixels=16 * 28 * 28, batch_size=3)
    batched = {i: t for i, t, _ in ev.predict(items, bb, args, ev.generate_plain)}
    args.batch_size = 1
    single = {i: t for i, t, _ in ev.predict(items, bb, args, ev.generate_plain)}
    assert batched == single and set(batched) == {0, 1, 2}
    lengths = {len(ev.encode_item(bb, it, args)["input_ids"]) for it in items}
    assert len(lengths) == 3  # the batch really was padded
    tag = ev.encode_item(bb, items[0], ev.Args(prompt="answer-tag"))["input_ids"].tolist()
    suffix = bb.tokenizer.encode("<answer>", add_special_tokens=False)
    assert tag[-len(suffix):] == suffix


def test_latent_ablation_is_recorded_passed_and_never_mixed(tmp_path, monkeypatch):
    """--latent-ablation reaches lvr.latent_generate(ablate=), is in the settings and the default file name, and a
    predictions file of one ablation is refused by a run (or --score-only) of another."""
    import types
    write_vstar(tmp_path / "vstar", n=4)
    answers = {str(i): "A" for i in range(4)}
    zeros = ev.Args(benchmark="vstar", data_dir=str(tmp_path / "vstar"), mode="latent", prompt="answer-tag",
                    latent_ablation="zeros", output=str(tmp_path / "run.json"))
    s = ev.evaluate(zeros, backbone=NO_MODEL, generate=fake_predictor(answers))
    assert s["settings"]["latent_ablation"] == "zeros" and "zeros" in s["settings"]["label"]
    lines = [json.loads(x) for x in open(tmp_path / "run.predictions.jsonl")]
    assert len(lines) == 1 + 4 and lines[0]["provenance"]["latent_ablation"] == "zeros"   # provenance line first
    intact = ev.Args(**{**zeros.__dict__, "latent_ablation": "none"})
    assert ev.settings(intact, "vstar")["latent_ablation"] == "none"
    with pytest.raises(SystemExit, match="latent_ablation zeros"):
        ev.evaluate(intact, backbone=NO_MODEL, generate=fake_predictor(answers))              # resume would mix: refused
    rescored = ev.evaluate(ev.Args(**{**intact.__dict__, "score_only": True}))  # scored as what the file holds
    assert rescored["settings"]["latent_ablation"] == "zeros" and rescored["overall"] == s["overall"]
    assert ev.evaluate(ev.Args(**{**zeros.__dict__, "score_only": True}))["overall"] == s["overall"]
    assert ev.default_paths(ev.Args(**{**zeros.__dict__, "output": ""}))[0] != \
        ev.default_paths(ev.Args(**{**intact.__dict__, "output": ""}))[0]
    with pytest.raises(ValueError, match="choose from"):
        ev.evaluate(ev.Args(**{**zeros.__dict__, "latent_ablation": "mean"}))
    with pytest.raises(ValueError, match="needs --mode latent"):
        ev.evaluate(ev.Args(**{**zeros.__dict__, "mode": "plain"}))
    # --mode latent resolves to lvr.generate_latent, which hands the ablation to lvr.latent_generate
    import lvr
    seen = {}

    def fake_latent_generate(bb, samples, **kw):
        seen.update(kw, n=len(samples))
        return [{"token_ids": [1]}] * len(samples)
    monkeypatch.setattr(lvr, "latent_generate", fake_latent_generate)
    monkeypatch.setattr(ev, "encode_item", lambda bb, it, args: {"id": it["id"]})
    bb = types.SimpleNamespace(tokenizer=types.SimpleNamespace(decode=lambda ids, **kw: "<answer> A </answer>"))
    items, _ = ev.load_benchmark("vstar", str(tmp_path / "vstar"), ev.Args(benchmark="vstar"))
    shuffle = ev.Args(**{**zeros.__dict__, "latent_ablation": "shuffle"})
    out = list(ev.predict(items[:2], bb, shuffle, ev.resolve_generator("latent")))
    assert seen["ablate"] == "shuffle" and seen["num_latent_steps"] == 8 and seen["n"] == 2 and len(out) == 2


def test_latent_force_span_opens_the_span_and_is_recorded(tmp_path, monkeypatch):
    write_vstar(tmp_path / "vstar", n=2)
    monkeypatch.setattr(ev, "load_image", lambda im: Image.new("RGB", (8, 8)))
    args = ev.Args(benchmark="vstar", data_dir=str(tmp_path / "vstar"), mode="latent", prompt="answer-tag",
                   latent_force_span=True)
    items, _ = ev.load_benchmark("vstar", args.data_dir, args)
    assert ev.build_messages(items[0], args)[1] == "<|lvr_start|>"
    assert ev.build_messages(items[0], ev.Args(**{**args.__dict__, "latent_force_span": False}))[1] == ""
    assert ev.provenance(args, "vstar")["latent_force_span"] is True        # a forced-span file never mixes
