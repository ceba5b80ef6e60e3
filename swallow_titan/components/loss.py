"""The training loss: torchtitan's summed cross-entropy, the fused one, and z-loss.

With ``[kernels] loss = "torch"`` the model returns logits and :class:`SwallowLoss`
computes torchtitan's summed cross-entropy on them (plus the z-loss if
``[kernels] z_loss > 0``). With ``loss = "fused_linear_ce"`` the labels travel to
the model in the input dict (``swallow_titan.data.dataloader.LabelsInInputs``), the model's output layer
returns ``[loss_sum, z_loss_sum]`` (``model/transformer.py``) and
:class:`SwallowLoss` unpacks it. Either way the trainer gets a sum over
non-ignored tokens and divides it by the global token count, as torchtitan does.
Validation passes the labels the same way (``swallow_titan.components.validation``), so with the
fused loss it never materialises the logits either.

z-loss for logging: every training forward adds its z-loss sum and its number of
counted tokens to the loss object's meter (:attr:`SwallowLoss.z_loss_meter`).
The trainer takes them at each log step (:meth:`SwallowLoss.take_z_loss`) and
logs ``train/z_loss``, the z-loss per token over all data-parallel ranks since
the previous log step (``trainer.py``, ``metrics.py``). The logged training
loss includes the z-loss.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Shard
from torchtitan.components.loss import IGNORE_INDEX, build_cross_entropy_loss


class ZLossMeter:
    """Sums the z-loss and the counted tokens of training forwards until taken."""

    def __init__(self) -> None:
        self._z_sum: torch.Tensor | None = None
        self._tokens: torch.Tensor | None = None

    def add(self, z_sum: torch.Tensor, tokens: torch.Tensor) -> None:
        z_sum, tokens = z_sum.detach().float(), tokens.detach()
        if self._z_sum is None:
            self._z_sum, self._tokens = z_sum, tokens
        else:
            self._z_sum = self._z_sum + z_sum
            self._tokens = self._tokens + tokens

    def take(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(z_loss_sum, counted_tokens)`` on this rank since the last take, or None."""
        if self._z_sum is None:
            return None
        taken = (self._z_sum, self._tokens)
        self._z_sum = self._tokens = None
        return taken


class SwallowLoss:
    """TrainSpec loss function: summed cross-entropy (+ z-loss) over counted tokens."""

    def __init__(self, job_config) -> None:
        self.z_loss = job_config.kernels.z_loss
        # torchtitan's summed CE, compiled when [compile] asks for "loss".
        self.cross_entropy = build_cross_entropy_loss(job_config)
        # What training forwards of this loss computed as z-loss, until taken.
        self.z_loss_meter = ZLossMeter()

    def take_z_loss(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(z_loss_sum, counted_tokens)`` of this rank's training forwards since
        the last take, or None (no z-loss, or no training forward since)."""
        return self.z_loss_meter.take()

    def __call__(self, pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if pred.ndim == 3:
            loss, z_sum = self._from_logits(pred, labels)
        else:
            # The fused output layer's [loss_sum, z_loss_sum]; under tensor
            # parallel a DTensor sharded over the TP ranks.
            packed = pred.full_tensor() if isinstance(pred, DTensor) else pred
            loss, z_sum = packed[0], packed[1]
        if self.z_loss > 0 and torch.is_grad_enabled():
            self.z_loss_meter.add(z_sum, (labels != IGNORE_INDEX).sum())
        return loss

    def _from_logits(
        self, logits: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        loss = self.cross_entropy(logits, labels)
        if self.z_loss == 0:
            return loss, None
        if isinstance(loss, DTensor):
            # Tensor parallel's loss_parallel returns a replicated DTensor.
            loss = loss.full_tensor()
        lse = _logsumexp_over_vocab(logits)
        counted = labels.flatten() != IGNORE_INDEX
        z_sum = self.z_loss * torch.where(counted, lse * lse, 0.0).sum()
        return loss + z_sum, z_sum


def _logsumexp_over_vocab(logits: torch.Tensor) -> torch.Tensor:
    """fp32 logsumexp of ``[batch, seq, vocab]`` logits per token, ``[batch * seq]``.

    Vocabulary-sharded DTensor logits (tensor parallel with loss_parallel) are
    reduced per shard first and only the per-shard results are gathered; DTensor's
    own logsumexp would gather the whole logits on every rank.
    """
    if not isinstance(logits, DTensor):
        return torch.logsumexp(logits.flatten(0, 1).float(), dim=-1)
    if logits.device_mesh.ndim != 1 or logits.placements[0] not in (
        Shard(-1),
        Shard(logits.ndim - 1),
    ):
        return torch.logsumexp(logits.full_tensor().flatten(0, 1).float(), dim=-1)
    local = torch.logsumexp(logits.to_local().flatten(0, 1).float(), dim=-1)
    per_shard = DTensor.from_local(
        local.unsqueeze(-1), logits.device_mesh, [Shard(1)], run_check=False
    )
    return torch.logsumexp(per_shard, dim=-1).full_tensor()


def build_swallow_loss(job_config, **kwargs) -> SwallowLoss:
    """TrainSpec ``build_loss_fn``."""
    del kwargs
    return SwallowLoss(job_config)
