"""The fused linear + cross-entropy with tied embeddings: when the output weight IS
the embedding weight, its gradient holds both the embedding's and the loss's share,
as in eager PyTorch (Triton interpreter, tiny shapes)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from swallow_titan.model.transformer import FusedLossOutput

V, H, IGNORE = 50, 16, -100
Z_LOSS = 1e-3


def _batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (2, 7), generator=g)
    labels = torch.randint(0, V, (2, 7), generator=g)
    labels[0, 2] = IGNORE
    return tokens, labels


def _tied_modules():
    torch.manual_seed(0)
    embedding = nn.Embedding(V, H)
    output = nn.Linear(H, V, bias=False)
    output.weight = embedding.weight  # how torchtitan ties them
    return embedding, FusedLossOutput.sharing(output, z_loss=Z_LOSS)


def _eager_loss(weight: torch.Tensor, tokens, labels, out_weight=None) -> torch.Tensor:
    """Embedding -> tanh -> linear -> summed cross-entropy + z-loss, float64."""
    h = torch.tanh(F.embedding(tokens, weight) * 1.5)
    logits = h @ (weight if out_weight is None else out_weight).T
    lse = torch.logsumexp(logits, -1)
    valid = labels != IGNORE
    ce = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE,
                         reduction="sum")
    return ce + Z_LOSS * torch.where(valid, lse * lse, 0.0).sum()


def test_the_fused_output_keeps_the_tie():
    embedding, fused = _tied_modules()
    assert fused.weight is embedding.weight
    assert len(list(nn.ModuleList([embedding, fused]).parameters())) == 1


def test_the_shared_weight_gets_the_embedding_and_the_loss_gradient():
    tokens, labels = _batch()
    embedding, fused = _tied_modules()
    h = torch.tanh(embedding(tokens) * 1.5)
    loss, _ = fused(h, labels=labels)
    loss.backward()

    w64 = embedding.weight.detach().double().requires_grad_()
    expected = _eager_loss(w64, tokens, labels)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    # fp32 against float64, relative to the largest gradient entry.
    scale = w64.grad.abs().max().item()
    torch.testing.assert_close(embedding.weight.grad.double(), w64.grad, rtol=0,
                               atol=1e-4 * scale)

    # Each path alone gives a gradient far from the sum: both must have arrived.
    for keep in ("embedding", "output"):
        w_a = embedding.weight.detach().double().requires_grad_()
        w_b = w_a.detach().clone()  # the other use, as a constant
        if keep == "embedding":
            _eager_loss(w_a, tokens, labels, out_weight=w_b).backward()
        else:
            h_b = torch.tanh(F.embedding(tokens, w_b) * 1.5)
            logits = h_b @ w_a.T
            lse = torch.logsumexp(logits, -1)
            (F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE,
                             reduction="sum")
             + Z_LOSS * torch.where(labels != IGNORE, lse * lse, 0.0).sum()).backward()
        assert (w_a.grad - w64.grad).abs().max().item() > 100 * 1e-4 * scale, keep


def test_a_tied_weight_accumulates_over_two_steps_like_eager():
    tokens, labels = _batch()
    embedding, fused = _tied_modules()
    for _ in range(2):  # no zero_grad: .grad accumulates across backward calls
        loss, _ = fused(torch.tanh(embedding(tokens) * 1.5), labels=labels)
        loss.backward()
    w64 = embedding.weight.detach().double().requires_grad_()
    (2 * _eager_loss(w64, tokens, labels)).backward()
    scale = w64.grad.abs().max().item()
    torch.testing.assert_close(embedding.weight.grad.double(), w64.grad, rtol=0,
                               atol=1e-4 * scale)
