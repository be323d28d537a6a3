"""The published layouts eval.py reads, as the public harnesses read them (see eval.py's docstring)."""
import eval as ev


def test_vstar_options_one_per_line_or_inline():
    suffix = "\nAnswer with the option's letter from the given choices directly."
    lines = "What is the colour of the cup?\n(A) red\n(B) blue" + suffix
    assert ev.vstar_question(lines) == ("What is the colour of the cup?", {"A": "red", "B": "blue"})
    inline = "What is the material of the glove? (A) rubber (B) cotton (C) leather (D) wool"  # lmms-lab/vstar-bench
    assert ev.vstar_question(inline) == ("What is the material of the glove?",
                                         {"A": "rubber", "B": "cotton", "C": "leather", "D": "wool"})
    assert ev.vstar_question(inline + suffix) == ev.vstar_question(inline)
    # an option with its own parentheses and a final period survives the one-per-line layout
    odd = "Where is it?\n(A) The dog is on the left side of the cat.\n(B) The dog is right (near the tree) of it."
    assert ev.vstar_question(odd)[1] == {"A": "The dog is on the left side of the cat.",
                                         "B": "The dog is right (near the tree) of it."}


def test_hallusionbench_reads_the_image_split(tmp_path):
    """lmms-lab/HallusionBench keeps its image and non-image questions in two splits: the image split is read."""
    import io

    import pandas as pd
    from PIL import Image
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    (tmp_path / "data").mkdir()
    row = dict(category="VD", subcategory="illusion", set_id=3, figure_id=1, question_id=2, question="Is it red?",
               gt_answer="1", gt_answer_details="", image=None)
    pd.DataFrame([row, {**row, "question_id": 5}]).to_parquet(tmp_path / "data" / "non_image-00000.parquet")
    pd.DataFrame([{**row, "image": {"bytes": png.getvalue(), "path": None}}]).to_parquet(
        tmp_path / "data" / "image-00000.parquet")
    items = ev.load_hallusionbench(str(tmp_path), ev.Args(benchmark="hallusionbench"))
    assert len(items) == 1 and items[0]["answer"] == "yes" and items[0]["category"] == "VD"
    assert items[0]["extra"]["figure"] == "VD_illusion_3_1" and items[0]["extra"]["qpair"] == "VD_illusion_3_2"


def test_method_settings_are_provenance(tmp_path):
    """A method's own settings (e.g. ULR's step count) are part of what made a predictions file: a run with other
    settings refuses to resume it."""
    import json

    import pytest
    root = tmp_path / "vstar"
    root.mkdir()
    row = {"image": "a.jpg", "category": "direct_attributes", "question_id": 0, "label": "A",
           "text": "What colour?\n(A) red\n(B) blue"}
    (root / "test_questions.jsonl").write_text(json.dumps(row) + "\n")
    args = ev.Args(benchmark="vstar", data_dir=str(root), output=str(tmp_path / "s.json"),
                   method_settings=json.dumps({"steps": 10}))
    ev.evaluate(args, backbone=object(), generate=lambda bb, items, a: ["A"] * len(items))
    assert ev.read_predictions(str(tmp_path / "s.predictions.jsonl"))[0]["method_settings"] == '{"steps": 10}'
    other = ev.Args(**{**args.__dict__, "method_settings": json.dumps({"steps": 20})})
    with pytest.raises(SystemExit, match="method_settings"):
        ev.evaluate(other, backbone=object(), generate=lambda bb, items, a: ["A"] * len(items))
