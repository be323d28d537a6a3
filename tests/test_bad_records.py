"""A corpus of badly typed records, one per kind, through each method's loader: every one is a counted skip with a
reason, and the good record still loads. (Before: tracebacks while loading, or a bbox of booleans accepted.)"""
import json

import pytest
from PIL import Image

import common as C
import dataloader as D
import latent_pretrain as L
import lvr
import lvr_grpo
import pearl as P
import sft


def good_lvr(tmp_path, name="ok.png"):
    Image.new("RGB", (84, 112), (90, 90, 90)).save(tmp_path / name)
    return {"image": [name], "bboxes": [[0.1, 0.1, 0.6, 0.6]],
            "conversations": [{"from": "human", "value": "<image>\nWhat colour?\n(A) red\n(B) blue"},
                              {"from": "gpt", "value": "<lvr>\n<answer> B </answer>"}]}


def bad_lvr_records(tmp_path):
    ok = good_lvr(tmp_path)
    conv = ok["conversations"]
    return {
        "bbox a bare number": {**ok, "bboxes": [0.5]},
        "bbox of booleans": {**ok, "bboxes": [[True, False, True, True]]},
        "question a number": {**ok, "conversations": [{"from": "human", "value": 7}, conv[1]]},
        "answer a number": {**ok, "conversations": [conv[0], {"from": "gpt", "value": 3.5}]},
        "record a string": "just a string",
        "record a list": [1, 2, 3],
        "conversations of strings": {**ok, "conversations": ["hi", "there"]},
        "image a number": {**ok, "image": 5},
    }


@pytest.fixture(scope="module")
def lvr_bb(toy_bb):
    """The toy backbone after LVR's surgery (this module's copy of toy_bb)."""
    lvr.prepare_model(toy_bb)
    return toy_bb


def test_lvr_loader_counts_every_bad_record(tmp_path, lvr_bb):
    a = lvr.Args(min_pixels=4 * 784, max_pixels=16 * 784, image_root=str(tmp_path))
    bad = bad_lvr_records(tmp_path)
    records = list(bad.values()) + [good_lvr(tmp_path)]
    skips = D.Skips()
    data = D.build_dataset(records, lambda r: lvr.convert_sft(r, lvr_bb, a), skips)
    assert len(data) == 1 and sum(skips.counts.values()) == len(bad), dict(skips.counts)
    skips = D.Skips()
    assert len(D.build_dataset(records, lambda r: lvr_grpo.convert_grpo(r, lvr_bb, a), skips)) == 3
    assert sum(skips.counts.values()) == len(bad) - 2  # GRPO reads no bbox


def test_sft_loader_counts_every_bad_record(tmp_path, toy_bb):
    """sft.py reads the same records through dataloader.visual_cot (before: a record that is not an object raised
    AttributeError out of the loader). It reads no bbox, so the two bad-bbox records train."""
    bad = bad_lvr_records(tmp_path)
    records = list(bad.values()) + [good_lvr(tmp_path)]
    skips = D.Skips()
    convert = lambda r: C.encode_chat(toy_bb, sft.to_chat(r, str(tmp_path)), min_pixels=4 * 784,  # noqa: E731
                                      max_pixels=16 * 784)
    assert len(D.build_dataset(records, convert, skips)) == 3
    assert sum(skips.counts.values()) == len(bad) - 2 and skips.counts["record is not a JSON object"] == 2


def test_pearl_loader_counts_every_bad_record(tmp_path):
    bad = bad_lvr_records(tmp_path)
    bad["empty answer tag"] = {**good_lvr(tmp_path), "conversations": [
        good_lvr(tmp_path)["conversations"][0], {"from": "gpt", "value": "<lvr>\n<answer>  </answer>"}]}
    skips = D.Skips()
    out = D.build_dataset(list(bad.values()) + [good_lvr(tmp_path)], lambda r: P.convert_record(r, str(tmp_path)),
                          skips)
    assert len(out) == 1 and sum(skips.counts.values()) == len(bad), dict(skips.counts)
    assert skips.counts["empty question or answer"] == 1


def test_coco_reader_counts_every_bad_annotation(tmp_path):
    coco = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2}, "not an image entry"],
            "annotations": [{"image_id": 1, "caption": "a red circle"}, "a string annotation",
                            {"image_id": 1, "caption": ["a", "list"]}, {"image_id": 2, "caption": "no file name"},
                            {"image_id": 1, "caption": 42}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    skips = D.Skips()
    pairs, images = L.read_pairs(str(tmp_path / "captions.json"), str(tmp_path), skips)
    assert pairs == [("a red circle", "1")]
    assert dict(skips.counts) == {"image entry without id or file_name": 2, "annotation is not an object": 1,
                                  "caption without image or text": 3}
