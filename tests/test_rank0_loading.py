"""Start-up at N ranks (docs/common.md, "distributed"): rank 0 loads the checkpoint, the other ranks build on the meta
device, shard_model fills every rank's shards from rank 0. On 2 CPU processes (gloo) every rank must end with the
checkpoint's weights (after the same surgery), its buffers, its tied embeddings, and the first-step loss and gradients
of one process; the frozen copies (lvr_grpo's reference, Pearl's LM head) are sharded, not held whole."""
import pytest
import torch
import torch.distributed as dist
from PIL import Image

import common as C
import pearl as P
import runtime as R

NEW_TOKENS = ["<|rank0_a|>", "<|rank0_b|>"]


def surgery(bb):
    C.add_special_tokens(bb, NEW_TOKENS)     # mean-initialised rows: on the meta ranks, shapes only


def first_step(bb, model) -> tuple[float, dict]:
    """Loss and (gathered) gradients of one packed batch: an image sample and a text-only one."""
    small = dict(min_pixels=4 * bb.patch_factor ** 2, max_pixels=16 * bb.patch_factor ** 2)
    chats = [[{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (60, 90), (200, 30, 30))},
                                           {"type": "text", "text": "colour? <|rank0_a|>"}]},
              {"role": "assistant", "content": "red <|rank0_b|>"}],
             [{"role": "user", "content": "two and two?"}, {"role": "assistant", "content": "four"}]]
    batch = C.pack(bb, [C.encode_chat(bb, c, **small) for c in chats])
    loss = C.next_token_loss(model(**C.model_inputs(batch, "cpu")).logits, batch["labels"])
    loss.backward()
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    return loss.item(), {n: full(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}


def gathered(model) -> tuple[dict, dict]:
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    with torch.no_grad():
        return ({n: full(p).clone() for n, p in model.named_parameters()},
                {n: b.clone() for n, b in model.named_buffers()})


def tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def _rank_worker(rank, world, init_file, checkpoints, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    d = R.Dist(rank, world, 0, torch.device("cpu"))
    out = {}
    for path in checkpoints:
        bb = C.load_backbone(path, d.device, dtype=torch.float32, rank0_only=True)
        read = not any(p.is_meta for p in bb.model.parameters())
        surgery(bb)
        ref = R.meta_copy(bb.model).requires_grad_(False)          # lvr_grpo's frozen reference, before sharding
        model = R.shard_model(bb.model, d)
        ref = R.shard_model(ref, d, weights_from=model)
        weights, buffers = gathered(model)
        out[path] = dict(read=read, tied=tied(model), weights=weights, buffers=buffers, ref=gathered(ref)[0],
                         ref_tied=tied(ref), step=first_step(bb, model))
    bb = C.load_backbone(checkpoints[0], d.device, rank0_only=True)   # Pearl (full fine-tuning): the frozen LM head
    args = P.resolve(P.Args(model=checkpoints[0], data="none", lora_r=0))
    head = P.setup_model(bb, args)
    R.shard_model(bb.model, d, extra_units=(bb.model.pearl_dynamics, head))
    out["pearl_head"] = (head.weight.to_local().shape, head.weight.full_tensor(), bb.model.lm_head.weight.full_tensor())
    bb = C.load_backbone(checkpoints[0], d.device, rank0_only=True)   # latent_pretrain: the tower whole on every rank
    out["tower"] = gathered(R.replicate_from_rank0(bb.model.model.visual, d)), bb.model.lm_head.weight.is_meta
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Toy exports as the checkpoints: Qwen2.5-VL (untied, spare rows) and Qwen3-VL (tied, resized by surgery)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    for name in ("toy", "toy-qwen3vl"):
        R.export_hf(C.load_backbone(name, seed=3), tmp / name)
    return [str(tmp / name) for name in ("toy", "toy-qwen3vl")]


def test_rank0_loading_equals_the_checkpoint_and_one_process(checkpoints, tmp_path):
    import torch.multiprocessing as mp
    mp.start_processes(_rank_worker, args=(2, str(tmp_path / "init"), checkpoints, str(tmp_path)), nprocs=2,
                       start_method="spawn")       # not fork: a fork of a process whose OpenMP / gloo threads
                                                   # already ran can deadlock in the child (it hung the suite at 2 threads)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for path in checkpoints:
        bb = C.load_backbone(path, dtype=torch.float32)                  # one process: the plain path
        surgery(bb)
        weights, buffers = gathered(bb.model)
        loss, grads = first_step(bb, bb.model)
        assert [r[path]["read"] for r in ranks] == [True, False]       # rank 1 read nothing
        for r in ranks:
            got = r[path]
            assert got["weights"].keys() == weights.keys() and got["buffers"].keys() == buffers.keys()
            for n in weights:                                           # bit-identical on every rank
                assert torch.equal(got["weights"][n], weights[n]), (path, n)
                assert torch.equal(got["ref"][n], weights[n]), (path, n)
            for n in buffers:                                           # rotary inv_freq: not in the state dict
                assert torch.equal(got["buffers"][n], buffers[n]), (path, n)
            assert got["tied"] == got["ref_tied"] == tied(bb.model)
            assert got["step"][0] == pytest.approx(loss, rel=1e-6)
            assert got["step"][1].keys() == grads.keys() and len(grads) > 10
            for n in grads:
                torch.testing.assert_close(got["step"][1][n], grads[n], atol=1e-6, rtol=1e-4)
    assert tied(C.load_backbone(checkpoints[1]).model)                 # the tied case is really exercised
    tower = gathered(C.load_backbone(checkpoints[0]).model.model.visual)
    for r in ranks:
        local_shape, head, lm_head = r["pearl_head"]
        assert local_shape[0] * 2 == head.shape[0] and torch.equal(head, lm_head)   # sharded, equal to the LM head
        (weights, buffers), rest_meta = r["tower"]
        for got, want in ((weights, tower[0]), (buffers, tower[1])):
            assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert [r["tower"][1] for r in ranks] == [False, True]             # only the tower: the rest stays on meta


def test_one_process_frozen_copy(checkpoints):
    """weights_from without torchrun: the meta skeleton allocated and copied (lvr_grpo's reference, one process)."""
    bb = C.load_backbone(checkpoints[1])
    ref = R.shard_model(R.meta_copy(bb.model).requires_grad_(False), R.Dist(), weights_from=bb.model)
    assert tied(ref) and not any(p.requires_grad for p in ref.parameters())
    for (n, p), (m, q) in zip(bb.model.state_dict().items(), ref.state_dict().items()):
        assert n == m and torch.equal(p, q) and p.data_ptr() != q.data_ptr()
