"""The chunked training loss (hidden states, then the output head chunk by chunk under checkpointing) against
the plain loss through the model's full logits: same value and same Bone gradients within 1e-5 (fp32)."""

from __future__ import annotations

import copy

import pytest
import torch

from bone import BoneConfig, get_bone_model
from worker.batches import collate
from worker.data import IGNORE_INDEX, Example
from worker.loss import CausalLMLoss, chunked_cross_entropy
from worker.train import summed_loss


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    examples = []
    for n, prompt in ((23, 5), (9, 0), (17, 16)):  # different lengths: padding; one row learns from all tokens
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        examples.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return collate(examples, pad_id=0, device=torch.device("cpu"))


@pytest.fixture
def model(base):
    torch.manual_seed(1)
    bone_model = get_bone_model(copy.deepcopy(base.model), BoneConfig(r=8))
    with torch.no_grad():  # non-zero blocks, so the adapter changes the logits and its gradients are not trivial
        for p in bone_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return bone_model


def _loss_and_grads(fn, model) -> tuple[torch.Tensor, list[torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss = fn()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("chunk_tokens", [1, 7, 1024])
def test_chunked_loss_equals_the_full_logits_loss(model, chunk_tokens):
    batch = _batch(model.config.vocab_size)
    loss_module = CausalLMLoss(model, chunk_tokens=chunk_tokens)
    assert loss_module.chunked
    plain, plain_grads = _loss_and_grads(lambda: summed_loss(model, batch), model)
    chunked, chunked_grads = _loss_and_grads(lambda: loss_module(**batch), model)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=0)
    for got, want in zip(chunked_grads, plain_grads):  # within 1e-5 of the gradient's scale (summation order)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_chunks_never_hold_more_than_chunk_tokens_logits():
    seen = []

    class Head(torch.nn.Linear):
        def forward(self, x):
            seen.append(x.shape[0])
            return super().forward(x)

    head = Head(4, 11)
    hidden = torch.randn(2, 30, 4, requires_grad=True)
    targets = torch.randint(0, 11, (2, 30))
    targets[0, :10] = IGNORE_INDEX  # never enters the head
    chunked_cross_entropy(hidden, targets, head, chunk_tokens=8).backward()
    assert max(seen) <= 8 and sum(seen) >= 50  # 50 targets, each through the head (again in backward)


def test_models_with_transformed_logits_take_the_plain_path(model):
    model.config.final_logit_softcapping = 30.0
    try:
        assert not CausalLMLoss(model).chunked
    finally:
        del model.config.final_logit_softcapping


@pytest.mark.parametrize("chunk_tokens", [1, 7, 0])  # 0: the plain path through the full logits
def test_per_row_sums_are_each_rows_loss_and_add_up_to_the_total(model, chunk_tokens):
    """Co-training (worker/cotrain.py) weighs each row by its own job's token count: the per-row sums must be
    each row's own loss, whatever chunk its tokens fell in, and weighted gradients must follow."""
    batch = _batch(model.config.vocab_size)
    loss_module = CausalLMLoss(model, chunk_tokens=chunk_tokens)
    rows = loss_module(**batch, per_row=True)
    assert rows.shape == (3,)
    for i in range(3):
        alone = loss_module(**{k: v[i : i + 1, : int(batch["attention_mask"][i].sum())] for k, v in batch.items()})
        torch.testing.assert_close(rows[i], alone, rtol=1e-5, atol=0)
    torch.testing.assert_close(rows.sum(), loss_module(**batch), rtol=1e-5, atol=0)
    weights = torch.tensor([0.5, 0.0, 2.0])
    weighted, got = _loss_and_grads(lambda: (loss_module(**batch, per_row=True) * weights).sum(), model)
    want_loss, want = _loss_and_grads(
        lambda: sum(
            w * loss_module(**{k: v[i : i + 1] for k, v in batch.items()}) for i, w in enumerate(weights.tolist())
        ),
        model,
    )
    torch.testing.assert_close(weighted, want_loss, rtol=1e-5, atol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5 * float(w.abs().max()))
