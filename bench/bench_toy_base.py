"""Does the toy base model answer in format, and does a short fine-tune on the toy LVR records move its scores?

Builds (or reuses) the toy base (`toy_base.ensure_toy_base`), evaluates it with eval.py on the toy V*, MMVP and
BLINK copies (plain decoding; the answer-tag protocol that LVR / Pearl use, and the lmms preset), fine-tunes it for
`--steps` of plain SFT on data/toy/lvr_train.json (full image, `<lvr>` dropped, full fine-tuning),
evaluates again and prints one table with the binomial standard errors and the chance levels.

    python bench/bench_toy_base.py                                  # base vs base + 60 SFT steps
    python bench/bench_toy_base.py --steps 60 --lr 1e-3 --prompts answer-tag,lmms --out runs/toy_base_bench
"""
import json
import os
import sys
import time
from dataclasses import dataclass, field

from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import eval as E  # noqa: E402
import toy_base  # noqa: E402
import toy_world as T  # noqa: E402


@dataclass
class Args:
    base_dir: str = field(default="data/toy/base", metadata={"help": "toy base export (built when missing)"})
    as_is: bool = field(default=False, metadata={"help": "use base_dir as it is (any recipe), never (re)build it"})
    world: str = field(default="data/toy", metadata={"help": "toy world root"})
    out: str = field(default="runs/toy_base_bench", metadata={"help": "fine-tuned export and eval outputs"})
    steps: int = field(default=60, metadata={"help": "SFT steps on the toy LVR records"})
    lr: float = field(default=1e-3, metadata={"help": "peak lr of the fine-tune"})
    per_micro: int = field(default=8, metadata={"help": "samples per fine-tuning step"})
    seed: int = field(default=0, metadata={"help": "seed of the base and of the fine-tune's data order"})
    benchmarks: str = field(default="vstar,mmvp,blink", metadata={"help": "toy eval sets"})
    prompts: str = field(default="answer-tag,lmms", metadata={"help": "eval.py prompt presets"})
    limit: int = field(default=0, metadata={"help": "items per benchmark (0 = all)"})
    batch_size: int = field(default=32, metadata={"help": "eval generation batch"})


def evaluate(model_dir, tag, a: Args, world) -> dict:
    """eval.py on each benchmark and prompt; returns {(bench, prompt): summary}."""
    bb = C.load_backbone(model_dir)
    recipe = toy_base.RECIPE
    out = {}
    for prompt in [p for p in a.prompts.split(",") if p]:
        for bench in [b for b in a.benchmarks.split(",") if b]:
            path = os.path.join(a.out, "eval", f"{tag}_{bench}_{prompt}.json")
            preds = path.replace(".json", ".predictions.jsonl")
            if os.path.exists(preds):
                os.unlink(preds)
            ea = E.Args(benchmark=bench, data_dir=os.path.join(world, "eval", bench), model=model_dir, prompt=prompt,
                        output=path, predictions=preds, min_pixels=recipe.min_pixels, max_pixels=recipe.max_pixels,
                        limit=a.limit, batch_size=a.batch_size, label=tag)
            out[(bench, prompt)] = E.evaluate(ea, backbone=bb)
    return out


def main():
    (a,) = HfArgumentParser(Args).parse_args_into_dataclasses()
    os.makedirs(a.out, exist_ok=True)
    world = str(T.ensure_toy_world(a.world, seed=0))
    t0 = time.perf_counter()
    base = a.base_dir if a.as_is else toy_base.ensure_toy_base(a.base_dir, seed=a.seed)
    t_base = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_scores = evaluate(base, "base", a, world)
    t_eval = time.perf_counter() - t0
    t0 = time.perf_counter()
    tuned = toy_base.finetune_base(base, os.path.join(a.out, "finetuned"), os.path.join(world, "lvr_train.json"),
                                   steps=a.steps, per_micro=a.per_micro, lr=a.lr, seed=a.seed)
    t_tune = time.perf_counter() - t0
    tuned_scores = evaluate(tuned, f"base+{a.steps}sft", a, world)
    rows = []
    print(f"\n| benchmark | prompt | chance | base | base + {a.steps} SFT steps | difference | "
          "unanswerable (base / tuned) |\n|---|---|---|---|---|---|---|")
    for key, s in base_scores.items():
        t = tuned_scores[key]
        diff_se = (s["se"] ** 2 + t["se"] ** 2) ** 0.5
        print(f"| {key[0]} | {key[1]} | {s['chance']:.1f} | {s['overall']:.1f} ± {s['se']:.1f} | "
              f"{t['overall']:.1f} ± {t['se']:.1f} | {t['overall'] - s['overall']:+.1f} ± {diff_se:.1f} | "
              f"{s['unanswerable']} / {t['unanswerable']} |")
        rows.append({"benchmark": key[0], "prompt": key[1], "chance": s["chance"], "base": s["overall"],
                     "base_se": s["se"], "tuned": t["overall"], "tuned_se": t["se"],
                     "per_category_base": s["per_category"], "per_category_tuned": t["per_category"],
                     "unanswerable_base": s["unanswerable"], "unanswerable_tuned": t["unanswerable"], "n": s["n"]})
    print(f"\nbase build/reuse {t_base:.0f} s, base eval {t_eval:.0f} s, fine-tune {t_tune:.0f} s "
          f"(torch threads {C.torch.get_num_threads()})")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"args": a.__dict__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
