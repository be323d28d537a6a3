"""Tests for unsilence.py: each formula against an independent computation (slow loop, float64, hand example, the
model's own full forward / generate) on the toy backbone or tiny tensors.

    python -m pytest -q tests/test_unsilence.py
"""
import json
import math

import pytest
import torch
from PIL import Image

import eval as E
import runtime as R
import lvr
import unsilence as U
from helpers import full_forward


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: toy backbone (LVR tokens registered), one toy item, a slots prompt
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bb(toy_bb):
    """conftest's toy backbone (a fresh copy per module) with the LVR tokens registered, frozen."""
    lvr.prepare_model(toy_bb)
    toy_bb.model.eval().requires_grad_(False)
    return toy_bb


def image(seed, w=112, h=84):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())


def toy_item(seed=0, question="what is the colour of the small circle"):
    return E.item(seed, question, {"A": "red", "B": "blue", "C": "green", "D": "yellow"}, "B", "toy", [image(seed)])


def make_args(**kw):
    base = dict(model="toy", min_pixels=16 * 784, max_pixels=64 * 784, max_new_tokens=6, stage1_steps=3,
                stage2_steps=4)
    return U.resolve(U.Args(**{**base, **kw}))


def slots_prompt(bb, args, seed=0):
    sample, q = U.slots_sample(bb, toy_item(seed), args)
    s, e = U.slot_range(sample, bb.token_id(U.SLOT_TOKEN), args.num_slots)
    return sample, U.make_prompt(bb, sample, s, e, q)


# ---------------------------------------------------------------------------------------------------------------
# Args: the released defaults; the toy preset fills only the fields not given
# ---------------------------------------------------------------------------------------------------------------
def test_toy_preset_fills_only_fields_not_given():
    released = U.resolve(U.Args(model="Qwen/Qwen2.5-VL-7B-Instruct"))
    assert (released.modes, released.limit, released.max_new_tokens) == ("slots", 0, 2048)
    assert (released.min_pixels, released.max_pixels) == (128 * 784, 256 * 784)
    args, given = R.parse_args(U.Args, ["--model", "toy", "--limit", "0", "--max-new-tokens", "2048"])
    U.resolve(args, given)
    assert (args.modes, args.limit, args.max_new_tokens) == ("slots,latent", 0, 2048)
    assert (args.min_pixels, args.max_pixels) == (16 * 784, 64 * 784)
    assert U.resolve(U.Args(model="toy", last=True, ablation="no_progression")).selection == "last"
    assert U.resolve(U.Args(model="toy", ablation="no_progression")).lam_progression == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Prompt layout
# ---------------------------------------------------------------------------------------------------------------
def test_released_prompt_layout(bb):
    args = make_args()
    sample, prompt = slots_prompt(bb, args)
    ids = sample["input_ids"].tolist()
    n = len(ids)
    tail = bb.tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert (prompt.slot_start, prompt.slot_end) == (n - len(tail) - 4, n - len(tail))   # released [L−K−2, L−2)
    assert ids[prompt.slot_start:prompt.slot_end] == [bb.token_id("<|endoftext|>")] * 4
    text = bb.tokenizer.decode(ids)
    assert "Question: what is the colour" in text and "PROBLEM: what is the colour" in text
    assert "reasoning stepsAfter these tokens" in text and "<think>" in text      # released separators kept
    span = bb.tokenizer.decode(ids[prompt.question_positions[0]:prompt.question_positions[-1] + 1])
    assert span.startswith("PROBLEM: what is") and span.endswith("yellow\n\n")
    buggy = U.slots_sample(bb, toy_item(), make_args(prompt_list_bug=True))[0]["input_ids"]
    assert "['what is" in bb.tokenizer.decode(buggy)
    assert ids[prompt.image_positions[0] - 1] == bb.token_id("<|vision_start|>")
    assert ids[prompt.image_positions[-1] + 1] == bb.token_id("<|vision_end|>")


# ---------------------------------------------------------------------------------------------------------------
# Frozen backbone; relevance once; the cached prefix
# ---------------------------------------------------------------------------------------------------------------
def test_backbone_and_its_grads_untouched_only_H_changes(bb):
    args = make_args()
    _, prompt = slots_prompt(bb, args)
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    embeds = prompt.embeds.clone()
    bb.model.requires_grad_(True)                      # even with grads enabled on the backbone, only H is stepped
    try:
        prefix = U.prefill(bb, prompt)
        H0 = prompt.embeds[prompt.slot_start:prompt.slot_end].clone()
        H, trace = U.optimise_latents(bb, prompt, prefix, H0, make_args(selection="last"),
                                      torch.Generator().manual_seed(0))
    finally:
        bb.model.requires_grad_(False)
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in bb.model.parameters())
    assert torch.equal(prompt.embeds, embeds)
    assert (H - H0).abs().max() > 0 and trace["delta_h_norm"] == pytest.approx(float((H - H0).norm()))


def test_relevance_once_equals_recomputing_each_step(bb):
    args = make_args()
    sample, prompt = slots_prompt(bb, args)
    once = U.prefill(bb, prompt).relevance
    g = torch.Generator().manual_seed(1)
    K, D = prompt.slot_end - prompt.slot_start, prompt.embeds.shape[1]
    with U.attention_implementation(bb.model, "eager"), torch.no_grad():
        for step in range(3):                          # the released procedure: a full eager forward per step
            H = torch.randn(K, D, generator=g) * 25 * 0.95 ** step
            att = full_forward(bb, sample, prompt, H, output_attentions=True).attentions
            per_layer_head = torch.cat([x[0] for x in att]).double()          # [layers·heads, L, L]
            rows = per_layer_head[:, prompt.question_positions][:, :, prompt.image_positions]
            torch.testing.assert_close(once.double(), rows.mean(0).mean(0), atol=1e-6, rtol=1e-5)


def test_stage2_cached_prefix_equals_full_forward_and_answer_equals_generate(bb):
    args = make_args()
    sample, prompt = slots_prompt(bb, args)
    prefix = U.prefill(bb, prompt)
    H = torch.randn(4, prompt.embeds.shape[1], generator=torch.Generator().manual_seed(2)) * 19.3
    with torch.no_grad():
        hidden, logits = U.forward_slots(bb, prompt, prefix, H)
        full = full_forward(bb, sample, prompt, H, output_hidden_states=True)
    s, e = prompt.slot_start, prompt.slot_end
    torch.testing.assert_close(logits, full.logits[0, s:e].float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hidden, full.hidden_states[-1][0, s:e], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(prefix.image_hidden, full.hidden_states[-1][0, prompt.image_positions], atol=1e-4,
                               rtol=1e-4)
    # the answer with the initial slots = model.generate on the plain prompt (greedy, no hook)
    H0 = prompt.embeds[s:e]
    ours = U.greedy_answer(bb, prompt, prefix, H0, 8, stop_at_eos=False)
    # attention_mask must be explicit: generate would infer it from pad_token_id = <|endoftext|> = the slot token
    n = len(sample["input_ids"])
    gen = bb.model.generate(input_ids=sample["input_ids"][None], attention_mask=torch.ones(1, n),
                            pixel_values=sample["pixel_values"], image_grid_thw=sample["image_grid_thw"],
                            mm_token_type_ids=sample["mm_token_type_ids"][None], max_new_tokens=8, min_new_tokens=8,
                            do_sample=False)
    assert ours == gen[0, n:].tolist()


# ---------------------------------------------------------------------------------------------------------------
# Stage I: pairs and InfoNCE
# ---------------------------------------------------------------------------------------------------------------
def test_pair_selection_on_a_constructed_relevance_vector():
    rel = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.05, 0.7, 0.2, 0.6, 0.0, 0.4])
    pos, neg = U.select_pairs(rel, num_slots=2, pos_k=2, neg_k=3)
    assert pos == [[1, 3], [5, 7]]                  # top 4 = {1, 3, 5, 7}, sorted by position, sliced per slot
    assert neg == [[8, 4, 0], [8, 4, 0]]            # least relevant first
    pos, neg = U.select_pairs(torch.tensor([0.5, 0.1, 0.3]), num_slots=2, pos_k=2, neg_k=2)
    assert pos == [[0, 1], [2]] and neg == [[2], [1, 0]]  # too few tokens: the last chunk is short; a slot's own
    pos, neg = U.select_pairs(torch.tensor([0.5, 0.1]), num_slots=2, pos_k=1, neg_k=1)   # positives never negatives
    assert pos == [[0], [1]] and neg == [[1], [0]]
    pos, neg = U.select_pairs(torch.tensor([0.5, 0.1]), num_slots=3, pos_k=1, neg_k=1)
    assert pos == [[0], [1], []] and neg == [[1], [0], []]                             # no chunk left: slot skipped
    pos, _ = U.select_pairs(torch.tensor([0.2, 0.9, 0.1, 0.8, 0.7, 0.6]), num_slots=2, pos_k=2, neg_k=1)
    assert pos == [[1, 3], [4, 5]]                  # index slicing, not rank slicing ([1, 3], [4, 5] by rank too)
    pos, _ = U.select_pairs(torch.tensor([0.6, 0.9, 0.1, 0.8, 0.7, 0.2]), num_slots=2, pos_k=2, neg_k=1)
    assert pos == [[0, 1], [3, 4]]                  # rank slicing would give [1, 3], [4, 0]


def test_infonce_against_a_slow_loop():
    g = torch.Generator().manual_seed(3)
    z, v = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(10, 8, generator=g, dtype=torch.float64)
    pos, neg = [[0, 1, 2], [3], []], [[7, 8], [9, 0, 1], [2]]
    tau = 0.2

    def cos(a, b):
        dot = sum(float(x) * float(y) for x, y in zip(a, b))
        return dot / math.sqrt(sum(float(x) ** 2 for x in a)) / math.sqrt(sum(float(y) ** 2 for y in b))

    terms = []
    for i in range(2):                                 # slot 2 has no positives: skipped
        num = sum(math.exp(cos(z[i], v[p]) / tau) for p in pos[i])
        den = num + sum(math.exp(cos(z[i], v[n]) / tau) for n in neg[i])
        terms.append(-math.log(num / den))
    assert float(U.infonce_loss(z, v, pos, neg, tau)) == pytest.approx(sum(terms) / len(terms), rel=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# Stage II: rewards, σ schedule, update, best step
# ---------------------------------------------------------------------------------------------------------------
def distributions():
    V = 12
    uniform = [1 / V] * V
    peaked = [0.6] + [0.4 / (V - 1)] * (V - 1)
    six = [0.16] * 6 + [0.04 / 6] * 6
    return [uniform, peaked, six]


def test_confidence_reward_by_hand():
    ps = distributions()
    logits = torch.log(torch.tensor(ps, dtype=torch.float64))
    c = [-sum(math.log(x + 1e-10) for x in sorted(p, reverse=True)[:10]) / 10 for p in ps]
    prog = (math.log((c[1] + 1e-8) / (c[0] + 1e-8)) + math.log((c[2] + 1e-8) / (c[1] + 1e-8))) / 2
    assert U.confidence_reward(logits, 10, 0.05) == pytest.approx(sum(c) / 3 + 0.05 * prog, rel=1e-6)
    assert U.confidence_reward(logits, 10, 0.0) == pytest.approx(sum(c) / 3, rel=1e-6)
    assert c[0] == pytest.approx(math.log(12))


def test_entropy_reward_by_hand():
    ps = distributions()
    logits = torch.log(torch.tensor(ps, dtype=torch.float64))
    h = [-sum(x * math.log(x) for x in p) for p in ps]
    expected = (max(0.0, h[0] - h[1]) + max(0.0, h[1] - h[2])) / 2
    assert h[1] < h[0] and h[2] > h[1]                 # one hinge active, one clipped to 0
    assert U.entropy_reward(logits) == pytest.approx(expected, rel=1e-6)


def test_sigma_schedule_and_nes_update_across_both_stages(bb):
    args = make_args(stage1_steps=2, stage2_steps=3, lam_align=0.0, lr=1.0, selection="last")  # Stage I: σ decays only
    _, prompt = slots_prompt(bb, args)
    prefix = U.prefill(bb, prompt)
    H0 = prompt.embeds[prompt.slot_start:prompt.slot_end].clone()
    H, trace = U.optimise_latents(bb, prompt, prefix, H0, args, torch.Generator().manual_seed(5))
    sig = [25 * 0.95 ** t for t in range(5)]
    assert trace["sigmas"] == pytest.approx(sig)
    assert U.sigma_schedule(make_args())[5] == pytest.approx(19.345, abs=1e-3)
    g, expected = torch.Generator().manual_seed(5), H0.double().clone()
    for t, reward in zip(range(2, 5), trace["rewards"][2:]):      # H ← H + η·R·ε/σ², σ = σ0·0.95^(2 + j) here
        eps = torch.randn(H0.shape, generator=g) * sig[t]
        expected += 1.0 * reward * eps.double() / sig[t] ** 2
    torch.testing.assert_close(H.double(), expected, atol=1e-5, rtol=1e-5)
    assert trace["rewards"][:2] == [0.0, 0.0]


def test_best_step_bookkeeping_and_the_stage1_trap(bb):
    init = torch.zeros(2)
    best = U.BestStep(init)
    for step, r in enumerate([-0.5, -0.4, -0.3]):       # Stage I logs −L ≤ 0: never beats 0.0
        best.update(step, r, torch.full((2,), float(step)))
    assert best.step == -1 and torch.equal(best.state, init)
    for step, r in [(3, 2.0), (4, 3.0), (5, 3.0), (6, 1.0)]:   # strict >: the first of two equal rewards stays
        best.update(step, r, torch.full((2,), float(step)))
    assert best.step == 4 and torch.equal(best.state, torch.full((2,), 4.0))
    last = U.BestStep(init, "last")
    for step, r in enumerate([-1.0, 5.0, 0.5]):
        last.update(step, r, torch.full((2,), float(step)))
    assert last.step == 2
    # in the loop: "Stage I only" returns the Stage-I result; --stage1-trap the initial latent (released rule)
    args = make_args(ablation="stage1_only", stage1_steps=3)
    assert args.stage2_steps == 0 and args.selection == "last"
    _, prompt = slots_prompt(bb, args)
    prefix = U.prefill(bb, prompt)
    H0 = prompt.embeds[prompt.slot_start:prompt.slot_end].clone()
    H, trace = U.optimise_latents(bb, prompt, prefix, H0, args, torch.Generator())
    assert trace["chosen_step"] == 2 and (H - H0).abs().max() > 0 and all(r < 0 for r in trace["rewards"])
    trap = make_args(ablation="stage1_only", stage1_steps=3, stage1_trap=True)
    H, trace = U.optimise_latents(bb, prompt, prefix, H0, trap, torch.Generator())
    assert trace["chosen_step"] == -1 and torch.equal(H, H0)
    # centre vs candidate at the chosen step: one Stage-II step, every reward accepted
    one = dict(stage1_steps=0, stage2_steps=1, best_init=-1e9)
    Hc, dc = U.optimise_latents(bb, prompt, prefix, H0, make_args(**one), torch.Generator().manual_seed(7))
    Hk, _ = U.optimise_latents(bb, prompt, prefix, H0, make_args(store="candidate", **one),
                               torch.Generator().manual_seed(7))
    eps = torch.randn(H0.shape, generator=torch.Generator().manual_seed(7)) * 25
    torch.testing.assert_close(Hk, H0 + eps)
    torch.testing.assert_close(Hc, H0 + 1e-3 * dc["rewards"][0] * eps / 25 ** 2)


# ---------------------------------------------------------------------------------------------------------------
# Diagnosis metrics and ablations
# ---------------------------------------------------------------------------------------------------------------
def test_diagnosis_metrics_on_constructed_attention():
    L = 6
    layer0 = torch.zeros(1, 2, L, L)
    layer0[0, 0, 4] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0, 0.0])   # head 0, row 4: image 0.5, latent 0.4
    layer0[0, 1, 4] = torch.tensor([0.5, 0.0, 0.0, 0.5, 0.0, 0.0])   # head 1, row 4: image 0.0, latent 0.5
    layer0[0, :, 5] = torch.tensor([0.0, 0.1, 0.1, 0.1, 0.2, 0.5])   # both heads, row 5: image 0.2, latent 0.1
    layer1 = torch.zeros(1, 2, L, L)
    layer1[0, :, 4:, 3] = 1.0                                        # all on the latent
    shares = U.attention_shares([layer0, layer1], [4, 5], [1, 2], [3])
    torch.testing.assert_close(shares, torch.tensor([[(0.5 + 0.0 + 0.2 + 0.2) / 4, (0.4 + 0.5 + 0.1 + 0.1) / 4],
                                                     [0.0, 1.0]]))
    # relevance: mean over layers, heads and question rows of attention to the image columns
    att = [torch.rand(1, 3, L, L, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    slow = [sum(float(att[l][0, h, q, j]) for l in range(2) for h in range(3) for q in (3, 4)) / 12 for j in (0, 1, 2)]
    torch.testing.assert_close(U.question_relevance(att, [3, 4], torch.tensor([0, 1, 2])), torch.tensor(slow))


def test_ablations_change_only_the_latent_inputs():
    g = torch.Generator().manual_seed(0)
    D, K = 6, 3
    prompts = []
    for i in range(3):                                  # latent mode: no suffix; one slots prompt with a suffix
        L = 8 + i
        prompts.append(U.LatentPrompt(torch.zeros(L, dtype=torch.long), torch.randn(L, D, generator=g),
                                      torch.arange(L).expand(3, -1), L - K, L, torch.arange(1, 3), [0]))
    latents = [torch.randn(K, D, generator=g) * (i + 1) for i in range(3)]
    intact = [U.answer_inputs(p, h) for p, h in zip(prompts, latents)]
    for kind in ("zeros", "noise", "shuffle", "remove"):
        fed = U.ablate(latents, kind, torch.Generator().manual_seed(1))
        for i, (p, h) in enumerate(zip(prompts, fed)):
            emb, pos = U.answer_inputs(p, h)
            s = p.slot_start
            assert torch.equal(emb[:s], intact[i][0][:s]) and torch.equal(pos[:, :s], intact[i][1][:, :s])
            if kind == "remove":
                assert len(emb) == s and pos.shape[1] == s
                continue
            torch.testing.assert_close(pos, intact[i][1], atol=0, rtol=0)
            if kind == "zeros":
                assert emb[s:].abs().sum() == 0
            elif kind == "noise":
                torch.testing.assert_close(emb[s:].norm(dim=-1), latents[i].norm(dim=-1))
                assert not torch.allclose(emb[s:], latents[i])
            else:
                assert torch.equal(emb[s:], latents[(i + 1) % 3])
    # a removed span before a suffix shifts the suffix positions down by K
    p = U.LatentPrompt(torch.zeros(10, dtype=torch.long), torch.randn(10, D), torch.arange(10).expand(3, -1), 4, 7,
                       torch.arange(1, 3), [0])
    emb, pos = U.answer_inputs(p, latents[0][:0])
    assert torch.equal(emb, torch.cat([p.embeds[:4], p.embeds[7:]])) and pos[0].tolist() == [0, 1, 2, 3, 4, 5, 6]


def test_latent_mode_intact_answer_equals_lvr_decoder(bb):
    args = make_args(latent_steps=4, max_new_tokens=5)
    it = toy_item(1)
    prompt, H0 = U.latent_prompt(bb, it, args)
    assert len(H0) == 4 and prompt.slot_end - prompt.slot_start == 4
    ours = U.greedy_answer(bb, prompt, U.prefill(bb, prompt, with_relevance=False), H0, 5)
    sample, _ = U.lvr_sample(bb, it, args)
    ref = lvr.latent_generate(bb, [sample], num_latent_steps=4, max_new_tokens=5)[0]
    assert ours == ref["token_ids"][4:]


def test_released_answer_span():
    assert U.released_answer_span("<think>x</think><answer> B </answer>") == "B"
    assert U.released_answer_span("so \\boxed{A} then \\boxed{\\text{B}}") == "\\text{B}"
    assert U.released_answer_span(" (C) red ") == "(C) red"


def test_eval_mode_unsilence_writes_diagnostics(tmp_path, toy_world):
    out = tmp_path / "vstar.json"
    E.main(["--benchmark", "vstar", "--model", "toy", "--mode", "unsilence", "--limit", "2", "--max-new-tokens", "3",
            "--min-pixels", str(16 * 784), "--max-pixels", str(64 * 784), "--output", str(out)])
    header, *rows = [json.loads(x) for x in out.with_suffix(".predictions.jsonl").read_text().splitlines()]
    assert header["provenance"]["mode"] == "unsilence"
    assert len(rows) == 2 and len(rows[0]["rewards"]) == 20 and "chosen_step" in rows[0]
    assert json.loads(out.read_text())["settings"]["mode"] == "unsilence"


def test_chance_under_each_headline_rule():
    """The chance column unsilence.py prints is eval.py's summary `chance` (question_chance for MMVP per question)."""
    opts = lambda n: {chr(65 + i): str(i) for i in range(n)}   # noqa: E731
    its = [E.item(i, "q", opts(n), "A", cat, [], pair=i // 2) for i, (n, cat) in enumerate([(4, "x"), (2, "x"),
                                                                                             (2, "y"), (2, "y")])]
    chance = lambda bench: E.score(bench, its, {}, E.Args(benchmark=bench))   # noqa: E731
    assert chance("vstar")["chance"] == pytest.approx(100 * (1 / 4 + 3 / 2) / 4)      # micro
    assert chance("mmvp")["chance"] == pytest.approx(100 * (1 / 8 + 1 / 4) / 2)       # both questions of a pair
    assert chance("blink")["chance"] == pytest.approx(100 * ((1 / 4 + 1 / 2) / 2 + 1 / 2) / 2)   # mean over subtasks
    assert chance("mmvp")["question_chance"] == pytest.approx(100 * (1 / 4 + 3 / 2) / 4)   # per question


def test_main_end_to_end_on_the_random_toy(tmp_path, toy_world):
    report = U.main(U.Args(model="toy", benchmarks="vstar", limit=2, run_dir=str(tmp_path), latent_steps=2,
                           max_new_tokens=3))
    assert set(report["diagnosis"]["toy"]["accuracy"]["vstar"]) == {"chance", "intact", "zeros", "noise", "shuffle",
                                                                       "remove"}
    assert {"slots: ULR", "latent: ULR", "chance"} <= set(report["ulr"]["vstar"])
    assert (tmp_path / "diagnosis.png").exists() and (tmp_path / "report.json").exists()
    header, *rows = [json.loads(x) for x in (tmp_path / "vstar_latent.predictions.jsonl").read_text().splitlines()]
    assert header["provenance"]["mode"] == "unsilence"
    assert len(rows) == 2 and all(len(r["rewards"]) == 20 for r in rows)
