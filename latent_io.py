"""What latent_pretrain.py reads, stores and reports that is not the method itself: the image–caption readers (COCO
JSON, Karpathy parquet, WebDataset shards, the toy world's paths), the frozen-target cache (fp16 safetensors shards,
named by a fingerprint of tower, settings and image set), GQA / ScienceQA as sft.py's canonical chat records, and the
report on the learned latent space (text→image retrieval, matched vs random cosines, k-means NMI, a cosine histogram
and a PCA plot). Imports only the shared files (common, dataloader, runtime; toy_world when asked for the toy):
latent_pretrain.py feeds it (no import cycle)."""
import glob
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import common as C
import dataloader as D
import runtime as R


# ----------------------------------------------------------------------------------------------------------------
# Image–caption pairs (COCO JSON, Karpathy parquet, WebDataset shards)
# ----------------------------------------------------------------------------------------------------------------
def toy_paths() -> dict:
    """latent_pretrain.py's `--data toy`: the toy world's COCO-format captions, GQA and ScienceQA (built once)."""
    from toy_world import ensure_toy_world
    root = Path(ensure_toy_world("data/toy", seed=0))
    coco = root / "coco"
    return {"data": str(coco / "annotations/captions_train2017.json"), "image_root": str(coco / "train2017"),
            "val_data": str(coco / "annotations/captions_val2017.json"), "val_image_root": str(coco / "val2017"),
            "categories": str(coco / "annotations/categories_val2017.json"),
            "gqa_dir": str(root / "gqa"), "scienceqa_dir": str(root / "scienceqa")}


def expand_shards(pattern: str) -> list[str]:
    """'dir/cc3m-{0000..0099}.tar' (WebDataset brace notation) or a glob → sorted shard paths."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if m:
        lo, hi = m.group(1), m.group(2)
        return [pattern[:m.start()] + str(i).zfill(len(lo)) + pattern[m.end():] for i in range(int(lo), int(hi) + 1)]
    return sorted(glob.glob(pattern))


def iter_wds(shard: str):
    """Stream one WebDataset tar: consecutive members sharing a key (path up to the first dot) form a sample."""
    sample = {}
    with tarfile.open(shard, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            stem, _, ext = os.path.basename(member.name).partition(".")
            key = os.path.join(os.path.dirname(member.name), stem)
            if sample and key != sample["__key__"]:
                yield sample
                sample = {}
            sample["__key__"] = key
            sample[ext.lower()] = tar.extractfile(member).read()
    if sample:
        yield sample


def read_pairs(path: str, image_root: str, skips: D.Skips):
    """→ (pairs [(caption, image_key)], images {image_key: path}). COCO official JSON (images + annotations),
    Karpathy parquet (filename / filepath, sentences), or WebDataset shards: (None, {"__wds__": shard paths}), the
    captions then come back from the target cache (they are read while extracting)."""
    pairs, images = [], {}
    if path.endswith(".json"):
        data = json.load(open(path))
        files = {}
        for im in data.get("images") or []:
            if isinstance(im, dict) and isinstance(im.get("file_name"), str) and "id" in im:
                files[im["id"]] = im["file_name"]
            else:
                skips.add("image entry without id or file_name")
        for ann in data.get("annotations") or []:
            if not isinstance(ann, dict):
                skips.add("annotation is not an object")
                continue
            caption = ann.get("caption").strip() if isinstance(ann.get("caption"), str) else ""
            if ann.get("image_id") not in files or not caption:
                skips.add("caption without image or text", f"annotation {ann.get('id')}")
                continue
            images[str(ann["image_id"])] = os.path.join(image_root, files[ann["image_id"]])
            pairs.append((caption, str(ann["image_id"])))
    elif path.endswith(".parquet"):
        for r in D.read_records(path):
            if not isinstance(r.get("filename"), str) or not r["filename"]:
                skips.add("row without filename")
                continue
            rel = os.path.join(r.get("filepath") or "", r["filename"])
            for s in r.get("sentences") or []:
                caption = s.get("raw") if isinstance(s, dict) else s
                caption = caption.strip() if isinstance(caption, str) else ""  # a list or number is no caption
                if not caption:
                    skips.add("caption without image or text", rel)
                    continue
                images[rel] = os.path.join(image_root, rel)
                pairs.append((caption, rel))
    else:
        return None, {"__wds__": expand_shards(path)}
    return pairs, images


# ----------------------------------------------------------------------------------------------------------------
# The frozen-target cache: written once, read lazily by image key
# ----------------------------------------------------------------------------------------------------------------
def cache_fingerprint(bb: C.Backbone, args, images: dict) -> str:
    """Targets depend on the tower's weights, the image size, K, the pooling and the image set: every image's (or
    WebDataset shard's) key, path, size and mtime go into the cache name, so changed data never reuses a cache."""
    import hashlib
    with torch.no_grad():
        w = sum(float(p.double().sum()) for p in bb.model.model.visual.parameters())
    h = hashlib.sha1(f"{bb.family}|{args.image_size}|{args.num_latents}|{args.pool}|{w:.6e}".encode())
    for key, path in sorted(images.items() if "__wds__" not in images else enumerate(images["__wds__"])):
        st = os.stat(path) if os.path.exists(path) else None
        h.update(f"|{key}|{path}|{st and st.st_size}|{st and st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def write_target_cache(encode, images: dict, cache_dir: Path, d: R.Dist, shard_size: int, k: int) -> Path:
    """One fp16 safetensors shard per `shard_size` images (or per WebDataset tar), written atomically, with the
    sums needed for the dataset mean / std; rank r extracts shards r, r+W, ...; existing shards are reused.
    `encode(PIL images) -> (z_tok [n, K, D], z_glob [n, D])` is latent_pretrain.encode_images."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    cache_dir.mkdir(parents=True, exist_ok=True)
    keys = sorted(k for k in images if k != "__wds__")
    jobs = images.get("__wds__") or [keys[j:j + shard_size] for j in range(0, len(keys), shard_size)]
    for i in range(d.rank, len(jobs), d.world):
        path = cache_dir / f"targets-{i:05d}.safetensors"
        if path.exists():
            continue
        wds = isinstance(jobs[i], str)
        names, caps, z_tok, z_glob, pil, skipped = [], [], [], [], [], {}

        def flush():
            if pil:
                t, g = encode(pil)
                z_tok.append(t), z_glob.append(g), pil.clear()

        source = iter_wds(jobs[i]) if wds else ({"__key__": k, "file": images[k]} for k in jobs[i])
        for s in tqdm(source, desc=f"targets {i}", disable=not d.main, leave=False):
            try:
                pil.append(D.open_image((s.get("jpg") or s.get("png") or b"") if wds else s["file"]))
            except C.SkipSample as e:   # kept in the shard, so a reused cache reports it too (load_targets)
                skipped[str(s["__key__"])] = str(e)
                continue
            names.append(str(s["__key__"]))
            caps.append(s["txt"].decode("utf-8", "replace").strip() if "txt" in s else "")
            if len(pil) == 16:
                flush()
        flush()
        z_tok = torch.cat(z_tok) if z_tok else torch.zeros(0, k, 1)
        z_glob = torch.cat(z_glob) if z_glob else torch.zeros(0, 1)
        save_file({"z_tok": z_tok.half().contiguous(), "z_glob": z_glob.half().contiguous(),
                   "tok_sum": z_tok.double().sum((0, 1)), "tok_sqsum": (z_tok.double() ** 2).sum((0, 1)),
                   "glob_sum": z_glob.double().sum(0)}, str(path) + ".tmp",
                  metadata={"keys": json.dumps(names), "captions": json.dumps(caps if wds else []),
                            "skipped": json.dumps(skipped)})
        os.replace(str(path) + ".tmp", path)
    if d.world > 1:  # every rank's shards are on disk before anyone reads the cache
        dist.barrier()
    return cache_dir


class TargetCache:
    """Reads cached targets by image key lazily (safe_open slices: a web-scale cache never sits in memory) and holds
    the dataset mean / std used for centring and standardising."""

    def __init__(self, cache_dir: Path):
        from safetensors import safe_open
        self.dir, self.files, self.index, self.captions, self.center = str(cache_dir), [], {}, [], False
        self.skipped = {}                                   # image key → why it has no target
        sums, n = {}, 0
        for f, path in enumerate(sorted(Path(cache_dir).glob("targets-*.safetensors"))):
            h = safe_open(str(path), framework="pt")
            self.files.append(h)
            keys, caps = json.loads(h.metadata()["keys"]), json.loads(h.metadata()["captions"])
            self.index.update({key: (f, row) for row, key in enumerate(keys)})
            self.captions += [(c, key) for c, key in zip(caps, keys) if c]
            self.skipped.update(json.loads(h.metadata().get("skipped", "{}")))
            if keys:
                sums = {k: sums.get(k, 0) + h.get_tensor(k) for k in ("tok_sum", "tok_sqsum", "glob_sum")}
                n += len(keys)
        assert n, f"empty target cache {cache_dir}"
        nk = n * self.files[0].get_slice("z_tok").get_shape()[1]
        self.tok_mean, self.glob_mean = (sums["tok_sum"] / nk).float(), (sums["glob_sum"] / n).float()
        self.tok_std = (sums["tok_sqsum"] / nk - (sums["tok_sum"] / nk) ** 2).clamp(min=1e-12).sqrt().float()

    def get(self, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.index[k] for k in keys]
        z_tok = torch.stack([self.files[f].get_slice("z_tok")[r] for f, r in rows]).float()
        z_glob = torch.stack([self.files[f].get_slice("z_glob")[r] for f, r in rows]).float()
        return (z_tok - self.tok_mean, z_glob - self.glob_mean) if self.center else (z_tok, z_glob)

    def random_pair_cosine(self, n_pairs: int = 2000, seed: int = 0) -> float:
        keys = sorted(self.index)
        a, b = np.random.default_rng(seed).integers(len(keys), size=(2, n_pairs))
        a, b = a[a != b], b[a != b]
        if not len(a):
            return float("nan")
        za, zb = self.get([keys[i] for i in a])[1], self.get([keys[i] for i in b])[1]
        return float(F.cosine_similarity(za, zb, dim=-1).mean())


# ----------------------------------------------------------------------------------------------------------------
# Downstream data: GQA / ScienceQA as sft.py records
# ----------------------------------------------------------------------------------------------------------------
def write_finetune_records(args, out: Path, skips: D.Skips):
    """The lmms-lab parquet layouts of GQA (instructions joined with images on imageId) and ScienceQA-IMG (answer =
    option index → letter) → sft.py's canonical {"messages": [...]} records (JSONL), each image's bytes written once
    beside them. The prompts are eval.py's lmms presets, so train and test match."""
    import pandas as pd
    from eval import LMMS_MC_SUFFIX, LMMS_OPEN_SUFFIX

    def parquets(folder, *patterns):
        return next((hits for p in patterns if (hits := sorted(glob.glob(os.path.join(folder, p))))), [])

    (out.parent / "images").mkdir(parents=True, exist_ok=True)
    records, written = [], set()

    def add(image, name, prompt, answer):
        raw = image.get("bytes") if isinstance(image, dict) else image
        if not raw:
            return skips.add("image without bytes", name)
        if name not in written:                                      # the parquet's bytes as they are: no re-encoding
            (out.parent / "images" / name).write_bytes(raw)
            written.add(name)
        records.append({"messages": [{"role": "user", "content": [{"type": "image", "image": f"images/{name}"},
                                                                  {"type": "text", "text": prompt}]},
                                     {"role": "assistant", "content": answer}]})
    if args.gqa_dir:
        qs = parquets(args.gqa_dir, "train_balanced_instructions/*.parquet", "*train_balanced_instructions*.parquet")
        ims = parquets(args.gqa_dir, "train_balanced_images/*.parquet", "*train_balanced_images*.parquet")
        if qs and ims:
            images = {k: v for p in ims for k, v in pd.read_parquet(p)[["id", "image"]].itertuples(index=False)}
            for r in pd.concat([pd.read_parquet(p) for p in qs]).to_dict("records"):
                if r["imageId"] not in images or not str(r.get("answer") or "").strip():
                    skips.add("gqa: missing image or answer", str(r.get("id")))
                    continue
                add(images[r["imageId"]], f"gqa_{r['imageId']}", f"{r['question']}\n{LMMS_OPEN_SUFFIX}",
                    str(r["answer"]))
    if args.scienceqa_dir:
        for f, p in enumerate(parquets(args.scienceqa_dir, "ScienceQA-IMG/train-*.parquet", "train-*.parquet",
                                       "train.parquet")):
            for row, r in enumerate(pd.read_parquet(p).to_dict("records")):
                if r.get("image") is None:
                    skips.add("scienceqa: no image", p)
                    continue
                hint = str(r.get("hint") or "").strip()
                q = (f"Context: {hint}\n" if hint else "") + r["question"]
                opts = "".join(f"\n{chr(65 + i)}. {c}" for i, c in enumerate(r["choices"]))
                add(r["image"], f"scienceqa_{f}_{row}", f"{q}{opts}\n{LMMS_MC_SUFFIX}", chr(65 + int(r["answer"])))
    out.with_suffix(".tmp").write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(out.with_suffix(".tmp"), out)


# ----------------------------------------------------------------------------------------------------------------
# The latent-space report
# ----------------------------------------------------------------------------------------------------------------
def retrieval_recall(sim: torch.Tensor, gt: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """sim [queries, gallery], gt [queries] = index of the right gallery item. rank = #items scored strictly
    higher than the right one (ties count in the query's favour); R@k = fraction with rank < k (percent)."""
    rank = (sim > sim.gather(1, gt[:, None])).sum(1)
    return {f"R@{k}": 100.0 * float((rank < k).float().mean()) for k in ks}


def kmeans_nmi(x: np.ndarray, labels: list, seed: int = 0, iters: int = 50) -> float:
    """k-means (k = number of categories, Lloyd's algorithm) then normalised mutual information with the labels."""
    classes = sorted(set(labels))
    y = np.array([classes.index(v) for v in labels])
    centres = x[np.random.default_rng(seed).choice(len(x), len(classes), replace=False)]
    for _ in range(iters):
        assign = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        centres = np.stack([x[assign == c].mean(0) if (assign == c).any() else centres[c] for c in range(len(classes))])
    joint = np.histogram2d(assign, y, bins=(len(classes), len(classes)))[0] / len(y)
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = (joint[nz] * np.log(joint[nz] / (pa[:, None] * pb[None])[nz])).sum()
    h = lambda q: -(q[q > 0] * np.log(q[q > 0])).sum()  # noqa: E731
    return float(2 * mi / max(h(pa) + h(pb), 1e-12))


def latent_report(pred_tok: torch.Tensor, z_tok: torch.Tensor, z_glob: torch.Tensor, gt: torch.Tensor, labels: list,
                  out: Path) -> dict:
    """pred_tok ẑ [queries, K, D] (one per held-out caption), targets z_tok [images, K, D] and z_glob [images, D], gt
    [queries] = each caption's image, labels = categories of the queries then of the images ('?' = none). Writes
    analysis.json and analysis.png into `out`, prints one line, returns the numbers."""
    n = len(z_glob)
    pred = pred_tok.mean(1)
    res = {**retrieval_recall(F.normalize(pred, dim=-1) @ F.normalize(z_glob, dim=-1).T, gt),
           "chance_R@1": 100.0 / n}
    shuffled = gt[torch.randperm(len(gt), generator=torch.Generator().manual_seed(0))]
    other = torch.where(shuffled == gt, (gt + 1) % n, shuffled)   # a random OTHER image per query
    matched = F.cosine_similarity(pred_tok, z_tok[gt], dim=-1).flatten()
    random_ = F.cosine_similarity(pred_tok, z_tok[other], dim=-1).flatten()
    res.update(cos_matched=float(matched.mean()), cos_random=float(random_.mean()), n_queries=len(gt),
               n_images=n)
    if len(set(labels)) > 1:
        res["nmi_pred"] = kmeans_nmi(F.normalize(pred, dim=-1).numpy(), labels[:len(pred)])
        res["nmi_target"] = kmeans_nmi(F.normalize(z_glob, dim=-1).numpy(), labels[len(pred):])
    out.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(1, 2, figsize=(11, 4.5))
        for values, name in ((matched, "matched"), (random_, "random")):
            ax[0].hist(values.numpy(), 40, alpha=0.6, label=name)
        ax[0].set_xlabel("cos(ẑ_k, z_k)"), ax[0].legend(), ax[0].set_title("matched vs random pairs")
        both = torch.cat([F.normalize(pred, dim=-1), F.normalize(z_glob, dim=-1)])
        both = both - both.mean(0)
        xy = (both @ torch.linalg.svd(both, full_matrices=False).Vh[:2].T).numpy()
        for c in sorted(set(labels)):
            for lo, hi, marker, name in ((0, len(pred), ".", "ẑ"), (len(pred), len(xy), "x", "z")):
                sel = [i for i in range(lo, hi) if labels[i] == c]
                ax[1].scatter(xy[sel, 0], xy[sel, 1], marker=marker, s=12, label=f"{c} {name}",
                              color=c if c in matplotlib.colors.CSS4_COLORS else None)
        ax[1].set_title("PCA of ẑ (.) and z (x) by category"), ax[1].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "analysis.png", dpi=100)
        plt.close(fig)
    except ImportError:
        pass
    (out / "analysis.json").write_text(json.dumps(res, indent=2))
    print("analysis: " + " ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()))
    return res
