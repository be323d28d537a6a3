"""Tests for lvr.py: every formula against an independent computation on the toy backbone / tiny tensors.

    python -m pytest -q tests/test_lvr.py
"""
import math
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common as C
import dataloader as D
import eval as E
import lvr
import lvr_grpo
from conftest import metrics, run_script


# ---------------------------------------------------------------------------------------------------------------
# ROI mapping
# ---------------------------------------------------------------------------------------------------------------
def roi_by_mask(bbox, h, w):
    """Paint the bbox onto the 14-px patch grid (floor low edge, ceil high edge), merge 2×2 (a token is in when any
    of its patches is), collect raster-order indices."""
    x0, y0, x1, y1 = bbox
    mask = torch.zeros(h, w, dtype=torch.bool)
    xs, xe = min(math.floor(x0 * w), w - 1), min(math.ceil(x1 * w), w)
    ys, ye = min(math.floor(y0 * h), h - 1), min(math.ceil(y1 * h), h)
    mask[ys:ye, xs:xe] = True
    merged = mask.view(h // 2, 2, w // 2, 2).any(3).any(1)
    return merged.flatten().nonzero()[:, 0].tolist()


def test_roi_worked_example():
    idx = lvr.roi_token_indices([0.382, 0.456, 0.718, 0.656], (1, 32, 32))
    assert len(idx) == 24
    assert sorted({i % 16 for i in idx}) == list(range(6, 12)) and sorted({i // 16 for i in idx}) == list(range(7, 11))
    assert idx == sorted(idx)  # raster order


def test_roi_matches_mask_on_random_boxes():
    rng = random.Random(0)
    for _ in range(2000):
        h, w = 2 * rng.randint(1, 40), 2 * rng.randint(1, 40)
        x0, x1 = sorted(rng.random() for _ in range(2))
        y0, y1 = sorted(rng.random() for _ in range(2))
        if rng.random() < 0.3:  # edge boxes touching the border
            x0, y0 = rng.choice([(0.0, y0), (x0, 0.0), (0.0, 0.0)])
            x1, y1 = rng.choice([(1.0, y1), (x1, 1.0), (1.0, 1.0)])
        if x1 <= x0 or y1 <= y0:
            continue
        assert lvr.roi_token_indices([x0, y0, x1, y1], (1, h, w)) == roi_by_mask([x0, y0, x1, y1], h, w)
    assert lvr.roi_token_indices([0, 0, 1, 1], (1, 6, 8)) == list(range(12))


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: toy backbone with the LVR tokens, tiny images
# ---------------------------------------------------------------------------------------------------------------
PIX = dict(min_pixels=4 * 784, max_pixels=16 * 784)


@pytest.fixture(scope="module")
def bb(toy_bb):
    lvr.prepare_model(toy_bb)
    toy_bb.model.eval()
    return toy_bb


def image(seed, w=84, h=112):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())


def sft_args(**kw):
    return lvr.Args(**{**dict(min_pixels=PIX["min_pixels"], max_pixels=PIX["max_pixels"], lam_lvr=1.0), **kw})


def record(seed, bbox, answer="B"):
    return {"id": str(seed), "image": [image(seed)], "bboxes": [bbox],
            "conversations": [{"from": "human", "value": "<image>\nWhat is the colour?\n(A) red\n(B) blue"},
                              {"from": "gpt", "value": f"<lvr>\n<answer> {answer} </answer>"}]}


def prompt(bb, seed, text="What is the colour?", prefix=""):
    msgs = [{"role": "user", "content": [{"type": "image", "image": image(seed, 56 + 28 * (seed % 3))},
                                         {"type": "text", "text": text}]}]
    return C.encode_chat(bb, msgs, add_generation_prompt=True, assistant_prefix=prefix, **PIX)


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: layout and teacher-forced alignment H[p-1] ↦ v_p
# ---------------------------------------------------------------------------------------------------------------
def test_layout_labels_and_skips(bb):
    args = sft_args()
    s = lvr.convert_sft(record(0, [0.1, 0.2, 0.6, 0.9]), bb, args)
    ids = s["input_ids"].tolist()
    t = {k: bb.token_id(k) for k in lvr.LVR_TOKENS}
    i = ids.index(t[lvr.LVR_START])
    T = len(s["roi"])
    assert ids[i + 1:i + 1 + T] == [t[lvr.LVR]] * T and ids[i + 1 + T:i + 3 + T] == [t[lvr.LVR_LATENT_END], t[lvr.LVR_END]]
    assert (s["labels"][s["input_ids"] == t[lvr.LVR]] == C.IGNORE).all()
    assert s["labels"][i] == t[lvr.LVR_START] and s["labels"][i + 1 + T] == t[lvr.LVR_LATENT_END]
    paper = lvr.convert_sft(record(0, [0.1, 0.2, 0.6, 0.9]), bb, sft_args(latent_end_token=False))
    assert t[lvr.LVR_LATENT_END] not in paper["input_ids"].tolist()
    capped = lvr.convert_sft(record(0, [0.0, 0.0, 1.0, 1.0]), bb, sft_args(max_roi_tokens=3))
    assert len(capped["roi"]) == 3 and (capped["input_ids"] == t[lvr.LVR]).sum() == 3
    skips = D.Skips()
    bad = [record(1, [0.5, 0.5, 0.4, 0.9]), record(2, [0.1, 0.1, 1.5, 0.9]), {"image": ["nope.png"]},
           {**record(3, [0.1, 0.1, 0.5, 0.5]), "image": ["missing.png"]}, record(4, [0.1, 0.1, 0.5, 0.5], answer="")]
    bad[-1]["conversations"][1]["value"] = "<lvr>\n<answer>  </answer>"
    assert D.build_dataset(bad, lambda r: lvr.convert_sft(r, bb, args), skips) == []
    assert sum(skips.counts.values()) == 5


def test_teacher_forcing_alignment_and_loss(bb):
    args = sft_args()
    samples = [lvr.convert_sft(record(k, bbox), bb, args)
               for k, bbox in enumerate([[0.1, 0.2, 0.6, 0.9], [0.3, 0.0, 1.0, 0.4]])]
    model = bb.model
    loss, terms = lvr.sft_loss(model, samples, bb, args, "cpu")
    terms = {k: float(v) for k, v in terms.items()}                  # detached device tensors (no sync) → floats
    # independent: per sample, image features from the tower, ROI targets by index, inputs_embeds built by hand
    lvr_id = bb.token_id(lvr.LVR)
    sq, n, ce_num, ce_den = 0.0, 0, 0.0, 0
    for s in samples:
        with torch.no_grad():
            feats = model.model.get_image_features(s["pixel_values"], s["image_grid_thw"], return_dict=True).pooler_output[0]
            v = feats[s["roi"]]
            emb = model.get_input_embeddings()(s["input_ids"])[None].clone()
            emb[0, s["input_ids"] == bb.token_id("<|image_pad|>")] = feats
            p = (s["input_ids"] == lvr_id).nonzero()[:, 0]
            emb[0, p] = v
            out = model(inputs_embeds=emb, position_ids=C.mrope_position_ids(bb, s)[:, None], output_hidden_states=True)
            H = out.hidden_states[-1][0]
        sq += ((H[p - 1].double() - v.double()) ** 2).sum().item()
        n += v.numel()
        lab = s["labels"][1:]
        keep = lab != C.IGNORE
        ce_num += F.cross_entropy(out.logits[0, :-1][keep].double(), lab[keep], reduction="sum").item()
        ce_den += int(keep.sum())
    assert terms["loss_lvr"] == pytest.approx(sq / n, rel=1e-4)
    assert terms["loss_ce"] == pytest.approx(ce_num / (ce_den - 0), rel=1e-4)
    assert loss.item() == pytest.approx(ce_num / ce_den + sq / n, rel=1e-4)


def test_padded_baseline_equals_packed(bb):
    """--no-pack (right-padded rows, ROI (row, col) per sample) gives the packed loss terms and gradients."""
    boxes = [[0.1, 0.2, 0.6, 0.9], [0.3, 0.0, 1.0, 0.4], [0.0, 0.5, 0.3, 1.0]]
    samples = [lvr.convert_sft(record(k, bbox), bb, sft_args()) for k, bbox in enumerate(boxes)]
    assert len({len(s["input_ids"]) for s in samples}) > 1          # unequal lengths: padding is exercised
    runs = []
    for pack in (True, False):
        bb.model.zero_grad(set_to_none=True)
        loss, terms = lvr.sft_loss(bb.model, samples, bb, sft_args(pack=pack, lam_lvr=1.0), "cpu")
        loss.backward()
        runs.append((loss.item(), {k: float(v) for k, v in terms.items()}, {n: p.grad.clone() for n, p in bb.model.named_parameters() if p.grad is not None}))
    bb.model.zero_grad(set_to_none=True)
    (l1, t1, g1), (l2, t2, g2) = runs
    assert l1 == pytest.approx(l2, rel=1e-5) and t1["loss_lvr"] == pytest.approx(t2["loss_lvr"], rel=1e-5)
    assert t1["loss_ce"] == pytest.approx(t2["loss_ce"], rel=1e-5)
    assert g1.keys() == g2.keys() and len(g1) > 10
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-6, msg=n)


def test_lvr_gradient_only_at_positions_before_latents(bb):
    args = sft_args(lam_lvr=1.0)
    s = lvr.convert_sft(record(5, [0.0, 0.0, 0.7, 0.7]), bb, args)
    batch = C.pack(bb, [s])
    src, dst = lvr.roi_positions(bb, [s])
    with lvr.latent_inputs(bb.model, dst, src=src) as tap:
        bb.model(**C.model_inputs(batch, "cpu"))
    H = tap["hidden"]
    H.retain_grad()
    pred = H[0, dst[:, 1] - 1]
    lvr.lvr_loss(pred, tap["targets"]).backward()
    rows = (H.grad[0].abs().sum(-1) > 0).nonzero()[:, 0]
    assert rows.tolist() == (dst[:, 1] - 1).tolist()      # the state at <|lvr_start|> predicts v_1, …
    # perturbing target i changes only term i of the per-position errors (targets are constants)
    err = ((pred - tap["targets"]) ** 2).mean(-1).detach()
    t2 = tap["targets"].clone()
    t2[1] += 1.0
    err2 = ((pred - t2) ** 2).mean(-1).detach()
    assert (err2 != err).nonzero()[:, 0].tolist() == [1]
    bb.model.zero_grad(set_to_none=True)


def test_lvr_loss_reductions():
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    slow = sum((p[i, j].item() - t[i, j].item()) ** 2 for i in range(5) for j in range(7))
    assert lvr.lvr_loss(p, t, "mse").item() == pytest.approx(slow / 35, rel=1e-6)
    assert lvr.lvr_loss(p, t, "mse_token").item() == pytest.approx(slow / 5, rel=1e-6)
    assert lvr.lvr_loss(p, t, "mae").item() == pytest.approx((p - t).abs().mean().item(), rel=1e-6)
    cos = [1 - (p[i] @ t[i] / p[i].norm() / t[i].norm()).item() for i in range(5)]
    assert lvr.lvr_loss(p, t, "cosine").item() == pytest.approx(sum(cos) / 5, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Latent decoding
# ---------------------------------------------------------------------------------------------------------------
def test_fixed_steps_feed_exactly_n(bb):
    for n in (4, 8):
        out = lvr.latent_generate(bb, [prompt(bb, 0, prefix=lvr.LVR_START)], num_latent_steps=n, max_new_tokens=3)[0]
        assert len(out["latents"]) == n and out["token_ids"][:n] == [bb.token_id(lvr.LVR)] * n
        assert bb.token_id(lvr.LVR) not in out["token_ids"][n:]
    forced = lvr.latent_generate(bb, [prompt(bb, 0, prefix=lvr.LVR_START)], num_latent_steps=4, max_new_tokens=3,
                                 force_end=True)[0]
    assert forced["token_ids"][4:6] == [bb.token_id(lvr.LVR_LATENT_END), bb.token_id(lvr.LVR_END)]


def _mixed_batch(bb):
    t = lambda s: bb.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    start = bb.token_id(lvr.LVR_START)
    samples = [prompt(bb, 0), prompt(bb, 1, "Is the circle left of the square?"), prompt(bb, 2, "How many?")]
    prefixes = [[start], t(" yes no") + [start], t(" red")]     # enter latent mode at steps 0, k, never
    return samples, prefixes


def test_cached_equals_recompute_and_batch_equals_alone(bb):
    samples, prefixes = _mixed_batch(bb)
    kw = dict(num_latent_steps=4, max_new_tokens=6)
    cached = lvr.latent_generate(bb, samples, prefix_tokens=prefixes, **kw)
    full = lvr.latent_generate(bb, samples, prefix_tokens=prefixes, use_cache=False, **kw)
    assert len(cached[0]["latents"]) == 4 and len(cached[1]["latents"]) == 4 and len(cached[2]["latents"]) == 0
    for c, f in zip(cached, full):
        assert c["token_ids"] == f["token_ids"]
        torch.testing.assert_close(c["latents"], f["latents"], atol=1e-4, rtol=1e-4)
    for b, (s, p) in enumerate(zip(samples, prefixes)):
        alone = lvr.latent_generate(bb, [s], prefix_tokens=[p], **kw)[0]
        assert alone["token_ids"] == cached[b]["token_ids"]
        torch.testing.assert_close(alone["latents"], cached[b]["latents"], atol=1e-4, rtol=1e-4)
    token = lvr.latent_generate(bb, samples, prefix_tokens=prefixes, mode="token", max_latent_steps=3, **kw)
    assert all(len(o["latents"]) <= 3 for o in token)
    # eval.py's seam (generate_latent): items in, each prompt encoded once, texts out, as one row decoded alone
    ea = E.Args(benchmark="vstar", mode="latent", prompt="answer-tag", latent_steps=4, latent_force_span=True,
                max_new_tokens=5, **PIX)
    items = [_item(0), _item(1)]
    texts = lvr.generate_latent(bb, items, ea)
    alone = [lvr.latent_generate(bb, [E.encode_item(bb, it, ea)], num_latent_steps=4, max_new_tokens=5,
                                 force_end=True)[0] for it in items]
    assert texts == [bb.tokenizer.decode(o["token_ids"], skip_special_tokens=True) for o in alone]
    assert E.encode_item(bb, items[0], ea)["input_ids"][-1] == bb.token_id(lvr.LVR_START)   # the forced span


def _item(k):
    return E.item(k, f"What colour is object {k}?", E.letters(["red", "blue"]), "A", "x",
                  [Image.new("RGB", (56, 56), (40 * k, 90, 200))])


def test_stored_latents_equal_replay_and_logprobs_match(bb):
    samples, prefixes = _mixed_batch(bb)
    gen = torch.Generator().manual_seed(0)
    outs = lvr.latent_generate(bb, samples, num_latent_steps=4, max_new_tokens=8, temperature=1.0, generator=gen,
                               prefix_tokens=prefixes)
    lvr_id = bb.token_id(lvr.LVR)
    for s, o in zip(samples, outs):   # replay the latent chain one step at a time, no cache
        comp = o["token_ids"]
        for i, j in enumerate([j for j, k in enumerate(comp) if k == lvr_id]):
            ids = torch.cat([s["input_ids"], torch.tensor(comp[:j], dtype=torch.long)])
            full = dict(s, input_ids=ids, labels=torch.full_like(ids, C.IGNORE),
                        mm_token_type_ids=torch.cat([s["mm_token_type_ids"], torch.zeros(j, dtype=torch.int32)]))
            prev = [q for q, k in enumerate(comp[:j]) if k == lvr_id]
            dst = torch.tensor([[0, len(s["input_ids"]) + q] for q in prev], dtype=torch.long).view(-1, 2)
            with torch.no_grad(), lvr.latent_inputs(bb.model, dst, values=o["latents"][:i]) as tap:
                bb.model(**C.model_inputs(C.pad_batch(bb, [full]), "cpu"))
            torch.testing.assert_close(tap["hidden"][0, -1], o["latents"][i], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        logp, mask = lvr_grpo.completion_logprobs(bb, bb.model, samples, outs, 1.0, "cpu")
    start = bb.token_id(lvr.LVR_START)
    for b, o in enumerate(outs):
        n_forced = len(prefixes[b])
        ids = torch.tensor(o["token_ids"])
        assert mask[b, :len(ids)].tolist() == ((ids != lvr_id) & (ids != start)).tolist()
        free = torch.arange(len(ids)) >= n_forced
        sel = mask[b, :len(ids)] & free
        assert sel.sum() > 0
        torch.testing.assert_close(logp[b, :len(ids)][sel], o["logprobs"][sel].float(), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Invalid tokens and latent positions (issue 10): forced by a logit bias on the toy backbone
# ---------------------------------------------------------------------------------------------------------------
class logit_bias:
    """Add `bias` {token: value} to the LM-head outputs (rollout and teacher-forced pass alike)."""

    def __init__(self, bb, bias):
        self.bb, self.bias = bb, bias

    def __enter__(self):
        v = torch.zeros(self.bb.model.lm_head.out_features)
        for k, x in self.bias.items():
            v[self.bb.token_id(k)] = x
        self.h = self.bb.model.lm_head.register_forward_hook(lambda _m, _i, out: out + v.to(out.dtype))
        return self

    def __exit__(self, *exc):
        self.h.remove()


class fed_embeddings:
    """Record the input embeddings of the first decoder layer (after latent_inputs wrote the latents), one tensor
    per forward call; .cat() joins the calls of a KV-cached decode along the sequence."""

    def __init__(self, bb):
        self.layer, self.calls = bb.model.model.language_model.layers[0], []

    def __enter__(self):
        def pre(_m, args, kwargs):
            self.calls.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
        self.h = self.layer.register_forward_pre_hook(pre, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.h.remove()

    def cat(self):
        return torch.cat(self.calls, 1)


BIAS = {lvr.LVR: 40.0, "<|image_pad|>": 40.0, "<|vision_end|>": 20.0, lvr.LVR_END: 6.0, lvr.LVR_LATENT_END: 6.0}


def slow_check_valid(bb, prompt_ids, out):
    """Independent scan: no vision token; `<|lvr|>` exactly at the recorded latent positions, each run of them
    right after `<|lvr_start|>`; `<|lvr_latent_end|>` / `<|lvr_end|>` only inside an open span."""
    ids, pos = out["token_ids"], set(out["latent_positions"].tolist())
    vision = {bb.token_id(k) for k in lvr.VISION_TOKENS}
    t = {k: bb.token_id(k) for k in lvr.LVR_TOKENS}
    assert {j for j, k in enumerate(ids) if k == t[lvr.LVR]} == pos
    is_open, seen_end = int(prompt_ids[-1]) == t[lvr.LVR_START], False
    for j, k in enumerate(ids):
        assert k not in vision, (j, k)
        if j in pos:
            assert is_open and not seen_end
        elif k == t[lvr.LVR_START]:
            assert not is_open
            is_open, seen_end = True, False
        elif k == t[lvr.LVR_LATENT_END]:
            assert is_open and not seen_end
            seen_end = True
        elif k == t[lvr.LVR_END]:
            assert is_open
            is_open = False


def test_rollout_never_samples_invalid_tokens_and_grpo_places_latents_by_position(bb):
    samples, prefixes = _mixed_batch(bb)
    samples, prefixes = samples * 2, prefixes * 2
    with logit_bias(bb, BIAS):
        # the bias would make every free token <|lvr|> or <|image_pad|> without the mask
        with torch.no_grad():
            raw = bb.model(**C.model_inputs(C.pad_batch(bb, samples[:1]), "cpu")).logits[0, -1]
        assert int(raw.argmax()) in (bb.token_id(lvr.LVR), bb.token_id("<|image_pad|>"))
        gen = torch.Generator().manual_seed(0)
        with fed_embeddings(bb) as rec:
            outs = lvr.latent_generate(bb, samples, num_latent_steps=3, max_new_tokens=10, temperature=1.0,
                                       generator=gen, prefix_tokens=prefixes)
        E, Lp = rec.cat(), rec.calls[0].shape[1]
        end_ids = {bb.token_id(lvr.LVR_END), bb.token_id(lvr.LVR_LATENT_END)}
        assert any(k in end_ids for o in outs for k in o["token_ids"])       # the span tokens do get sampled
        for b, (s, o) in enumerate(zip(samples, outs)):
            slow_check_valid(bb, s["input_ids"], o)
            assert len(o["latent_positions"]) == len(o["latents"]) == (3 if b % 3 != 2 else 0)
            for v, j in zip(o["latents"], o["latent_positions"].tolist()):        # rollout fed them there
                torch.testing.assert_close(E[b, Lp + j], v)
        # a GRPO step: latents written back at the recorded positions of the packed row, tokens elsewhere
        with fed_embeddings(bb) as rec:
            logp, mask = lvr_grpo.completion_logprobs(bb, bb.model, samples, outs, 1.0, "cpu")
        row, off = rec.calls[0][0], 0
        emb = bb.model.get_input_embeddings().weight
        for s, o in zip(samples, outs):
            n_p, comp = len(s["input_ids"]), torch.tensor(o["token_ids"])
            slot = torch.zeros(len(comp), dtype=torch.bool)
            slot[o["latent_positions"]] = True
            torch.testing.assert_close(row[off + n_p + o["latent_positions"]], o["latents"])
            torch.testing.assert_close(row[off + n_p + torch.arange(len(comp))[~slot]], emb[comp[~slot]].detach())
            off += n_p + len(comp)
        adv = torch.linspace(-1, 1, len(outs))
        loss, _ = lvr_grpo.grpo_loss(logp, logp.detach(), logp.detach(), adv, mask)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in bb.model.parameters()
                                            if p.grad is not None)
        bb.model.zero_grad(set_to_none=True)
        for b, o in enumerate(outs):                                            # same masked π as the sampler
            n = len(o["token_ids"])
            free = mask[b, :n] & (torch.arange(n) >= len(prefixes[b]))
            torch.testing.assert_close(logp[b, :n][free].detach(), o["logprobs"][free].float(), atol=1e-4, rtol=1e-4)


def test_masked_logprobs_equal_softmax_over_allowed_tokens(bb):
    """completion_logprobs against a slow loop: per position, log-softmax over the tokens valid there only."""
    samples, prefixes = _mixed_batch(bb)
    with logit_bias(bb, {lvr.LVR_END: 3.0, lvr.LVR_LATENT_END: 3.0, lvr.LVR_START: 2.0}):
        gen = torch.Generator().manual_seed(3)
        outs = lvr.latent_generate(bb, samples, num_latent_steps=2, max_new_tokens=8, temperature=0.7, generator=gen,
                                   prefix_tokens=prefixes)
        with torch.no_grad():
            logp, mask = lvr_grpo.completion_logprobs(bb, bb.model, samples, outs, 0.7, "cpu")
        t = {k: bb.token_id(k) for k in lvr.LVR_TOKENS}
        vision = [bb.token_id(k) for k in lvr.VISION_TOKENS]
        for b, (s, o) in enumerate(zip(samples, outs)):
            comp, pos = o["token_ids"], set(o["latent_positions"].tolist())
            ids = torch.cat([s["input_ids"], torch.tensor(comp)])
            ids[len(s["input_ids"]) + torch.tensor(sorted(pos), dtype=torch.long)] = t[lvr.LVR]
            full = dict(s, input_ids=ids, labels=torch.full_like(ids, C.IGNORE),
                        mm_token_type_ids=torch.cat([s["mm_token_type_ids"], torch.zeros(len(comp), dtype=torch.int32)]))
            dst = torch.tensor([[0, len(s["input_ids"]) + j] for j in sorted(pos)], dtype=torch.long).view(-1, 2)
            with torch.no_grad(), lvr.latent_inputs(bb.model, dst, values=o["latents"]):
                lg = bb.model(**C.model_inputs(C.pad_batch(bb, [full]), "cpu")).logits[0].double()
            is_open, seen = int(s["input_ids"][-1]) == t[lvr.LVR_START], False
            for j, k in enumerate(comp):
                banned = set(vision) | {t[lvr.LVR]}
                banned |= {t[lvr.LVR_START]} if is_open else {t[lvr.LVR_END], t[lvr.LVR_LATENT_END]}
                banned |= {t[lvr.LVR_LATENT_END]} if seen else set()
                if j not in pos:
                    allowed = [v for v in range(lg.shape[-1]) if v not in banned]
                    z = lg[len(s["input_ids"]) + j - 1, allowed] / 0.7
                    want = z[allowed.index(k)] - torch.logsumexp(z, 0)
                    assert mask[b, j]  == (k != t[lvr.LVR_START])
                    assert logp[b, j].item() == pytest.approx(want.item(), abs=1e-4)
                    is_open, seen = ((True, False) if k == t[lvr.LVR_START] else (is_open, True)
                                     if k == t[lvr.LVR_LATENT_END] else (False, seen) if k == t[lvr.LVR_END]
                                     else (is_open, seen))
                else:
                    assert not mask[b, j]
        assert any(t[lvr.LVR_END] in o["token_ids"] for o in outs)


def test_positions_not_ids_decide_negative_control(bb):
    """The pre-fix rule (latents at the `<|lvr|>` ids) crashes on a stray id and silently drops/misplaces latents
    when the ids and the slots disagree; completion_logprobs follows the recorded positions or refuses loudly."""
    samples, prefixes = _mixed_batch(bb)
    outs = lvr.latent_generate(bb, samples, num_latent_steps=3, max_new_tokens=6, prefix_tokens=prefixes)
    o, s, lvr_id = outs[0], samples[0], bb.token_id(lvr.LVR)
    with torch.no_grad():
        base = lvr_grpo.completion_logprobs(bb, bb.model, [s], [o], 1.0, "cpu")[0][0]
    old_rule = lambda ids: (torch.tensor(ids) == lvr_id).nonzero()[:, 0]       # noqa: E731
    # (1) a stray <|lvr|> id after the span: the old rule finds 4 slots for 3 latents → shape crash
    j = max(o["latent_positions"].tolist()) + 1
    stray = dict(o, token_ids=o["token_ids"][:j] + [lvr_id] + o["token_ids"][j + 1:])
    e = torch.zeros(1, len(s["input_ids"]) + len(stray["token_ids"]), o["latents"].shape[1])
    with pytest.raises(RuntimeError):
        e.index_put((torch.zeros_like(old_rule(stray["token_ids"])), old_rule(stray["token_ids"])), o["latents"])
    with pytest.raises(ValueError, match=rf"index {j} is invalid"):
        lvr_grpo.completion_logprobs(bb, bb.model, [s], [stray], 1.0, "cpu")
    stray_pad = dict(o, token_ids=o["token_ids"][:j] + [bb.token_id("<|image_pad|>")] + o["token_ids"][j + 1:])
    with pytest.raises(ValueError, match="image_pad"):                      # not "tokens: 579, features: 576"
        lvr_grpo.completion_logprobs(bb, bb.model, [s], [stray_pad], 1.0, "cpu")
    # (2) the slots carry other ids: the old rule finds no slot (latents dropped); positions give the same log-probs
    other = bb.tokenizer.encode(" a", add_special_tokens=False)[0]
    relabel = dict(o, token_ids=[other if q in set(o["latent_positions"].tolist()) else k
                                 for q, k in enumerate(o["token_ids"])])
    assert len(old_rule(relabel["token_ids"])) == 0 < len(o["latents"])
    with torch.no_grad(), fed_embeddings(bb) as rec:
        same = lvr_grpo.completion_logprobs(bb, bb.model, [s], [relabel], 1.0, "cpu")[0][0]
    torch.testing.assert_close(rec.calls[0][0, len(s["input_ids"]) + o["latent_positions"]], o["latents"])
    torch.testing.assert_close(same, base)


# ---------------------------------------------------------------------------------------------------------------
# Test-time latent ablations: only the latent inputs change
# ---------------------------------------------------------------------------------------------------------------
def _forced_run(bb, ablate, N=3, seed=0):
    """3 items whose prompts end in `<|lvr_start|>`, then N latent steps, then the same forced text: the token
    sequence is fixed (teacher forcing), so only what is fed in the latent slots may differ between ablations."""
    samples = [prompt(bb, k, prefix=lvr.LVR_START) for k in range(3)]
    text = [bb.tokenizer.encode(x, add_special_tokens=False)[:3] for x in (" the red one", " it is blue", " no no no")]
    with fed_embeddings(bb) as rec:
        outs = lvr.latent_generate(bb, samples, num_latent_steps=N, max_new_tokens=3, prefix_tokens=text,
                                   ablate=ablate, ablate_seed=seed)
    return outs, rec.calls


@pytest.mark.parametrize("ablate", ["zeros", "noise", "shuffle"])
def test_latent_ablations_change_only_the_latent_inputs(bb, ablate):
    N = 3
    intact, calls0 = _forced_run(bb, "none", N)
    abl, calls = _forced_run(bb, ablate, N)
    calls = calls[-len(calls0):]                   # shuffle runs an intact first pass (recorded first): skip it
    E0, E = torch.cat(calls0, 1), torch.cat(calls, 1)
    Lp = calls0[0].shape[1]
    for o0, o in zip(intact, abl):
        assert o["token_ids"] == o0["token_ids"] and o["latent_positions"].tolist() == list(range(N))
    slots = torch.zeros(E.shape[1], dtype=torch.bool)
    slots[Lp + torch.arange(N)] = True
    assert torch.equal(E[:, ~slots], E0[:, ~slots])                       # everything else bit-identical
    assert not torch.allclose(E[:, slots], E0[:, slots])
    perm = lvr.derangement(3, 0)
    assert sorted(perm) == [0, 1, 2] and all(perm[b] != b for b in range(3))
    for b, o in enumerate(abl):
        fed = E[b, Lp:Lp + N]
        torch.testing.assert_close(fed, o["latents"])                      # "latents" = what was fed
        if ablate == "zeros":
            assert (fed == 0).all()
        elif ablate == "noise":                                            # norm of the latent it replaces
            torch.testing.assert_close(fed.norm(dim=-1), o["states"].norm(dim=-1), rtol=1e-5, atol=1e-5)
            assert (F.cosine_similarity(fed, o["states"], dim=-1).abs() < 0.5).all()
        else:                                                              # another item's intact latents
            torch.testing.assert_close(fed, intact[perm[b]]["latents"])
    # the intact run's first latent equals the ablated run's own first state (same context before the slots)
    torch.testing.assert_close(abl[0]["states"][0], intact[0]["latents"][0], atol=1e-5, rtol=1e-5)


def test_latent_ablation_remove_and_fallbacks(bb):
    t = {k: bb.token_id(k) for k in lvr.LVR_TOKENS}
    out = lvr.latent_generate(bb, [prompt(bb, 0, prefix=lvr.LVR_START)], num_latent_steps=4, max_new_tokens=4,
                              ablate="remove")[0]
    assert out["token_ids"][:2] == [t[lvr.LVR_LATENT_END], t[lvr.LVR_END]] and len(out["latents"]) == 0
    assert t[lvr.LVR] not in out["token_ids"]
    sampled = lvr.latent_generate(bb, [prompt(bb, 1)], num_latent_steps=4, max_new_tokens=5, ablate="remove",
                                  prefix_tokens=[[t[lvr.LVR_START]]])[0]             # a span opened mid-completion
    assert sampled["token_ids"][:3] == [t[lvr.LVR_START], t[lvr.LVR_LATENT_END], t[lvr.LVR_END]]
    with pytest.warns(UserWarning, match="falls? back|falling back"):
        one = lvr.latent_generate(bb, [prompt(bb, 0, prefix=lvr.LVR_START)], num_latent_steps=2, max_new_tokens=2,
                                  ablate="shuffle")[0]
    torch.testing.assert_close(one["latents"].norm(dim=-1), one["states"].norm(dim=-1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown ablation"):
        lvr.latent_generate(bb, [prompt(bb, 0)], ablate="mean")
    # eval.py's seam accepts it too
    ea = E.Args(benchmark="vstar", mode="latent", prompt="answer-tag", latent_steps=2, latent_ablation="shuffle",
                latent_force_span=True, max_new_tokens=3, **PIX)
    texts = lvr.generate_latent(bb, [_item(0), _item(1)], ea)
    assert len(texts) == 2 and all(isinstance(x, str) for x in texts)


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: rewards, advantages, GRPO loss
# ---------------------------------------------------------------------------------------------------------------
SPAN = "<|lvr_start|><|lvr|><|lvr|><|lvr_latent_end|><|lvr_end|>"


@pytest.mark.parametrize("text,truth,acc,fmt,fmt_released", [
    (SPAN + "\n<answer> B </answer>", "B", 1, 1, 1),
    (SPAN + "\n<answer> (b) </answer>", "B", 1, 1, 1),
    (SPAN + "\n<answer>\nB\n</answer>", "B", 1, 1, 0),          # multi-line answer: released regex fails
    (SPAN + "\n<answer> C </answer>", "B", 0, 1, 1),
    (SPAN + "\nB", "B", 0, 0, 0),                                # missing answer tags
    ("<answer> B </answer>", "B", 1, 0, 0),                      # skipped the latent span
    (SPAN + "\n<answer> B </answer> because it is blue", "B", 1, 0, 0),   # extra text after the answer
    (SPAN + "\n<answer> B", "B", 0, 0, 0),                        # unterminated
    (SPAN + "<answer> blue car </answer>", "Blue  car", 1, 1, 1),
])
def test_rewards(text, truth, acc, fmt, fmt_released):
    assert lvr_grpo.accuracy_reward(text, truth) == acc
    assert lvr_grpo.format_reward(text) == fmt
    assert lvr_grpo.format_reward(text, dotall=False) == fmt_released


def test_group_advantages():
    r = torch.tensor([2.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = lvr_grpo.group_advantages(r, 4)
    g = [2.0, 1.0, 0.0, 1.0]
    mean = sum(g) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in g) / 3)
    assert adv[:4].tolist() == pytest.approx([(x - mean) / (std + 1e-4) for x in g])
    assert adv[4:].tolist() == [0.0] * 4


@pytest.mark.parametrize("loss_type", ["bnpo", "grpo", "dr_grpo"])
def test_grpo_loss_against_slow_loop(loss_type):
    g = torch.Generator().manual_seed(1)
    B, T, eps, beta = 4, 6, 0.2, 0.04
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    old = logp + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 0.8   # ρ both sides of the clip
    ref = logp + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5)
    adv = torch.tensor([1.5, -0.7, 0.0, -2.0], dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[2] = False
    mask[2, 0] = True
    loss, stats = lvr_grpo.grpo_loss(logp, old, ref, adv, mask, eps, beta, loss_type, max_len=10)
    per_seq, tot, cnt = [], 0.0, 0
    for i in range(B):
        s, c = 0.0, 0
        for t in range(T):
            if not mask[i, t]:
                continue
            rho = math.exp(logp[i, t] - old[i, t])
            surr = min(rho * adv[i].item(), min(max(rho, 1 - eps), 1 + eps) * adv[i].item())
            d = (ref[i, t] - logp[i, t]).item()
            s += -surr + beta * (math.exp(d) - d - 1)
            c += 1
        per_seq.append(s / c)
        tot, cnt = tot + s, cnt + c
    want = {"bnpo": tot / cnt, "grpo": sum(per_seq) / B, "dr_grpo": tot / (B * 10)}[loss_type]
    assert loss.item() == pytest.approx(want, rel=1e-10)
    # ρ ≡ 1 and ref = logp: the gradient is −A per token (normalised), KL 0
    lp = logp.clone().requires_grad_(True)
    l1, s1 = lvr_grpo.grpo_loss(lp, lp.detach(), lp.detach(), adv, mask, eps, beta, "bnpo")
    l1.backward()
    assert s1["kl"] == 0.0
    torch.testing.assert_close(lp.grad, -(adv[:, None] * mask) / mask.sum())


# ---------------------------------------------------------------------------------------------------------------
# Training runs as subprocesses (tiny): 2 processes (torchrun, FSDP2, gloo) vs 1 process, kill-and-resume
# ---------------------------------------------------------------------------------------------------------------
def train(run_dir, data, *extra, procs=1):
    """Run lvr.py, or lvr_grpo.py when `extra` starts with GRPO (toy, no eval, 1 sample or prompt per micro-batch)
    with `procs` processes; return its metrics.jsonl rows."""
    script, records = ("lvr_grpo.py", "lvr_grpo.json") if extra[:1] == ("grpo",) else ("lvr.py", "lvr_train.json")
    extra = extra[1:] if script == "lvr_grpo.py" else extra
    extra = extra if "--model" in extra else ("--model", "toy", *extra)     # the random toy: fast, no base needed
    run_script(script, "--data", data / records, "--eval", "false", "--per-micro", 1, "--run-dir", run_dir, *extra,
               nproc=procs, timeout=300)
    return metrics(run_dir)


SFT = ("--steps", 4, "--save-every", 2)
# The toy policy earns no reward (advantages 0, step-1 loss 0), so lr 1 with weight decay 0.3 shrinks the policy
# away from the frozen reference in step 1: step 2 then has a non-zero k3 KL, loss and gradient to compare.
GRPO = ("grpo", "--steps", 2, "--num-generations", 2, "--max-new-tokens", 6, "--lr", 1, "--weight-decay", 0.3)
SFT_KEYS, GRPO_KEYS = ("loss", "loss_ce", "loss_lvr"), ("loss", "kl", "grad_norm", "reward", "completion_len")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, toy_world):
    """The uninterrupted reference: 1 process, 2 micro-batches accumulated per step."""
    run = tmp_path_factory.mktemp("one")
    return run, train(run, toy_world, *SFT, "--grad-accum", 2)


def assert_same(rows, ref, keys, rel):
    ref = {r["step"]: r for r in ref}
    for r in rows:
        for k in keys:
            assert r[k] == pytest.approx(ref[r["step"]][k], rel=rel, abs=1e-7), (r["step"], k, r[k], ref[r["step"]][k])


def test_two_processes_match_one_process_both_stages(one_process, tmp_path, toy_world):
    one_dir, one = one_process
    two = train(tmp_path / "two", toy_world, *SFT, "--grad-accum", 1, "--stop-after", 3, procs=2)
    assert [r["step"] for r in two] == [1, 2, 3] and all(r["loss_lvr"] > 0 for r in two)
    assert len({round(r["loss"], 6) for r in one}) == 4            # the curve moves: a wrong batch would show
    assert_same(two, one, SFT_KEYS, 1e-4)
    assert (tmp_path / "two" / "export" / "model.safetensors").exists()    # export gathers FSDP shards
    model = ("--model", one_dir / "export")                            # stage 2 from the same stage-1 export
    g1 = train(tmp_path / "g1", toy_world, *GRPO, *model, "--grad-accum", 2)
    g2 = train(tmp_path / "g2", toy_world, *GRPO, *model, "--grad-accum", 1, procs=2)
    assert len(g1) == len(g2) == 2 and g1[1]["kl"] > 1e-4 and g1[1]["grad_norm"] > 1e-4
    assert_same(g2, g1, GRPO_KEYS, 1e-4)


def test_kill_and_resume_continues_the_same_curve(one_process, tmp_path, toy_world):
    cut = tmp_path / "cut"
    train(cut, toy_world, *SFT, "--grad-accum", 2, "--stop-after", 3)  # "killed" after step 3; last checkpoint: 2
    rows = train(cut, toy_world, *SFT, "--grad-accum", 2, "--resume", "true")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # rows after the checkpoint re-run, not duplicated
    assert_same(rows, one_process[1], SFT_KEYS, 1e-5)
