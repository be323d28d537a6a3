"""ULR benchmark (a script, not a test; CPU toy LVR export, slots mode, the released 5 + 15 steps).

(a) Per-sample cost of ULR / plain generation, split into prompt (vision tower + prefix pass, with the one
    relevance computation), Stage I, Stage II and the answer's generation. Two baselines, the same prompt and the same
    number of new tokens, greedy: `model.generate`, and this file's own cached decoder answering with H0.
(b) The saving from computing the question -> image relevance once and reusing the prefix KV cache, against the
    released procedure, re-created here: every Stage-I step a full eager forward (vision tower, attention maps,
    hidden states) and its backward; every Stage-II step a full forward (or, with the released `--kv_reuse`, the
    slots + suffix on the cached prefix). Eager attention everywhere, as released.
Interleaved repeats over a few toy items, median per item.

    python bench/bench_unsilence.py [--repeats 5] [--items 4] [--new-tokens 32]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval as E  # noqa: E402
import unsilence as U  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from helpers import full_forward, hook_slots  # noqa: E402  (the released injection, as the tests use it)

clock = time.perf_counter   # bench/run_all.py --device cuda swaps in a clock that synchronises the GPU first


def ours(bb, it, args, gen, new_tokens):
    t = [clock()]
    sample, q = U.slots_sample(bb, it, args)
    s, e = U.slot_range(sample, bb.token_id(U.SLOT_TOKEN), args.num_slots)
    prompt = U.make_prompt(bb, sample, s, e, q)
    prefix = U.prefill(bb, prompt)
    t.append(clock())
    H0 = prompt.embeds[s:e].clone()
    args1 = U.Args(**{**vars(args), "stage2_steps": 0, "selection": "last"})
    H, _ = U.optimise_latents(bb, prompt, prefix, H0, args1, gen)
    t.append(clock())
    args2 = U.Args(**{**vars(args), "stage1_steps": 0})
    args2.sigma = args.sigma * args.sigma_decay ** args.stage1_steps          # σ continues from Stage I
    H, _ = U.optimise_latents(bb, prompt, prefix, H, args2, gen)
    t.append(clock())
    U.greedy_answer(bb, prompt, prefix, H, new_tokens, stop_at_eos=False)
    t.append(clock())
    return [t[i + 1] - t[i] for i in range(4)]


def released(bb, it, args, gen, new_tokens, kv_reuse):
    """The released procedure's forwards (its arithmetic is unsilence.py's; only the work per step differs)."""
    t = [clock()]
    sample, q = U.slots_sample(bb, it, args)
    s, e = U.slot_range(sample, bb.token_id(U.SLOT_TOKEN), args.num_slots)
    prompt = U.make_prompt(bb, sample, s, e, q)
    prefix = U.prefill(bb, prompt, with_relevance=False) if kv_reuse else None   # --kv_reuse prefills once
    t.append(clock())
    H = prompt.embeds[s:e].clone().requires_grad_(True)
    adam = torch.optim.Adam([H], lr=args.lr, maximize=True)
    for _ in range(args.stage1_steps):                  # full eager forward + attention maps every step
        out = full_forward(bb, sample, prompt, H, output_attentions=True, output_hidden_states=True)
        rel = U.question_relevance(out.attentions, prompt.question_positions, prompt.image_positions)
        pos, neg = U.select_pairs(rel.detach(), args.num_slots, args.pos_k, args.neg_k)
        hidden = out.hidden_states[-1][0]
        loss = U.infonce_loss(hidden[s:e], hidden[prompt.image_positions], pos, neg, args.tau)
        (H.grad,) = torch.autograd.grad(-args.lam_align * loss, [H])
        adam.step()
    t.append(clock())
    sigma = args.sigma * args.sigma_decay ** args.stage1_steps
    with torch.no_grad():
        for _ in range(args.stage2_steps):
            eps = torch.randn(H.shape, generator=gen) * sigma
            cand = H.detach() + eps
            if kv_reuse:                                # slots + suffix on the cached prefix, then crop
                cache = U.cache_from(prefix.kv, bb.model.config.text_config)
                embeds, positions = U.answer_inputs(prompt, cand)
                out = bb.model.model.language_model(inputs_embeds=embeds[None, s:], position_ids=positions[:, None, s:],
                                                    cache=cache, use_cache=True)
                logits = bb.model.lm_head(out.last_hidden_state[0, :e - s])
            else:
                logits = full_forward(bb, sample, prompt, cand).logits[0, s:e]
            reward = U.confidence_reward(logits, args.top_k, args.lam_progression)
            H += args.lr * reward * eps / sigma ** 2
            sigma *= args.sigma_decay
    t.append(clock())
    hook = hook_slots(bb, prompt, H.detach())           # model.generate with the hook (prefill only in released)
    try:
        bb.model.generate(**generate_inputs(bb, sample), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False)
    finally:
        hook.remove()
    t.append(clock())
    return [t[i + 1] - t[i] for i in range(4)]


def generate_inputs(bb, sample) -> dict:
    """One prompt as `model.generate` takes it, on the model's device."""
    n = len(sample["input_ids"])
    x = dict(input_ids=sample["input_ids"][None], attention_mask=torch.ones(1, n, dtype=torch.long),
             pixel_values=sample["pixel_values"], image_grid_thw=sample["image_grid_thw"],
             mm_token_type_ids=sample["mm_token_type_ids"][None])
    return {k: v.to(bb.model.device) for k, v in x.items()}


def plain(bb, it, args, gen, new_tokens):
    t0 = clock()
    sample, _ = U.slots_sample(bb, it, args)
    with torch.no_grad():
        bb.model.generate(**generate_inputs(bb, sample), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False)
    return [0.0, 0.0, 0.0, clock() - t0]


def plain_ours(bb, it, args, gen, new_tokens):
    """The same prompt answered with H0 by this file's decoder (no optimisation, no relevance pass)."""
    t0 = clock()
    sample, q = U.slots_sample(bb, it, args)
    s, e = U.slot_range(sample, bb.token_id(U.SLOT_TOKEN), args.num_slots)
    prompt = U.make_prompt(bb, sample, s, e, q)
    prefix = U.prefill(bb, prompt, with_relevance=False)
    t1 = clock()
    U.greedy_answer(bb, prompt, prefix, prompt.embeds[s:e], new_tokens, stop_at_eos=False)
    return [t1 - t0, 0.0, 0.0, clock() - t1]


def variants(bb) -> dict:
    """name -> f(bb, item, args, gen, new_tokens) -> seconds [prompt + prefix, Stage I, Stage II, generation]."""
    eager = lambda f: (lambda *x: run_eager(bb, f, *x))   # noqa: E731
    return {"plain generation": plain, "plain generation, this file's decoder": plain_ours,
            "ULR, this file": ours, "ULR, this file, eager everywhere": eager(ours),
            "ULR, released procedure (eager)": eager(lambda *x: released(*x, kv_reuse=False)),
            "ULR, released --kv_reuse (eager)": eager(lambda *x: released(*x, kv_reuse=True))}


def measure(bb, args, items, repeats: int, new_tokens: int, names=None) -> dict:
    """name -> per (repeat, item) the split seconds of that variant (`names`: a subset of variants(bb)); the variants
    interleaved per item, after one warm-up round."""
    run = {k: f for k, f in variants(bb).items() if names is None or k in names}
    gen = torch.Generator().manual_seed(0)
    times = {k: [] for k in run}
    for r in range(repeats + 1):                        # repeat 0 warms up
        for it in items:
            for name, f in run.items():
                split = f(bb, it, args, gen, new_tokens)
                if r:
                    times[name].append(split)
    return times


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--items", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--model", default="runs/lvr/export")
    opt = p.parse_args()
    U.ensure_toy_lvr(opt.model)
    args = U.resolve(U.Args(model=opt.model))
    bb = U.load_latent_model(opt.model, args)
    items = E.load_benchmark("vstar", "", U.eval_args("vstar", args))[0][:opt.items]
    times = measure(bb, args, items, opt.repeats, opt.new_tokens)
    med = {k: [statistics.median(x[i] for x in v) for i in range(4)] for k, v in times.items()}
    base, base_ours = sum(med["plain generation"]), sum(med["plain generation, this file's decoder"])
    print(f"toy LVR export, slots mode, {args.stage1_steps} + {args.stage2_steps} steps, {opt.new_tokens} new tokens, "
          f"{len(items)} items x {opt.repeats} repeats, median per item (ms)")
    print("| variant | prompt + prefix | Stage I | Stage II | generation | total | / plain `generate` | "
          "/ plain, this file's decoder |")
    print("|---|---|---|---|---|---|---|---|")
    for k, m in med.items():
        print(f"| {k} | " + " | ".join(f"{x * 1e3:.1f}" for x in m) + f" | {sum(m) * 1e3:.1f} | {sum(m) / base:.2f} | "
              f"{sum(m) / base_ours:.2f} |")
    o, rel, kv = sum(med["ULR, this file, eager everywhere"]), sum(med["ULR, released procedure (eager)"]), \
        sum(med["ULR, released --kv_reuse (eager)"])
    print(f"saving (same eager kernels): released / this file = {rel / o:.2f}x per sample; "
          f"with --kv_reuse {kv / o:.2f}x; "
          f"Stage I {med['ULR, released procedure (eager)'][1] / med['ULR, this file, eager everywhere'][1]:.2f}x, "
          f"Stage II {med['ULR, released procedure (eager)'][2] / med['ULR, this file, eager everywhere'][2]:.2f}x")


def run_eager(bb, f, *x):
    with U.attention_implementation(bb.model, "eager"):
        return f(*x)


if __name__ == "__main__":
    main()
