# Docs: spec/eval.md (benchmarks in their published formats, official scoring rules)
"""eval.py — evaluate a Qwen2.5-VL checkpoint on visual-reasoning benchmarks, read as published, scored by the
official rules, with every score-changing setting recorded in the output.

Runs:
    python eval.py --benchmark vstar --data-dir data/vstar_bench --model toy                 # offline toy backbone
    python eval.py --benchmark mmvp --data-dir data/MMVP --model Qwen/Qwen2.5-VL-7B-Instruct --output mmvp.json
    python eval.py --benchmark blink --data-dir data/BLINK --model ckpt/pearl --prompt answer-tag   # Pearl protocol
    python eval.py --benchmark vstar --data-dir data/vstar_bench --model ckpt/lvr --mode latent --prompt answer-tag
    python eval.py --benchmark mmvp --data-dir data/MMVP --predictions mmvp.jsonl --score-only    # re-score only
    python eval.py --table runs/*.json                                                         # markdown table
An interrupted run resumes: predictions are appended to the JSONL file (default `<output stem>.predictions.jsonl`)
as they are produced, and a restart skips ids already there. The file's first line is its provenance (model path
and content fingerprint, benchmark, mode, prompt, pixels, generation settings): a run with another model or setting
refuses the file in one line (`--overwrite` re-predicts), so one model's predictions are never scored as another's.
`--score-only` reports the file's provenance, warns about items without a prediction (`--strict`: exit 1).

Scoring rules (the headline `overall`, in percent):
    mmvp            pair accuracy: a pair (Index 1-2, 3-4, ...) counts only if both questions are right
                    (MMVP paper, tsb0601/MMVP); per-question accuracy is reported beside it (`question_accuracy`),
                    which is what the LVR and Pearl papers report.
    vstar           micro accuracy over 191 questions; per category (direct_attributes, relative_position).
    blink           accuracy per subtask; overall = unweighted mean over subtasks (BLINK paper / repo).
    hrbench4k/8k    VLMEvalKit `report_acc_hrbench`: accuracy within each `cycle_category` (one option order),
                    then the mean over cycles; single/cross the same way. (Not the "right in all orders" rule.)
    mmerw_lite      micro accuracy; Perception / Reasoning (from `category`) and per `l2-category`.
    cvbench         ((acc ADE20K + acc COCO) / 2 + acc Omni3D) / 2 (CV-Bench paper / Cambrian repo).
    gqa             exact match after lower-casing, removing punctuation and collapsing spaces (lmms-eval
                    `exact_match` with ignore_case, ignore_punctuation).
    scienceqa       letter accuracy, target chr(65 + answer); rows without an image are skipped and counted.
    mmstar          micro accuracy; per category.
    hallusionbench  question accuracy (aAcc); figure accuracy (fAcc: all questions of one figure right) and
                    question-pair accuracy (qAcc: one question right on all its figures), keys as in the
                    HallusionBench repo; yes/no read by rule, no GPT judge.
Multiple choice answers are read by `extract_choice` (VLMEvalKit `can_infer` behaviour, see its docstring);
an unreadable answer is scored wrong and counted in `unanswerable`.

Deviations and choices:
- One rule-based extractor for every multiple-choice benchmark instead of each harness's own regex (lmms-eval's
  MMVP/MME-RW regexes read the article "A" of "A man ..." as an answer). `--extractor official` switches
  MME-RealWorld to lmms-eval's `extract_characters_regex` (first A-E after stripping "The best answer is" etc.).
- MMVP answers: the published Questions.csv as-is by default; `--mmvp-corrected` applies lmms-eval's corrections
  (Index 100 and 280 -> (a), lmms-eval issue #1018). The summary's settings say which.
- Prompts are built from (question, options) by one preset for all benchmarks rather than each dataset's `prompt`
  column; MMStar keeps its options inside the question text under `lmms`, as lmms-eval does.
- `answer-tag` in plain mode appends `<answer>` after the generation prompt and generates 4 tokens (Pearl); in
  latent mode the LVR model writes its latent span first, so no prefix is forced and 512 tokens are allowed (LVR).
- HallusionBench is scored by a yes/no rule, not the GPT-4 judge of its repo (no network at evaluation time).
- Methods plug in through one seam: `evaluate(args, backbone=, generate=)`, where `generate(backbone, items, args)`
  returns one answer per item (a text, or (text, per-item fields written beside the prediction)). `--mode` picks
  one from GENERATORS by name ("lvr:generate_latent", "unsilence:generate_ulr"), imported only when that mode runs,
  so eval.py imports no method file. `--latent-ablation none|zeros|noise|shuffle|remove` is LVR's test-time
  ablation of the latents, recorded in the settings, the provenance and the default output name.
- Layouts checked against public sources (code search of the harnesses' task definitions):
  MMVP, BLINK columns and idx format, the HR-Bench cycle rule (VLMEvalKit); and
  V*: `text` holds the question and the options "(A) …" (one per line in the release's test_questions.jsonl, inline
  in lmms-lab/vstar-bench as read by lmms-eval `vstar_doc_to_text`; both parsed); the instruction "Answer with the
  option's letter from the given choices directly." is lmms-eval's post_prompt, not part of the question (dropped
  if a copy carries it); `label` is the letter; `category` direct_attributes | relative_position.
  MME-RealWorld-Lite: lmms-eval `mme_realworld_lite.yaml` reads yifanzhang114/MME-RealWorld-lite-lmms-eval (split
  train): `index, question, multi-choice options` (a list of "(A) text"), `answer` (letter), `category`
  ("Perception/…" | "Reasoning/…"), `l2-category`, image as base64 in `bytes` (`image` also accepted).
  HallusionBench: lmms-eval `hallusion_bench_image.yaml` reads lmms-lab/HallusionBench, split `image`: `category`
  (VD | VS), `subcategory, set_id, figure_id, question_id, question, gt_answer` ("1"/"0"), `image`; the
  figure / question-pair keys are joined as in its `hb_aggregation_result_intern`. Its default scoring is a
  GPT-4 judge; ours is the rule.
- With no --data-dir the toy world's copies (toy_world.py, published layouts) of vstar, mmvp, blink, gqa and
  scienceqa are used, so `python eval.py` runs offline on CPU.
"""
import base64
import io
import json
import math
import os
import re
import string
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path

import pandas as pd
from PIL import Image


@dataclass
class Args:
    benchmark: str = field(default="vstar", metadata={"help": "mmvp, vstar, blink, hrbench4k, hrbench8k, mmerw_lite, "
                                                              "cvbench, gqa, scienceqa, mmstar, hallusionbench"})
    data_dir: str = field(default="", metadata={"help": "folder holding the benchmark as published (default: the "
                                                         "toy world's copy, for vstar, mmvp, blink, gqa, scienceqa)"})
    model: str = field(default="toy", metadata={"help": "HF checkpoint path/name, or 'toy'"})
    mode: str = field(default="plain", metadata={"help": "plain | latent (LVR) | unsilence (ULR)"})
    prompt: str = field(default="lmms", metadata={"help": "prompt preset: lmms | answer-tag | vlmeval"})
    predictions: str = field(default="", metadata={"help": "predictions JSONL (default: <output stem>.predictions.jsonl)"})
    output: str = field(default="", metadata={"help": "summary JSON (default: runs/eval/<benchmark>_summary.json)"})
    score_only: bool = field(default=False, metadata={"help": "re-score an existing predictions file, no model"})
    overwrite: bool = field(default=False, metadata={"help": "re-predict from scratch when the predictions file was "
                                                             "made by another model or setting (default: refuse)"})
    strict: bool = field(default=False, metadata={"help": "--score-only: exit 1 when items have no prediction"})
    batch_size: int = field(default=8, metadata={"help": "generation batch size (left padding)"})
    limit: int = field(default=0, metadata={"help": "evaluate only the first N items (0 = all)"})
    max_new_tokens: int = field(default=0, metadata={"help": "0 = the preset's default (16 lmms/vlmeval, 4 answer-tag)"})
    min_pixels: int = field(default=256 * 28 * 28, metadata={"help": "smallest image size in pixels (lmms-eval default)"})
    max_pixels: int = field(default=2048 * 28 * 28, metadata={"help": "largest image size in pixels (lmms-eval default)"})
    latent_steps: int = field(default=8, metadata={"help": "LVR fixed latent steps in --mode latent (4, 8 or 16)"})
    latent_ablation: str = field(default="none", metadata={"help": "--mode latent test-time ablation of the latents: "
                                                                   "none | zeros | noise | shuffle | remove"})
    latent_force_span: bool = field(default=False, metadata={"help": "--mode latent: open the latent span at the start "
                                                                     "of the answer (<|lvr_start|> as the assistant "
                                                                     "prefix) and close it after N steps, for a model "
                                                                     "that does not emit the span tokens itself"})
    extractor: str = field(default="robust", metadata={"help": "robust | official (lmms-eval regex for mmerw_lite)"})
    mmvp_corrected: bool = field(default=False, metadata={"help": "apply lmms-eval's MMVP answer corrections"})
    label: str = field(default="", metadata={"help": "row name in --table (default: model + mode)"})
    method_settings: str = field(default="", metadata={"help": "a method's own settings that change its answers "
                                                               "(JSON; set by the method file calling evaluate), "
                                                               "recorded in the provenance"})
    table: list[str] = field(default_factory=list, metadata={"help": "summary JSONs -> print a markdown table"})


SYSTEM_PROMPT = "You are a helpful assistant."
LMMS_MC_SUFFIX = "Answer with the option's letter from the given choices directly."
LMMS_OPEN_SUFFIX = "Answer the question using a single word or phrase."
VLMEVAL_SUFFIX = "Please select the correct answer from the options above."


# ---------------------------------------------------------------------------------------------------------------
# Loaders: each returns [{"id", "question", "options" {letter: text} | None, "answer", "category", "images", "extra"}]
# ---------------------------------------------------------------------------------------------------------------
def decode_image(x, root=""):
    """A published image cell -> PIL image (lazy decode) or a path: HF Image struct, raw bytes, base64 text, path."""
    if isinstance(x, dict):
        if x.get("bytes") is not None:
            return Image.open(io.BytesIO(x["bytes"]))
        return os.path.join(root, x["path"])
    if isinstance(x, (bytes, bytearray)):
        return Image.open(io.BytesIO(x))
    if isinstance(x, str) and os.path.exists(os.path.join(root, x)):
        return os.path.join(root, x)
    return Image.open(io.BytesIO(base64.b64decode(x)))


def letters(texts):
    return {chr(65 + i): str(t) for i, t in enumerate(texts)}


def item(id, question, options, answer, category, images, **extra):
    return {"id": id, "question": question, "options": options, "answer": answer, "category": category,
            "images": images, "extra": extra}


def read_table(path_or_glob):
    """Concatenate parquet / tsv / csv / jsonl files matched by a glob (sorted, so row order is stable)."""
    paths = sorted(glob(path_or_glob))
    if not paths:
        raise FileNotFoundError(f"no file matches {path_or_glob}")
    frames = []
    for p in paths:
        if p.endswith(".parquet"):
            frames.append(pd.read_parquet(p))
        elif p.endswith(".tsv"):
            frames.append(pd.read_csv(p, sep="\t", keep_default_na=False))
        elif p.endswith(".csv"):
            frames.append(pd.read_csv(p, keep_default_na=False))
        else:
            frames.append(pd.read_json(p, lines=True))
    return pd.concat(frames, ignore_index=True)


def first_match(data_dir, *patterns):
    for pat in patterns:
        if glob(os.path.join(data_dir, pat)):
            return os.path.join(data_dir, pat)
    raise FileNotFoundError(f"none of {patterns} under {data_dir}")


def paren_letter(answer):
    """'(A)' / 'A' / '(a) Open' -> 'A'."""
    m = re.match(r"\s*\(?\s*([A-Za-z])\s*\)?", str(answer))
    return m.group(1).upper()


MMVP_CORRECTIONS = {100: "A", 280: "A"}  # 1-based Index -> answer (lmms-eval issue #1018: tusks long; standing)


def load_mmvp(data_dir, args):
    df = read_table(first_match(data_dir, "Questions.csv", "*/Questions.csv"))
    root = os.path.dirname(first_match(data_dir, "Questions.csv", "*/Questions.csv"))
    out = []
    for r in df.to_dict("records"):
        idx = int(r["Index"])
        opts = re.findall(r"\(([a-z])\)\s*(.*?)\s*(?=\([a-z]\)|$)", str(r["Options"]))
        answer = paren_letter(r["Correct Answer"])
        if args.mmvp_corrected and idx in MMVP_CORRECTIONS:
            answer = MMVP_CORRECTIONS[idx]
        out.append(item(idx, str(r["Question"]).strip(), {k.upper(): v for k, v in opts}, answer, "mmvp",
                        [os.path.join(root, "MMVP Images", f"{idx}.jpg")], pair=(idx - 1) // 2))
    return out


VSTAR_OPTION = re.compile(r"\(([A-D])\)\s*(.*?)\s*(?=\([A-D]\)|$)", re.S)


def vstar_question(text):
    """(stem, {letter: option}) from a V* `text`: options one per line after the question (the release's
    test_questions.jsonl), or inline, "Question? (A) x (B) y" (how lmms-eval's vstar_doc_to_text reads
    lmms-lab/vstar-bench); a trailing "Answer with the option's letter ..." instruction is dropped."""
    text = re.split(r"\n?Answer with the option", text)[0]
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if sum(bool(re.match(r"\([A-D]\)", ln)) for ln in lines) >= 2:          # one option per line
        opts = {m.group(1): m.group(2).strip() for ln in lines if (m := re.match(r"\(([A-D])\)\s*(.*)", ln))}
        return "\n".join(ln for ln in lines if not re.match(r"\([A-D]\)", ln)), opts
    stem, sep, tail = text.partition("(A)")
    return stem.strip(), {k: v.strip() for k, v in VSTAR_OPTION.findall(sep + tail)}


def load_vstar(data_dir, args):
    out = []
    with open(first_match(data_dir, "test_questions.jsonl")) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            stem, opts = vstar_question(r["text"])
            out.append(item(r["question_id"], stem, opts, paren_letter(r["label"]), r["category"],
                            [os.path.join(data_dir, r["image"])]))
    return out


def load_blink(data_dir, args):
    out = []
    for p in sorted(glob(os.path.join(data_dir, "*", "val-*.parquet"))):
        for r in pd.read_parquet(p).to_dict("records"):
            images = [decode_image(r[f"image_{k}"]) for k in range(1, 5) if r.get(f"image_{k}") is not None]
            task = r.get("sub_task") or os.path.basename(os.path.dirname(p))
            out.append(item(r["idx"], r["question"], letters(r["choices"]), paren_letter(r["answer"]), task, images))
    return out


def load_hrbench(data_dir, args, which):
    df = read_table(first_match(data_dir, f"hr_bench_{which}.tsv", f"hr_bench_{which}.parquet", f"*{which}*.parquet"))
    out = []
    for r in df.to_dict("records"):
        opts = {k: str(r[k]) for k in "ABCD" if k in r and str(r[k]) not in ("", "nan", "None")}
        out.append(item(int(r["index"]), r["question"], opts, paren_letter(r["answer"]), r["category"],
                        [decode_image(r["image"])], cycle=r["cycle_category"]))
    return out


def load_mmerw_lite(data_dir, args):
    df = read_table(first_match(data_dir, "*.parquet", "data/*.parquet"))
    out = []
    for r in df.to_dict("records"):
        opts = {}
        for k, text in enumerate(r["multi-choice options"]):  # "(A) text", full-width parens in some rows
            text = str(text).replace("（", "(").replace("）", ")")
            m = re.match(r"\s*\(([A-Z])\)\s*(.*)", text)
            opts[m.group(1) if m else chr(65 + k)] = (m.group(2) if m else text).strip()
        cell = r.get("bytes", r.get("image"))
        kind = "Perception" if "perception" in str(r["category"]).lower() else "Reasoning"
        out.append(item(r["index"], r["question"], opts, paren_letter(r["answer"]), kind,
                        [decode_image(cell)], l2=r.get("l2-category", "")))
    return out


def load_cvbench(data_dir, args):
    out = []
    for split in ("test_2d", "test_3d"):
        for r in read_table(first_match(data_dir, f"{split}.parquet", f"*/{split}.parquet")).to_dict("records"):
            out.append(item(f"{split}/{r['idx']}", r["question"], letters(r["choices"]), paren_letter(r["answer"]),
                            r["task"], [decode_image(r["image"])], source=r["source"]))
    return out


def load_gqa(data_dir, args):
    qs = read_table(first_match(data_dir, "testdev_balanced_instructions/*.parquet",
                                "*testdev_balanced_instructions*.parquet"))
    ims = read_table(first_match(data_dir, "testdev_balanced_images/*.parquet", "*testdev_balanced_images*.parquet"))
    images = dict(zip(ims["id"], ims["image"]))
    return [item(str(r["id"]), r["question"], None, r["answer"], "gqa", [decode_image(images[r["imageId"]])])
            for r in qs.to_dict("records")]


def load_scienceqa(data_dir, args):
    df = read_table(first_match(data_dir, "ScienceQA-IMG/test-*.parquet", "test-*.parquet", "test.parquet"))
    out, skipped = [], 0
    for i, r in enumerate(df.to_dict("records")):
        if r.get("image") is None:
            skipped += 1
            continue
        hint = str(r.get("hint") or "").strip()
        question = (f"Context: {hint}\n" if hint else "") + r["question"]
        out.append(item(i, question, letters(r["choices"]), chr(65 + int(r["answer"])),
                        str(r.get("subject", "scienceqa")), [decode_image(r["image"])]))
    if skipped:
        print(f"scienceqa: skipped {skipped} rows without an image")
    return out, skipped


def load_mmstar(data_dir, args):
    df = read_table(first_match(data_dir, "mmstar.parquet", "*.parquet"))
    out = []
    for r in df.to_dict("records"):
        stem, _, tail = str(r["question"]).partition("Options:")
        opts = dict(re.findall(r"([A-F]):\s*(.*?)\s*(?=,\s*[A-F]:|$)", tail.strip(), flags=re.S))
        out.append(item(r["index"], r["question"], opts, paren_letter(r["answer"]), r["category"],
                        [decode_image(r["image"])], stem=stem.strip(), options_in_question=True))
    return out


def load_hallusionbench(data_dir, args):
    df = read_table(first_match(data_dir, "data/image-*.parquet", "image-*.parquet", "*.parquet", "data/*.parquet",
                                  "*.tsv"))                     # lmms-lab/HallusionBench: split "image"
    out = []
    for i, r in enumerate(df.to_dict("records")):
        if r.get("image") is None:  # visual_input 0 questions: not in the 951-question image split
            continue
        answer = "yes" if str(r["gt_answer"]).strip() in ("1", "yes", "Yes") else "no"
        key = [str(r[k]) for k in ("category", "subcategory", "set_id")]
        out.append(item(i, r["question"], None, answer, r["category"], [decode_image(r["image"])],
                        yes_no=True, figure="_".join(key + [str(r["figure_id"])]), qpair="_".join(key + [str(r["question_id"])])))
    return out


# name -> (loader, published n)
BENCHMARKS = {
    "mmvp": (load_mmvp, 300), "vstar": (load_vstar, 191), "blink": (load_blink, 1901),
    "hrbench4k": (lambda d, a: load_hrbench(d, a, "4k"), 800), "hrbench8k": (lambda d, a: load_hrbench(d, a, "8k"), 800),
    "mmerw_lite": (load_mmerw_lite, 1919), "cvbench": (load_cvbench, 2638), "gqa": (load_gqa, 12578),
    "scienceqa": (load_scienceqa, 2017), "mmstar": (load_mmstar, 1500), "hallusionbench": (load_hallusionbench, 951),
}


TOY_WORLD_DIRS = {"vstar": "eval/vstar", "mmvp": "eval/mmvp", "blink": "eval/blink", "gqa": "gqa",
                  "scienceqa": "scienceqa"}


def load_benchmark(name, data_dir, args):
    """Items of a benchmark, plus warnings (count differs from the published n, skipped rows)."""
    loader, published_n = BENCHMARKS[name]
    if not data_dir:  # offline default: the generated toy world, in the published layouts
        if name not in TOY_WORLD_DIRS:
            raise ValueError(f"the toy world has no {name}; pass --data-dir")
        from toy_world import ensure_toy_world
        data_dir = os.path.join(ensure_toy_world(), TOY_WORLD_DIRS[name])
    items, warnings = loader(data_dir, args), []
    if isinstance(items, tuple):
        items, skipped = items
        warnings.append(f"{name}: {skipped} rows without an image skipped")
    print(f"{name}: {len(items)} items (published n = {published_n})")
    if len(items) != published_n:
        warnings.append(f"{name}: loaded {len(items)} items, published n is {published_n}")
    if args.limit:
        items = items[: args.limit]
        warnings.append(f"{name}: --limit {args.limit}, scored on {len(items)} items")
    return items, warnings


# ---------------------------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------------------------
def answer_span(text):
    """The text after `<answer>` (if any) up to `</answer` (if any)."""
    text = str(text)
    if "<answer>" in text:
        text = text.split("<answer>", 1)[1]
    return text.split("</answer", 1)[0].strip()


NOT_ARTICLE = {"is", "was", "and", "or", "seems", "appears", "would", "should", "matches"}


def extract_choice(text, options):
    """Read a multiple-choice letter from a model output; None if it cannot be read.

    VLMEvalKit `can_infer` behaviour: (1) the whole output is one letter, "(B)", "B.", "b)"; (2) "the answer is
    (X)" / "answer: X"; (3) after replacing punctuation by spaces, exactly one option letter stands alone as a
    token (an upper-case "A" followed by a lower-case word is the article, not an option: "A man is ..."; several
    distinct letters -> None); (4) exactly one option's text appears as a whole phrase anywhere in the output -> its
    letter (VLMEvalKit `can_infer_text`, with phrase boundaries instead of substrings). A lower-case letter after
    "answer is" counts when the sentence ends there ("the answer is c").
    """
    s = answer_span(text)
    valid = set(options)
    m = re.fullmatch(r"[\(\[]?\s*([A-Za-z])\s*[\)\]]?\s*[.:]?", s)
    if m:
        return m.group(1).upper() if m.group(1).upper() in valid else None
    m = re.search(r"answer\s*(?:is|:)?\s*:?\s*(?:option\s*)?(\(([A-Za-z])\)|\b([A-Z])\b)", s, flags=re.I)
    if m and (m.group(2) or m.group(3)) and (m.group(2) or m.group(3)).upper() in valid:
        # a lower-case letter counts only when the sentence ends there: "the answer is c", not "... is a blue one"
        if m.group(2) or m.group(3).isupper() or re.match(r"\s*([.,;:!?)]|$)", s[m.end():]):
            return (m.group(2) or m.group(3)).upper()
    found = {x.upper() for x in re.findall(r"\(([a-z])\)", s) if x.upper() in valid}
    for m in re.finditer(r"(?<![\w-])([A-Z])(?![\w-])", s):  # standalone capital letters
        if m.group(1) not in valid:
            continue
        after = s[m.end():]
        nxt = re.match(r" +([a-z]\w*)", after)
        if m.group(1) == "A" and nxt and nxt.group(1) not in NOT_ARTICLE:
            continue  # the article: "A man is standing"
        found.add(m.group(1))
    if len(found) == 1:
        return found.pop()
    if found:
        return None
    low = s.lower()  # option text as a whole phrase; lookarounds, since an option may end in "." (V*-style)
    hits = [k for k, v in options.items()
            if v.strip() and re.search(r"(?<!\w)" + re.escape(v.lower().strip()) + r"(?!\w)", low)]
    return hits[0] if len(hits) == 1 else None


def extract_choice_mmerw_official(text, options):
    """lmms-eval `extract_characters_regex` for MME-RealWorld: strip answer prefixes, first A-E letter."""
    s = answer_span(text)
    for prefix in ("The best answer is", "The correct answer is", "The answer is", "The answer",
                   "The best option is", "The correct option is", "Best answer:", "Best option:"):
        s = s.replace(prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCDE]", s):
        return None
    m = re.search(r"[ABCDE]", s)
    return m.group(0) if m else None


def extract_yes_no(text):
    words = re.findall(r"\b(yes|no)\b", answer_span(text).lower())
    return words[0] if words else None


def normalize_open(text):
    """GQA exact-match normalisation: lower-case, drop punctuation, collapse whitespace."""
    text = str(text).lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------
def pct(xs):
    xs = list(xs)
    return 100.0 * sum(xs) / len(xs) if xs else 0.0


def by(items, key, values):
    groups = defaultdict(list)
    for it, v in zip(items, values):
        groups[key(it)].append(v)
    return dict(sorted(groups.items()))


def judge(benchmark, items, predictions, args):
    """Per item: (correct, readable). A missing prediction is wrong and unreadable."""
    out = []
    for it in items:
        text = predictions.get(str(it["id"]))
        if text is None:
            out.append((False, False))
        elif benchmark == "gqa":
            out.append((normalize_open(answer_span(text)) == normalize_open(it["answer"]), True))
        elif benchmark == "hallusionbench":
            yn = extract_yes_no(text)
            out.append((yn == it["answer"], yn is not None))
        else:
            official = args.extractor == "official" and benchmark == "mmerw_lite"
            letter = (extract_choice_mmerw_official if official else extract_choice)(text, it["options"])
            out.append((letter == it["answer"], letter is not None))
    return out


def score(benchmark, items, predictions, args, warnings=()):
    """Summary dict for one benchmark; `predictions` maps str(id) -> raw model text."""
    verdicts = judge(benchmark, items, predictions, args)
    correct = [c for c, _ in verdicts]
    missing = sum(str(it["id"]) not in predictions for it in items)
    s = {"benchmark": benchmark, "n": len(items), "overall": pct(correct), "micro": pct(correct),
         "per_category": {k: pct(v) for k, v in by(items, lambda it: it["category"], correct).items()},
         "unanswerable": sum(not r for _, r in verdicts) - missing, "missing_predictions": missing}
    if benchmark == "mmvp":
        pairs = by(items, lambda it: it["extra"]["pair"], correct)
        s["pair_accuracy"] = pct(all(v) for v in pairs.values() if len(v) == 2)
        s["question_accuracy"], s["overall"] = s["micro"], s["pair_accuracy"]
        s["per_category"] = {"pairs": s["pair_accuracy"], "questions": s["question_accuracy"]}
        if any(len(v) != 2 for v in pairs.values()):
            warnings = list(warnings) + ["mmvp: incomplete pairs ignored by pair accuracy"]
    elif benchmark == "blink":
        s["overall"] = sum(s["per_category"].values()) / max(len(s["per_category"]), 1)
    elif benchmark.startswith("hrbench"):
        cycles = by(items, lambda it: it["extra"]["cycle"], list(zip(items, correct)))
        s["per_cycle"] = {c: pct(v for _, v in rows) for c, rows in cycles.items()}
        s["overall"] = sum(s["per_cycle"].values()) / max(len(cycles), 1)
        per_cat = defaultdict(list)
        for rows in cycles.values():
            for cat, vals in by([it for it, _ in rows], lambda it: it["category"], [v for _, v in rows]).items():
                per_cat[cat].append(pct(vals))
        s["per_category"] = {cat: sum(v) / len(cycles) for cat, v in sorted(per_cat.items())}  # as VLMEvalKit
    elif benchmark == "cvbench":
        src = {k: pct(v) for k, v in by(items, lambda it: it["extra"]["source"], correct).items()}
        s["per_source"] = src
        s["overall"] = ((src.get("ADE20K", 0.0) + src.get("COCO", 0.0)) / 2 + src.get("Omni3D", 0.0)) / 2
    elif benchmark == "mmerw_lite":
        s["per_l2_category"] = {k: pct(v) for k, v in by(items, lambda it: it["extra"]["l2"], correct).items()}
    elif benchmark == "hallusionbench":
        figs = by(items, lambda it: it["extra"]["figure"], correct)
        qpairs = by(items, lambda it: it["extra"]["qpair"], correct)
        s["aAcc"], s["fAcc"], s["qAcc"] = s["micro"], pct(all(v) for v in figs.values()), pct(all(v) for v in qpairs.values())
    s.update(uncertainty(benchmark, items, correct, s))
    s["warnings"] = list(warnings)
    s["settings"] = settings(args, benchmark)
    return s


def binomial_se(p_percent, n):
    """Standard error (percentage points) of an accuracy p measured on n independent units: sqrt(p(1-p)/n)."""
    p = p_percent / 100.0
    return 100.0 * math.sqrt(p * (1 - p) / n) if n else 0.0


def uncertainty(benchmark, items, correct, s):
    """`se` (binomial standard error of `overall`, in points) and `chance` (the expected `overall` of uniform guessing
    among the options), both over the headline's own units: MMVP pairs (chance = the product of the two questions'
    1/#options), BLINK the unweighted mean over subtasks (SE = sqrt(sum SE_k^2) / K), otherwise items (macro averages
    such as HR-Bench's or CV-Bench's are given the items' binomial SE, an approximation). Open-ended answers (GQA)
    have chance 0; yes/no questions 50."""
    def item_chance(it):
        if it["options"]:
            return 100.0 / len(it["options"])
        return 50.0 if it["extra"].get("yes_no") else 0.0
    chances = [item_chance(it) for it in items]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    if benchmark == "mmvp":
        pairs = by(items, lambda it: it["extra"]["pair"], list(zip(correct, chances)))
        full = [v for v in pairs.values() if len(v) == 2]
        chance = mean([v[0][1] * v[1][1] / 100.0 for v in full])
        return {"se": binomial_se(s["overall"], len(full)), "chance": chance, "se_units": len(full),
                "question_se": binomial_se(s["question_accuracy"], len(items)), "question_chance": mean(chances)}
    if benchmark == "blink":
        groups = by(items, lambda it: it["category"], list(zip(correct, chances)))
        ses = [binomial_se(pct(c for c, _ in v), len(v)) for v in groups.values()]
        return {"se": math.sqrt(sum(x * x for x in ses)) / max(len(ses), 1),
                "chance": mean([mean([ch for _, ch in v]) for v in groups.values()]), "se_units": len(items)}
    return {"se": binomial_se(s["overall"], len(items)), "chance": mean(chances), "se_units": len(items)}


def settings(args, benchmark):
    """Everything that changes the number."""
    preset_tokens = {"lmms": 16, "vlmeval": 16, "answer-tag": 512 if args.mode == "latent" else 4}
    out = {"model": args.model, "mode": args.mode, "prompt": args.prompt, "system": SYSTEM_PROMPT,
           "decoding": "greedy", "max_new_tokens": args.max_new_tokens or preset_tokens[args.prompt],
           "min_pixels": args.min_pixels, "max_pixels": args.max_pixels, "batch_size": args.batch_size,
           "extractor": args.extractor if benchmark == "mmerw_lite" else "robust", "limit": args.limit,
           "label": args.label or f"{args.model} ({args.mode}, {args.prompt})"}
    if args.mode == "latent":
        out["latent_steps"] = args.latent_steps
        out["latent_ablation"] = args.latent_ablation
        out["latent_force_span"] = args.latent_force_span
        if not args.label and args.latent_ablation != "none":
            out["label"] = f"{args.model} ({args.mode}, {args.prompt}, latents {args.latent_ablation})"
    if args.mode == "unsilence":  # the method builds its own (released) prompt; --prompt does not apply
        out["prompt"] = "unsilence.py: released ULR prompt (system <think>/<answer>, 4 <|endoftext|> slots)"
    if args.method_settings:
        out["method_settings"] = args.method_settings
    if benchmark == "mmvp":
        out["mmvp_answers"] = ("lmms-eval corrected (Index 100, 280 -> A)" if args.mmvp_corrected
                               else "published Questions.csv as-is")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------------
def build_messages(it, args):
    """(messages, assistant_prefix) for one item under the chosen preset."""
    opts, q = it["options"], it["question"]
    if args.prompt == "vlmeval" and opts:
        stem = it["extra"].get("stem", q)
        text = f"Question: {stem}\nOptions:\n" + "".join(f"{k}. {v}\n" for k, v in opts.items()) + VLMEVAL_SUFFIX
    elif opts:
        listed = "" if it["extra"].get("options_in_question") else "".join(f"\n{k}. {v}" for k, v in opts.items())
        text = f"{q}{listed}\n{LMMS_MC_SUFFIX}"
    elif it["extra"].get("yes_no"):  # HallusionBench: the question alone (lmms-eval)
        text = q
    else:
        text = f"{q}\n{LMMS_OPEN_SUFFIX}"
    content = [{"type": "image", "image": load_image(im)} for im in it["images"]] + [{"type": "text", "text": text}]
    prefix = "<answer>" if args.prompt == "answer-tag" and args.mode == "plain" else \
        "<|lvr_start|>" if args.mode == "latent" and args.latent_force_span else ""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}], prefix


def load_image(im):
    return (Image.open(im) if isinstance(im, str) else im).convert("RGB")


# ---------------------------------------------------------------------------------------------------------------
# Generation: the harness hands a method's `generate` one batch of items at a time
# ---------------------------------------------------------------------------------------------------------------
# A generate function is the one seam between eval.py and a method: generate(backbone, items, args) -> one answer per
# item, in order: a text, or (text, dict of per-item fields written beside the prediction). The method encodes its
# own prompts (encode_item) and pads them once. eval.py imports no method file: `--mode` names a function by
# "module:function", imported only when that mode runs.
GENERATORS = {"plain": "eval:generate_plain", "latent": "lvr:generate_latent", "unsilence": "unsilence:generate_ulr"}


def load_model(args):
    import torch
    from common import load_backbone
    from runtime import warn_untested_versions
    warn_untested_versions()
    model = args.model
    if model == "toy-base":                       # the pretrained toy "stage 0", built once on first use
        from toy_base import ensure_toy_base
        model = ensure_toy_base()
    return load_backbone(model, device="cuda" if torch.cuda.is_available() else "cpu")


def encode_item(backbone, it, args):
    from common import encode_chat
    messages, prefix = build_messages(it, args)
    return encode_chat(backbone, messages, add_generation_prompt=True, min_pixels=args.min_pixels,
                       max_pixels=args.max_pixels, assistant_prefix=prefix)


GENERATE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


def generate_plain(backbone, items, args):
    """Greedy decoding of the benchmark prompt, left-padded, the model's own `generate`."""
    import torch
    from common import pad_batch
    model = backbone.model
    batch = pad_batch(backbone, [encode_item(backbone, it, args) for it in items], side="left",
                      with_positions=False)                                  # generate computes M-RoPE itself
    batch = {k: batch[k].to(model.device) for k in GENERATE_KEYS if batch.get(k) is not None}
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=settings(args, args.benchmark)["max_new_tokens"],
                             do_sample=False)
    return backbone.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def resolve_generator(mode):
    import importlib
    module, name = GENERATORS[mode].split(":")
    try:
        return getattr(sys.modules[__name__] if module == "eval" else importlib.import_module(module), name)
    except ImportError as e:
        raise ImportError(f"--mode {mode} needs {module}.py ({GENERATORS[mode]}), which is missing") from e


def predict(items, backbone, args, generate):
    """Yield (id, text, extra) per item, asking `generate` for --batch-size items at a time."""
    for start in range(0, len(items), args.batch_size):
        chunk = items[start: start + args.batch_size]
        answers = generate(backbone, chunk, args)
        if len(answers) != len(chunk):
            raise RuntimeError(f"generate returned {len(answers)} answers for {len(chunk)} items")
        for it, a in zip(chunk, answers):
            text, extra = a if isinstance(a, tuple) else (a, {})
            yield it["id"], text, extra


# ---------------------------------------------------------------------------------------------------------------
# Predictions file (resumable) and the run
# ---------------------------------------------------------------------------------------------------------------
LATENT_ABLATIONS = ("none", "zeros", "noise", "shuffle", "remove")


PREDICTION_KEYS = ("mode", "prompt", "system", "decoding", "max_new_tokens", "min_pixels", "max_pixels",
                   "latent_steps", "latent_ablation", "latent_force_span", "method_settings")


def model_fingerprint(model: str) -> str:
    """A content fingerprint of a checkpoint: sha256 over its config.json, its weights index and, per safetensors
    file, the header (names, shapes, dtypes) plus 16 blocks of 64 KiB sampled across the file (a retrained model
    at the same path differs; reading 1 MiB per file, not 15 GB). A hub id is fingerprinted from the local cache;
    one not cached is named only."""
    import hashlib
    from pathlib import Path
    from common import check_model_name
    if check_model_name(model) in ("toy", "toy-qwen3vl") or model.startswith("random:"):
        return f"{model} (random init, seed 0)"
    path = Path(model)
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download
            path = Path(snapshot_download(model, local_files_only=True))
        except Exception:  # noqa: BLE001 — not cached locally: nothing to read
            return f"hub:{model} (not cached: name only)"
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        if (path / name).is_file():
            h.update((path / name).read_bytes())
    for w in sorted(path.glob("*.safetensors")):
        size = w.stat().st_size
        with open(w, "rb") as f:
            header = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(header, 1 << 24)) + str(size).encode())
            for k in range(16):
                f.seek(8 + header + (size - 8 - header) * k // 16)
                h.update(f.read(1 << 16))
    return h.hexdigest()[:16]


def provenance(args, benchmark):
    """What made a predictions file: the model (path and content fingerprint), the benchmark and every setting
    that changes a prediction. Scoring-only settings (extractor, MMVP answers, limit, label) are not part of it."""
    s = settings(args, benchmark)
    return {"benchmark": benchmark, "model": args.model, "model_fingerprint": model_fingerprint(args.model),
            **{k: s[k] for k in PREDICTION_KEYS if k in s}}


def read_predictions(path):
    """(provenance header or None, {str(id): prediction text}). A torn last line (killed mid-write), a line that is
    not an object, or one without id and prediction is ignored."""
    preds, header = {}, None
    if path and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("provenance"), dict) and header is None:
                    header = row["provenance"]
                    continue
                if not isinstance(row, dict) or "id" not in row or "prediction" not in row:
                    continue
                preds[str(row["id"])] = row["prediction"]
    return header, preds


def describe(p):
    return (f"model {p.get('model')} (fingerprint {p.get('model_fingerprint')}), "
            + ", ".join(f"{k} {p[k]}" for k in PREDICTION_KEYS if k in p and k != "system"))


def run_predictions(items, generate, backbone, args, path, benchmark=None):
    """Predict the items not yet in `path`, appending one flushed JSONL line per item. The file's first line is its
    provenance; a file made by another model or setting is refused (one line, exit 2) or, with --overwrite,
    re-predicted from scratch. Predictions of two models never mix in one file. `backbone`: a loaded Backbone, or
    None to load --model only when something is left to predict."""
    from tqdm import tqdm
    mine = provenance(args, benchmark or args.benchmark)
    header, done = read_predictions(path)
    if (header or done) and header != mine:
        if not args.overwrite:
            raise SystemExit(f"{path}: predictions made by {describe(header) if header else 'an unknown model'}; "
                             f"this run is {describe(mine)}. Pass --overwrite to re-predict, or another --output")
        print(f"--overwrite: {path} was made by another model or setting; predicting from scratch")
        os.remove(path)
        header, done = None, {}
    todo = [it for it in items if str(it["id"]) not in done]
    if done:
        print(f"resuming: {len(items) - len(todo)} of {len(items)} already predicted in {path}")
    if not todo:
        return done
    backbone = backbone or load_model(args)  # only when something is left to predict
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a+") as f:
        f.seek(0, os.SEEK_END)
        if not f.tell():
            f.write(json.dumps({"provenance": mine}) + "\n")
        if f.tell():  # finish a line torn by a kill, so the next record starts on its own line
            f.seek(f.tell() - 1)
            if f.read(1) != "\n":
                f.write("\n")
        for id, text, extra in tqdm(predict(todo, backbone, args, generate), total=len(todo), desc=args.benchmark):
            f.write(json.dumps({"id": id, "prediction": text, **extra}) + "\n")
            f.flush()
            done[str(id)] = text
    return done


def default_paths(args):
    ablated = f"_latents-{args.latent_ablation}" if args.mode == "latent" and args.latent_ablation != "none" else ""
    output = args.output or os.path.join("runs", "eval", f"{args.benchmark}{ablated}_summary.json")
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    predictions = args.predictions or os.path.splitext(output)[0] + ".predictions.jsonl"
    return output, predictions


def evaluate(args, backbone=None, generate=None):
    """The one entry point, for the command line and for every method: predict (resuming) or read predictions
    (--score-only), score, write the summary, return it. A method passes its loaded `backbone` and its `generate`
    (default: the one --mode names in GENERATORS); with no backbone --model is loaded when needed."""
    for value, allowed in ((args.benchmark, BENCHMARKS), (args.mode, ("plain", "latent", "unsilence")),
                           (args.prompt, ("lmms", "answer-tag", "vlmeval")), (args.extractor, ("robust", "official")),
                           (args.latent_ablation, LATENT_ABLATIONS)):
        if value not in allowed:
            raise ValueError(f"{value!r}: choose from {sorted(allowed)}")
    if args.latent_ablation != "none" and args.mode != "latent":
        raise ValueError("--latent-ablation needs --mode latent")
    output, pred_path = default_paths(args)
    items, warnings = load_benchmark(args.benchmark, args.data_dir, args)
    if args.score_only:
        made_by, predictions = read_predictions(pred_path)
        if not predictions:
            raise SystemExit(f"--score-only: no predictions in {pred_path}")
        missing = sum(str(it["id"]) not in predictions for it in items)
        if missing:
            warnings = list(warnings) + [f"{missing} of {len(items)} items have no prediction in {pred_path}: "
                                         "scored as wrong"]
        if made_by is None:
            warnings = list(warnings) + [f"{pred_path} has no provenance line: the model that made it is unknown"]
    else:
        predictions = run_predictions(items, generate or resolve_generator(args.mode), backbone, args, pred_path)
        made_by = read_predictions(pred_path)[0]
    summary = score(args.benchmark, items, predictions, args, warnings)
    summary["predictions"], summary["provenance"] = pred_path, made_by
    if args.score_only and made_by:  # the summary names the model that made the predictions, not --model
        summary["settings"].update({k: made_by[k] for k in ("model", *PREDICTION_KEYS) if k in made_by})
        summary["settings"]["label"] = args.label or f"{made_by['model']} ({made_by['mode']}, {made_by['prompt']})"
    with open(output, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"{args.benchmark}: overall {summary['overall']:.2f} ± {summary['se']:.2f} (SE; chance "
          f"{summary['chance']:.1f}; n={summary['n']}, unanswerable {summary['unanswerable']}) -> {output}")
    if args.benchmark == "mmvp":
        print(f"mmvp: per question {summary['question_accuracy']:.2f} ± {summary['question_se']:.2f} (SE; chance "
              f"{summary['question_chance']:.1f}); pair accuracy over {summary['se_units']} pairs")
    for w in summary["warnings"]:
        print("warning:", w)
    if args.score_only and args.strict and summary["missing_predictions"]:
        raise SystemExit(f"--strict: {summary['missing_predictions']} items have no prediction")
    return summary


def compare(columns: dict, benchmarks: list[str], data_dir, run_dir: str, **settings) -> dict:
    """Every method's end-of-run evaluation: each column {"model": dir or id, any Args field, optionally "backbone" (a
    loaded model) and "generate" (the method's seam)} on each benchmark, `data_dir(benchmark)` its folder, predictions
    in run_dir/eval/<benchmark>_<column>.json (overwrite: a file another model or setting made is re-predicted, one
    this exact model made is resumed); `settings` apply to every column. A model is loaded once. Prints
    one markdown row per benchmark (chance, then score ± binomial SE per column); returns {bench: {column: summary}}."""
    rows, loaded = {}, {}
    for name, column in columns.items():
        column = dict(column)
        generate, backbone = column.pop("generate", None), column.pop("backbone", None)
        if backbone is None and column["model"] not in loaded:
            loaded[column["model"]] = load_model(Args(model=column["model"]))
        for bench in benchmarks:
            out = str(Path(run_dir, "eval", f"{bench}_{name}.json"))
            args = Args(**{"benchmark": bench, "data_dir": str(data_dir(bench)), "output": out, "overwrite": True,
                           **settings, **column})
            rows.setdefault(bench, {})[name] = evaluate(args, backbone or loaded[column["model"]], generate)
    print(markdown(["benchmark", "chance", *(f"{n}: {c['model']}" for n, c in columns.items())],
                   [[bench, f"{next(iter(row.values()))['chance']:.1f}",
                     *(f"{s['overall']:.1f} ± {s['se']:.1f}" for s in row.values())] for bench, row in rows.items()]))
    return rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: the header, its separator, one line per row."""
    line = lambda cells: "| " + " | ".join(map(str, cells)) + " |"   # noqa: E731
    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def markdown_table(paths):
    """Rows = runs (settings.label), columns = benchmarks (overall %); MMVP also per question."""
    rows, columns = {}, []
    for p in paths:
        with open(p) as f:
            s = json.load(f)
        cells = {s["benchmark"]: s["overall"]}
        if s["benchmark"] == "mmvp":
            cells["mmvp (per question)"] = s["question_accuracy"]
        for c in cells:
            if c not in columns:
                columns.append(c)
        rows.setdefault(s["settings"]["label"], {}).update(cells)
    return markdown(["model", *columns], [[label, *(f"{cells[c]:.1f}" if c in cells else "–" for c in columns)]
                                          for label, cells in rows.items()])


def main(argv=None):
    from transformers import HfArgumentParser
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses(args=argv)
    if args.table:
        print(markdown_table(args.table))
        return None
    return evaluate(args)


if __name__ == "__main__":
    main(sys.argv[1:])
