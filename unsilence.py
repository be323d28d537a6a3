# Docs: docs/unsilence.md
"""ULR: Unsilencing Latent Reasoning at inference time (Zhang et al., arXiv 2605.02735; released code
zhangxin-xd/Unsilencing-Latent-Reasoning, MIT), and the diagnosis of silenced visual latents.

Diagnosis (`diagnose`): do an lvr.py export's answer tokens use its latents? (a) answer→image vs answer→latent
attention per layer; (b) cos(first latent, latent-end embedding); (c) the causal test: accuracy with the latents
intact, zeroed, noised at their norm, shuffled across items, removed. Remedy (ULR, `optimise_latents`): the backbone
frozen, per test sample only the K latent inputs H move: Stage I pulls each toward the question-relevant image tokens
(multi-positive InfoNCE, Adam), Stage II is a zeroth-order (NES) search on a confidence reward; then greedy decoding
with H in place. Slots mode = the released code (K `<|endoftext|>` slots in a plain VLM prompt); latent mode = the
paper's framing (H0 = an LVR model's latents).

Launch (one process; ULR optimises one sample at a time, as released):
    python unsilence.py                          # CPU toy: LVR export (trained if missing), diagnosis, ULR, tables
    python unsilence.py --stage ulr --model Qwen/Qwen2.5-VL-7B-Instruct --benchmarks mmvp --data-dir data/MMVP
    python unsilence.py --stage ulr --modes latent --model runs/lvr7b/export --benchmarks vstar \\
        --data-dir data/vstar_bench --max-pixels 4014080          # one GPU, the paper's framing on an LVR model
    python unsilence.py --stage diagnose --model runs/lvr_a/export,runs/lvr_b/export    # one row per checkpoint
    python eval.py --benchmark mmvp --data-dir data/MMVP --model Qwen/Qwen2.5-VL-7B-Instruct --mode unsilence \\
        --min-pixels 100352 --max-pixels 200704 --max-new-tokens 2048      # the same through the eval harness
8 GPUs: no torchrun; one process per GPU and benchmark (CUDA_VISIBLE_DEVICES=i ... --run-dir runs/ulr_<bench>).
Defaults are the released scripts'; on a toy model TOY_PRESET replaces the fields not given (and is printed). Every
detail, with the released code's behaviour beside this file's: docs/unsilence.md.

| choice (R = released code, P = the paper as read by a third party) | default | flag | source |
|---|---|---|---|
| Stage-II reward | top-10 log-confidence + 0.05 x progression | `--reward paper` (entropy hinge) | R / P |
| InfoNCE temperature, objective weight | tau 0.2, lam_align 1 | `--tau`, `--lam-align` | R scripts (code: 0.07, 0.1) |
| positives / negatives per slot | 4 (index slicing of top K·4) / 4 least relevant | `--pos-k 2` (P), `--neg-k 16` | R |
| best step | best starts at 0.0, strict >, stores the updated centre H | `--last`, `--store candidate` | R, P Alg. 1 |
| Stage-I trap | `--ablation stage1_only` returns the Stage-I result | `--stage1-trap`: the initial H | R (named here) |
| relevance; Stage I / II forwards | once, on the prefix; slots only, on the cached prefix KV | - | R: full forwards |
| released list-repr bug (`Question: ['...']`) | not copied | `--prompt-list-bug` | R result files |
| latent-model mode | H0 = lvr.latent_generate's decoded latents | `--modes latent` | P (not in R) |
| numerics | fp32; eager attention for the relevance pass only, else SDPA | `--dtype`, `--attn` | R: fp32, eager |
| scoring | `<answer>`, else last `\\boxed{}`, else the text; eval.py's rules | - | R: + a GPT-4o judge |
| noise eps | CPU generator seeded once per evaluation, drawn in item order | `--seed 42` | R (once per process) |
"""
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers import DynamicCache

import common as C
import runtime as R
import eval as E
import lvr


# ----------------------------------------------------------------------------------------------------------------
# Args
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Args:
    stage: str = field(default="all", metadata={"help": "what to run", "choices": ["diagnose", "ulr", "all"]})
    model: str = field(default="runs/lvr/export", metadata={"help": "dir / hub id; diagnosis: LVR exports, a,b,..."})
    modes: str = field(default="slots", metadata={"help": "H0: slots (the released prompt) | latent (LVR latents)"})
    benchmarks: str = field(default="vstar,mmvp,blink", metadata={"help": "eval.py benchmarks"})
    data_dir: str = field(default="", metadata={"help": "the benchmark's folder, one benchmark (default: toy copy)"})
    limit: int = field(default=0, metadata={"help": "items per benchmark (0 = all)"})
    run_dir: str = field(default="runs/unsilence", metadata={"help": "tables, plot, predictions"})
    num_slots: int = field(default=4, metadata={"help": "K latent slots in slots mode"})
    latent_steps: int = field(default=8, metadata={"help": "latents the LVR model decodes (latent mode, diagnosis)"})
    stage1_steps: int = field(default=5, metadata={"help": "Stage I steps (InfoNCE, Adam)"})
    stage2_steps: int = field(default=15, metadata={"help": "Stage II steps (NES)"})
    lr: float = field(default=1e-3, metadata={"help": "Adam lr (Stage I) and NES step size (Stage II)"})
    tau: float = field(default=0.2, metadata={"help": "InfoNCE temperature"})
    pos_k: int = field(default=4, metadata={"help": "positives per slot"})
    neg_k: int = field(default=4, metadata={"help": "negatives per slot"})
    lam_align: float = field(default=1.0, metadata={"help": "weight of the Stage-I objective -L_align"})
    sigma: float = field(default=25.0, metadata={"help": "sigma_0 of the Stage-II perturbation"})
    sigma_decay: float = field(default=0.95, metadata={"help": "sigma *= decay after every step of both stages"})
    reward: str = field(default="code", metadata={"help": "Stage-II reward", "choices": ["code", "paper"]})
    top_k: int = field(default=10, metadata={"help": "top-k probabilities in the confidence reward"})
    lam_progression: float = field(default=0.05, metadata={"help": "weight of the progression term"})
    selection: str = field(default="best", metadata={"help": "H returned", "choices": ["best", "last"]})
    last: bool = field(default=False, metadata={"help": "= --selection last (released --disable_best_reward)"})
    store: str = field(default="centre", metadata={"help": "H kept at the best", "choices": ["centre", "candidate"]})
    best_init: float = field(default=0.0, metadata={"help": "initial best reward of the released rule"})
    ablation: str = field(default="none", metadata={"help": "ULR ablation", "choices": [
                          "none", "stage1_only", "stage2_only", "no_progression"]})
    stage1_trap: bool = field(default=False, metadata={"help": "stage1_only under the released rule (initial H)"})
    init: str = field(default="token", metadata={"help": "slots H0: <|endoftext|> | N(0, .02)",
                                                 "choices": ["token", "random"]})
    causal_ablations: str = field(default="zeros,noise,shuffle,remove", metadata={"help": "diagnosis ablations"})
    max_new_tokens: int = field(default=2048, metadata={"help": "answer tokens"})
    min_pixels: int = field(default=128 * 28 * 28, metadata={"help": "image pixel budget, min (128 tokens)"})
    max_pixels: int = field(default=256 * 28 * 28, metadata={"help": "image pixel budget, max (256 tokens)"})
    dtype: str = field(default="float32", metadata={"help": "model dtype", "choices": ["float32", "bfloat16"]})
    attn: str = field(default="sdpa", metadata={"help": "attention kernel", "choices": ["sdpa", "eager"]})
    prompt_list_bug: bool = field(default=False, metadata={"help": "render the first question as ['...'] (released)"})
    seed: int = field(default=42, metadata={"help": "seed of the noise generator (once per evaluation)"})


# A tiny model answers in a few tokens from small images; 24 items per toy set keep the default run short. Applied (and
# printed) only when every model is the toy backbone or an export of it, to the fields not given on the command line.
TOY_PRESET = dict(modes="slots,latent", limit=24, max_new_tokens=32, min_pixels=16 * 28 * 28, max_pixels=64 * 28 * 28)


def resolve(args: Args, explicit: set[str] | None = None) -> Args:
    models = args.model.split(",")       # the toy, a toy export, or the default export `python lvr.py` will train
    if all(C.is_toy(m) or m == "runs/lvr/export" and not Path(m, "config.json").exists() for m in models):
        R.apply_preset(args, TOY_PRESET, R.changed_fields(args) if explicit is None else explicit,
                       "toy preset", "model is the toy backbone")
    if "toy-base" in models:             # the pretrained toy "stage 0" (toy_base.py), built once on first use
        from toy_base import ensure_toy_base
        args.model = ",".join(ensure_toy_base() if m == "toy-base" else m for m in models)
    args.selection = "last" if args.last else args.selection
    if args.ablation == "stage1_only":
        args.stage2_steps = 0
        args.selection = "best" if args.stage1_trap else "last"   # the released rule would return the initial H
    elif args.ablation == "stage2_only":
        args.stage1_steps = 0
    elif args.ablation == "no_progression":
        args.lam_progression = 0.0
    return args


# ----------------------------------------------------------------------------------------------------------------
# Data: the released prompt (slots mode), the LVR prompt (latent mode), token spans
# ----------------------------------------------------------------------------------------------------------------
SLOT_TOKEN = "<|endoftext|>"
SYSTEM_PROMPT = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
                 "The assistant first thinks about the reasoning process in the mind and then provides the user with "
                 "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
                 "</answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer here "
                 "</answer>")


def slots_sample(bb: C.Backbone, it: dict, args: Args) -> tuple[dict, str]:
    """The released user turn: [image, "Question: {q}\\nPut your final answer within \\\\boxed{}.\\n\\n",
    "\\n\\nPROBLEM: {q}\\n\\nThe following special tokens ... {K slots}"] (missing separators kept as released)."""
    q = it["question"] + "".join(f"\n{k}. {v}" for k, v in (it["options"] or {}).items())
    cot = f"Question: {[q] if args.prompt_list_bug else q}\nPut your final answer within \\boxed{{}}.\n\n"
    thinking = (f"\n\nPROBLEM: {q}\n\n"
                "The following special tokens represent YOUR INTERNAL THINKING SPACE where your reasoning happens "
                "implicitly.\nYou do NOT need to output explicit reasoning steps"
                "After these tokens, directly provide your final answer."
                f"Here are the {args.num_slots} special tokens: " + SLOT_TOKEN * args.num_slots)
    images = [{"type": "image", "image": E.load_image(im)} for im in it["images"]]
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": images + [{"type": "text", "text": cot},
                                                      {"type": "text", "text": thinking}]}]
    sample = C.encode_chat(bb, messages, add_generation_prompt=True, min_pixels=args.min_pixels,
                           max_pixels=args.max_pixels)
    return sample, q


def lvr_sample(bb: C.Backbone, it: dict, args: Args) -> tuple[dict, str]:
    """eval.py's LVR protocol prompt (answer-tag, latent mode) with `<|lvr_start|>` forced at the end."""
    messages, _ = E.build_messages(it, SimpleNamespace(prompt="answer-tag", mode="latent", latent_force_span=False))
    sample = C.encode_chat(bb, messages, add_generation_prompt=True, min_pixels=args.min_pixels,
                           max_pixels=args.max_pixels)
    return append_tokens(sample, [bb.token_id(lvr.LVR_START)]), it["question"]


def append_tokens(sample: dict, ids: list[int]) -> dict:
    extra = torch.tensor(ids, dtype=torch.long)
    return dict(sample, input_ids=torch.cat([sample["input_ids"], extra]),
                labels=torch.cat([sample["labels"], torch.full_like(extra, C.IGNORE)]),
                mm_token_type_ids=torch.cat([sample["mm_token_type_ids"], torch.zeros(len(ids), dtype=torch.int32)]))


def find_question_span(tokenizer, ids: list[int], question: str) -> list[int]:
    """Released `_find_question_positions`: the first occurrence of "PROBLEM: {q}\\n\\n", else "PROBLEM: {q}",
    else q (a token subsequence)."""
    for text in (f"PROBLEM: {question}\n\n", f"PROBLEM: {question}", question):
        needle = tokenizer.encode(text, add_special_tokens=False)
        for i in range(len(ids) - len(needle) + 1):
            if needle and ids[i:i + len(needle)] == needle:
                return list(range(i, i + len(needle)))
    return []


# ----------------------------------------------------------------------------------------------------------------
# Model surgery: one prompt embedded once (vision tower once), prefix KV cache, slot-only forwards
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class LatentPrompt:
    input_ids: torch.Tensor          # [L] (slots hold placeholder ids)
    embeds: torch.Tensor             # [L, D] token embeddings with the image features in place
    positions: torch.Tensor          # [3, L] M-RoPE positions of the whole prompt (get_rope_index), computed once
    slot_start: int
    slot_end: int
    image_positions: torch.Tensor    # between the first <|vision_start|> and <|vision_end|>
    question_positions: list


def make_prompt(bb: C.Backbone, sample: dict, slot_start: int, slot_end: int, question: str) -> LatentPrompt:
    model, dev = bb.model, next(bb.model.parameters()).device
    ids = sample["input_ids"].to(dev)
    with torch.no_grad():
        embeds = model.model.language_model.embed_tokens(ids).clone()
        if sample["pixel_values"] is not None:
            feats = model.model.get_image_features(sample["pixel_values"].to(dev),
                                                   sample["image_grid_thw"].to(dev)).pooler_output
            embeds[ids == model.config.image_token_id] = torch.cat(feats).to(embeds.dtype)
    lst = ids.tolist()
    vs, ve = bb.token_id("<|vision_start|>"), bb.token_id("<|vision_end|>")
    image_positions = torch.arange(lst.index(vs) + 1, lst.index(ve), device=dev)
    return LatentPrompt(ids, embeds, C.mrope_position_ids(bb, sample).to(dev), slot_start, slot_end,
                        image_positions, find_question_span(bb.tokenizer, lst[:slot_start], question))


def slot_range(sample: dict, slot_id: int, k: int) -> tuple[int, int]:
    """The last K slot tokens, contiguous (released: positions [L−K−2, L−2) before the generation header)."""
    where = (sample["input_ids"] == slot_id).nonzero()[:, 0].tolist()[-k:]
    assert len(where) == k and where == list(range(where[0], where[0] + k)), "slots not found contiguous"
    return where[0], where[0] + k


def latent_prompt(bb: C.Backbone, it: dict, args: Args) -> tuple[LatentPrompt, torch.Tensor]:
    """Latent mode: lvr.latent_generate decodes N latents after the forced `<|lvr_start|>`; they become H0 and the
    `<|lvr|>` slots of the prompt."""
    sample, question = lvr_sample(bb, it, args)
    out = lvr.latent_generate(bb, [sample], num_latent_steps=args.latent_steps, max_new_tokens=1)[0]
    H0 = out["latents"]
    full = append_tokens(sample, [bb.token_id(lvr.LVR)] * len(H0))
    n = len(sample["input_ids"])
    return make_prompt(bb, full, n, n + len(H0), question), H0


@contextmanager
def attention_implementation(model, name: str):
    """Run the backbone with another attention kernel inside the block (eager materialises attention maps)."""
    before = model.config._attn_implementation
    if name != before:
        model.set_attn_implementation(name)
    try:
        yield
    finally:
        if name != before:
            model.set_attn_implementation(before)


@dataclass
class Prefix:
    kv: list                         # per layer (keys, values) of positions [0, slot_start), detached
    image_hidden: torch.Tensor       # [n_img, D] final normed hidden states of the image tokens (v_j)
    relevance: torch.Tensor | None   # [n_img] question -> image attention (None if not asked)
    last_logits: torch.Tensor        # [V] logits at slot_start − 1


def question_relevance(attentions, question_positions, image_positions) -> torch.Tensor:
    """rel_j = mean over layers, heads and question rows of attention(question row -> image token j)."""
    att = torch.stack([a[0] for a in attentions]).float().mean((0, 1))       # [L, L], mean over layers × heads
    return att[question_positions][:, image_positions].mean(0)


@torch.no_grad()
def prefill(bb: C.Backbone, prompt: LatentPrompt, with_relevance: bool = True) -> Prefix:
    """ONE forward over the prefix [0, slot_start): KV cache, v_j and (eager) the question -> image relevance.
    The question precedes the slots, so neither depends on H: computed once per sample."""
    lm, s = bb.model.model.language_model, prompt.slot_start
    need = with_relevance and bool(prompt.question_positions)
    with attention_implementation(bb.model, "eager" if need else bb.model.config._attn_implementation):
        out = lm(inputs_embeds=prompt.embeds[None, :s], position_ids=prompt.positions[:, None, :s], use_cache=True,
                 output_attentions=need)
    hidden = out.last_hidden_state[0]
    relevance = question_relevance(out.attentions, prompt.question_positions, prompt.image_positions) if need else None
    kv = [(layer.keys.detach(), layer.values.detach()) for layer in out.cache.layers]
    return Prefix(kv, hidden[prompt.image_positions], relevance, bb.model.lm_head(hidden[-1]).float())


def cache_from(kv: list, config) -> DynamicCache:
    """A fresh cache holding the prefix (the prefix tensors are never modified: each forward appends to a copy)."""
    cache = DynamicCache(config=config)
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


def forward_slots(bb: C.Backbone, prompt: LatentPrompt, prefix: Prefix, H: torch.Tensor):
    """Hidden states (final norm) and logits at the K slots with H in place, on the cached prefix (grad flows to H)."""
    lm, s = bb.model.model.language_model, prompt.slot_start
    out = lm(inputs_embeds=H[None].to(prompt.embeds.dtype), position_ids=prompt.positions[:, None, s:s + len(H)],
             cache=cache_from(prefix.kv, bb.model.config.text_config), use_cache=True)
    hidden = out.last_hidden_state[0]
    return hidden, bb.model.lm_head(hidden).float()


# ----------------------------------------------------------------------------------------------------------------
# Losses: Stage I pairs from relevance and the multi-positive InfoNCE L_align; Stage II rewards R
# ----------------------------------------------------------------------------------------------------------------
def select_pairs(relevance: torch.Tensor, num_slots: int, pos_k: int, neg_k: int):
    """Index slicing (released `index_slice`): the top K·pos_k image tokens, sorted by position; slot i takes chunk i.
    Negatives of slot i: the neg_k least relevant tokens not among its positives. Indices into the image tokens."""
    order = torch.argsort(relevance, descending=True).tolist()
    top = sorted(order[:min(num_slots * pos_k, len(order))])
    positives, negatives = [], []
    for i in range(num_slots):
        pos = top[i * pos_k:(i + 1) * pos_k]
        positives.append(pos)
        negatives.append([j for j in reversed(order) if j not in pos][:neg_k] if pos else [])
    return positives, negatives


def infonce_loss(z: torch.Tensor, v: torch.Tensor, positives, negatives, tau: float) -> torch.Tensor:
    """L_align = mean_i −log(Σ_{p∈P_i} e^{cos(z_i,v_p)/τ} / Σ_{j∈P_i∪N_i} e^{cos(z_i,v_j)/τ}); slots
    without positives or negatives are skipped (released)."""
    losses = []
    for i, (pos, neg) in enumerate(zip(positives, negatives)):
        if not pos or not neg:
            continue
        sim = F.cosine_similarity(z[i][None], v[pos + neg], dim=-1) / tau
        losses.append(torch.logsumexp(sim, 0) - torch.logsumexp(sim[:len(pos)], 0))
    return torch.stack(losses).mean() if losses else z.sum() * 0.0


def confidence_reward(logits: torch.Tensor, top_k: int = 10, lam_progression: float = 0.05) -> float:
    """Released: c_t = −mean log(top-k p_t + 1e-10); R = mean_t c_t + λ · mean_t log((c_{t+1}+1e-8)/(c_t+1e-8))."""
    top = torch.topk(torch.softmax(logits.float(), -1), top_k, -1).values
    c = -torch.log(top + 1e-10).mean(-1)
    progression = torch.log((c[1:] + 1e-8) / (c[:-1] + 1e-8)).mean() if len(c) > 1 else c.new_zeros(())
    return float(c.mean() + lam_progression * progression)


def entropy_reward(logits: torch.Tensor) -> float:
    """Paper (Eq. 5 as read): R = mean_{t<K} max(0, H(p_t) − H(p_{t+1}))."""
    logp = torch.log_softmax(logits.float(), -1)
    entropy = -(logp.exp() * logp).sum(-1)
    return float((entropy[:-1] - entropy[1:]).clamp(min=0).mean()) if len(entropy) > 1 else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Decoding: greedy answer with the latents in place (prefix from the cache), the released answer extraction
# ----------------------------------------------------------------------------------------------------------------
def answer_inputs(prompt: LatentPrompt, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings [L', D] and positions [3, L'] of the answered sequence: the prompt with its slot rows set to H
    (H with 0 rows removes the span; later positions shift down by the span length)."""
    s, e = prompt.slot_start, prompt.slot_end
    if len(H) == e - s:
        return torch.cat([prompt.embeds[:s], H.to(prompt.embeds), prompt.embeds[e:]]), prompt.positions
    assert len(H) == 0, "H must fill the slots or be empty (removed)"
    return (torch.cat([prompt.embeds[:s], prompt.embeds[e:]]),
            torch.cat([prompt.positions[:, :s], prompt.positions[:, e:] - (e - s)], 1))


@torch.no_grad()
def greedy_answer(bb: C.Backbone, prompt: LatentPrompt, prefix: Prefix, H: torch.Tensor, max_new_tokens: int,
                  stop_at_eos: bool = True) -> list[int]:
    lm, s = bb.model.model.language_model, prompt.slot_start
    embeds, positions = answer_inputs(prompt, H)
    cache = cache_from(prefix.kv, bb.model.config.text_config)
    logits = prefix.last_logits
    if len(embeds) > s:
        out = lm(inputs_embeds=embeds[None, s:], position_ids=positions[:, None, s:], cache=cache, use_cache=True)
        logits = bb.model.lm_head(out.last_hidden_state[0, -1]).float()
    eos_ids = bb.model.generation_config.eos_token_id
    eos = {bb.tokenizer.eos_token_id, *(eos_ids if isinstance(eos_ids, (list, tuple)) else [eos_ids])}
    banned = bb.tokenizer.encode("addCriterion", add_special_tokens=False)   # released bad_words_ids (Qwen2.5)
    next_pos = int(positions.max()) + 1
    tokens = []
    for i in range(max_new_tokens):
        if len(banned) == 1:
            logits[banned[0]] = -float("inf")
        tok = int(logits.argmax())
        tokens.append(tok)
        if stop_at_eos and tok in eos or i == max_new_tokens - 1:
            break
        pos = torch.full((3, 1, 1), next_pos + i, device=embeds.device)
        out = lm(input_ids=torch.tensor([[tok]], device=embeds.device), position_ids=pos, cache=cache, use_cache=True)
        logits = bb.model.lm_head(out.last_hidden_state[0, -1]).float()
    return tokens


def decode(bb: C.Backbone, tokens: list[int]) -> str:
    return bb.tokenizer.decode(tokens, skip_special_tokens=True)


def released_answer_span(text: str) -> str:
    """The released verifier's extraction: `<answer>` content, else the last `\\boxed{}`, else the text."""
    if "<answer>" in text:
        return text.split("<answer>", 1)[1].split("</answer>", 1)[0].strip()
    starts = [i for i in range(len(text)) if text.startswith("\\boxed{", i)]
    if starts:
        depth, i = 1, starts[-1] + len("\\boxed{")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i:j].strip()
    return text.strip()


# ----------------------------------------------------------------------------------------------------------------
# Per-sample optimisation loop: setup → for step (Stage I: loss → backward → step) → for step (Stage II: reward →
# NES step) → log and keep the best step → answer with the chosen H
# ----------------------------------------------------------------------------------------------------------------
class BestStep:
    """Released rule: best reward starts at `best_init` (0.0), a step replaces it on a strict >; `last` keeps the
    final state. Stage I logs −lam_align·L ≤ 0, so under the released rule no Stage-I step is ever chosen."""

    def __init__(self, initial: torch.Tensor, rule: str = "best", best_init: float = 0.0):
        self.rule, self.reward, self.step, self.state = rule, best_init, -1, initial.detach().clone()

    def update(self, step: int, reward: float, state: torch.Tensor):
        if self.rule == "last" or reward > self.reward:
            self.reward, self.step, self.state = reward, step, state.detach().clone()


def sigma_schedule(args: Args) -> list[float]:
    """σ used at each step: σ0·decay^step over Stage I and Stage II alike."""
    return [args.sigma * args.sigma_decay ** t for t in range(args.stage1_steps + args.stage2_steps)]


def optimise_latents(bb: C.Backbone, prompt: LatentPrompt, prefix: Prefix, H0: torch.Tensor, args: Args,
                     generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """ULR on one sample; the backbone is frozen and only H [K, D] moves. Returns (chosen H, optimisation trace)."""
    sigmas = sigma_schedule(args)
    H = H0.detach().clone().float().requires_grad_(True)
    opt = torch.optim.Adam([H], lr=args.lr, maximize=True)                  # H is the only parameter
    best = BestStep(H0.float(), args.selection, args.best_init)
    positives, negatives = [], []
    if args.stage1_steps and prefix.relevance is not None:
        positives, negatives = select_pairs(prefix.relevance, len(H0), args.pos_k, args.neg_k)
    rewards, times = [], {}
    t0 = time.perf_counter()
    for step in range(args.stage1_steps):                                  # Stage I: maximise −lam_align·L_align
        hidden, _ = forward_slots(bb, prompt, prefix, H)
        objective = -args.lam_align * infonce_loss(hidden.float(), prefix.image_hidden.float(), positives,
                                                   negatives, args.tau)
        if objective.requires_grad:                   # grad w.r.t. H only: backbone .grad never written
            (H.grad,) = torch.autograd.grad(objective, [H])
            opt.step()
        rewards.append(objective.item())
        best.update(step, rewards[-1], H)
    times["stage1_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for step in range(args.stage1_steps, args.stage1_steps + args.stage2_steps):   # Stage II: NES on R
        sigma = sigmas[step]
        eps = (torch.randn(H.shape, generator=generator) * sigma).to(H)
        candidate = H.detach() + eps
        with torch.no_grad():
            _, logits = forward_slots(bb, prompt, prefix, candidate)
            reward = (confidence_reward(logits, args.top_k, args.lam_progression) if args.reward == "code"
                      else entropy_reward(logits))
            H += args.lr * reward * eps / sigma ** 2                      # H ← H + η·R·ε/σ²
        rewards.append(reward)
        best.update(step, reward, candidate if args.store == "candidate" else H)
    times["stage2_s"] = time.perf_counter() - t0
    chosen = best.state.to(H0.dtype)
    return chosen, {"rewards": rewards, "sigmas": sigmas, "chosen_step": best.step,
                    "delta_h_norm": float((chosen.float() - H0.float()).norm()), "h0_norm": float(H0.float().norm()),
                    **times}


def ulr_answers(bb: C.Backbone, items: list[dict], args: Args, mode: str, generator: torch.Generator) -> list:
    """Per item: build the prompt, answer with H0, optimise H, answer with it. Returns (answer text, per-item fields)
    per item: what eval.py writes in its predictions file."""
    answers = []
    for it in items:
        t0 = time.perf_counter()
        if mode == "slots":
            sample, question = slots_sample(bb, it, args)
            s, e = slot_range(sample, bb.token_id(SLOT_TOKEN), args.num_slots)
            prompt = make_prompt(bb, sample, s, e, question)
            H0 = prompt.embeds[s:e].clone()
            if args.init == "random":
                H0 = (torch.randn(H0.shape, generator=generator) * 0.02).to(H0)
        else:
            prompt, H0 = latent_prompt(bb, it, args)
        prefix = prefill(bb, prompt, with_relevance=args.stage1_steps > 0)
        times = {"prefill_s": time.perf_counter() - t0}
        plain = decode(bb, greedy_answer(bb, prompt, prefix, H0, args.max_new_tokens))
        H, trace = optimise_latents(bb, prompt, prefix, H0, args, generator)
        t0 = time.perf_counter()
        raw = decode(bb, greedy_answer(bb, prompt, prefix, H, args.max_new_tokens))
        times["generate_s"] = time.perf_counter() - t0
        answers.append((released_answer_span(raw), {"raw": raw, "prediction_no_ulr": released_answer_span(plain),
                                                     "question_span_found": bool(prompt.question_positions),
                                                     **trace, **times}))
    return answers


# ----------------------------------------------------------------------------------------------------------------
# Diagnosis of a latent model: attention shares, cos(first latent, end delimiter), the causal test
# ----------------------------------------------------------------------------------------------------------------
def attention_shares(attentions, answer_rows, image_cols, latent_cols) -> torch.Tensor:
    """[layers, 2]: mean over heads and answer rows of the attention mass on image tokens and on latent tokens."""
    shares = []
    for a in attentions:                                      # [1, heads, L, L]
        rows = a[0][:, answer_rows].float()                   # [heads, rows, L]
        shares.append(torch.stack([rows[..., image_cols].sum(-1).mean(), rows[..., latent_cols].sum(-1).mean()]))
    return torch.stack(shares)


def ablate(latents: list[torch.Tensor], kind: str, generator: torch.Generator) -> list[torch.Tensor]:
    """Causal-test inputs: intact | zeros | noise (Gaussian, each vector rescaled to its latent's norm) |
    shuffle (item i gets item i+1's latents) | remove (no latent vectors)."""
    def noise(h):
        eps = torch.randn(h.shape, generator=generator).to(h)
        return eps / eps.norm(dim=-1, keepdim=True) * h.norm(dim=-1, keepdim=True)
    ablations = {"intact": lambda: latents, "zeros": lambda: [torch.zeros_like(h) for h in latents],
                 "noise": lambda: [noise(h) for h in latents], "shuffle": lambda: latents[1:] + latents[:1],
                 "remove": lambda: [h[:0] for h in latents]}
    if kind in ablations:
        return ablations[kind]()
    raise ValueError(f"unknown ablation {kind!r}")


@torch.no_grad()
def diagnose(bb: C.Backbone, items_by_bench: dict, args: Args, generator: torch.Generator) -> dict:
    """Attention shares and cosines over all items; the causal test per benchmark."""
    end_embedding = bb.model.get_input_embeddings().weight[bb.token_id(lvr.LVR_LATENT_END)].float()
    shares, cosines, accuracy = [], [], {}
    for bench, its in items_by_bench.items():
        decoded = [latent_prompt(bb, it, args) for it in its]                 # (prompt, decoded latents H)
        prefixes = [prefill(bb, prompt, with_relevance=False) for prompt, _ in decoded]
        latents = [h for _, h in decoded]
        accuracy[bench] = {}
        for kind in ["intact"] + [k for k in args.causal_ablations.split(",") if k]:            # (c)
            answers = [greedy_answer(bb, prompt, prefix, h, args.max_new_tokens)
                       for (prompt, _), prefix, h in zip(decoded, prefixes, ablate(latents, kind, generator))]
            texts = {str(it["id"]): released_answer_span(decode(bb, a)) for it, a in zip(its, answers)}
            summary = E.score(bench, its, texts, eval_args(bench, args))
            if kind == "intact":
                accuracy[bench]["chance"], intact = summary["chance"], answers
            accuracy[bench][kind] = summary["overall"]
        with attention_implementation(bb.model, "eager"):      # (a): one teacher-forced pass over prompt + answer
            for (prompt, H), tokens in zip(decoded, intact):
                cosines.append(float(F.cosine_similarity(H[0].float(), end_embedding, dim=0)))   # (b)
                embeds, positions = answer_inputs(prompt, H)
                seq = torch.cat([embeds, bb.model.get_input_embeddings()(torch.tensor(tokens, device=embeds.device))])
                new = int(positions.max()) + 1 + torch.arange(len(tokens), device=seq.device)
                out = bb.model.model.language_model(inputs_embeds=seq[None], output_attentions=True, use_cache=False,
                                                    position_ids=torch.cat([positions, new.expand(3, -1)], 1)[:, None])
                shares.append(attention_shares(out.attentions, list(range(len(embeds), len(seq))),   # answer rows
                                               prompt.image_positions, list(range(prompt.slot_start, prompt.slot_end))))
    per_layer = torch.stack(shares).mean(0)
    return {"attention_image_per_layer": per_layer[:, 0].tolist(),
            "attention_latent_per_layer": per_layer[:, 1].tolist(),
            "attention_image": float(per_layer[:, 0].mean()), "attention_latent": float(per_layer[:, 1].mean()),
            "cos_first_latent_end": sum(cosines) / len(cosines), "accuracy": accuracy}


def plot_diagnosis(results: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, r in results.items():
        layers = range(1, len(r["attention_image_per_layer"]) + 1)
        line, = ax.plot(layers, r["attention_image_per_layer"], marker="o", label=f"{name}: image")
        ax.plot(layers, r["attention_latent_per_layer"], marker="s", ls="--", color=line.get_color(),
                label=f"{name}: latents")
    ax.set(xlabel="layer", ylabel="attention share of answer tokens", title="answer -> image vs latents",
           xticks=list(layers))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Evaluate: eval.py's seam (`python eval.py --mode unsilence`), loading, tables
# ----------------------------------------------------------------------------------------------------------------
def eval_args(benchmark: str, args: Args, **kw) -> E.Args:
    return E.Args(benchmark=benchmark, data_dir=args.data_dir, model=args.model, mode="unsilence", limit=args.limit,
                  min_pixels=args.min_pixels, max_pixels=args.max_pixels, max_new_tokens=args.max_new_tokens, **kw)


def generate_ulr(bb: C.Backbone, items: list[dict], ea: E.Args) -> list:
    """`python eval.py --mode unsilence`: slots-mode ULR with the released defaults and eval's image budget. One
    sampling generator per loaded model, so the answers do not depend on --batch-size."""
    if getattr(bb, "ulr_run", None) is None:
        given = dict(model=ea.model, modes="slots", min_pixels=ea.min_pixels, max_pixels=ea.max_pixels,
                     max_new_tokens=E.settings(ea, ea.benchmark)["max_new_tokens"], limit=0)   # as recorded
        args = resolve(Args(**given), explicit=set(given))
        bb.model.to(getattr(torch, args.dtype)).eval().requires_grad_(False)
        bb.ulr_run = (args, torch.Generator().manual_seed(args.seed))
    args, generator = bb.ulr_run
    return ulr_answers(bb, items, args, "slots", generator)


def load_latent_model(path: str, args: Args, lvr_tokens: bool = True) -> C.Backbone:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    bb = C.load_backbone(path, dev, dtype=getattr(torch, args.dtype),
                         attn_implementation="eager" if args.attn == "eager" else None)
    if lvr_tokens:                                         # latent mode / diagnosis; a no-op for an LVR export
        lvr.prepare_model(bb)
        lvr.attach_saved_head(bb)
    bb.model.eval().requires_grad_(False)
    return bb


def print_markdown(header: list[str], rows: list[list[str]]):
    print("\n" + E.markdown(header, rows))


def ensure_toy_lvr(path: str):
    if path == "runs/lvr/export" and not Path(path, "config.json").exists():
        print("no toy LVR export: training one with `python lvr.py --eval false`")
        subprocess.run([sys.executable, str(Path(__file__).with_name("lvr.py")), "--eval", "false"], check=True)


# ----------------------------------------------------------------------------------------------------------------
# main: setup → diagnosis per checkpoint → ULR per mode and benchmark (eval.py's seam) → tables and report
# ----------------------------------------------------------------------------------------------------------------
def main(args: Args, explicit: set[str] | None = None):
    resolve(args, explicit)
    R.seed_everything(args.seed)
    os.makedirs(args.run_dir, exist_ok=True)
    models = [m for m in args.model.split(",") if m]
    for m in models:
        ensure_toy_lvr(m)
    benchmarks = [b for b in args.benchmarks.split(",") if b]
    items_by_bench = {b: E.load_benchmark(b, args.data_dir, eval_args(b, args))[0] for b in benchmarks}
    report = {"args": asdict(args)}
    if args.stage in ("diagnose", "all"):
        results = {m: diagnose(load_latent_model(m, args), items_by_bench, args,
                               torch.Generator().manual_seed(args.seed)) for m in models}
        plot_diagnosis(results, os.path.join(args.run_dir, "diagnosis.png"))
        report["diagnosis"] = results
        print_markdown(["checkpoint", "answer->image", "answer->latents", "per layer (image / latents)",
                     "cos(first latent, latent end)"],
                    [[m, f"{r['attention_image']:.3f}", f"{r['attention_latent']:.3f}",
                      ", ".join(f"{x:.3f} / {y:.3f}" for x, y in zip(r["attention_image_per_layer"],
                                                                     r["attention_latent_per_layer"])),
                      f"{r['cos_first_latent_end']:.3f}"] for m, r in results.items()])
        kinds = list(results[models[0]]["accuracy"][benchmarks[0]])
        print_markdown(["causal test: checkpoint", "benchmark", *kinds],
                    [[m, b, *(f"{r['accuracy'][b][k]:.1f}" for k in kinds)] for m, r in results.items()
                     for b in benchmarks])
    if args.stage in ("ulr", "all"):
        bb = load_latent_model(models[-1], args, lvr_tokens="latent" in args.modes)
        table = {b: {} for b in benchmarks} | ({"mmvp (per question)": {}} if "mmvp" in benchmarks else {})
        for mode in [x for x in args.modes.split(",") if x]:
            for b in benchmarks:
                output = Path(args.run_dir, f"{b}_{mode}.json")
                preds = output.with_suffix(".predictions.jsonl")
                preds.unlink(missing_ok=True)    # a fresh run: one sampling generator over all items, never resumed
                ea = eval_args(b, args, output=str(output), predictions=str(preds), label=f"ULR {mode}", overwrite=True,
                               method_settings=json.dumps({**asdict(args), "modes": mode}, sort_keys=True))
                generator = torch.Generator().manual_seed(args.seed)
                summary = E.evaluate(ea, backbone=bb, generate=lambda bb, its, _ea, mode=mode, generator=generator:
                                     ulr_answers(bb, its, args, mode, generator))
                records = [r for r in map(json.loads, preds.read_text().splitlines()) if "id" in r]  # not provenance
                no_ulr = E.score(b, items_by_bench[b], {str(r["id"]): r["prediction_no_ulr"] for r in records}, ea)
                row = table[b]
                row.setdefault("chance", summary["chance"])
                row[f"{mode}: no ULR"], row[f"{mode}: ULR"] = no_ulr["overall"], summary["overall"]
                row[f"{mode}: |dH|"] = sum(r["delta_h_norm"] for r in records) / len(records)
                row[f"{mode}: |H0|"] = sum(r["h0_norm"] for r in records) / len(records)
                if b == "mmvp":
                    table["mmvp (per question)"].setdefault("chance", summary["question_chance"])
                    table["mmvp (per question)"].update({f"{mode}: no ULR": no_ulr["question_accuracy"],
                                                         f"{mode}: ULR": summary["question_accuracy"]})
        report["ulr"] = table
        cols = list(table[benchmarks[0]])
        cell = lambda row, c: "" if c not in row else f"{row[c]:.1e}" if "|" in c else f"{row[c]:.1f}"   # noqa: E731
        print_markdown(["benchmark", *cols], [[b, *(cell(row, c) for c in cols)] for b, row in table.items()])
    Path(args.run_dir, "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main(*R.parse_args(Args))
