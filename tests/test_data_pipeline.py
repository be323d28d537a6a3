"""The streaming data pipeline (issue 15): exact lengths without pixels, samples encoded lazily in DataLoader workers,
token-budget micro-batches, the consumed position as the resume point. Every check compares against the eager path
(build_dataset: every sample encoded up front, pixels included) or a hand-built expectation."""
import io
import json

import pytest
import torch
from PIL import Image

import common as C
import dataloader as D
from conftest import run_script

SMALL = dict(min_pixels=4 * 784, max_pixels=64 * 784)


def chat(images, text="What is the colour of the circle?", answer="<answer> A </answer>"):
    parts = [{"type": "image", "image": im} for im in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]},
            {"role": "assistant", "content": answer}]


def assert_samples_equal(got: dict, want: dict):
    assert got.keys() == want.keys()
    for k in want:
        if isinstance(want[k], torch.Tensor):
            assert torch.equal(got[k], want[k]), k
        else:
            assert got[k] == want[k], k


def lengths_only_matches(bb, chats):
    for messages in chats:
        full = C.encode_chat(bb, messages, **SMALL)
        with C.lengths_only():
            light = C.encode_chat(bb, messages, **SMALL)
        assert light["pixel_values"] is None
        for k in ("input_ids", "labels", "mm_token_type_ids"):
            assert torch.equal(light[k], full[k]), k
        assert (light["image_grid_thw"] is None) == (full["image_grid_thw"] is None)
        if full["image_grid_thw"] is not None:
            assert torch.equal(light["image_grid_thw"], full["image_grid_thw"])
            assert light["image_grid_thw"].dtype == full["image_grid_thw"].dtype


# ---------------------------------------------------------------- lengths without pixels
def test_lengths_only_equals_the_full_encode(toy_bb_both, tmp_path):
    """Grids from smart_resize alone equal the image processor's; images come from the header only (an ImageSize),
    from a path, bytes or an HF struct; a crop (Pearl's tool calls) has PIL's size."""
    bb = toy_bb_both
    sizes = [(60, 90), (1000, 800), (37, 211), (500, 28), (28, 28), (333, 777)]
    Image.new("RGB", (333, 777), (10, 200, 30)).save(tmp_path / "a.png")
    Image.new("RGB", (640, 480), (10, 20, 230)).save(tmp_path / "b.jpg")
    chats = [chat([Image.new("RGB", s) for s in sizes[:2]]), chat([Image.new("RGB", s) for s in sizes[2:]]),
             chat([]), chat([D.open_image("a.png", tmp_path), D.open_image("b.jpg", tmp_path)])]
    lengths_only_matches(bb, chats)
    jpg = (tmp_path / "b.jpg").read_bytes()
    with C.lengths_only():
        for ref in ("b.jpg", jpg, {"bytes": jpg, "path": None}, {"bytes": None, "path": "b.jpg"}):
            im = D.open_image(ref, tmp_path)
            assert isinstance(im, D.ImageSize) and im.size == (640, 480)
        box = (13, 7, 301, 250)
        assert D.open_image("b.jpg", tmp_path).crop(box).size == Image.open(tmp_path / "b.jpg").crop(box).size
        with pytest.raises(C.SkipSample, match="missing image"):
            D.open_image("nope.png", tmp_path)
    assert isinstance(D.open_image("b.jpg", tmp_path), Image.Image)        # outside the context: pixels again


def test_lengths_only_with_the_real_tokenizer():
    bb = C.load_backbone("random:qwen2.5-vl-3b", num_layers=1, device="meta")     # real tokenizer, nothing allocated
    lengths_only_matches(bb, [chat([Image.new("RGB", (1000, 800))], text="Où est le chat? 猫はどこ?"),
                              chat([Image.new("RGB", (90, 60)), Image.new("RGB", (64, 640))])])


def test_every_methods_converter_measures_its_full_length(toy_world):
    """Each method's unchanged converter, under lengths_only, gives the length its full encode has: sft (LVR
    records), pearl (three views from a bbox crop trajectory, PixelReasoner and ThinkMorph parquet), latent_pretrain
    (captions), lvr (its span of ROI tokens)."""
    import latent_pretrain as L
    import lvr
    import pearl as P
    import sft
    bb = C.load_backbone("toy")
    lvr.prepare_model(bb)
    P.setup_model(bb, P.Args(lora_r=0))
    C.add_special_tokens(bb, [L.LATENT_START, L.LATENT_PAD, L.LATENT_END])
    pa, la = P.Args(**SMALL), lvr.Args(image_root=str(toy_world), **SMALL)
    cases = [(toy_world / "lvr_train.json", lambda r: C.encode_chat(bb, sft.to_chat(r, str(toy_world)), **SMALL)),
             (toy_world / "lvr_train.json", lambda r: P.encode_example(bb, P.convert_record(r, str(toy_world)), pa)),
             (toy_world / "pixelreasoner_train.json",
              lambda r: P.encode_example(bb, P.convert_record(r, str(toy_world)), pa)),
             (toy_world / "thinkmorph_train.parquet",
              lambda r: P.encode_example(bb, P.convert_record(r, str(toy_world)), pa)),
             (toy_world / "lvr_train.json", lambda r: lvr.convert_sft(r, bb, la)),
             (toy_world / "coco/annotations/captions_train2017.json",
              lambda r: L.encode_caption(bb, r["caption"], 4))]
    for path, convert in cases:
        records = D.Records(path, limit=4)
        for i in range(len(records)):
            full = convert(records[i])
            with C.lengths_only():
                light = convert(records[i])
            assert len(light["input_ids"]) == len(full["input_ids"]), (path, i)
            assert torch.equal(light["input_ids"], full["input_ids"]), (path, i)


# ---------------------------------------------------------------- records by index
def test_records_by_index_equal_read_records(tmp_path, toy_world):
    lines = [json.dumps({"a": 1, "x": [0.5, None, "é"]}), "not json", json.dumps([1, 2]), json.dumps({"a": 2})]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    for path in (tmp_path / "r.jsonl", toy_world / "lvr_train.json"):
        want_skips, got_skips = D.Skips(), D.Skips()
        want = list(D.read_records(path, want_skips))
        records = D.Records(path, got_skips)
        assert [records[i] for i in range(len(records))] == want and dict(got_skips.counts) == dict(want_skips.counts)
    assert len(D.Records(toy_world / "lvr_train.json", limit=7)) == 7
    assert D.Records(tmp_path / "r.jsonl", D.Skips(), tag="root")[1] == ("root", {"a": 2})
    table = D.Records(toy_world / "thinkmorph_train.parquet", limit=3)     # Arrow-backed; images stay bytes
    assert len(table) == 3 and set(table[0]["problem_image_0"]) == {"bytes", "path"}


# ---------------------------------------------------------------- lazy = eager
@pytest.fixture(scope="module")
def lvr_records(toy_world):
    bb = C.load_backbone("toy")
    import sft
    convert = lambda r: C.encode_chat(bb, sft.to_chat(r, str(toy_world)), **SMALL)  # noqa: E731
    return bb, D.Records(toy_world / "lvr_train.json", limit=24), convert


@pytest.mark.parametrize("workers", [0, 2])
def test_lazy_micro_batches_equal_the_eager_ones(lvr_records, workers):
    """Same seed → the same micro-batches, sample for sample (tensor-equal, pixels included), over an epoch
    boundary; and packed in the workers (M-RoPE position ids there) = packed here from the eager samples."""
    bb, records, convert = lvr_records
    eager = D.build_dataset((records[i] for i in range(len(records))), convert, D.Skips(), desc="lvr")
    eager_order = D.MicroBatches([len(s["input_ids"]) for s in eager], per_micro=3, seed=7)
    lazy = D.LazySamples(records, convert, D.Skips(), desc="lvr", workers=workers)
    assert lazy.lengths.tolist() == [len(s["input_ids"]) for s in eager]
    order = D.MicroBatches(lazy.lengths, per_micro=3, seed=7)
    loader = D.Loader(lazy, order, D.Skips(), workers=workers)
    packed = D.Loader(lazy, D.MicroBatches(lazy.lengths, per_micro=3, seed=7), D.Skips(), workers=workers,
                      collate=lambda samples: C.pack(bb, samples))
    for got, got_packed, idx in zip(loader.next(10), packed.next(10), eager_order.next(n=10)):  # 8 per epoch
        assert len(got) == len(idx)
        for g, j in zip(got, idx):
            assert_samples_equal(g, eager[j])
        want = C.pack(bb, [eager[j] for j in idx])
        assert_samples_equal(got_packed, want)
    loader.close()
    packed.close()


# ---------------------------------------------------------------- order: token budget, world size, resume
def synthetic(n: int, seed: int = 0):
    """Records of known lengths and a converter that needs no model: the order logic alone."""
    g = torch.Generator().manual_seed(seed)
    records = [{"id": i, "n": int(v)} for i, v in enumerate(torch.randint(5, 120, (n,), generator=g))]
    return records, lambda r: {"input_ids": torch.full((r["n"],), r["id"])}


def ids_of(batches):
    return [[int(s["input_ids"][0]) for s in b] for b in batches]


def test_token_budget_micro_batches_fit_and_are_world_size_independent():
    records, convert = synthetic(300)
    data = D.LazySamples(records, convert, D.Skips(), max_tokens=200)
    one = D.Loader(data, D.MicroBatches(data.lengths, token_budget=200, seed=1, window=64), D.Skips())
    ranks = [D.Loader(data, D.MicroBatches(data.lengths, token_budget=200, seed=1, window=64), D.Skips(), r, 2)
             for r in (0, 1)]
    single = ids_of(one.next(40))                                    # 2k micro-batches of 1 rank ...
    two = [ids_of(rank.next(20)) for rank in ranks]                  # ... = k of each of 2 ranks, interleaved
    assert single == [b for pair in zip(*two) for b in pair]
    assert all(sum(records[i]["n"] for i in b) <= 200 for b in single)
    first_epoch = D.MicroBatches(data.lengths, token_budget=200, seed=1, window=64).micro
    seen = [i for b in first_epoch for i in b]
    assert sorted(seen) == list(range(300))                          # an epoch covers every sample once
    fill = sum(data.lengths) / (200 * len(first_epoch))
    assert fill > 0.9, fill


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_the_consumed_position(workers):
    """state() after k micro-batches is where they were consumed, not where the workers had prefetched to: a loader
    started from it continues exactly as the uninterrupted one (across an epoch boundary)."""
    records, convert = synthetic(50, seed=3)
    data = D.LazySamples(records, convert, D.Skips())
    full = D.Loader(data, D.MicroBatches(data.lengths, per_micro=4, seed=2), D.Skips(), workers=workers)
    full = ids_of(full.next(20))
    first = D.Loader(data, D.MicroBatches(data.lengths, per_micro=4, seed=2), D.Skips(), workers=workers)
    head = ids_of(first.next(9))
    state = json.loads(json.dumps(first.state()))                   # as a checkpoint's sidecar stores it
    first.close()
    order = D.MicroBatches(data.lengths, per_micro=4, seed=2)
    order.load_state(state)
    assert head + ids_of(D.Loader(data, order, D.Skips(), workers=workers).next(11)) == full


# ---------------------------------------------------------------- skips: at the lengths pass and in the workers
def test_skips_are_counted_as_the_eager_path_counts_them(tmp_path, toy_bb):
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    good = {"image": "ok.png", "bbox": [0.1, 0.1, 0.5, 0.5], "answer": "A"}
    lines = [json.dumps(good), json.dumps({**good, "image": "missing.png"}), json.dumps({**good, "image": "bad.png"}),
             json.dumps({**good, "bbox": [0.1, 0.1, 1.5, 0.5]}), json.dumps({**good, "answer": ""}),
             '{"image": "ok.png", "bbox": [0.1', json.dumps({**good, "answer": "A " * 400}), "[1, 2]",
             json.dumps({**good, "answer": "B"})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")

    def convert(r):
        im = D.open_image(r["image"], tmp_path)
        D.check_bbox(r["bbox"])
        return C.encode_chat(toy_bb, chat([im], answer=D.text_field(r["answer"], "answer")), **SMALL)

    eager_skips, lazy_skips = D.Skips(), D.Skips()
    eager = D.build_dataset(D.read_records(tmp_path / "d.jsonl", eager_skips), convert, eager_skips, 200, "d")
    lazy = D.LazySamples(D.Records(tmp_path / "d.jsonl", lazy_skips), convert, lazy_skips, 200, "d")
    assert len(lazy) == len(eager) == 2 and lazy.lengths.tolist() == [len(s["input_ids"]) for s in eager]
    assert dict(lazy_skips.counts) == dict(eager_skips.counts) and sum(lazy_skips.counts.values()) == 7


@pytest.mark.parametrize("workers", [0, 2])
def test_a_sample_that_fails_only_in_a_worker_is_a_counted_skip(tmp_path, toy_bb, workers):
    """A truncated PNG: its header reads (the lengths pass keeps it), its pixels do not. The worker drops it and
    reports it; a micro-batch left empty gets the next sample as a stand-in; the order of every other micro-batch is
    unchanged."""
    buf = io.BytesIO()
    Image.effect_noise((200, 200), 64).convert("RGB").save(buf, "PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    for i in range(5):
        Image.new("RGB", (56 + 28 * i, 56), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    records = [{"image": f"{i}.png"} for i in range(5)] + [{"image": "cut.png"}]
    convert = lambda r: C.encode_chat(toy_bb, chat([D.open_image(r["image"], tmp_path)]), **SMALL)  # noqa: E731
    skips = D.Skips()
    data = D.LazySamples(records, convert, skips, desc="d", workers=workers)
    assert len(data) == 6 and not skips.counts                     # the lengths pass cannot see it
    order = D.MicroBatches(data.lengths, per_micro=1, seed=0)
    plan = [idx[0] for idx in D.MicroBatches(data.lengths, per_micro=1, seed=0).next(n=6)]
    got = D.Loader(data, order, skips, workers=workers).next(6)
    assert dict(skips.counts) == {"unreadable image": 1} and skips.examples["unreadable image"] == "d[5]"
    widths = [int(b[0]["image_grid_thw"][0, 2]) for b in got]
    expect = [(56 + 28 * ((j + 1) % 6 if j == 5 else j)) // 14 for j in plan]   # cut.png's turn: sample 0 stands in
    assert widths == expect


def test_worker_skips_of_every_rank_reach_the_summary(tmp_path):
    """Under torchrun a sample that fails only at the full encode is met by whichever rank's micro-batch holds it;
    Loader.close() adds the other ranks' counts, so the summary rank 0 prints counts all four truncated images
    (before: only rank 0's). sft.py, 2 processes, one epoch of 8 records, 4 of them truncated PNGs."""
    buf = io.BytesIO()
    Image.effect_noise((200, 200), 64).convert("RGB").save(buf, "PNG")
    records = []
    for i in range(8):
        if i % 2:
            (tmp_path / f"{i}.png").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])   # header reads, pixels not
        else:
            Image.new("RGB", (56, 56), (30 * i, 0, 0)).save(tmp_path / f"{i}.png")
        records.append({"image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                               {"from": "gpt", "value": "red"}]})
    (tmp_path / "d.json").write_text(json.dumps(records))
    out = run_script("sft.py", "--model", "toy", "--data", tmp_path / "d.json", "--per-micro", 1, "--grad-accum", 1,
                     "--steps", 4, "--eval", "", "--run-dir", tmp_path / "run", nproc=2).stdout
    assert "8 samples from" in out and "; skipped 0 samples" in out           # the lengths pass cannot see them
    final = [x for x in out.splitlines() if x.startswith("skipped ")]
    assert len(final) == 1 and final[0].startswith("skipped 4 samples: 4 unreadable image"), final


def test_to_device_moves_only_the_named_keys():
    batch = [{"full": {"pixel_values": torch.ones(2), "input_ids": torch.ones(3)}, "n": 1}]
    out = D.to_device(batch, "meta", keys=("pixel_values",))
    assert out[0]["full"]["pixel_values"].is_meta and not out[0]["full"]["input_ids"].is_meta and out[0]["n"] == 1
    assert D.to_device(batch, "meta")[0]["full"]["input_ids"].is_meta
