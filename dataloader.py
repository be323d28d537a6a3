# Docs: docs/common.md ("dataloader.py")
"""Data for every training file: records read by index, images, counted skips, the micro-batch order, and lazy
loading (details and tests: docs/common.md).

  data     Records (by index), read_records, text_field, open_image (header only under common.lengths_only),
           check_bbox, visual_cot (the LVR / Visual-CoT record), counted Skips, build_dataset (the eager path)
  order    MicroBatches (per_micro samples or a token budget; rank-sharded, resumable), greedy_bins
  loading  LazySamples (exact lengths at start-up, no pixels), Loader (each rank's micro-batches encoded in
           DataLoader workers), to_device (non-blocking)

It imports common.py (the chat encoding the converters call), never the reverse.
"""
from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from common import SkipSample, lengths_only, measuring_lengths


# ----------------------------------------------------------------------------------------------------------------
# Data: records by index, images, counted skips
# ----------------------------------------------------------------------------------------------------------------
class Skips:
    """Counts bad samples by reason; a long run never crashes on one record and never hides what it dropped."""

    def __init__(self):
        self.counts, self.examples = Counter(), {}

    def add(self, reason: str, where: str = ""):
        self.counts[reason] += 1
        self.examples.setdefault(reason, where)

    def summary(self) -> str:
        if not self.counts:
            return "skipped 0 samples"
        parts = [f"{n} {r} (e.g. {self.examples[r]})" for r, n in self.counts.most_common()]
        return f"skipped {sum(self.counts.values())} samples: " + "; ".join(parts)


def read_records(path: str, skips: Skips | None = None):
    """Yield raw records (dicts) from .json (a list, or {"data" | "annotations": [...]}), .jsonl (one object per line)
    or .parquet (through `datasets`). With `skips`, malformed lines and non-objects are counted skips."""
    path = str(path)
    if path.endswith(".parquet"):
        from datasets import load_dataset
        yield from load_dataset("parquet", data_files=path, split="train")
        return
    if path.endswith(".jsonl"):
        rows = _jsonl_rows(path, skips)
    elif path.endswith(".json"):
        with open(path) as f:
            data = json.load(f)
        rows = ((f"{path}[{i}]", rec) for i, rec in
                enumerate(data if isinstance(data, list) else data.get("data", data.get("annotations", []))))
    else:
        raise ValueError(f"{path}: expected .json, .jsonl or .parquet")
    for where, rec in rows:
        if isinstance(rec, dict):
            yield rec
        elif skips is not None:
            skips.add("record is not a JSON object", where)


def _jsonl_rows(path: str, skips: Skips | None):
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if skips is None:
                    raise
                skips.add("malformed JSON line", f"{path}:{i + 1}")
                continue
            yield f"{path}:{i + 1}", rec


class Records:
    """The records of one data file by index (the order of read_records), never held as Python objects: json / jsonl
    records as their compact JSON text in one buffer (memory = that text, and DataLoader workers share it without the
    copy-on-write growth a list of dicts causes); parquet rows in the memory-mapped Arrow table, image columns left
    undecoded. Malformed lines and non-objects are counted skips. `limit`: the first N records only. With `tag`, an
    item is (tag, record): several files concatenate with torch.utils.data.ConcatDataset and keep their tag (pearl.py
    tags each file with its image root)."""

    def __init__(self, path, skips: Skips | None = None, limit: int = 0, tag=None):
        self.path, self.tag, self.table = str(path), tag, None
        if self.path.endswith(".parquet"):
            self.table = _arrow_table(self.path, limit)
            return
        buf, offsets = io.BytesIO(), [0]
        for rec in itertools.islice(read_records(self.path, skips), limit or None):
            offsets.append(offsets[-1] + buf.write(json.dumps(rec, separators=(",", ":")).encode()))
        self.text, self.offsets = buf.getvalue(), np.array(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.table) if self.table is not None else len(self.offsets) - 1

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self.table is not None:
            rec = self.table[int(i)]
        else:
            rec = json.loads(self.text[self.offsets[i]:self.offsets[i + 1]])
        return rec if self.tag is None else (self.tag, rec)


def _arrow_table(path: str, limit: int):
    from datasets import Image as ImageFeature, load_dataset
    table = load_dataset("parquet", data_files=path, split="train")
    for name, feature in table.features.items():      # {"bytes", "path"} structs: open_image decodes when needed
        if isinstance(feature, ImageFeature):
            table = table.cast_column(name, ImageFeature(decode=False))
    return table.select(range(min(limit, len(table)))) if limit else table


def text_field(value, what: str = "text") -> str:
    """A record's text field, stripped; SkipSample if it is not a string or is empty (a number, a list, None)."""
    if not isinstance(value, str) or not value.strip():
        raise SkipSample(f"{what} missing or not text")
    return value.strip()


class ImageSize:
    """An image's size without its pixels (under lengths_only): the PIL calls converters make before encode_chat —
    `size`, `width`, `height`, `convert`, `crop` (PIL's rounding of the box) — so they run unchanged."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def convert(self, mode: str = "RGB") -> "ImageSize":
        return self

    def crop(self, box) -> "ImageSize":
        x0, y0, x1, y1 = (round(v) for v in box)
        return ImageSize(x1 - x0, y1 - y0)


def open_image(ref, root: str | Path = ".") -> Image.Image:
    """A path (relative to `root`), an HF Image struct {"bytes", "path"}, raw bytes or a PIL image → RGB PIL (an
    ImageSize from the header alone under lengths_only). Raises SkipSample for a missing or unreadable file; a file
    whose header reads but whose pixels do not fails only at the full encode (a counted skip there: LazySamples)."""
    try:
        if isinstance(ref, Image.Image):
            return ImageSize(*ref.size) if measuring_lengths() else ref.convert("RGB")
        if isinstance(ref, dict):
            ref = ref.get("bytes") or ref.get("path")
        if isinstance(ref, (bytes, bytearray)):
            im = Image.open(io.BytesIO(ref))
        else:
            if not (Path(root) / ref).exists():
                raise SkipSample("missing image")
            im = Image.open(Path(root) / ref)
        with im:
            if measuring_lengths():
                return ImageSize(*im.size)
            im.load()
            return im.convert("RGB")
    except SkipSample:
        raise
    except Exception as e:  # PIL raises many types for corrupt files
        raise SkipSample("unreadable image") from e


def check_bbox(b) -> list[float]:
    """A normalised [x0, y0, x1, y1] inside [0, 1] with positive area, else SkipSample. Booleans are not numbers."""
    if not isinstance(b, (list, tuple)) or len(b) != 4 or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b):
        raise SkipSample("malformed bbox")
    x0, y0, x1, y1 = map(float, b)
    if min(x0, y0, x1, y1) < 0 or max(x0, y0, x1, y1) > 1:
        raise SkipSample("bbox outside [0,1]")
    if x1 <= x0 or y1 <= y0:
        raise SkipSample("degenerate bbox")
    return [x0, y0, x1, y1]


def visual_cot(rec, image_root: str | Path = ".") -> tuple[str, str, Image.Image]:
    """An LVR / Visual-CoT record (LLaVA `conversations`: human question with `<image>`, gpt answer; one `image`) →
    (question without `<image>`, answer as written, the opened image). Every malformed field is a SkipSample."""
    if not isinstance(rec, dict):
        raise SkipSample("record is not a JSON object")
    conv, img = rec.get("conversations"), rec.get("image")
    if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(m, dict) for m in conv[:2]) \
            or conv[0].get("from") != "human" or conv[1].get("from") != "gpt":
        raise SkipSample("malformed conversations")
    img = img[0] if isinstance(img, list) and len(img) == 1 else img
    if img is None or isinstance(img, (bool, int, float, list, tuple)) or not img:  # a path, bytes or PIL image
        raise SkipSample("not exactly one image")
    question = text_field(conv[0].get("value"), "question").replace("<image>\n", "").replace("<image>", "").strip()
    return question, text_field(conv[1].get("value"), "answer"), open_image(img, image_root)


def _convert_or_skip(convert, rec, skips, max_tokens: int | None, where: str) -> dict | None:
    """convert(rec), or None with the reason counted: a bad record, or a sample over `max_tokens` (dropped, never
    truncated: truncation could cut an image's token run)."""
    try:
        s = convert(rec)
    except SkipSample as e:
        skips.add(str(e), where)
        return None
    if max_tokens and len(s["input_ids"]) > max_tokens:
        skips.add("over the token budget", f"{where} ({len(s['input_ids'])} > {max_tokens})")
        return None
    return s


def build_dataset(records, convert, skips: Skips, max_tokens: int | None = None, desc: str = "data") -> list:
    """Eager: `convert(record) -> sample` over all records, pixels included, all held in memory (small sets: the toy
    base, tests, lvr.py until it moves to LazySamples). Bad records and over-long samples are counted skips."""
    samples = (_convert_or_skip(convert, rec, skips, max_tokens, f"{desc}[{i}]") for i, rec in enumerate(records))
    return [s for s in samples if s is not None]


# ----------------------------------------------------------------------------------------------------------------
# Order: deterministic micro-batches of `per_micro` samples or of at most `token_budget` tokens
# ----------------------------------------------------------------------------------------------------------------
def greedy_bins(lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of sample indices under a token budget (each bin = one packed row)."""
    bins, loads = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, load in enumerate(loads):
            if load + lengths[i] <= budget:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return [sorted(b) for b in bins]


class MicroBatches:
    """Deterministic, world-size-independent order of global micro-batches: epoch e is a permutation seeded by
    (seed, e) cut into micro-batches of `per_micro` samples, or, with `token_budget` > 0, into packed rows of at most
    that many tokens (first-fit-decreasing inside windows of `window` consecutive samples of the permutation, each
    window's rows shuffled), so that ranks do near-equal work. Rank r of W takes global micro-batches r, r+W, ..., so
    2 processes × k accumulation see exactly the micro-batches of 1 process × 2k. state() / load_state() resume the
    exact data position."""

    def __init__(self, lengths, per_micro: int = 1, seed: int = 0, token_budget: int = 0, window: int = 512):
        self.lengths = [int(n) for n in lengths]
        if token_budget and max(self.lengths, default=0) > token_budget:
            raise ValueError(f"a sample of {max(self.lengths)} tokens does not fit a {token_budget}-token micro-batch")
        self.per_micro, self.seed, self.token_budget, self.window = per_micro, seed, token_budget, window
        self.epoch, self.cursor = 0, 0
        self._plan()

    def _plan(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths)).tolist()
        if not self.token_budget:
            p = self.per_micro
            self.micro = [order[i:i + p] for i in range(0, len(order) - p + 1, p)]
            return
        self.micro = []
        for c in (order[i:i + self.window] for i in range(0, len(order), self.window)):
            rows = [[c[j] for j in b] for b in greedy_bins([self.lengths[j] for j in c], self.token_budget)]
            self.micro += [rows[k] for k in rng.permutation(len(rows))]

    def next(self, rank: int = 0, world: int = 1, n: int = 1) -> list[list[int]]:
        """The next n micro-batches of this rank (all ranks advance the cursor by n·world)."""
        out = []
        for _ in range(n):
            if self.cursor + world > len(self.micro):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._plan()
                if len(self.micro) < world:
                    raise ValueError(f"{len(self.micro)} micro-batches per epoch, fewer than the {world} ranks")
            out.append(self.micro[self.cursor + rank])
            self.cursor += world
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state(self, s: dict):
        epoch, self.cursor = int(s["epoch"]), int(s["cursor"])
        if epoch != self.epoch:
            self.epoch = epoch
            self._plan()


# ----------------------------------------------------------------------------------------------------------------
# Loading: exact lengths first (no pixels), then each rank's micro-batches encoded lazily in DataLoader workers
# ----------------------------------------------------------------------------------------------------------------
LENGTH_CHUNK = 512                      # records per task of the lengths pass (split across ranks and workers)


class LazySamples:
    """A data set that holds its records and each sample's exact token count, and encodes a sample (decode, resize,
    patchify, tokenise) only when a micro-batch needs it. Start-up is one lengths pass: every record through
    `convert` under lengths_only(), so bad records and samples over `max_tokens` are counted skips before any order is
    planned (as build_dataset counts them), in record order. The pass is split across ranks (all_gather_object) and
    `workers` DataLoader workers. `data[j]` is sample j fully encoded; `lengths[j]` its token count."""

    def __init__(self, records, convert, skips: Skips, max_tokens: int | None = None, desc: str = "data",
                 workers: int = 0):
        self.records, self.convert, self.desc = records, convert, desc
        self.keep, self.lengths = _lengths_pass(_LengthTask(records, convert, max_tokens, desc), skips, workers)

    def __len__(self) -> int:
        return len(self.keep)

    def where(self, j: int) -> str:
        return f"{self.desc}[{self.keep[j]}]"

    def __getitem__(self, j: int) -> dict:
        s = self.convert(self.records[self.keep[j]])
        if len(s["input_ids"]) != self.lengths[j]:  # the planned budget would not hold: a bug, never a silent change
            raise RuntimeError(f"{self.where(j)}: {len(s['input_ids'])} tokens encoded, {self.lengths[j]} planned "
                               "(lengths_only() disagrees with the full encode)")
        return s

    def micro_batch(self, idx: list[int]) -> tuple[list[dict], list[tuple[str, str]]]:
        """The samples of one micro-batch, encoded, and the (reason, where) of those that failed only now (e.g. an
        image whose header reads but whose pixels do not): dropped and reported, never a crash. If none is left, the
        next samples in data order stand in, so this rank still computes a micro-batch and the others never wait."""
        samples, failed = [], []
        for j in idx:
            try:
                samples.append(self[j])
            except SkipSample as e:
                failed.append((str(e), self.where(j)))
        for k in range(1, len(self)):      # a stand-in's own failure is counted in its own micro-batch, not here
            if samples:
                break
            with contextlib.suppress(SkipSample):
                samples.append(self[(idx[-1] + k) % len(self)])
        if not samples:
            raise RuntimeError(f"no sample of {self.desc} encodes (e.g. {failed[:3]})")
        return samples, failed


class _LengthTask(torch.utils.data.Dataset):
    """Task c of the lengths pass: records [c·LENGTH_CHUNK, (c+1)·LENGTH_CHUNK) under lengths_only → (kept record
    indices, their token counts, the (reason, where) of each skip, in record order)."""

    def __init__(self, records, convert, max_tokens, desc):
        self.records, self.convert, self.max_tokens, self.desc = records, convert, max_tokens, desc

    def __len__(self) -> int:
        return math.ceil(len(self.records) / LENGTH_CHUNK)

    def __getitem__(self, c: int):
        keep, lengths, skipped = [], [], _SkipList()
        with lengths_only():
            for i in range(c * LENGTH_CHUNK, min((c + 1) * LENGTH_CHUNK, len(self.records))):
                s = _convert_or_skip(self.convert, self.records[i], skipped, self.max_tokens, f"{self.desc}[{i}]")
                if s is not None:
                    keep.append(i)
                    lengths.append(len(s["input_ids"]))
        return keep, lengths, list(skipped)


class _SkipList(list):
    def add(self, reason: str, where: str = ""):
        self.append((reason, where))


def _lengths_pass(tasks: _LengthTask, skips: Skips, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank r runs tasks r, r+W, ... (in `workers` processes, or here), all ranks gather every result: the same kept
    samples, lengths and skip counts on every rank."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = list(range(rank, len(tasks), world))
    if workers:
        results = list(zip(mine, _data_loader(tasks, workers, sampler=mine)))
    else:
        results = [(c, tasks[c]) for c in mine]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        results = sorted((r for part in gathered for r in part), key=lambda r: r[0])
    keep, lengths = [], []
    for _, (k, n, skipped) in results:
        keep += k
        lengths += n
        for reason, where in skipped:
            skips.add(reason, where)
    return np.array(keep, dtype=np.int64), np.array(lengths, dtype=np.int64)


def _data_loader(dataset, workers: int, **kw) -> torch.utils.data.DataLoader:
    """Items as the dataset returns them (no collation). Workers are forked (they inherit the converters, closures
    over the backbone, without pickling; they never touch CUDA); the private generator keeps the global RNG (dropout,
    init) untouched by the workers' seeds."""
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_as_is,
                                       multiprocessing_context="fork" if workers else None,
                                       generator=torch.Generator(), **kw)


def _as_is(item):
    return item


class _RankStream(torch.utils.data.IterableDataset):
    """This rank's micro-batches of `order` from its state at construction, encoded and `collate`d. Worker w of n
    encodes this rank's micro-batches w, w+n, ... (the DataLoader hands them back in order); each comes with the
    order's state after it and the skips it met."""

    def __init__(self, data: LazySamples, order: MicroBatches, rank: int, world: int, collate):
        self.data, self.order, self.rank, self.world, self.collate = data, copy.copy(order), rank, world, collate

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        order = copy.copy(self.order)      # shares the epoch's plan; next() rebinds, never mutates it
        for k in itertools.count():
            idx = order.next(self.rank, self.world)[0]
            if k % workers == worker:
                samples, failed = self.data.micro_batch(idx)
                yield {"batch": self.collate(samples) if self.collate else samples, "state": order.state(),
                       "failed": failed}


class Loader:
    """This rank's micro-batches of `data`, in `order` from its current state, encoded lazily: in `workers` DataLoader
    workers (0: in this process), then `collate`d there (e.g. pack: the M-RoPE position ids are computed there too),
    pinned when `device` is CUDA. next(n) returns the next n batches on the host (move each with to_device when it is
    needed); state() is the position after the micro-batches returned so far, not after those prefetched: what a
    checkpoint saves. Samples that fail only at the full encode are counted in `skips` as they arrive, and close()
    adds the other ranks' (the lengths pass already counted every rank's)."""

    def __init__(self, data: LazySamples, order: MicroBatches, skips: Skips, rank: int = 0, world: int = 1,
                 collate=None, workers: int = 0, device=None):
        self.skips, self.failed, self._state, self._it, self._closed = skips, Skips(), order.state(), None, False
        pin = device is not None and torch.device(device).type == "cuda"
        self._loader = _data_loader(_RankStream(data, order, rank, world, collate), workers, pin_memory=pin)

    def next(self, n: int = 1) -> list:
        if self._it is None:                              # workers start on first use
            self._it = iter(self._loader)
        out = []
        for _ in range(n):
            item = next(self._it)
            for reason, where in item["failed"]:
                self.skips.add(reason, where)
                self.failed.add(reason, where)                 # this rank's: close() tells the others
            self._state = item["state"]
            out.append(item["batch"])
        return out

    def state(self) -> dict:
        return dict(self._state)

    def close(self):
        """Stop the workers (they would otherwise prefetch until the process exits). Under torchrun (collective: every
        rank calls it once, after its last next()) the other ranks' worker skips join `skips`, so the summary rank 0
        prints counts the whole run."""
        self._it = None
        if self._closed or not (dist.is_initialized() and dist.get_world_size() > 1):
            self._closed = True
            return
        self._closed, gathered = True, [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.failed)
        for rank, theirs in enumerate(gathered):
            if rank == dist.get_rank():
                continue                                          # this rank's are in `skips` already
            for reason, n in theirs.counts.items():
                self.skips.counts[reason] += n
                self.skips.examples.setdefault(reason, theirs.examples[reason])


def to_device(batch, device, keys: tuple[str, ...] | None = None):
    """The tensors of a (nested) batch on `device`, copied non-blocking (from pinned memory the host does not wait);
    with `keys`, only the tensors under those dict keys (e.g. pearl.py's pixel_values: its views pack on the host)."""
    def move(x, selected: bool):
        if isinstance(x, torch.Tensor):
            return x.to(device, non_blocking=True) if selected else x
        if isinstance(x, dict):
            return {k: move(v, selected or (keys is not None and k in keys)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(move(v, selected) for v in x)
        return x
    return move(batch, keys is None)

