"""torchtitan's llama3 Transformer with swallow-titan's kernels switched in.

``SwallowTransformer`` is torchtitan's ``Transformer`` (same modules, parameter
names and initialisation order, so checkpoints and HF conversion are unchanged)
plus two options from ``[kernels]``:

- ``rmsnorm = "triton"``: every norm is a :class:`TritonRMSNorm`, and each block
  fuses its mid-block residual add into ``ffn_norm`` (:class:`FusedNormBlock`).
- ``loss = "fused_linear_ce"``: the output layer is a :class:`FusedLossOutput`.
  When the forward receives ``labels`` it returns the summed loss instead of the
  logits, computed chunk by chunk inside the output layer's own forward, so FSDP
  has gathered the output weight there exactly as it does for the logits, and
  tensor parallel's vocabulary-sharded weight is used where it lies.

The labels reach the model as an extra key of the dataloader's input dict
(``swallow_titan.data.dataloader.LabelsInInputs``); torchtitan passes every key but
"input" to the model's forward; validation adds them the same way. Without
``labels`` the model returns logits as usual (generation, HF export checks).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.models.llama3.model.model import Transformer, TransformerBlock
from torchtitan.tools.logging import logger

from kernels import fused_linear_cross_entropy, rms_norm, rms_norm_heads
from swallow_titan.config.sections import FUSED_LOSS, TRITON_NORM
from swallow_titan.model.args import SwallowModelArgs


class TritonRMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameter, same init) computed by ``kernels.rms_norm``.

    ``forward(x, residual)`` returns ``(norm(x + residual), x + residual)``. Under
    sequence parallel, torchtitan's ``SequenceParallel`` style makes ``x`` a
    sequence-sharded DTensor but leaves keyword arguments alone, so a plain
    ``residual`` is taken to be sharded like ``x``.
    """

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        if isinstance(x, DTensor) and residual is not None and not isinstance(
            residual, DTensor
        ):
            residual = DTensor.from_local(
                residual, x.device_mesh, x.placements, run_check=False
            )
        return rms_norm(x, self.weight, eps, residual=residual)


def share_norm(norm: nn.RMSNorm, cls: type[nn.RMSNorm]) -> nn.RMSNorm:
    """A ``cls`` holding ``norm``'s own weight Parameter (not a copy) and eps."""
    if norm.weight is None:
        raise ValueError("Triton RMSNorm needs an elementwise weight (elementwise_affine=True)")
    new = cls(norm.normalized_shape, eps=norm.eps, device="meta")
    new.weight = norm.weight
    return new


class TritonQKNorm(nn.RMSNorm):
    """Qwen3's per-head q/k norm (``nn.RMSNorm(head_dim)`` on ``[batch, seq,
    heads, head_dim]``) computed by ``kernels.rms_norm_heads``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return rms_norm_heads(x, self.weight, eps)


def use_triton_qk_norms(attention: nn.Module) -> None:
    """Compute an attention module's ``q_norm`` / ``k_norm`` with the Triton kernel.

    For torchtitan's qwen3 ``Attention`` (any module whose ``q_norm`` and
    ``k_norm`` are ``nn.RMSNorm`` or None): each norm is replaced by a
    :class:`TritonQKNorm` holding the same weight Parameter, so parameter names,
    initialisation, checkpoints and tensor-parallel plans (which address the
    modules by name) are unchanged. Call it after building the model, before
    parallelising it.
    """
    for name in ("q_norm", "k_norm"):
        norm = getattr(attention, name, None)
        if norm is None:
            continue
        if not isinstance(norm, nn.RMSNorm):
            raise TypeError(
                f"use_triton_qk_norms: {name} is a {type(norm).__name__}, expected nn.RMSNorm"
            )
        setattr(attention, name, share_norm(norm, TritonQKNorm))


class FusedNormBlock(TransformerBlock):
    """torchtitan's block with Triton norms and ``h = x + attn; norm(h)`` fused."""

    def __init__(self, layer_id: int, model_args: SwallowModelArgs):
        super().__init__(layer_id, model_args)
        self.attention_norm = TritonRMSNorm(model_args.dim, eps=model_args.norm_eps)
        self.ffn_norm = TritonRMSNorm(model_args.dim, eps=model_args.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        freqs_cis: torch.Tensor,
        attention_masks,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        normed, h = attend_then_fused_norm(self, x, freqs_cis, attention_masks, positions)
        return h + self.feed_forward(normed)


def attend_then_fused_norm(
    block: nn.Module, x: torch.Tensor, rope: torch.Tensor, attention_masks, positions
) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's first half with the mid-block add fused into ``ffn_norm``.

    Returns ``(ffn_norm(h), h)`` for ``h = x + attention(attention_norm(x))``;
    ``block`` is a torchtitan llama3 or qwen3 block whose ``ffn_norm`` is a
    :class:`TritonRMSNorm`.
    """
    attn = block.attention(block.attention_norm(x), rope, attention_masks, positions)
    normed, h = block.ffn_norm(attn, residual=x)
    if isinstance(h, DTensor):
        # Under sequence parallel the rest of the block works on local shards.
        h = h.to_local()
    return normed, h


def loss_from_labels(
    model: nn.Module, tokens: torch.Tensor, rope: torch.Tensor, attention_masks, positions,
    labels: torch.Tensor,
) -> torch.Tensor:
    """torchtitan's forward up to the output layer, then the fused loss on ``labels``.

    ``model`` is a torchtitan llama3 or qwen3 model (``tok_embeddings``,
    ``layers``, ``norm``, ``output``; ``rope`` is its RoPE buffer); returns the
    :class:`FusedLossOutput`'s ``[loss_sum, z_loss_sum]``.
    """
    if not isinstance(model.output, FusedLossOutput):
        raise ValueError(
            f"{type(model).__name__} got labels but its output layer computes logits; "
            'labels are only passed with [kernels] loss = "fused_linear_ce"'
        )
    h = model.tok_embeddings(tokens) if model.tok_embeddings is not None else tokens
    for layer in model.layers.values():
        h = layer(h, rope, attention_masks, positions)
    h = model.norm(h) if model.norm is not None else h
    return model.output(h, labels=labels)


class FusedLossOutput(nn.Linear):
    """The output layer; given labels, it returns the loss instead of the logits.

    ``forward(h)`` returns logits like ``nn.Linear``. ``forward(h, labels)``
    returns a 2-element fp32 tensor ``[loss_sum, z_loss_sum]``: the summed
    cross-entropy plus z-loss over tokens whose label is not ``IGNORE_INDEX``
    (what torchtitan's loss function returns), and the z-loss part of it,
    detached, for logging. It stays a tensor so that tensor parallel's output
    hook (which expects a DTensor and redistributes it to ``Shard(-1)``) passes
    it through; ``swallow_titan.components.loss`` unpacks it.
    """

    def __init__(self, dim: int, vocab_size: int, z_loss: float = 0.0, device=None):
        super().__init__(dim, vocab_size, bias=False, device=device)
        self.z_loss = z_loss

    @classmethod
    def sharing(cls, output: nn.Linear, z_loss: float = 0.0) -> "FusedLossOutput":
        """A fused output layer holding ``output``'s own weight Parameter.

        With tied embeddings (``output.weight is tok_embeddings.weight``, as in
        the small Qwen3 models) the tie survives the swap: the loss's weight
        gradient and the embedding's then accumulate in the one shared
        ``.grad``, as they do in eager.
        """
        if output.bias is not None:
            raise ValueError("FusedLossOutput: the output layer must have no bias")
        new = cls(output.in_features, output.out_features, z_loss, device="meta")
        new.weight = output.weight
        return new

    def forward(
        self, h: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        if labels is None:
            return super().forward(h)
        loss, z = fused_linear_cross_entropy(
            h, self.weight, labels, ignore_index=IGNORE_INDEX, z_loss=self.z_loss
        )
        return torch.stack([loss, z])


class SwallowTransformer(Transformer):
    """torchtitan's llama3 ``Transformer`` with the ``[kernels]`` options applied."""

    def __init__(self, model_args: SwallowModelArgs):
        super().__init__(model_args)
        if model_args.rmsnorm_impl == TRITON_NORM:
            self.layers = nn.ModuleDict(
                {
                    str(i): FusedNormBlock(i, model_args)
                    for i in range(model_args.n_layers)
                }
            )
            self.norm = TritonRMSNorm(model_args.dim, eps=model_args.norm_eps)
        if model_args.loss_impl == FUSED_LOSS:
            self.output = FusedLossOutput(
                model_args.dim, model_args.vocab_size, z_loss=model_args.z_loss
            )
        if model_args.rmsnorm_impl == TRITON_NORM or model_args.loss_impl == FUSED_LOSS:
            logger.info(
                f"Triton kernels: rmsnorm = {model_args.rmsnorm_impl!r}, "
                f"loss = {model_args.loss_impl!r}"
            )

    def forward(
        self,
        tokens: torch.Tensor,
        attention_masks=None,
        positions: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]``; with ``labels``, the fused output
        layer's ``[loss_sum, z_loss_sum]`` instead (see :class:`FusedLossOutput`)."""
        if labels is None:
            return super().forward(tokens, attention_masks, positions)
        return loss_from_labels(self, tokens, self.freqs_cis, attention_masks, positions, labels)
