"""Model arguments and the registered flavors.

The architecture is torchtitan's llama3 ``Transformer``; ``SwallowModelArgs``
adds what the TOML may change per run (attention type and mask).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torchtitan.models.llama3.model.args import RoPEScalingArgs, TransformerModelArgs

# Llama 3.1's RoPE: theta 500,000 with the "llama3" frequency scaling.
LLAMA31_ROPE_THETA = 500_000.0
LLAMA31_ROPE_SCALING = RoPEScalingArgs(
    scaling_factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
LLAMA3_VOCAB_SIZE = 128_256  # 128,000 BPE ranks + 256 special tokens


@dataclass
class PerRunArgs:
    """The model arguments swallow-titan's TOML sets per run, for every family.

    A mixin, listed before torchtitan's arguments class (``class
    X(PerRunArgs, TransformerModelArgs)``): its ``update_from_config`` runs
    torchtitan's, then takes the attention type and mask from ``[model]`` and
    the kernels from ``[kernels]``.
    """

    rmsnorm_impl: str = "torch"
    """"torch" (nn.RMSNorm) or "triton" (kernels.rms_norm, residual add fused)."""

    loss_impl: str = "torch"
    """"torch" (the model returns logits) or "fused_linear_ce" (given labels, the
    output layer returns the summed loss instead; see model/transformer.py)."""

    z_loss: float = 0.0
    """z-loss coefficient the fused output layer applies."""

    def update_from_config(self, job_config, **kwargs) -> None:
        super().update_from_config(job_config, **kwargs)
        self.attn_type = job_config.model.attn_type
        self.attn_mask_type = job_config.model.attn_mask_type
        self.rmsnorm_impl = job_config.kernels.rmsnorm
        self.loss_impl = job_config.kernels.loss
        self.z_loss = job_config.kernels.z_loss


@dataclass
class SwallowModelArgs(PerRunArgs, TransformerModelArgs):
    """torchtitan's llama3 arguments, updated from swallow-titan's ``[model]``
    and ``[kernels]`` (:class:`PerRunArgs`)."""


def _llama31(**overrides) -> SwallowModelArgs:
    base = SwallowModelArgs(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=LLAMA3_VOCAB_SIZE,
        # FFN hidden = 1024 * ceil(1.3 * (2/3 * 4 * 4096) / 1024) = 14336
        ffn_dim_multiplier=1.3,
        multiple_of=1024,
        norm_eps=1e-5,
        rope_theta=LLAMA31_ROPE_THETA,
        rope_scaling_args=replace(LLAMA31_ROPE_SCALING),
    )
    return replace(base, **overrides)


# The vocabulary of the tokenizer shipped in assets/tokenizer (3,840 BPE ranks
# + 256 special tokens); scripts/build_tiny_tokenizer.py builds it.
TINY_VOCAB_SIZE = 4096

FLAVORS: dict[str, SwallowModelArgs] = {
    # Exactly Llama-3.1-8B.
    "8B": _llama31(),
    # Exactly Llama-3.3-70B (Instruct): 80 layers, width 8192, GQA 64/8, FFN
    # 28672 = 4096 * ceil(1.3 * (2/3 * 4 * 8192) / 4096), the same llama3 RoPE.
    "70B": _llama31(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        ffn_dim_multiplier=1.3,
        multiple_of=4096,
    ),
    # Full width, 6 of the 32 layers (2.36B parameters), for one-GPU benchmarks
    # of 8B's exact kernels. The plan's estimate at seq 8192, local batch 1,
    # selective AC: 4 layers 44.5 GiB, 6 layers 52.9 GiB, 8 layers 61.2 GiB; 6
    # leaves a rough estimate ~25 GiB of margin on an 80 GB H100 (compile
    # workspace, allocator fragmentation, float8 casts, the profiler).
    "8B_proxy": _llama31(n_layers=6),
    # Same architecture (GQA, SwiGLU, llama3 RoPE), small enough for 2 CPU cores.
    "tiny": _llama31(
        dim=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=2,
        vocab_size=TINY_VOCAB_SIZE,
        ffn_dim_multiplier=None,
        multiple_of=64,
    ),
}
