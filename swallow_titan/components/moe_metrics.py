"""MoE routing metrics: per-layer expert load and the auxiliary loss, for TensorBoard and the run log.

torchtitan's MoE layer counts the tokens routed to each expert in its
``tokens_per_expert`` buffer; auxiliary-loss-free balancing reads and zeroes
it in an optimizer pre-step hook. :class:`ExpertLoadMeter` takes the counts
every step just before the optimizer steps (and zeroes them itself when no
such hook does), sums them until the next log step, and then reports, over all
data-parallel ranks:

- ``moe/layer_<i>/max_load``: the busiest expert's share of routed tokens
  divided by the mean share (1 = perfectly balanced; ``num_experts`` = one
  expert takes everything);
- ``moe/max_load``: the largest of these over the layers;
- ``moe/aux_loss``: the mean auxiliary load-balancing loss of the training
  forwards (``[moe] load_balance = "aux_loss"``; top_k = uniform routing).

Counts are ratios, so activation checkpointing's recomputation (which counts
every token twice) does not change them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def moe_layers(model_parts: list[nn.Module]) -> list[tuple[str, nn.Module]]:
    """``(layer id, MoE module)`` of every MoE block, in layer order."""
    found = []
    for part in model_parts:
        for layer_id, block in part.layers.items():
            if getattr(block, "moe_enabled", False):
                found.append((layer_id, block.moe))
    return found


class ExpertLoadMeter:
    """Tokens per expert per MoE layer since the last log step, and the aux loss."""

    def __init__(self, model_parts: list[nn.Module]) -> None:
        self.model_parts = model_parts
        self.layers = moe_layers(model_parts)
        self.counts: torch.Tensor | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.layers)

    def record(self) -> None:
        """Take this step's counts; call after backward, before the optimizer step."""
        if not self.layers:
            return
        with torch.no_grad():
            step = torch.stack([moe.tokens_per_expert.detach().float() for _, moe in self.layers])
            self.counts = step if self.counts is None else self.counts + step
            for _, moe in self.layers:
                # With an expert bias torchtitan's pre-step hook uses and zeroes them.
                if moe.load_balance_coeff is None:
                    moe.tokens_per_expert.zero_()

    def metrics(self, group: Any = None) -> dict[str, float]:
        """The log step's metrics (collective over ``group`` when given); resets the counts."""
        if not self.layers or self.counts is None:
            return {}
        counts, self.counts = self.counts, None
        if group is not None:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        share = counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)
        max_load = share.max(dim=1).values * counts.shape[1]
        out = {
            f"moe/layer_{layer_id}/max_load": float(value)
            for (layer_id, _), value in zip(self.layers, max_load.tolist())
        }
        out["moe/max_load"] = float(max_load.max())
        aux = [part.take_aux_loss() for part in self.model_parts if hasattr(part, "take_aux_loss")]
        aux = [a for a in aux if a is not None]
        if aux:
            value = torch.tensor(sum(aux) / len(aux), dtype=torch.float64, device=counts.device)
            if group is not None:
                dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
                value /= dist.get_world_size(group)
            out["moe/aux_loss"] = float(value)
        return out
