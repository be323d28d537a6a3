"""fp32 master weights with bf16 compute (`--dtype`): one real optimizer step of lvr.py (stage-1 SFT) and pearl.py
(`--lora-r 0`) at lr 1e-5 moves nearly every trainable element, while the same step on pure-bf16 parameters (the
old behaviour, the negative control) rounds most updates away; a bf16 run exports bf16 and the export reloads and
evaluates; a bad --dtype is one argparse error line. CPU (bf16 autocast), toy backbone.

    python -m pytest -q tests/test_precision.py
"""
import json

import pytest
import torch

import common as C
import runtime as R
import lvr
import pearl
from conftest import run_script


@pytest.fixture(scope="module")
def records(tmp_path_factory, toy_world):
    """The first 4 toy-world LVR records (absolute image paths), a data file both lvr.py and pearl.py read."""
    root = toy_world
    recs = json.loads((root / "lvr_train.json").read_text())[:4]
    for r in recs:
        r["image"] = str(root / r["image"]) if isinstance(r["image"], str) else [str(root / p) for p in r["image"]]
    path = tmp_path_factory.mktemp("data") / "lvr_train.json"
    path.write_text(json.dumps(recs))
    (path.parent / "eval").symlink_to(root / "eval")                  # lvr.py evaluates on <data dir>/eval
    return str(path)


@pytest.fixture
def steps(monkeypatch):
    """Records, for every optimizer step the training files take, the fraction of trainable elements that changed
    and the dtypes of the stepped parameters (AdamW is replaced by a subclass that compares before and after)."""
    seen = []

    class SpyAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            params = [p for g in self.param_groups for p in g["params"]]
            before = [p.detach().clone() for p in params]
            out = super().step(closure)
            changed = {p.dtype: [0, 0] for p in params}                # dtype → [changed, total] elements
            for p, b in zip(params, before):
                changed[p.dtype][0] += int((p.detach() != b).sum())
                changed[p.dtype][1] += p.numel()
            seen.append({"fraction": sum(c for c, _ in changed.values()) / sum(n for _, n in changed.values()),
                         "by_dtype": {k: c / n for k, (c, n) in changed.items()}, "dtypes": set(changed),
                         "numel": {k: n for k, (_, n) in changed.items()},
                         "autocast": torch.is_autocast_enabled("cpu")})
            return out

    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    return seen


def pure_bf16(monkeypatch):
    """The negative control: load_backbone hands the training files bf16 parameters (what AdamW stepped before)."""
    load = C.load_backbone
    monkeypatch.setattr(C, "load_backbone", lambda *a, **k: load(*a, **{**k, "dtype": torch.bfloat16}))


LR = {"lr", "head_lr"}  # given explicitly: lr 1e-5 equals the paper default, and the toy preset must not replace it


def run_lvr(records, run_dir, **kw):
    a = lvr.Args(model="toy", data=records, run_dir=str(run_dir), steps=1, per_micro=2, lr=1e-5, dtype="bf16", **kw)
    lvr.main(a, explicit=R.changed_fields(a) | LR | set(kw))   # eval=False equals the default: say it was given


def run_pearl(records, run_dir, **kw):
    a = pearl.Args(model="toy", data=records, run_dir=str(run_dir), steps=1, per_micro=2, lr=1e-5, lora_r=0, dtype="bf16",
                   eval="", **kw)
    pearl.main(a, explicit=R.changed_fields(a) | LR | {"eval"})


def test_lvr_sft_step_bf16_compute_moves_fp32_masters(records, steps, tmp_path):
    run_lvr(records, tmp_path, eval=True, eval_steps="4", eval_benchmarks="vstar", eval_limit=2)
    (s,) = steps
    print(f"lvr stage-1 step, bf16 compute over fp32 masters: {100 * s['fraction']:.2f} % of elements changed")
    assert s["dtypes"] == {torch.float32} and not s["autocast"]     # AdamW steps fp32 masters, outside autocast
    assert s["fraction"] > 0.99
    # the export of a bf16 run is bf16 (weights and config.json), reloads and was evaluated above (eval.py)
    export = tmp_path / "export"
    from safetensors import safe_open
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((export / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "eval" / "vstar_N4.json").read_text())["overall"] >= 0
    again = C.load_backbone(str(export), dtype=torch.bfloat16)
    assert next(again.model.parameters()).dtype == torch.bfloat16


def test_lvr_sft_step_on_pure_bf16_params_loses_most_updates(records, steps, tmp_path, monkeypatch):
    pure_bf16(monkeypatch)
    run_lvr(records, tmp_path, eval=False)
    (s,) = steps
    print(f"lvr stage-1 step on pure bf16 params: {100 * s['fraction']:.2f} % of elements changed")
    assert s["dtypes"] == {torch.bfloat16}
    assert s["fraction"] < 0.5


def test_pearl_full_finetune_step_bf16_compute_moves_fp32_masters(records, steps, tmp_path):
    run_pearl(records, tmp_path)
    (s,) = steps
    print(f"pearl --lora-r 0 step, bf16 compute over fp32 masters: {100 * s['fraction']:.2f} % of elements changed")
    assert s["dtypes"] == {torch.float32} and s["fraction"] > 0.99
    export = tmp_path / "export"
    assert json.loads((export / "config.json").read_text())["dtype"] == "bfloat16"
    model = C.load_backbone(str(export)).model                     # CPU: upcast to fp32 on load
    assert not any("pearl" in n for n, _ in model.named_parameters())


def test_pearl_full_finetune_step_on_pure_bf16_params_loses_most_updates(records, steps, tmp_path, monkeypatch):
    pure_bf16(monkeypatch)
    run_pearl(records, tmp_path, export=False)
    (s,) = steps                                       # the dynamics head is still created fp32 (a 1 % minority)
    bf16 = s["by_dtype"][torch.bfloat16]
    print(f"pearl --lora-r 0 step on pure bf16 params: {100 * bf16:.2f} % of the bf16 elements changed")
    assert s["numel"][torch.bfloat16] > 0.9 * sum(s["numel"].values()) and bf16 < 0.5


def test_pearl_lora_keeps_frozen_base_in_compute_dtype(records, steps, tmp_path):
    """Default LoRA: base weights frozen in bf16, everything trained (adapters, predictor rows, head) fp32."""
    a = pearl.Args(model="toy", data=records, run_dir=str(tmp_path), steps=1, per_micro=2, dtype="bf16", eval="",
                   export=False)
    bb = pearl.main(a, explicit=R.changed_fields(a) | {"eval"})
    frozen = {p.dtype for p in bb.model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16} and steps[0]["dtypes"] == {torch.float32}


def test_fp32_export_stays_fp32(tmp_path):
    bb = C.load_backbone("toy")
    R.export_hf(bb, tmp_path, dtype=torch.float32)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float32"
    assert C.load_backbone(str(tmp_path)).model.dtype == torch.float32


def test_compute_dtype_and_context():
    assert R.compute_dtype("auto", "cpu") == torch.float32 and R.compute_dtype("auto", "cuda") == torch.bfloat16
    assert R.compute_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        R.compute_dtype("fp16", "cpu")
    with R.compute_context("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with R.compute_context("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("script", ["lvr.py", "pearl.py", "latent_pretrain.py"])
def test_dtype_flag(script):
    from transformers import HfArgumentParser
    module = __import__(script[:-3])
    (a,) = HfArgumentParser(module.Args).parse_args_into_dataclasses(["--dtype", "bf16"])
    assert a.dtype == "bf16"
    (a,) = HfArgumentParser(module.Args).parse_args_into_dataclasses([])
    assert a.dtype == "auto"
    r = run_script(script, "--dtype", "fp16", timeout=120, check=False)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert "argument --dtype: invalid choice: 'fp16'" in last and "bf16" in last, r.stderr[-500:]
    h = run_script(script, "--help", timeout=120, check=False).stdout
    assert "bf16 on CUDA, fp32 on CPU" in " ".join(h.split())


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_latent_pretrain_bf16_compute_moves_fp32_masters(stage, steps, tmp_path, toy_world):
    """Both stages train fp32 masters under bf16 autocast (losses, the contrastive matmuls included, in fp32) and
    export bf16."""
    import latent_pretrain as LP
    from test_latent_pretrain import _tiny_coco
    if stage == "pretrain":
        captions, img = _tiny_coco(tmp_path)
        a = LP.Args(model="toy", data=str(captions), image_root=str(img), image_size=56, per_micro=4, analyze=False,
                    cache_dir=str(tmp_path / "cache"))
    else:
        a = LP.Args(model="toy", stage="finetune", init="toy", gqa_dir=str(toy_world / "gqa"), per_micro=2, eval_limit=0)
    a.steps, a.lr, a.head_lr, a.dtype, a.run_dir = 1, 1e-5, 1e-5, "bf16", str(tmp_path / "run")
    LP.main(a, explicit=R.changed_fields(a) | LR)
    (s,) = steps
    print(f"latent_pretrain {stage} step, bf16 compute over fp32 masters: {100 * s['fraction']:.2f} % changed")
    assert s["dtypes"] == {torch.float32} and s["fraction"] > 0.99
    assert json.loads((tmp_path / "run" / "export" / "config.json").read_text())["dtype"] == "bfloat16"
