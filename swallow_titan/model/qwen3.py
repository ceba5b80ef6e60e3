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

from torchtitan.models.moe import MoEArgs
from torchtitan.models.qwen3 import Qwen3ModelArgs, qwen3_args
from torchtitan.tools.utils import device_type

from swallow_titan.config.sections import AUX_LOSS, AUX_LOSS_FREE

# The vocabulary of the tiny tokenizer in assets/tokenizer (see model.args).
from swallow_titan.model.args import TINY_VOCAB_SIZE


# torch._grouped_mm computes in bf16 and needs 16-byte-aligned groups (CUDA);
# on CPU the experts run torchtitan's per-expert loop in the model's dtype.
GROUPED_MM_AVAILABLE = device_type == "cuda"


@dataclass
class SwallowQwen3ModelArgs(Qwen3ModelArgs):
    """torchtitan's Qwen3 arguments, updated from swallow-titan's ``[model]`` and ``[moe]``."""

    router_aux_loss_coef: float = 0.0
    """Coefficient of the MoE auxiliary load-balancing loss (HF's
    ``router_aux_loss_coef``); 0 when ``[moe] load_balance`` is not "aux_loss"."""

    def update_from_config(self, job_config, **kwargs) -> None:
        super().update_from_config(job_config, **kwargs)
        self.attn_type = job_config.model.attn_type
        self.attn_mask_type = job_config.model.attn_mask_type
        if not self.moe_enabled:
            return
        moe = job_config.moe
        # Either balancing method, never both: the expert bias exists only
        # with "aux_loss_free" (torchtitan skips it when the coefficient is None).
        self.moe_args.load_balance_coeff = (
            moe.bias_update_rate if moe.load_balance == AUX_LOSS_FREE else None
        )
        self.router_aux_loss_coef = moe.aux_loss_coef if moe.load_balance == AUX_LOSS else 0.0
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

QWEN3_FLAVORS: dict[str, SwallowQwen3ModelArgs] = {
    name: _ours(qwen3_args[name])
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
