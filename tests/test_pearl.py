"""Pearl: every formula against an independent computation, views per data format, shared-encoding parity,
a 2-process torchrun smoke run, the export round trip and the toy default's score table. CPU, tiny toy backbones."""
import io
import json

import pytest
import torch
from PIL import Image, ImageDraw

import common as C
import dataloader as D
import runtime as R
import pearl as P
from common import IGNORE
from conftest import metrics, run_script


# ------------------------------------------------------------------------------------------- fixtures (published shapes)
def scene(w=200, h=160, seed=0):
    im = Image.new("RGB", (w, h), (128, 128, 128))
    d = ImageDraw.Draw(im)
    d.rectangle([20, 20, 90, 90], fill=(220, 40, 40))
    d.ellipse([150 - seed, 100, 165 - seed, 115], fill=(40, 90, 220))
    return im


def png_bytes(im):
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


QUESTION = "What is the colour of the circle?\n(A) red\n(B) green\n(C) blue\n(D) yellow"


def lvr_record(tmp, i=0, bbox=(0.7, 0.6, 0.86, 0.75)):
    scene(seed=i).save(tmp / f"lvr_{i}.png")
    return {"id": f"lvr_{i}", "image": [f"lvr_{i}.png"], "bboxes": [list(bbox)],
            "conversations": [{"from": "human", "value": "<image>\n" + QUESTION},
                              {"from": "gpt", "value": "<lvr>\n<answer> C </answer>"}]}


def pixelreasoner_record(tmp, i=0, missing_second_crop=True):
    im = scene(seed=i)
    im.save(tmp / f"pr_{i}.png")
    crop1 = im.crop((100, 60, 200, 160))
    crop1.save(tmp / f"pr_{i}_1.png")
    call = lambda b, k: ('<tool_call>\n' + json.dumps({"name": "crop_image", "arguments": {"bbox_2d": b,  # noqa: E731
                                                       "target_image": k}}) + '\n</tool_call>')
    ml = [{"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant.\n\n# Tools\n<tools>\n{}\n</tools>"}]},
          {"role": "user", "content": [{"type": "image", "image": f"pr_{i}.png"}, {"type": "text", "text": QUESTION}]},
          {"role": "assistant", "content": [{"type": "text", "text": "The circle is small. Zoom in.\n" + call([0.5, 0.375, 1.0, 1.0], 1)}]},
          {"role": "user", "content": [{"type": "text", "text": "\nHere is the cropped image (Image Size: 100x100):"},
                                       {"type": "image", "image": f"pr_{i}_1.png"}]},
          {"role": "assistant", "content": [{"type": "text", "text": "Closer.\n" + call([0.4, 0.3, 0.8, 0.7], 2)}]},
          {"role": "user", "content": [{"type": "text", "text": "\nHere is the cropped image (Image Size: 40x40):"},
                                       {"type": "image", "image": f"pr_{i}_2_missing.png" if missing_second_crop else f"pr_{i}_1.png"}]},
          {"role": "assistant", "content": [{"type": "text", "text": "It is blue. So the answer is \\boxed{C}."}]}]
    return {"qid": f"pr_{i}", "question": QUESTION, "answer": "C", "question_image_path": f"pr_{i}.png", "message_list": ml}


def thinkmorph_record(i=0):
    im = scene(seed=i)
    boxed = im.copy()
    ImageDraw.Draw(boxed).rectangle([145, 95, 170, 120], outline=(0, 0, 0), width=2)
    return {"pid": f"tm_{i}", "problem_image_0": {"bytes": png_bytes(im), "path": "p.png"}, "question": QUESTION,
            "resoning_thought_0": "I will mark the circle.", "reasoning_image_0": {"bytes": png_bytes(boxed), "path": "r.png"},
            "resoning_thought_1": "The marked circle is blue. The answer is (C).", "answer": "C"}


def make(model="toy", **kw):
    args = P.resolve(P.Args(model=model, data="none", **kw))   # the toy preset on the fields not in kw
    bb = C.load_backbone(model)
    frozen = P.setup_model(bb, args)
    return bb, args, frozen


def encode(bb, args, rec, root):
    return P.encode_example(bb, P.convert_record(rec, str(root)), args)


def supervised_text(bb, view):
    ids = view["input_ids"][view["labels"] != IGNORE]
    return bb.tokenizer.decode(ids, skip_special_tokens=False)


# ------------------------------------------------------------------------------------------------------------- losses
def test_jepa_stop_gradient_and_metrics():
    pred = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    loss = P.jepa_loss(pred, target, "cosine")
    loss.backward()
    assert target.grad is None, "the trajectory embedding must receive no gradient"
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    p, t = pred.detach(), target.detach()
    cos = [float((p[i] @ t[i]) / (p[i].norm() * t[i].norm())) for i in range(3)]
    assert loss.item() == pytest.approx(sum(1 - c for c in cos) / 3, abs=1e-6)
    d = p - t
    assert P.jepa_loss(p, t, "mse").item() == pytest.approx(float((d ** 2).mean()), abs=1e-6)
    assert P.jepa_loss(p, t, "l2").item() == pytest.approx(float(d.norm(dim=-1).mean()), abs=1e-6)
    sl1 = torch.where(d.abs() < 1, 0.5 * d ** 2, d.abs() - 0.5)
    assert P.jepa_loss(p, t, "smoothl1").item() == pytest.approx(float(sl1.mean()), abs=1e-6)


def slow_nextlat(head, h, e, y, W, horizon, target):
    """Per-position, per-step loop in float64."""
    L, states, ce = len(y), [], []
    for t in range(L - horizon):
        if y[t + 1] == IGNORE:
            continue
        cur = h[t]
        for k in range(1, horizon + 1):
            cur = cur + head.mlp(head.norm(torch.cat([cur, e[t + k]])))
            diff = cur - h[t + k]
            states.append(torch.where(diff.abs() < 1, 0.5 * diff ** 2, diff.abs() - 0.5).mean())
            tgt = int(y[t + k]) if target == "released" else (int(y[t + k + 1]) if t + k + 1 < L else IGNORE)
            if tgt != IGNORE:
                logp = torch.log_softmax(W @ cur, -1)
                ce.append(-logp[tgt])
    return torch.stack(states).mean(), torch.stack(ce).mean()


@pytest.mark.parametrize("horizon,target", [(1, "released"), (1, "shifted"), (2, "released")])
def test_nextlat_against_slow_loop(horizon, target):
    torch.manual_seed(0)
    H, V = 8, 11
    head = P.DynamicsHead(H).double()
    W = torch.randn(V, H, dtype=torch.float64)
    hs, es, ys = [], [], []
    for L in (9, 7):
        hs.append(torch.randn(L, H, dtype=torch.float64))
        es.append(torch.randn(L, H, dtype=torch.float64))
        y = torch.randint(0, V, (L,))
        y[: L // 2] = IGNORE
        ys.append(y)
    state, token = P.nextlat_loss(head, hs, es, ys, W, horizon, target)
    slow = [slow_nextlat(head, h, e, y, W, horizon, target) for h, e, y in zip(hs, es, ys)]
    assert state.item() == pytest.approx(sum(s for s, _ in slow).item() / 2, rel=1e-6)  # the loss is computed in fp32
    assert token.item() == pytest.approx(sum(t for _, t in slow).item() / 2, rel=1e-6)  # the loss is computed in fp32
    # the state target is stop-gradient but h_t (the head's input) is not
    h = hs[0].clone().requires_grad_()
    s, _ = P.nextlat_loss(head, [h], [es[0]], [ys[0]], W, 1, "off")
    s.backward()
    last_sup = int((ys[0] != IGNORE).nonzero()[-1])
    assert h.grad[:last_sup].abs().sum() > 0 and h.grad[last_sup].abs().sum() == 0


# ---------------------------------------------------------------------------------------------------------- views
def test_views_lvr(tmp_path):
    bb, args, _ = make()
    ex = encode(bb, args, lvr_record(tmp_path), tmp_path)
    full, inp, traj = ex["full"], ex["input"], ex["traj"]
    assert supervised_text(bb, full) == "<answer> C </answer><|im_end|>"  # only the final answer
    assert len(full["image_grid_thw"]) == 2 and traj["image_index"] == [0, 1] and inp["image_index"] == [0]
    dec = lambda v: bb.tokenizer.decode(v["input_ids"])  # noqa: E731
    assert "colour of the circle" in dec(full) and "colour of the circle" in dec(inp)
    assert "colour of the circle" not in dec(traj) and "Focus on the region" in dec(traj)
    assert (inp["labels"] == IGNORE).all() and (traj["labels"] == IGNORE).all()
    # the crop is executed from the bbox: 0.16·200 × 0.15·160 px → its own grid
    _, args2, _ = make(traj_drop_i0=True)
    ex2 = encode(bb, args2, lvr_record(tmp_path), tmp_path)
    assert ex2["traj"]["image_index"] == [1]


def test_views_pixelreasoner(tmp_path):
    bb, args, _ = make()
    ex = encode(bb, args, pixelreasoner_record(tmp_path), tmp_path)
    full, traj = ex["full"], ex["traj"]
    text = bb.tokenizer.decode(full["input_ids"])
    assert "<tool_call>" not in text and "crop_image" not in text and "<tools>" not in text
    sup = supervised_text(bb, full)  # every assistant turn supervised, user turns not
    assert sup == "The circle is small. Zoom in.<|im_end|>Closer.<|im_end|>It is blue. So the answer is \\boxed{C}.<|im_end|>"
    assert len(full["image_grid_thw"]) == 3 and traj["image_index"] == [0, 1, 2]
    assert "colour of the circle" not in bb.tokenizer.decode(traj["input_ids"])
    # the missing second crop was executed on crop 1 (target_image 2): 40×60 px of the 100×100 crop
    rec = pixelreasoner_record(tmp_path)
    conv = P.convert_record(rec, str(tmp_path))
    crop2 = conv["steps"][3]["images"][0]
    assert crop2.size == (40, 40)
    ref = Image.open(tmp_path / "pr_0_1.png").convert("RGB").crop((40, 30, 80, 70))
    assert list(crop2.getdata()) == list(ref.getdata())


def test_views_thinkmorph_and_skips(tmp_path):
    bb, args, _ = make()
    ex = encode(bb, args, thinkmorph_record(), tmp_path)
    assert supervised_text(bb, ex["full"]) == ("I will mark the circle.<|im_end|>"
                                               "The marked circle is blue. The answer is (C).<|im_end|>")
    assert len(ex["full"]["image_grid_thw"]) == 2
    assert "colour of the circle" not in bb.tokenizer.decode(ex["traj"]["input_ids"])
    skips = D.Skips()
    bad = [lvr_record(tmp_path, 1, bbox=(0.5, 0.5, 1.2, 0.9)), lvr_record(tmp_path, 2, bbox=(0.5, 0.5, 0.5, 0.9)),
           {**lvr_record(tmp_path, 3), "image": ["nope.png"]}, {"foo": 1}, lvr_record(tmp_path, 4)]
    data = D.build_dataset(bad, lambda r: encode(bb, args, r, tmp_path), skips)
    assert len(data) == 1 and sum(skips.counts.values()) == 4, skips.summary()


def test_views_canonical_messages(tmp_path):
    """This project's own format: a chat with images (paths or PIL), string or part-list content, `train: False`."""
    scene().save(tmp_path / "c.png")
    crop = scene().crop((140, 90, 180, 130))
    rec = {"messages": [
        {"role": "system", "content": "You look closely."},
        {"role": "user", "content": [{"type": "image", "image": "c.png"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": "Let me look at the circle.", "train": False},
        {"role": "user", "content": [{"type": "image", "image": crop}, {"type": "text", "text": "The crop."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It is blue. (C)"}]}]}
    bb, args, _ = make()
    ex = encode(bb, args, rec, tmp_path)
    full, inp, traj = ex["full"], ex["input"], ex["traj"]
    dec = lambda v: bb.tokenizer.decode(v["input_ids"])  # noqa: E731
    assert supervised_text(bb, full) == "It is blue. (C)<|im_end|>"  # the context turn is not a target
    assert all(dec(v).startswith("<|im_start|>system\nYou look closely.<|im_end|>") for v in (full, inp, traj))
    assert len(full["image_grid_thw"]) == 2 and inp["image_index"] == [0] and traj["image_index"] == [0, 1]
    assert "colour of the circle" in dec(inp) and "colour of the circle" not in dec(traj)
    assert "Let me look at the circle." in dec(traj) and "The crop." in dec(traj) and "It is blue" not in dec(inp)
    assert dec(inp).endswith("".join(P.predictor_tokens(4)) + "<|im_end|>\n")
    # the trajectory view keeps I0 (released default), so it carries exactly the full view's image tokens
    pads = lambda v: [t for t in v["input_ids"].tolist() if t == bb.token_id("<|image_pad|>")]  # noqa: E731
    assert pads(traj) == pads(full)


@pytest.mark.parametrize("position", ["im_end", "last_predictor"])
def test_embedding_positions(tmp_path, position):
    bb, args, _ = make(embed_position=position)
    ex = encode(bb, args, pixelreasoner_record(tmp_path), tmp_path)
    im_end = bb.token_id("<|im_end|>")
    preds = [bb.token_id(t) for t in P.predictor_tokens(4)]
    ids = ex["input"]["input_ids"].tolist()
    pos = ex["input"]["emb_pos"]
    if position == "im_end":  # released: the <|im_end|> right after the predictor tokens = unpadded length − 2
        assert ids[pos] == im_end and ids[pos - 4:pos] == preds and pos == len(ids) - 2
    else:
        assert ids[pos] == preds[-1] == bb.token_id("<|predictor_1|>")
    tids = ex["traj"]["input_ids"].tolist()
    tpos = ex["traj"]["emb_pos"]  # closes the last assistant turn
    assert tids[tpos] == im_end and tpos == len(tids) - 2
    assert "boxed{C}" in bb.tokenizer.decode(tids[tpos - 8:tpos])
    assert preds == list(range(preds[0], preds[0] + 4))  # one embedding row each, descending names


# ------------------------------------------------------------------------------------------ SFT equivalence, parity
def test_lambda_zero_is_sft(tmp_path):
    bb, args, frozen = make(lora_r=0)
    exs = [encode(bb, args, lvr_record(tmp_path, i), tmp_path) for i in range(2)]
    exs.append(encode(bb, args, pixelreasoner_record(tmp_path), tmp_path))
    model = bb.model
    sft = C.next_token_loss(model(**C.model_inputs(C.pack(bb, [e["full"] for e in exs]), "cpu")).logits,
                            C.pack(bb, [e["full"] for e in exs])["labels"])
    args.lam = 0.0
    loss0, terms = P.pearl_loss(bb, model, frozen, exs, args)
    assert loss0.item() == sft.item() and set(terms) == {"loss_vlm", "loss"}
    args.lam = 0.2  # three views in one packed row: L_VLM still equals SFT (views do not attend to each other)
    loss, terms = P.pearl_loss(bb, model, frozen, exs, args)
    assert terms["loss_vlm"].item() == pytest.approx(sft.item(), abs=1e-5)
    expect = terms["loss_vlm"] + 0.2 * (terms["loss_jepa"] + terms["loss_state"] + terms["loss_token"])
    assert loss.item() == pytest.approx(expect.item(), abs=1e-6)


def test_reuse_images_seam(toy_bb_both):
    """The one place Pearl reaches into transformers: image embeddings computed once (`encode_images_once`) and fed
    back through the public `mm_encoder_outputs` keyword (`reuse_images`) must give the same hidden states as
    re-encoding the pixels. A transformers upgrade that changes this contract fails here, by name."""
    bb = toy_bb_both
    model = bb.model.eval()
    msgs = [{"role": "user", "content": [{"type": "image", "image": scene(seed=1)},
                                         {"type": "image", "image": scene(seed=2)}, {"type": "text", "text": "q"}]},
            {"role": "assistant", "content": "a"}]
    s = C.encode_chat(bb, msgs, min_pixels=16 * bb.patch_factor ** 2, max_pixels=64 * bb.patch_factor ** 2)
    inputs = C.model_inputs(C.pack(bb, [s]), "cpu")
    encoded = {}
    with torch.no_grad(), P.capture(model) as cap:
        with P.encode_images_once(model, [0, 1], encoded):
            model(**inputs)
        ref = cap["hidden"].clone()
        assert encoded["pooled"] is not None and len(encoded["pooled"]) == 2
        inputs.pop("pixel_values"), inputs.pop("image_grid_thw")
        model(**inputs, image_grid_thw=s["image_grid_thw"], mm_encoder_outputs=P.reuse_images(encoded, [0, 1]))
        torch.testing.assert_close(cap["hidden"], ref, atol=1e-5, rtol=1e-5)
        model(**inputs, image_grid_thw=s["image_grid_thw"], mm_encoder_outputs=P.reuse_images(encoded, [1, 0]))
        assert not torch.allclose(cap["hidden"], ref, atol=1e-3)  # negative control: swapped images differ


@pytest.mark.parametrize("model_name,lora", [("toy", 0), ("toy-qwen3vl", 8)])
def test_shared_encoding_equals_naive_stacked(tmp_path, model_name, lora):
    bb, args, frozen = make(model_name, lora_r=lora)
    exs = [encode(bb, args, pixelreasoner_record(tmp_path, 0), tmp_path),
           encode(bb, args, lvr_record(tmp_path, 1), tmp_path), encode(bb, args, thinkmorph_record(2), tmp_path)]
    model = bb.model.eval()  # no LoRA dropout: the two layouts must give the same numbers
    with torch.no_grad():  # make LoRA B non-zero so adapters matter
        for n, p in model.named_parameters():
            if "lora_B" in n or "trainable_tokens_delta" in n:
                p.add_(0.05 * torch.randn_like(p))
    results = []
    for naive in (False, True):
        model.zero_grad(set_to_none=True)
        loss, terms = P.pearl_loss(bb, model, frozen, exs, args, naive=naive)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((terms, grads))
    out, _ = P.forward_views(bb, model, exs, ("full", "input", "traj"))  # packed: h_R computed without autograd
    assert all(not h.requires_grad for h in out["traj"][0]) and all(h.requires_grad for h in out["input"][0])
    (t0, g0), (t1, g1) = results
    for k in t0:
        assert t0[k].item() == pytest.approx(t1[k].item(), abs=2e-5, rel=1e-4), k
    assert g0.keys() == g1.keys() and any("visual" in n for n in g0) and any("pearl_dynamics" in n for n in g0)
    if lora:
        assert any("trainable_tokens_delta" in n for n in g0)  # predictor rows learn (clean default)
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], atol=2e-5, rtol=1e-3, msg=n)


@pytest.mark.parametrize("quirks", [False, True])
def test_released_quirks_freeze_predictor_rows_and_head_base(tmp_path, quirks):
    """--released-quirks: after one optimizer step the predictor-token embedding rows and the dynamics head's base
    weights are bit-identical (only LoRA on the head learns); the clean default changes both."""
    bb, args, frozen = make(released_quirks=quirks)
    model = bb.model.train()
    ids = torch.tensor([bb.token_id(t) for t in P.predictor_tokens(4)])
    head_base = lambda: {n: p.detach().clone() for n, p in model.pearl_dynamics.named_parameters()  # noqa: E731
                         if "lora_" not in n}
    rows0, head0 = model.get_input_embeddings()(ids).detach().clone(), head_base()
    exs = [encode(bb, args, lvr_record(tmp_path, i), tmp_path) for i in range(2)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    P.pearl_loss(bb, model, frozen, exs, args)[0].backward()
    opt.step()
    rows1, head1 = model.get_input_embeddings()(ids).detach(), head_base()
    assert head0.keys() == head1.keys() and any("mlp.0" in n and "weight" in n for n in head0)
    assert any("lora_" in n for n, _ in model.pearl_dynamics.named_parameters()) == quirks
    same_head = [torch.equal(head0[n], head1[n]) for n in head0]
    if quirks:
        assert torch.equal(rows0, rows1) and all(same_head)
        assert any(p.grad is not None and p.grad.abs().sum() > 0
                   for n, p in model.pearl_dynamics.named_parameters() if "lora_B" in n)  # LoRA on the head learns
    else:
        assert not torch.equal(rows0, rows1) and not any(same_head)


# ------------------------------------------------------------------------------------------- torchrun, export
def _write_fixture_data(tmp_path):
    recs = [lvr_record(tmp_path, i) for i in range(6)]
    (tmp_path / "lvr.json").write_text(json.dumps(recs))
    (tmp_path / "pr.json").write_text(json.dumps([pixelreasoner_record(tmp_path, i) for i in range(2)]))
    return f"{tmp_path / 'lvr.json'},{tmp_path / 'pr.json'}"


def train(tmp_path, run_dir, *extra, nproc=1):
    """pearl.py as a subprocess (4 steps, 2 examples per micro-batch, no eval); returns its metrics rows."""
    run_script("pearl.py", "--data", _write_fixture_data(tmp_path), "--run-dir", run_dir, "--steps", "4",
               "--per-micro", "2", "--eval", "", "--model", "toy", *extra, nproc=nproc, timeout=240)
    return metrics(run_dir)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """The reference curve: 1 process × grad-accum 2, default LoRA (dropout on), checkpoints every 2 steps."""
    tmp = tmp_path_factory.mktemp("one")
    return tmp, train(tmp, tmp / "run", "--grad-accum", "2", "--save-every", "2", "--export", "false")


def test_two_processes_match_one_process_and_export(one_process_run):
    """2 processes (gloo, FSDP2, the dynamics head its own unit) × accum 1 == 1 process × accum 2 on the same global
    micro-batches: every logged loss term, every step. Then the export is a plain HF model that generates."""
    tmp, one = one_process_run
    two = train(tmp, tmp / "two", "--grad-accum", "1", nproc=2)
    keys = [k for k in one[0] if k.startswith("loss")]
    assert set(keys) == {"loss", "loss_vlm", "loss_jepa", "loss_nextlat", "loss_state", "loss_token"}
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-4), (a["step"], k, a[k], b[k])
    assert one[0]["loss"] != one[1]["loss"]  # different micro-batches, so a step mix-up would show
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp / "two" / "export")
    tok = AutoTokenizer.from_pretrained(tmp / "two" / "export")
    assert not any("pearl" in n or "lora" in n for n, _ in model.named_parameters())
    ids = torch.tensor([tok.encode("<|im_start|>user\nwhat colour<|im_end|>\n<|im_start|>assistant\n")])
    gen = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 3


def test_kill_and_resume_continues_the_same_curve(one_process_run):
    """Killed after step 3 (last checkpoint: step 2), resumed: steps 3-4 equal the uninterrupted run. The DCP
    checkpoint holds the LoRA adapters, the trainable predictor rows and the dynamics head."""
    from torch.distributed.checkpoint import FileSystemReader
    tmp, full = one_process_run
    common = ("--grad-accum", "2", "--save-every", "2", "--export", "false")
    train(tmp, tmp / "cut", *common, "--stop-after", "3")
    rows = train(tmp, tmp / "cut", *common, "--resume", "true")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # rows after the checkpoint re-run, not duplicated
    for r in rows:
        for k in ("loss", "loss_vlm", "loss_jepa", "loss_nextlat"):
            assert r[k] == pytest.approx(full[r["step"] - 1][k], rel=1e-5), (r["step"], k)
    keys = FileSystemReader(str(tmp / "cut" / "checkpoint-2")).read_metadata().state_dict_metadata
    for part in ("lora_A", "lora_B", "trainable_tokens_delta", "pearl_dynamics.mlp.0.weight"):
        assert any(k.startswith("model.") and part in k for k in keys), part
    assert any(k.startswith("optim.") and "pearl_dynamics" in k for k in keys)


@pytest.mark.parametrize("model_name", ["toy-qwen3vl"])
def test_export_merges_lora_exactly(tmp_path, model_name):
    """The merged plain checkpoint computes the same logits as the trained LoRA model (Qwen3-VL: tied, resized)."""
    bb, args, frozen = make(model_name)
    with torch.no_grad():
        for n, p in bb.model.named_parameters():
            if "lora_B" in n or "trainable_tokens_delta" in n:
                p.add_(0.05 * torch.randn_like(p))
    args.run_dir = str(tmp_path)
    out = P.export(bb, bb.model, args, R.Dist())
    ex = encode(bb, args, lvr_record(tmp_path), tmp_path)
    batch = C.model_inputs(C.pack(bb, [ex["input"]]), "cpu")  # contains the predictor tokens
    bb.model.eval()
    with torch.no_grad():
        ref = bb.model(**batch).logits
        plain = C.load_backbone(out).model.eval()
        got = plain(**batch).logits
    assert not any("lora" in n or "pearl" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------- the toy default
def test_toy_default_prints_scores_beside_the_start_model_and_the_sft_baseline(tmp_path):
    """`python pearl.py` (toy base, toy world) with a tiny budget: one markdown row per toy benchmark, chance and
    mean ± SE for the export beside the starting model, eval.py's summaries written; with an SFT baseline run in
    --sft-dir (λ = 0) its export is a third column."""
    sft, run = tmp_path / "sft", tmp_path / "pearl"
    run_script("pearl.py", "--steps", "1", "--lam", "0", "--eval", "", "--run-dir", sft)
    out = run_script("pearl.py", "--steps", "2", "--eval-limit", "8", "--run-dir", run, "--sft-dir", sft).stdout
    lines = [x for x in out.splitlines() if x.startswith("| ")]
    assert lines[0].startswith(f"| benchmark | chance | Pearl: {run / 'export'} | start: ")
    assert lines[0].endswith(f" | SFT: {sft / 'export'} |"), lines[0]
    assert [x.split(" | ")[0] for x in lines[1:]] == ["| vstar", "| mmvp", "| blink"], lines
    for row in lines[1:]:
        cells = row.strip("| ").split(" | ")
        assert len(cells) == 5 and float(cells[1]) > 0 and all(" ± " in c for c in cells[2:]), row
    for bench in ("vstar", "mmvp", "blink"):
        for name in ("Pearl", "start", "SFT"):
            summary = json.loads((run / "eval" / f"{bench}_{name}.json").read_text())
            assert summary["n"] > 0 and summary["settings"]["prompt"] == "answer-tag"


def test_throughput_counts_only_the_views_that_run(tmp_path, monkeypatch):
    """tokens/s and MFU count the views a step runs: with λ = 0 only the full views (no input or trajectory forward);
    with λ > 0 all three, the trajectory view forward-only. Checked against the examples pearl_loss received."""
    logged, seen = [], []
    log, loss = R.RunLogger.log, P.pearl_loss
    monkeypatch.setattr(R.RunLogger, "log", lambda self, step, m, tokens, flops=None:
                        logged.append((tokens, flops)) or log(self, step, m, tokens, flops))
    monkeypatch.setattr(P, "pearl_loss", lambda bb, model, head, examples, args, naive=False:
                        seen.append(examples) or loss(bb, model, head, examples, args, naive))
    data = _write_fixture_data(tmp_path)
    for lam, views in ((0.0, ("full",)), (0.2, ("full", "input", "traj"))):
        logged.clear()
        seen.clear()
        args = P.Args(model="toy", data=data, run_dir=str(tmp_path / f"run{lam}"), steps=1, per_micro=2, eval="",
                      export=False, lam=lam)
        bb = P.main(args, explicit={"model", "data", "run_dir", "steps", "per_micro", "eval", "export", "lam"})
        lens = {n: [len(ex[n]["input_ids"]) for exs in seen for ex in exs] for n in views}
        with_grad = [x for n in views if n != "traj" for x in lens[n]]
        flops = R.step_flops(bb.model, with_grad, weight_grads=False) + R.step_flops(bb.model, lens.get("traj", []),
                                                                                      backward=False)
        assert len(logged) == 1 and logged[0][0] == sum(map(sum, lens.values())), (lam, logged)
        assert logged[0][1] == pytest.approx(flops, rel=1e-12), lam
