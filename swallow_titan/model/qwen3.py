"""Qwen3 model arguments and flavors (dense and MoE), served by torchtitan's qwen3 model.

The architecture is torchtitan 0.2.2's ``Qwen3Model`` (``torchtitan.models.qwen3``):
head_dim decoupled from dim / n_heads, RMSNorm on q and k per head, RoPE with
theta 1,000,000 (no scaling), SwiGLU or torchtitan's MoE layer, tied
embeddings for the small models. ``SwallowQwen3ModelArgs`` adds what the TOML
may change per run, as ``SwallowModelArgs`` does for Llama: attention type and
mask, and the MoE load balancing of ``[moe]``.

The flavors are torchtitan's own (``qwen3_args``: 0.6B to 32B and 30B-A3B),
copied into this class, plus ``tiny`` and ``tiny_moe`` for CPU tests.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torchtitan.models.moe import MoEArgs
from torchtitan.models.qwen3 import Qwen3Model, Qwen3ModelArgs, qwen3_args
from torchtitan.models.qwen3.model.model import TransformerBlock
from torchtitan.tools.logging import logger
from torchtitan.tools.utils import device_type

from swallow_titan.config.checks import global_batch_sequences, resolve_layout
from swallow_titan.config.sections import AUX_LOSS, AUX_LOSS_FREE, FUSED_LOSS, TRITON_NORM
from swallow_titan.runtime.ranks import job_world_size

# TINY_VOCAB_SIZE: the vocabulary of the tiny tokenizer in assets/tokenizer.
from swallow_titan.model.args import TINY_VOCAB_SIZE, PerRunArgs
from swallow_titan.model.transformer import (
    FusedLossOutput,
    TritonRMSNorm,
    attend_then_fused_norm,
    loss_from_labels,
    share_norm,
    use_triton_qk_norms,
)


# torch._grouped_mm computes in bf16 and needs 16-byte-aligned groups (CUDA);
# on CPU the experts run torchtitan's per-expert loop in the model's dtype.
GROUPED_MM_AVAILABLE = device_type == "cuda"


@dataclass
class SwallowQwen3ModelArgs(PerRunArgs, Qwen3ModelArgs):
    """torchtitan's Qwen3 arguments, updated from swallow-titan's ``[model]`` and
    ``[kernels]`` (:class:`PerRunArgs`; with ``rmsnorm = "triton"`` the q/k norms
    too) and ``[moe]``."""

    router_aux_loss_coef: float = 0.0
    """Coefficient of the MoE auxiliary load-balancing loss (HF's
    ``router_aux_loss_coef``); 0 when ``[moe] load_balance`` is not "aux_loss"."""

    aux_loss_weight: float = 0.0
    """``router_aux_loss_coef`` x local batch / global batch: the weight of one
    micro-batch's auxiliary loss in the step's gradient (see SwallowQwen3Model)."""

    def update_from_config(self, job_config, **kwargs) -> None:
        super().update_from_config(job_config, **kwargs)
        if not self.moe_enabled:
            return
        moe = job_config.moe
        # Either balancing method, never both: the expert bias exists only
        # with "aux_loss_free" (torchtitan skips it when the coefficient is None).
        self.moe_args.load_balance_coeff = (
            moe.bias_update_rate if moe.load_balance == AUX_LOSS_FREE else None
        )
        self.router_aux_loss_coef = moe.aux_loss_coef if moe.load_balance == AUX_LOSS else 0.0
        layout = resolve_layout(job_config, job_world_size(), job_config.job.config_file or "")
        self.aux_loss_weight = (
            self.router_aux_loss_coef
            * job_config.training.local_batch_size
            / global_batch_sequences(job_config, layout)
        )
        self.moe_args.use_grouped_mm = moe.grouped_mm and GROUPED_MM_AVAILABLE


def _ours(args: Qwen3ModelArgs, **overrides) -> SwallowQwen3ModelArgs:
    """torchtitan's flavor as ``SwallowQwen3ModelArgs`` (a deep copy), changed by ``overrides``."""
    values = {f.name: copy.deepcopy(getattr(args, f.name)) for f in fields(Qwen3ModelArgs)}
    ours = replace(SwallowQwen3ModelArgs(**values), **overrides)
    ours.moe_args.use_grouped_mm = GROUPED_MM_AVAILABLE
    return ours


# Qwen3's tied embeddings, q/k norm, GQA and decoupled head_dim, small enough
# for 2 CPU cores. head_dim 32 with dim 128 and 8 heads: q is 256 wide, so a
# mapping that assumed head_dim = dim / n_heads would fail.
_TINY = dict(
    vocab_size=TINY_VOCAB_SIZE,
    dim=128,
    n_layers=3,
    n_heads=8,
    n_kv_heads=2,
    head_dim=32,
    hidden_dim=384,
    max_seq_len=4096,
)

# Qwen3's base models were pre-trained with 32,768 positions (config.json
# max_position_embeddings); torchtitan's flavors say 4,096. The run's seq_len
# replaces it either way; this only keeps torchtitan from warning at 8,192.
QWEN3_MAX_POSITIONS = 32_768

QWEN3_FLAVORS: dict[str, SwallowQwen3ModelArgs] = {
    name: _ours(qwen3_args[name], max_seq_len=QWEN3_MAX_POSITIONS)
    for name in ("0.6B", "1.7B", "4B", "8B", "14B", "32B", "30B-A3B")
}
QWEN3_FLAVORS["tiny"] = _ours(qwen3_args["0.6B"], **_TINY)
# 8 experts, 2 per token, every layer MoE and untied embeddings, as in 30B-A3B.
QWEN3_FLAVORS["tiny_moe"] = _ours(
    qwen3_args["30B-A3B"],
    **{**_TINY, "enable_weight_tying": False},
    moe_inter_dim=64,
    moe_args=MoEArgs(
        num_experts=8,
        num_shared_experts=0,
        top_k=2,
        score_func="softmax",
        route_norm=True,
        route_scale=1.0,
        score_before_experts=False,
    ),
)


class _AddAuxiliaryGradient(torch.autograd.Function):
    """Identity on ``x`` whose backward also sends gradient ``weight`` into ``aux``.

    The auxiliary loss enters training through its gradient only, so the
    model's output and torchtitan's loss (and train/loss) stay the
    cross-entropy; ``weight`` is the coefficient scaled to this micro-batch's
    share of the step (see :class:`SwallowQwen3Model`).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.aux_shape, ctx.aux_dtype, ctx.weight = aux.shape, aux.dtype, weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        aux_grad = torch.full(ctx.aux_shape, ctx.weight, dtype=ctx.aux_dtype, device=grad.device)
        return grad, aux_grad, None


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Qwen3-MoE's auxiliary loss (transformers' ``load_balancing_loss_func``).

    Over the tokens of all MoE layers together: ``num_experts x sum over
    experts of (share of routed slots) x (mean router probability)``, summed
    over the ``top_k`` slots; ``top_k`` when routing is uniform. ``router_logits``: one ``[tokens, num_experts]`` tensor
    per layer.
    """
    logits = torch.cat(router_logits, dim=0).float()
    probs = torch.softmax(logits, dim=-1)
    num_experts = probs.shape[-1]
    _, selected = torch.topk(probs, top_k, dim=-1)
    slots = F.one_hot(selected, num_experts).float().mean(dim=0)  # [top_k, experts]
    return num_experts * (slots * probs.mean(dim=0)).sum()


class FusedNormQwen3Block(TransformerBlock):
    """torchtitan's qwen3 block with Triton norms and ``h = x + attn; norm(h)`` fused.

    The block's norms are :class:`TritonRMSNorm` modules holding the block's
    own weight Parameters, and the attention's q/k norms run the per-head
    Triton kernel (:func:`use_triton_qk_norms`); names, initialisation and
    checkpoints are torchtitan's. Only ``forward`` differs: the mid-block
    residual add happens inside ``ffn_norm``'s kernel, as in Llama's
    ``FusedNormBlock``; the feed-forward is the dense SwiGLU or the MoE layer.
    """

    def __init__(self, layer_id: int, model_args: Qwen3ModelArgs):
        super().__init__(layer_id, model_args)
        self.attention_norm = share_norm(self.attention_norm, TritonRMSNorm)
        self.ffn_norm = share_norm(self.ffn_norm, TritonRMSNorm)
        use_triton_qk_norms(self.attention)

    def forward(
        self,
        x: torch.Tensor,
        rope_cache: torch.Tensor,
        attention_masks,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        normed, h = attend_then_fused_norm(self, x, rope_cache, attention_masks, positions)
        return h + (self.moe(normed) if self.moe_enabled else self.feed_forward(normed))


class SwallowQwen3Model(Qwen3Model):
    """torchtitan's ``Qwen3Model``, plus Qwen3-MoE's auxiliary load-balancing loss.

    With ``aux_loss_weight > 0`` (``[moe] load_balance = "aux_loss"``), a
    training forward collects every MoE router's logits (forward hooks on the
    routers' gates that only keep their output, so torchtitan's modules run
    unchanged) and attaches to the model's output the gradient of
    ``aux_loss_weight x`` the loss of :func:`load_balancing_loss`; the output
    itself is unchanged. This happens outside the blocks, so activation
    checkpointing recomputes them exactly (the hooks keep nothing while it
    does). ``aux_loss_weight`` is the coefficient times this micro-batch's
    share of the step's sequences (local batch / global batch): gradient
    accumulation and FSDP's summed reduction then add up to the coefficient
    times the mean auxiliary loss, as HF's Qwen3-MoE trains.
    :meth:`take_aux_loss` returns the mean auxiliary loss since the last call,
    for the run log.

    ``[kernels]`` apply as for Llama (``SwallowTransformer``): with
    ``rmsnorm = "triton"`` the blocks are :class:`FusedNormQwen3Block` (block
    norms fused with the residual add, q/k norms per head) and the final norm a
    :class:`TritonRMSNorm`; with ``loss = "fused_linear_ce"`` the output layer
    is a :class:`FusedLossOutput` holding the output layer's own weight, so
    tied embeddings stay tied, and a forward given ``labels`` returns its
    ``[loss_sum, z_loss_sum]``. Otherwise the model is exactly torchtitan's.
    """

    def __init__(self, model_args: Qwen3ModelArgs):
        super().__init__(model_args)
        rmsnorm_impl = getattr(model_args, "rmsnorm_impl", "torch")
        loss_impl = getattr(model_args, "loss_impl", "torch")
        if rmsnorm_impl == TRITON_NORM:
            # New blocks, as SwallowTransformer does; init_weights runs later.
            self.layers = torch.nn.ModuleDict(
                {str(i): FusedNormQwen3Block(i, model_args) for i in range(model_args.n_layers)}
            )
            self.norm = share_norm(self.norm, TritonRMSNorm)
        if loss_impl == FUSED_LOSS:
            # Holds self.output's weight, which with tied embeddings is the embedding's.
            self.output = FusedLossOutput.sharing(self.output, z_loss=model_args.z_loss)
        if rmsnorm_impl == TRITON_NORM or loss_impl == FUSED_LOSS:
            logger.info(f"Triton kernels: rmsnorm = {rmsnorm_impl!r}, loss = {loss_impl!r}")
        self._router_logits: list[torch.Tensor] | None = None  # a list while collecting
        self._aux_sum = 0.0
        self._aux_count = 0
        self._aux_weight = getattr(model_args, "aux_loss_weight", 0.0)
        self._aux_enabled = bool(model_args.moe_enabled and self._aux_weight > 0)
        if self._aux_enabled:
            for layer in self.layers.values():
                layer.moe.router.gate.register_forward_hook(self._keep_router_logits)

    def _keep_router_logits(self, module, inputs, logits: torch.Tensor) -> None:
        if self._router_logits is None:
            return
        if isinstance(logits, DTensor):
            # Tensor parallel: this hook runs before torchtitan's (NoParallel)
            # makes the replicated gate's output local. Every TP rank routes
            # the same tokens and takes the same auxiliary loss; its gradient
            # enters the gate once on each rank (a replicated gradient, not
            # summed over TP as the cross-entropy part is by
            # sum_router_gradients_over_tp), so it is not counted twice.
            logits = logits.to_local()
        self._router_logits.append(logits)

    def _forward(self, tokens: torch.Tensor, attention_masks, positions, labels) -> torch.Tensor:
        """torchtitan's forward, or with ``labels`` the fused output layer's loss."""
        if labels is None:
            return super().forward(tokens, attention_masks, positions)
        return loss_from_labels(self, tokens, self.rope_cache, attention_masks, positions, labels)

    def forward(
        self,
        tokens: torch.Tensor,
        attention_masks=None,
        positions: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (with ``labels``: the fused loss, see :class:`FusedLossOutput`); in
        training with the auxiliary loss on, its gradient rides on the output."""
        if not (self._aux_enabled and self.training and torch.is_grad_enabled()):
            return self._forward(tokens, attention_masks, positions, labels)
        self._router_logits = []
        try:
            output = self._forward(tokens, attention_masks, positions, labels)
            logits = self._router_logits
        finally:
            self._router_logits = None
        aux = load_balancing_loss(logits, self.model_args.moe_args.top_k)
        self._aux_sum += aux.detach().item()
        self._aux_count += 1
        return _AddAuxiliaryGradient.apply(output, aux, self._aux_weight)

    def take_aux_loss(self) -> float | None:
        """Mean auxiliary loss of the training forwards since the last call (None: none)."""
        if not self._aux_count:
            return None
        mean = self._aux_sum / self._aux_count
        self._aux_sum, self._aux_count = 0.0, 0
        return mean
