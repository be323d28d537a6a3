"""Foundation tests: preprocessing, packing equivalence, surgery, data skips, micro-batch order, distributed
training parity and kill-and-resume (sft.py as a subprocess), Hugging Face export."""
import json
import math
import os

import pytest
import torch
from PIL import Image

import common as C
import dataloader as D
import runtime as R
from conftest import metrics, run_script
from helpers import token_logprobs

SMALL = dict(min_pixels=4 * 784, max_pixels=64 * 784)


def chat(image_sizes, text="What is the colour of the circle?", answer="<answer> A </answer>"):
    parts = [{"type": "image", "image": Image.new("RGB", s, (200, 30, 30))} for s in image_sizes]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]},
            {"role": "assistant", "content": answer}]


# ---------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("factor", [28, 32])
def test_smart_resize_constraints(factor):
    g = torch.Generator().manual_seed(0)
    lo, hi = 4 * factor ** 2, 256 * factor ** 2
    for _ in range(500):
        h, w = (int(v) for v in torch.randint(10, 3000, (2,), generator=g))
        if max(h, w) / min(h, w) > 200:
            continue
        rh, rw = C.smart_resize(h, w, factor, lo, hi)
        assert rh % factor == 0 and rw % factor == 0
        assert lo <= rh * rw <= hi, (h, w, rh, rw)
        if lo * 2 < h * w < hi / 2 and min(h, w) >= factor:  # in range: only rounding moves the sides
            assert abs(rh - h) <= factor / 2 + 1e-9 and abs(rw - w) <= factor / 2 + 1e-9


def test_smart_resize_hand_example():
    # 448x448 fits [4·28², 1280·28²]: unchanged; 1000x1000 over max 256·28² = 200704 px -> scaled to 448x448
    assert C.smart_resize(448, 448, 28, 4 * 784, 1280 * 784) == (448, 448)
    assert C.smart_resize(1000, 1000, 28, 4 * 784, 256 * 784) == (448, 448)
    assert C.smart_resize(20, 20, 28, 4 * 784, 256 * 784) == (56, 56)  # below min: scaled up to 2x2 tokens


def test_token_counts_multi_image_and_labels(toy_bb_both):
    bb = toy_bb_both
    f = bb.patch_factor
    s = C.encode_chat(bb, chat([(5 * f, 3 * f), (2 * f, 7 * f)]), **SMALL)
    assert s["image_grid_thw"].tolist() == [[1, 6, 10], [1, 14, 4]]  # grid in patches (h, w) = 2x tokens
    pad = bb.token_id("<|image_pad|>")
    runs = torch.nonzero(s["input_ids"] == pad).flatten()
    assert len(runs) == 15 + 14  # t·h·w / merge² per image
    assert s["pixel_values"].shape[0] == 60 + 56  # one row per patch
    assert (s["mm_token_type_ids"] == 1).sum() == len(runs)
    # labels: exactly the assistant content and its <|im_end|>
    supervised = s["input_ids"][s["labels"] != C.IGNORE]
    assert bb.tokenizer.decode(supervised) == "<answer> A </answer><|im_end|>"
    # each image run is framed by vision_start / vision_end and contiguous
    vs, ve = bb.token_id("<|vision_start|>"), bb.token_id("<|vision_end|>")
    ids = s["input_ids"].tolist()
    starts = [i for i, t in enumerate(ids) if t == vs]
    assert [ids[i + 1:i + 1 + n] == [pad] * n and ids[i + 1 + n] == ve for i, n in zip(starts, (15, 14))] == [True] * 2


def test_untrained_assistant_turns_are_context(toy_bb_both):
    bb = toy_bb_both
    msgs = chat([(56, 56)])
    msgs = msgs + [{"role": "user", "content": "again"}, {"role": "assistant", "content": "B", "train": False}]
    s = C.encode_chat(bb, msgs, **SMALL)
    assert bb.tokenizer.decode(s["input_ids"][s["labels"] != C.IGNORE]) == "<answer> A </answer><|im_end|>"


def test_encode_matches_chat_template(toy_bb_both):
    bb = toy_bb_both
    """Our piecewise rendering equals the tokenizer's chat template (with the image pads expanded)."""
    msgs = chat([(56, 84)])
    s = C.encode_chat(bb, msgs, **SMALL)
    text = bb.tokenizer.apply_chat_template(msgs, tokenize=False)
    n = int((s["input_ids"] == bb.token_id("<|image_pad|>")).sum())
    text = text.replace("<|image_pad|>", "<|image_pad|>" * n)
    assert bb.tokenizer.encode(text, add_special_tokens=False) == s["input_ids"].tolist()


# ---------------------------------------------------------------- packing
def per_sample_logprobs(bb, samples):
    out = []
    for s in samples:
        b = C.pack(bb, [s])
        logits = bb.model(**C.model_inputs(b, "cpu")).logits
        lp, _ = token_logprobs(logits, s["labels"][None] * 0 + s["input_ids"][None])  # every next token
        out.append(lp[0])
    return out


@torch.no_grad()
def test_packed_equals_per_sample(toy_bb_both):
    bb = toy_bb_both
    bb.model.eval()
    samples = [C.encode_chat(bb, chat(sz, text="q" * k), **SMALL)
               for sz, k in [([(60, 90)], 3), ([(100, 50), (56, 56)], 1), ([], 7)]]
    ref = per_sample_logprobs(bb, samples)
    batch = C.pack(bb, samples)
    all_ids = batch["input_ids"]
    logits = bb.model(**C.model_inputs(batch, "cpu")).logits
    lp, _ = token_logprobs(logits, all_ids)
    off = 0
    for s, r in zip(samples, ref):
        n = len(s["input_ids"])
        torch.testing.assert_close(lp[0, off:off + n - 1], r, atol=1e-5, rtol=1e-5)
        off += n
    # negative control: positions that do not restart make the samples attend to each other
    bad = dict(batch)
    bad["position_ids"] = batch["position_ids"].clone()
    bad["position_ids"][0, 0] = torch.arange(all_ids.shape[1])
    lp_bad, _ = token_logprobs(bb.model(**C.model_inputs(bad, "cpu")).logits, all_ids)
    n0 = len(samples[0]["input_ids"])
    assert (lp_bad[0, n0:n0 + len(samples[1]["input_ids"]) - 1] - ref[1]).abs().max() > 1e-3
    # and the mask is what keeps them apart: with a KV cache transformers would skip it (use_cache must stay off)
    leaky = C.model_inputs(batch, "cpu") | {"use_cache": True}
    lp_leak, _ = token_logprobs(bb.model(**leaky).logits, all_ids)
    assert (lp_leak[0, n0:n0 + len(samples[1]["input_ids"]) - 1] - ref[1]).abs().max() > 1e-3


@torch.no_grad()
def test_padded_equals_per_sample(toy_bb_both):
    bb = toy_bb_both
    bb.model.eval()
    samples = [C.encode_chat(bb, chat([(60, 90)]), **SMALL), C.encode_chat(bb, chat([(120, 60)], text="x"), **SMALL)]
    ref = per_sample_logprobs(bb, samples)
    batch = C.pad_batch(bb, samples)
    lp, _ = token_logprobs(bb.model(**C.model_inputs(batch, "cpu")).logits, batch["input_ids"])
    for i, (s, r) in enumerate(zip(samples, ref)):
        torch.testing.assert_close(lp[i, :len(s["input_ids"]) - 1], r, atol=1e-5, rtol=1e-5)


def test_pack_labels_do_not_cross_samples(toy_bb):
    bb = toy_bb
    samples = [C.encode_chat(bb, chat([]), **SMALL) for _ in range(3)]
    for s in samples:
        s["labels"] = s["input_ids"].clone()  # fully supervised
    b = C.pack(bb, samples)
    starts = torch.cumsum(torch.tensor([0] + [len(s["input_ids"]) for s in samples[:-1]]), 0)
    assert (b["labels"][0, starts] == C.IGNORE).all()
    assert (b["position_ids"][0, 0, starts] == 0).all()


def test_greedy_bins_respects_budget():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(50, 900, (300,), generator=g).tolist()
    bins = D.greedy_bins(lengths, 2048)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 2048 for b in bins)
    assert sum(lengths) / (2048 * len(bins)) > 0.95


# ---------------------------------------------------------------- surgery
def test_add_special_tokens_reuses_spare_rows_or_resizes():
    bb = C.load_backbone("toy")  # 32 spare rows
    rows = bb.model.get_input_embeddings().weight.shape[0]
    mean = bb.model.get_input_embeddings().weight[:len(bb.tokenizer)].mean(0).clone()
    ids = C.add_special_tokens(bb, ["<|lvr_start|>", "<|lvr|>"])
    assert bb.model.get_input_embeddings().weight.shape[0] == rows  # reused, no resize
    torch.testing.assert_close(bb.model.get_input_embeddings().weight[ids[1]], mean)
    s = C.encode_chat(bb, [{"role": "user", "content": "a <|lvr|> b"}])
    assert ids[1] in s["input_ids"].tolist()
    assert C.add_special_tokens(bb, ["<|lvr|>"]) == [ids[1]]  # idempotent

    q3 = C.load_backbone("toy-qwen3vl")  # no spare rows, tied
    n = q3.model.get_input_embeddings().weight.shape[0]
    ids = C.add_special_tokens(q3, ["<|predictor_1|>"], init="<|im_end|>")
    assert q3.model.get_input_embeddings().weight.shape[0] == n + 1
    torch.testing.assert_close(q3.model.get_input_embeddings().weight[ids[0]],
                               q3.model.get_input_embeddings().weight[q3.token_id("<|im_end|>")])


# ---------------------------------------------------------------- data
def test_broken_records_are_counted_skips(tmp_path, toy_bb):
    bb = toy_bb
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    lines = [json.dumps({"image": "ok.png", "bbox": [0.1, 0.1, 0.5, 0.5], "answer": "A"}),
             json.dumps({"image": "missing.png", "bbox": [0.1, 0.1, 0.5, 0.5], "answer": "A"}),
             json.dumps({"image": "bad.png", "bbox": [0.1, 0.1, 0.5, 0.5], "answer": "A"}),
             json.dumps({"image": "ok.png", "bbox": [0.1, 0.1, 1.5, 0.5], "answer": "A"}),
             json.dumps({"image": "ok.png", "bbox": [0.5, 0.1, 0.5, 0.5], "answer": "A"}),
             json.dumps({"image": "ok.png", "bbox": [0.1, 0.1, 0.5, 0.5], "answer": ""}),
             '{"image": "ok.png", "bbox": [0.1',
             json.dumps({"image": "ok.png", "bbox": [0.1, 0.1, 0.5, 0.5], "answer": "A " * 400}),
             json.dumps({"image": "ok.png", "bbox": [0.2, 0.2, 0.9, 0.9], "answer": "B"})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")

    def convert(r):
        im = D.open_image(r["image"], tmp_path)
        D.check_bbox(r["bbox"])
        if not r["answer"].strip():
            raise C.SkipSample("empty answer")
        return C.encode_chat(bb, [{"role": "user", "content": [{"type": "image", "image": im},
                                                               {"type": "text", "text": "q"}]},
                                  {"role": "assistant", "content": r["answer"]}], **SMALL)

    skips = D.Skips()
    data = D.build_dataset(D.read_records(tmp_path / "d.jsonl", skips), convert, skips, max_tokens=200)
    assert len(data) == 2
    assert dict(skips.counts) == {"missing image": 1, "unreadable image": 1, "bbox outside [0,1]": 1,
                                  "degenerate bbox": 1, "empty answer": 1, "malformed JSON line": 1,
                                  "over the token budget": 1}
    assert "skipped 7 samples" in skips.summary()


@pytest.mark.parametrize("bbox", [0.5, "0,0,1,1", [0, 0, 1], [True, False, True, True], [0, 0, float("nan"), 1],
                                  None, {"x0": 0}])
def test_check_bbox_rejects_malformed_shapes(bbox):
    with pytest.raises(C.SkipSample, match="malformed bbox"):
        D.check_bbox(bbox)


def test_build_dataset_skips_non_objects_and_extreme_aspect(tmp_path, toy_bb):
    bb = toy_bb

    def convert(r):
        im = Image.new("RGB", (r["w"], r["h"]))
        return C.encode_chat(bb, [{"role": "user", "content": [{"type": "image", "image": im}]},
                                  {"role": "assistant", "content": D.text_field(r["answer"], "answer")}], **SMALL)

    records = [[1, 2, 3], "a string", {"w": 1000, "h": 1, "answer": "x"}, {"w": 56, "h": 56, "answer": 7},
               {"w": 56, "h": 56, "answer": ["x"]}, {"w": 56, "h": 56, "answer": "ok"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    skips = D.Skips()
    assert len(D.build_dataset(D.read_records(tmp_path / "d.jsonl", skips), convert, skips)) == 1
    assert dict(skips.counts) == {"record is not a JSON object": 2, "aspect ratio over 200": 1,
                                  "answer missing or not text": 2}


def test_micro_batches_world_size_independent_and_resumable():
    lengths = list(range(10, 50))
    one = D.MicroBatches(lengths, per_micro=2, seed=3)
    a, b = D.MicroBatches(lengths, per_micro=2, seed=3), D.MicroBatches(lengths, per_micro=2, seed=3)
    for _ in range(25):  # crosses epochs
        single = one.next(0, 1, 4)
        two = [x for pair in zip(a.next(0, 2, 2), b.next(1, 2, 2)) for x in pair]
        assert single == two
    packed_one = D.MicroBatches(lengths * 20, token_budget=120, seed=5, window=64)
    p0, p1 = D.MicroBatches(lengths * 20, token_budget=120, seed=5, window=64), \
        D.MicroBatches(lengths * 20, token_budget=120, seed=5, window=64)
    seen = []
    for _ in range(30):
        single = packed_one.next(0, 1, 2)
        assert single == [p0.next(0, 2, 1)[0], p1.next(1, 2, 1)[0]]
        assert all(sum((lengths * 20)[i] for i in row) <= 120 for row in single)
        seen += [i for row in single for i in row]
    assert len(seen) == len(set(seen))  # within the first epoch no sample repeats
    state = one.state()
    nxt = one.next(0, 1, 3)
    fresh = D.MicroBatches(lengths, per_micro=2, seed=3)
    fresh.load_state(state)
    assert fresh.next(0, 1, 3) == nxt


def test_cosine_lr_values():
    assert R.cosine_lr(0, 100, 1.0, 0.1) == pytest.approx(0.1)
    assert R.cosine_lr(9, 100, 1.0, 0.1) == pytest.approx(1.0)
    assert R.cosine_lr(55, 100, 1.0, 0.1) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert R.cosine_lr(100, 100, 1.0, 0.1) == pytest.approx(0.0, abs=1e-12)


def test_check_finite_reports_terms():
    with pytest.raises(FloatingPointError, match="lvr=nan"):
        R.check_finite(torch.tensor(float("nan")), 3, {"ce": 1.0, "lvr": float("nan")})


# ---------------------------------------------------------------- training infrastructure (sft.py, subprocesses)
# sft.py is the template loop every method file follows; on the random-init toy, with a tiny budget and no eval.
SFT = ("--model", "toy", "--per-micro", 2, "--lr", 1e-3, "--eval", "")


def losses(run_dir):
    return {r["step"]: r["loss"] for r in metrics(run_dir)}


def test_two_process_fsdp_matches_one_process(tmp_path, toy_world):
    run_script("sft.py", *SFT, "--run-dir", tmp_path / "one", "--steps", 4, "--grad-accum", 2)
    run_script("sft.py", *SFT, "--run-dir", tmp_path / "two", "--steps", 4, "--grad-accum", 1, nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == 4 and one.keys() == two.keys()
    for k in one:
        assert one[k] == pytest.approx(two[k], rel=1e-4), (k, one, two)
    assert one[4] < one[1]  # it trains
    assert (tmp_path / "two" / "export" / "model.safetensors").exists()  # export gathers FSDP shards


def test_kill_and_resume_continues_the_same_curve(tmp_path, toy_world):
    base = (*SFT, "--grad-accum", 1, "--steps", 6, "--save-every", 2, "--pack", "false")
    run_script("sft.py", *base, "--run-dir", tmp_path / "full")
    run_script("sft.py", *base, "--run-dir", tmp_path / "cut", "--stop-after", 3)  # killed after step 3 (ckpt: 2)
    run_script("sft.py", *base, "--run-dir", tmp_path / "cut", "--resume", "true")
    full = losses(tmp_path / "full")
    cut = metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4, 5, 6]  # rows after the checkpoint (step 3) re-run, not duplicated
    for r in cut:
        assert r["loss"] == pytest.approx(full[r["step"]], rel=1e-5), (r, full)


def _fake_checkpoint(run_dir, step, sidecar):
    ckpt = run_dir / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / ".metadata").write_bytes(b"")
    if sidecar is not None:
        (ckpt / "trainer_state.json").write_text(sidecar)
    return ckpt


def test_latest_checkpoint_falls_back_past_a_torn_sidecar(tmp_path):
    good = _fake_checkpoint(tmp_path, 2, json.dumps({"step": 2}))
    _fake_checkpoint(tmp_path, 4, '{"step": 4, "rng": {"pyth')  # torn: killed while writing
    _fake_checkpoint(tmp_path, 6, None)                           # killed before the sidecar
    (tmp_path / "checkpoint-x").mkdir()                           # not a checkpoint
    assert R.latest_checkpoint(tmp_path) == good
    assert R.latest_checkpoint(tmp_path / "nothing") is None


def test_checkpoint_retention_run_id_and_refusal(tmp_path):
    bb = C.load_backbone("toy")
    opt = torch.optim.AdamW(bb.model.parameters(), lr=1e-3)
    for step in (1, 2, 3, 4):
        R.save_checkpoint(tmp_path / f"checkpoint-{step}", bb.model, opt, step, {"data": {}}, keep=2)
    assert [p.name for p in R._checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    meta = R.load_checkpoint(R.latest_checkpoint(tmp_path), bb.model, opt)
    assert meta["step"] == 4 and meta["run_id"] == R.run_id(tmp_path)
    (tmp_path / "run_id").write_text("someone-else")  # a checkpoint from another run directory
    with pytest.raises(RuntimeError, match="refusing"):
        R.load_checkpoint(tmp_path / "checkpoint-4", bb.model, opt)


def test_resume_and_checkpoint_cadence(tmp_path, capsys, monkeypatch):
    """R.resume: 0 without --resume or without a complete checkpoint (said once), else the newest checkpoint's step
    with the data position restored; R.checkpoint_every saves exactly at the multiples of --save-every."""
    from types import SimpleNamespace
    bb = C.load_backbone("toy")
    opt = torch.optim.AdamW(bb.model.parameters(), lr=1e-3)
    order = D.MicroBatches([5] * 8, per_micro=2, seed=0)
    saved = []
    monkeypatch.setattr(R, "save_checkpoint", lambda path, *a, **kw: saved.append((path.name, kw["keep"])))
    args = SimpleNamespace(run_dir=str(tmp_path), resume=True, save_every=3, keep_checkpoints=2)
    for step in range(1, 10):
        R.checkpoint_every(args, step, bb.model, opt, SimpleNamespace(state=lambda: {}))
    assert saved == [("checkpoint-3", 2), ("checkpoint-6", 2), ("checkpoint-9", 2)]
    assert R.resume(SimpleNamespace(run_dir=str(tmp_path), resume=False), bb.model, opt, order) == 0
    assert R.resume(args, bb.model, opt, order) == 0 and "no complete checkpoint" in capsys.readouterr().out
    monkeypatch.undo()
    moved = D.MicroBatches([5] * 8, per_micro=2, seed=0)
    moved.load_state({"epoch": 1, "cursor": 3})
    R.save_checkpoint(tmp_path / "checkpoint-5", bb.model, opt, 5, {"data": moved.state()})
    assert R.resume(args, bb.model, opt, order) == 5 and order.state() == moved.state()


def test_non_finite_loss_names_the_one_based_step():
    with pytest.raises(FloatingPointError, match="at step 8:"):
        R.check_finite(torch.tensor(float("inf")), 7)


def test_hf_export_round_trip(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    for name in ("toy", "toy-qwen3vl"):
        bb = C.load_backbone(name)
        C.add_special_tokens(bb, ["<|latent_pad|>"])
        out = tmp_path / name
        R.export_hf(bb, out)
        model = AutoModelForImageTextToText.from_pretrained(out).eval()
        tok = AutoTokenizer.from_pretrained(out)
        ip = Qwen2VLImageProcessorPil.from_pretrained(out)
        assert tok.convert_tokens_to_ids("<|latent_pad|>") == bb.token_id("<|latent_pad|>")
        s = C.encode_chat(bb, chat([(80, 60)]), **SMALL)
        b = C.pack(bb, [s])
        with torch.no_grad():
            ref = bb.model.eval()(**C.model_inputs(b, "cpu")).logits
            got = model(**C.model_inputs(b, "cpu")).logits
        torch.testing.assert_close(got, ref)
        assert ip.patch_size == bb.image_processor.patch_size
        again = C.load_backbone(str(out))  # the real-checkpoint path: local directory, no remote code
        assert again.family == bb.family and again.patch_factor == bb.patch_factor
        with torch.no_grad():
            torch.testing.assert_close(again.model.eval()(**C.model_inputs(b, "cpu")).logits, ref)
        assert set(os.listdir(out)) >= {"config.json", "model.safetensors", "tokenizer.json",
                                        "preprocessor_config.json"}


def test_activation_checkpointing_same_loss_and_grads():
    d = R.Dist()
    results = []
    for ac in (False, True):
        bb = C.load_backbone("toy", seed=1)
        model = R.shard_model(bb.model, d, activation_checkpointing=ac).train()
        b = C.pack(bb, [C.encode_chat(bb, chat([(60, 90)]), **SMALL), C.encode_chat(bb, chat([]), **SMALL)])
        loss = C.next_token_loss(model(**C.model_inputs(b, "cpu")).logits, b["labels"])
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l0, l1)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], atol=1e-6, rtol=1e-5)


def test_read_records_parquet_and_json(tmp_path):
    import pandas as pd
    pd.DataFrame({"idx": [1, 2, 3], "question": ["a", "b", "c"]}).to_parquet(tmp_path / "x.parquet")
    assert [r["question"] for r in D.read_records(tmp_path / "x.parquet")] == ["a", "b", "c"]
    (tmp_path / "l.json").write_text(json.dumps([{"a": 1}, {"a": 2}]))
    assert [r["a"] for r in D.read_records(tmp_path / "l.json")] == [1, 2]


def test_step_flops_hand_counted():
    """The MFU numerator on the toy (hidden 64, 2 layers, 4 heads of 16, 2 KV heads, MLP 128): per layer q 64·64,
    k 64·32, v 64·32, o 64·64, gate/up/down 3·64·128; plus the LM head V·64. Embeddings, norms, biases and the vision
    tower are not matmul FLOPs of the LLM."""
    bb = C.load_backbone("toy")
    V = bb.model.config.text_config.vocab_size
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128
    n = 2 * per_layer + V * 64
    assert R.matmul_params(bb.model) == n
    lens = [7, 30]  # a packed row of two samples: attention is per sample (Σ L²), not over the row
    fwd = sum(2 * n * L + 4 * 2 * 64 * L * L for L in lens)
    assert R.step_flops(bb.model, lens, backward=False) == fwd
    assert R.step_flops(bb.model, lens) == 3 * fwd
    # frozen matmul weights (LoRA): no weight gradients, so the backward is 2·N·L + 2·attention, not 4·N·L + 2·attention
    bwd_frozen = sum(2 * n * L + 2 * 4 * 2 * 64 * L * L for L in lens)
    assert R.step_flops(bb.model, lens, weight_grads=False) == fwd + bwd_frozen
    assert R.step_flops(bb.model, [37]) > R.step_flops(bb.model, lens)  # one 37-token sample attends over more pairs
