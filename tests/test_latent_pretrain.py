"""Tests for latent_pretrain.py: target pooling, the target cache (and its invalidation when the images change), the
losses against slow references (including the 2-rank all-gather), positions of the losses, head shapes, the new token
rows' own learning rate and the plain HF export, retrieval metrics, and 2-process torchrun smoke runs.

    python -m pytest -q tests/test_latent_pretrain.py
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common as C
import dataloader as D
import runtime as R
import latent_io as A
import latent_pretrain as L
from conftest import metrics, run_script


@pytest.fixture(scope="module")
def bb(toy_bb):
    C.add_special_tokens(toy_bb, [L.LATENT_START, L.LATENT_PAD, L.LATENT_END])
    return toy_bb


def _moved(export: Path) -> tuple[bool, bool]:
    """(some LLM decoder-layer weight differs from the toy init, some vision-tower weight does): training really
    stepped, and the frozen tower stayed frozen. (The embedding rows of new tokens change without any step.)"""
    start = C.load_backbone("toy").model.state_dict()
    done = C.load_backbone(str(export)).model.state_dict()
    differs = {k for k in start if not torch.equal(start[k], done[k].to(start[k].dtype))
               and ("visual" in k or "language_model.layers." in k)}
    assert any("language_model.layers." in k for k in start)
    return any("visual" not in k for k in differs), any("visual" in k for k in differs)


# ---------------------------------------------------------------- targets
def test_pool_targets_hand_computed():
    x = torch.arange(16.0)[:, None]                               # 4×4 grid, raster order, D = 1
    assert L.pool_targets(x, (4, 4), 4, "grid").flatten().tolist() == [2.5, 4.5, 10.5, 12.5]   # quadrants
    assert L.pool_targets(x, (4, 4), 4, "bands").flatten().tolist() == [1.5, 5.5, 9.5, 13.5]   # rows (Mirage)
    y = torch.arange(9.0)[:, None]                                # 3×3: adaptive windows overlap at the middle
    assert L.pool_targets(y, (3, 3), 4, "grid").flatten().tolist() == [2.0, 3.0, 5.0, 6.0]
    two = torch.stack([torch.arange(16.0), -torch.arange(16.0)], 1)  # channels pooled independently
    assert L.pool_targets(two, (4, 4), 4)[:, 1].tolist() == [-2.5, -4.5, -10.5, -12.5]


def _tiny_images(folder: Path, n: int):
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for i in range(n):
        im = Image.new("RGB", (60 + 7 * i, 50), ((50 * i) % 256, 90, 200 - 20 * i))
        im.paste((255, 255, 0), (5 * i, 5, 5 * i + 20, 25))
        im.save(folder / f"{i}.png")
        images[str(i)] = str(folder / f"{i}.png")
    return images


def test_cache_round_trip_and_tower_not_rerun(bb, tmp_path, monkeypatch):
    images = _tiny_images(tmp_path / "img", 5)
    images["missing"] = str(tmp_path / "img" / "nope.png")
    args = L.Args(image_size=56, shard_size=2)                   # 56 px → 2×2 merged tokens: K = 4 is the identity
    L.extract_targets(bb, args, R.Dist(), images, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("targets-*.safetensors"))) == 3
    cache = L.TargetCache(tmp_path / "cache")
    assert cache.skipped == {"missing": "missing image"}       # counted per caption by load_targets, every run
    keys = [str(i) for i in range(5)]
    z_tok, z_glob = cache.get(keys)
    pil = [Image.open(images[k]).convert("RGB") for k in keys]
    with torch.no_grad():
        ims = [im.resize((56, 56)) for im in pil]
        out = bb.image_processor(images=ims, do_resize=False, return_tensors="pt")
        raw = bb.model.model.get_image_features(out["pixel_values"], out["image_grid_thw"], return_dict=True)
    raw = torch.stack(raw.pooler_output)                         # [5, 4, D] raster order
    torch.testing.assert_close(z_tok, raw.half().float())
    torch.testing.assert_close(z_glob, raw.mean(1).half().float())
    torch.testing.assert_close(cache.glob_mean, raw.mean(1).mean(0), atol=1e-3, rtol=1e-3)
    cache.center = True
    torch.testing.assert_close(cache.get(keys)[1], z_glob - cache.glob_mean)

    def boom(*a, **k):
        raise AssertionError("vision tower ran although the cache exists")
    monkeypatch.setattr(bb.model.model, "get_image_features", boom)
    L.extract_targets(bb, args, R.Dist(), images, tmp_path / "cache")
    torch.testing.assert_close(L.TargetCache(tmp_path / "cache").get(keys)[0], z_tok)


def test_changed_image_set_gets_a_fresh_cache(bb, tmp_path):
    captions, img = _tiny_coco(tmp_path, 3)
    args = L.Args(image_size=56, center="false")

    def targets():
        _, cache = L.load_targets(bb, args, R.Dist(), str(captions), str(img), D.Skips(), tmp_path / "cache")
        return cache.dir, cache.get(["1"])[1]
    before, z_before = targets()
    assert targets()[0] == before                                 # unchanged data: the same cache is reused
    Image.new("RGB", (60, 50), (1, 2, 3)).save(img / "1.png")     # the data is regenerated with new content
    after, z_after = targets()
    assert after != before
    fresh = L.encode_images(bb, [Image.open(img / "1.png")], 56, 4, "grid")[1]
    torch.testing.assert_close(z_after, fresh.half().float())    # the new image's targets, not the stale ones
    assert not torch.allclose(z_after, z_before)
    images = {str(i): str(img / f"{i}.png") for i in range(3)}
    assert L.cache_fingerprint(bb, args, images) == Path(after).name
    assert L.cache_fingerprint(bb, args, {k: images[k] for k in ("0", "2")}) != Path(after).name   # fewer images
    assert L.cache_fingerprint(bb, L.Args(image_size=112), images) != Path(after).name              # other size


# ---------------------------------------------------------------- losses
def _slow_infonce(p, g, ids, scale, mask=True):
    p, g = F.normalize(p.double(), dim=-1), F.normalize(g.double(), dim=-1)
    n, total = len(p), 0.0
    for a, b in ((p, g), (g, p)):
        for i in range(n):
            num = torch.exp(scale * a[i] @ b[i])
            den = sum(torch.exp(scale * a[i] @ b[j]) for j in range(n) if j == i or not mask or ids[j] != ids[i])
            total = total - torch.log(num / den)
    return total / (2 * n)


def test_batch_infonce_matches_slow_loop_with_same_image_mask():
    torch.manual_seed(0)
    p, g = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    g[3] = g[1]                                                   # captions 1 and 3 show the same image
    ids = torch.tensor([0, 1, 2, 1, 4, 5])
    scale = torch.tensor(2.0, dtype=torch.float64)
    for mask in (True, False):
        got = L.batch_contrastive_loss(p, g, ids, scale, kind="infonce", mask_same_image=mask)
        torch.testing.assert_close(got.double(), _slow_infonce(p, g, ids, scale.exp(), mask), rtol=1e-5, atol=1e-6)
    masked = L.batch_contrastive_loss(p, g, ids, scale, mask_same_image=True)
    assert masked < L.batch_contrastive_loss(p, g, ids, scale, mask_same_image=False)


def test_siglip_matches_slow_loop():
    torch.manual_seed(1)
    p, g, ids = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 1, 2])
    s, b = torch.tensor(1.5), torch.tensor(-2.0)
    pn, gn = F.normalize(p, dim=-1), F.normalize(g, dim=-1)
    ref = 0.0
    for i in range(4):
        for j in range(4):
            y = 1.0 if ids[i] == ids[j] else -1.0
            ref += -F.logsigmoid(y * (s.exp() * pn[i] @ gn[j] + b))
    got = L.batch_contrastive_loss(p, g, ids, s, b, kind="siglip")
    torch.testing.assert_close(got, ref / 4)


def _rank_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    p_all, g_all = torch.randn(8, 5), torch.randn(8, 5)
    ids_all = torch.tensor([0, 1, 2, 3, 1, 5, 0, 7])             # same-image pairs cross the rank boundary
    sl = slice(rank * 4, rank * 4 + 4)
    p = p_all[sl].clone().requires_grad_(True)
    scale = torch.tensor(1.2, requires_grad=True)
    loss = L.batch_contrastive_loss(p, g_all[sl], ids_all[sl], scale)
    loss.backward()
    torch.save({"loss": loss.detach(), "grad_p": p.grad, "grad_s": scale.grad}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_rank_all_gather_equals_single_process(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    torch.manual_seed(0)
    p_all, g_all = torch.randn(8, 5), torch.randn(8, 5)
    ids_all = torch.tensor([0, 1, 2, 3, 1, 5, 0, 7])
    p = p_all.clone().requires_grad_(True)
    scale = torch.tensor(1.2, requires_grad=True)
    loss = L.batch_contrastive_loss(p, g_all, ids_all, scale)
    loss.backward()
    # FSDP averages gradients over ranks: the rank-mean of losses / gradients is the single-process computation
    torch.testing.assert_close((r[0]["loss"] + r[1]["loss"]) / 2, loss.detach())
    torch.testing.assert_close(torch.cat([r[0]["grad_p"], r[1]["grad_p"]]) / 2, p.grad)
    torch.testing.assert_close((r[0]["grad_s"] + r[1]["grad_s"]) / 2, scale.grad)


def test_instance_losses_against_reference():
    torch.manual_seed(0)
    z_hat, z = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    ref = sum(1 - (z_hat[b, k] @ z[b, k]) / (z_hat[b, k].norm() * z[b, k].norm())
              for b in range(3) for k in range(4)) / 12
    torch.testing.assert_close(L.instance_loss(z_hat, z, "cosine"), ref)

    class Stats:
        center, tok_mean, tok_std = False, torch.full((6,), 0.5), torch.full((6,), 2.0)
    torch.testing.assert_close(L.instance_loss(z_hat, z, "l2", Stats()), ((z_hat - (z - 0.5) / 2) ** 2).mean())
    torch.testing.assert_close(L.instance_loss(z_hat, z, "l1", Stats()), (z_hat - (z - 0.5) / 2).abs().mean())
    assert L.instance_loss(z, z, "cosine").abs() < 1e-6


# ---------------------------------------------------------------- positions, head, packing
def test_caption_sample_layout(bb):
    caption = "a small red circle in the top left"
    s = L.encode_caption(bb, caption, 4)
    ids = s["input_ids"]
    assert s["pixel_values"] is None and s["image_grid_thw"] is None
    for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"):
        assert not (ids == bb.token_id(t)).any(), "the image must never be in the pretraining context"
    assert int((ids == bb.token_id(L.LATENT_PAD)).sum()) == 4
    assert bb.tokenizer.decode(ids[s["labels"] != C.IGNORE]) == caption        # L_NTP on caption tokens only
    text = bb.tokenizer.decode(ids)
    assert text == ("<|im_start|>user\nDescribe an image.<|im_end|>\n<|im_start|>assistant\n" + caption +
                    "<|latent_start|>" + "<|latent_pad|>" * 4 + "<|latent_end|><|im_end|>\n")


@pytest.mark.parametrize("kind", ["mlp", "none", "attnpool"])
def test_head_reads_pad_states_of_each_packed_sample(bb, kind):
    torch.manual_seed(0)
    dim = bb.model.config.text_config.hidden_size
    head = L.LatentHead(kind, dim, dim, 48, 4, 0.07, "infonce")
    ids = [bb.token_id(t) for t in (L.LATENT_START, L.LATENT_PAD, L.LATENT_END)]
    module = L.LatentPretrainer(bb.model, head, ids, 4, -1).eval()
    samples = [L.encode_caption(bb, c, 4) for c in ("a red square", "two blue circles and a big green triangle")]
    batch = C.pack(bb, samples, extra_keys=("caption_mask",))
    with torch.no_grad():
        _, z_hat, _, _ = module(batch["input_ids"], batch["position_ids"], batch["caption_mask"], batch["seq_lens"])
        assert z_hat.shape == (2, 4, dim)
        for b, s in enumerate(samples):                          # independent: each sample alone, unpacked
            h = bb.model.model(input_ids=s["input_ids"][None], use_cache=False).last_hidden_state[0]
            pads = h[s["input_ids"] == bb.token_id(L.LATENT_PAD)][None]
            ref = head(pads, h[s["caption_mask"]][None], torch.zeros(1, int(s["caption_mask"].sum()), dtype=torch.bool))
            torch.testing.assert_close(z_hat[b], ref[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,kind", [("toy", "mlp"), ("toy", "attnpool"), ("toy-qwen3vl", "mlp")])
def test_padded_baseline_equals_packed(name, kind):
    """--no-pack (right-padded rows + attention mask) gives the packed loss terms and gradients."""
    b = C.load_backbone(name)
    dim = b.model.config.text_config.hidden_size
    args = L.Args(head=kind)
    module = L.build_module(b, args, dim)
    samples = [L.encode_caption(b, c, 4) for c in ("a red square", "two blue circles and a big green triangle",
                                                    "a tiny yellow circle")]
    torch.manual_seed(0)
    z_tok, z_glob = torch.randn(3, 4, dim), torch.randn(3, dim)
    runs = []
    for make in (C.pack, C.pad_batch):
        module.zero_grad(set_to_none=True)
        batch = make(b, samples, extra_keys=("caption_mask",))
        loss, terms = L.pretrain_loss(module, batch, z_tok, z_glob, torch.tensor([0, 1, 2]), args, None, "cpu")
        loss.backward()
        runs.append(({k: v.item() for k, v in {"loss": loss, **terms}.items()},
                     {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}))
    (t1, g1), (t2, g2) = runs
    assert set(t1) >= {"loss", "loss_ntp", "loss_inst", "loss_batch"}
    for k in t1:
        assert t1[k] == pytest.approx(t2[k], rel=1e-5), k
    assert g1.keys() == g2.keys() and any("head" in n for n in g1) and "latent_rows" in g1
    for n in g1:                                                  # float32 rounding, relative to each tensor's scale
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-5 * float(g1[n].abs().max()), msg=n)


@pytest.mark.parametrize("name", ["toy", "toy-qwen3vl"])   # untied / tied input and output embeddings
def test_lean_ntp_loss_equals_the_loss_of_the_full_logits(name):
    """L_NTP as trained (ntp_loss: supervised positions only, chunked, tied: the latent columns from `rows`) equals
    next_token_loss on lm_logits' full [R, T, V] logits, in value and in the gradients of h and the latent rows."""
    b = C.load_backbone(name)
    module = L.build_module(b, L.Args(), b.model.config.text_config.hidden_size)
    batch = C.pack(b, [L.encode_caption(b, c, 4) for c in ("a red square", "two blue circles")], ("caption_mask",))
    ids = torch.tensor(module.latent_ids)
    torch.manual_seed(0)
    h = torch.randn(*batch["input_ids"].shape, b.model.config.text_config.hidden_size, requires_grad=True)
    labels = batch["labels"].clone()
    labels[0, 5] = module.latent_ids[0]                          # a latent token as a target: its column is read
    got = module.ntp_loss(h, ids, module.latent_rows, labels)
    ref = C.next_token_loss(module.lm_logits(h, ids, module.latent_rows), labels)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    (gh, grows), (rh, rrows) = (torch.autograd.grad(x, (h, module.latent_rows), allow_unused=True) for x in (got, ref))
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-6)
    if name == "toy":                                            # untied: the rows are not in the output matrix
        assert grows is None and rrows is None
    else:
        assert grows.abs().sum() > 0
        torch.testing.assert_close(grows, rrows, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["toy", "toy-qwen3vl"])   # untied / tied input and output embeddings
def test_latent_rows_train_at_head_lr_and_export_is_plain(name, tmp_path):
    b = C.load_backbone(name)
    dim = b.model.config.text_config.hidden_size
    module = L.build_module(b, L.Args(), dim)
    assert module.tied == (name == "toy-qwen3vl")
    batch = C.pack(b, [L.encode_caption(b, c, 4) for c in ("a red square", "two blue circles")], ("caption_mask",))
    torch.manual_seed(0)
    z_tok, z_glob = torch.randn(2, 4, dim), torch.randn(2, dim)
    emb = b.model.get_input_embeddings().weight

    def step(lr, head_lr):
        opt = torch.optim.AdamW(L.param_groups(module, L.Args(lr=lr, head_lr=head_lr)))
        L.pretrain_loss(module, batch, z_tok, z_glob, torch.tensor([0, 1]), L.Args(), None, "cpu")[0].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    rows0, emb0 = module.latent_rows.detach().clone(), emb.detach().clone()
    step(0.0, 1e-2)                                               # only the head group moves: the new rows do
    assert not torch.equal(module.latent_rows, rows0) and torch.equal(emb, emb0)
    rows1 = module.latent_rows.detach().clone()
    step(1e-2, 0.0)                                               # only the LLM group moves: the rows do not
    assert torch.equal(module.latent_rows, rows1) and not torch.equal(emb, emb0)

    module.eval()
    with torch.no_grad():
        want = module(batch["input_ids"], batch["position_ids"], batch["caption_mask"], batch["seq_lens"])[0]
        R.export_hf(b, tmp_path, state_dict=module.export_state_dict(R.full_state_dict(module)), model=b.model)
        plain = C.load_backbone(str(tmp_path)).model.eval()      # a plain HF model, no project code in forward
        got = plain(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        ids = module.latent_ids
        torch.testing.assert_close(plain.get_input_embeddings().weight[ids], rows1)
        assert not torch.allclose(plain.get_input_embeddings().weight[ids], rows0)


# ---------------------------------------------------------------- analysis
def test_retrieval_recall_known_ranks():
    # query 0: right item best (rank 0); query 1: 2 items above (rank 2); query 2: 5 above (rank 5); query 3: 10 above
    sim = torch.zeros(4, 12)
    gt = torch.tensor([0, 1, 2, 3])
    sim[0, 0] = 1.0
    sim[1, 1], sim[1, [5, 6]] = 0.5, 0.9
    sim[2, 2], sim[2, [4, 5, 6, 7, 8]] = 0.5, 0.9
    sim[3, 3], sim[3, [0, 1, 2, 4, 5, 6, 7, 8, 9, 10]] = 0.5, 0.9
    r = A.retrieval_recall(sim, gt)
    assert r == {"R@1": 25.0, "R@5": 50.0, "R@10": 75.0}


def test_kmeans_nmi_separated_clusters():
    x = torch.cat([torch.randn(20, 2) * 0.01 + c for c in (torch.tensor([0.0, 5]), torch.tensor([5.0, 0]))])
    assert A.kmeans_nmi(x.numpy(), ["a"] * 20 + ["b"] * 20) == pytest.approx(1.0)


# ---------------------------------------------------------------- 2-process smoke runs
def _tiny_coco(root: Path, n_images=8):
    _tiny_images(root / "img", n_images)
    ann = [{"id": 10 * i + j, "image_id": i, "caption": f"{c} shape number {i} at the left"}
           for i in range(n_images) for j, c in enumerate(("a red", "a blue"))]
    data = {"images": [{"id": i, "file_name": f"{i}.png"} for i in range(n_images)], "annotations": ann}
    (root / "captions.json").write_text(json.dumps(data))
    return root / "captions.json", root / "img"


def _torchrun(*argv) -> str:
    r = run_script("latent_pretrain.py", "--model", "toy", *argv, nproc=2, timeout=300)
    return r.stdout + r.stderr


def test_torchrun_pretrain_then_analyze(tmp_path):
    captions, img = _tiny_coco(tmp_path)
    out = _torchrun("--data", captions, "--image-root", img, "--val-data", captions, "--val-image-root", img,
                    "--image-size", "56", "--steps", "2", "--per-micro", "4", "--run-dir", tmp_path / "run")
    assert "step 2" in out and "analysis: R@1" in out
    rows = metrics(tmp_path / "run")
    assert {"loss_ntp", "loss_inst", "loss_batch"} <= set(rows[-1])
    export = tmp_path / "run" / "export"
    assert (export / "model.safetensors").exists() and (export / "latent_head.safetensors").exists()
    from transformers import Qwen2_5_VLForConditionalGeneration
    Qwen2_5_VLForConditionalGeneration.from_pretrained(export)   # loads with no project code
    assert _moved(export) == (True, False)                       # FSDP2: the optimizer steps the sharded weights


def test_torchrun_finetune(tmp_path, toy_world):
    stale = tmp_path / "ft" / "gqa_summary.predictions.jsonl"       # an earlier export's predictions: not reused
    stale.parent.mkdir()
    stale.write_text("".join(json.dumps({"id": f"testdev{i:07d}", "prediction": "STALE"}) + "\n" for i in range(48)))
    out = _torchrun("--stage", "finetune", "--init", "toy", "--gqa-dir", toy_world / "gqa", "--scienceqa-dir", "",
                    "--steps", "2", "--per-micro", "2", "--eval-limit", "2", "--run-dir", tmp_path / "ft")
    assert "step 2" in out and "resuming" not in out
    assert (tmp_path / "ft" / "export" / "model.safetensors").exists()
    header, *preds = [json.loads(x) for x in stale.read_text().splitlines()]
    assert header["provenance"]["model"].endswith("export")                      # the new export made them
    assert len(preds) == 2 and all(p["prediction"] != "STALE" for p in preds)
    assert _moved(tmp_path / "ft" / "export") == (True, False)


def test_webdataset_shards_stream_into_the_cache(bb, tmp_path):
    import io
    import tarfile
    for s in range(2):                                            # two shards, 3 samples each, one corrupt image
        with tarfile.open(tmp_path / f"cc-{s:02d}.tar", "w") as tar:
            for i in range(3):
                buf = io.BytesIO()
                Image.new("RGB", (40, 30), (40 * i, 80 * s, 90)).save(buf, format="JPEG")
                members = {"jpg": buf.getvalue() if (s, i) != (1, 2) else b"not a jpeg",
                           "txt": f"caption {s} {i}".encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{s:02d}{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    pairs, images = L.read_pairs(str(tmp_path / "cc-{00..01}.tar"), "", D.Skips())
    assert pairs is None and len(images["__wds__"]) == 2
    L.extract_targets(bb, L.Args(image_size=56), R.Dist(), images, tmp_path / "cache")
    cache = L.TargetCache(tmp_path / "cache")
    assert cache.skipped == {"010002": "unreadable image"}         # kept in the shard for every later run
    assert sorted(cache.captions) == sorted((f"caption {s} {i}", f"{s:02d}{i:04d}")
                                            for s in range(2) for i in range(3) if (s, i) != (1, 2))


def test_resume_continues_the_same_loss_curve(tmp_path):
    captions, img = _tiny_coco(tmp_path)

    def losses(run, *extra):
        run_script("latent_pretrain.py", "--model", "toy", "--data", captions, "--image-root", img, "--image-size",
                   "56", "--steps", "4", "--per-micro", "4", "--save-every", "2", "--analyze", "false",
                   "--run-dir", run, *extra, timeout=300)
        return {r["step"]: r["loss"] for r in metrics(run)}

    full = losses(tmp_path / "a")
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    shutil.copy(tmp_path / "a" / "run_id", tmp_path / "b" / "run_id")  # the run directory's identity moves with it
    resumed = losses(tmp_path / "b", "--resume", "true")
    assert sorted(resumed) == [3, 4]
    assert resumed[3] == pytest.approx(full[3], rel=1e-5) and resumed[4] == pytest.approx(full[4], rel=1e-5)


def test_skips_count_captions_on_fresh_and_reused_caches(bb, tmp_path):
    """An image that cannot be read drops all its captions: 5 counted samples on the run that extracts the targets
    and again on a run that reuses the cache (before: 1 image, then 0)."""
    captions, img = _tiny_coco(tmp_path, n_images=3)
    data = json.loads(captions.read_text())
    data["annotations"] += [{"id": 900 + j, "image_id": 7, "caption": f"caption {j}"} for j in range(5)]
    data["images"].append({"id": 7, "file_name": "missing.png"})
    captions.write_text(json.dumps(data))
    for run in ("fresh", "reused"):
        skips = D.Skips()
        pairs, _ = L.load_targets(bb, L.Args(image_size=56), R.Dist(), str(captions), str(img), skips,
                                  tmp_path / "cache")
        assert dict(skips.counts) == {"missing image": 5}, run
        assert len(pairs) == 6 and all(k != "7" for _, k in pairs)
