"""RMSNorm in Triton: forward, backward, and a variant that fuses the residual add.

``y = x / sqrt(mean(x^2) + eps) * weight``, with the statistics in fp32 whatever
the input dtype. The fused variant takes ``(x, residual)`` and returns
``(norm(x + residual), x + residual)``: a Llama block's "add then norm" in one
pass over memory. The sum is formed in fp32 and rounded to the wider of the two
input dtypes (type promotion, as eager ``h = x + residual`` does) before it is
normalised, so the fused variant gives the same numbers as the unfused pair. The
dtypes may differ: under bf16 autocast without FSDP the residual stream stays
fp32 (the embedding's output) while attention returns bf16; then ``h`` and the
normalised output are fp32, as eager's ``norm(x + residual)`` is.

Backward computes ``dx`` row by row and the weight gradient as fp32 partial sums,
one row of partials per program of a persistent kernel, reduced afterwards.

The kernels are PyTorch custom ops (``torch.ops.swallow.rms_norm*``) with fake
(meta) implementations and registered autograd, so ``torch.compile(fullgraph=True)``
traces through them and ``torch.library.opcheck`` passes. :func:`rms_norm` also
accepts DTensors (see :func:`_rms_norm_dtensor`). :func:`rms_norm_reference` is the
plain-PyTorch definition the tests compare against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from kernels.runtime import autotune_configs, check_device, num_programs

# The widest row one program normalises (Llama-3 8B/70B use 4096/8192).
MAX_HIDDEN = 65536


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch RMSNorm (and residual add) with the kernels' semantics."""
    h = x if residual is None else x + residual
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    y = y.to(x.dtype)
    return y if residual is None else (y, h)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension of ``x``, in Triton.

    Returns ``norm(x) * weight``; with ``residual`` given, returns
    ``(norm(x + residual) * weight, x + residual)``. Statistics are fp32; outputs
    have ``x``'s dtype, or with ``residual`` the promoted dtype of ``x`` and
    ``residual`` (the dtype of eager ``x + residual``). DTensor inputs (tensor/sequence parallel, or a DTensor
    weight) are handled without gathering anything; the weight gradient of a
    sequence-sharded input is returned as a partial sum that DTensor reduces.
    """
    if any(isinstance(t, DTensor) for t in (x, weight, residual)):
        return _rms_norm_dtensor(x, weight, eps, residual)
    if residual is None:
        return torch.ops.swallow.rms_norm(x, weight, eps)[0]
    y, h, _ = torch.ops.swallow.rms_norm_residual(x, residual, weight, eps)
    return y, h


def rms_norm_heads(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head RMSNorm of ``x`` ``[batch, seq, heads, head_dim]`` with a
    ``[head_dim]`` weight: Qwen3's q/k norm (``nn.RMSNorm(head_dim)`` applied to
    the query and key heads before RoPE).

    Each (token, head) row of ``head_dim`` elements is one kernel row, so this is
    :func:`rms_norm` with the shape checked; the autotuner has configs for such
    narrow rows (``HEAD_DIM_CONFIGS``). A DTensor ``x`` sharded on the heads
    (tensor parallel: ``SequenceParallel(sequence_dim=2)`` in torchtitan's
    qwen3 plan) is normalised shard by shard, the weight gradient summed over
    the shards as for sequence parallel.
    """
    if x.dim() != 4:
        raise ValueError(
            f"rms_norm_heads: x must be [batch, seq, heads, head_dim], got shape "
            f"{tuple(x.shape)}"
        )
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm_heads: weight has shape {tuple(weight.shape)}, expected "
            f"({x.shape[-1]},) (head_dim of x {tuple(x.shape)})"
        )
    return rms_norm(x, weight, eps)


# ---------------------------------------------------------------------------
# Triton kernels


# One row per program is right for Llama widths on a GPU; the interpreter pays
# per operation, not per element, so it gets many rows per program.
# No BLOCK_M=4: at hidden 4096 its backward needs 250+ registers per thread
# with 8 warps (one block per SM; spills under Triton 3.6) and spills with 16
# (benchmarks/kernels_aot.py, tests/test_kernels_aot.py).
HIDDEN_CONFIGS = [
    triton.Config({"BLOCK_M": m}, num_warps=w)
    for m, w in ((1, 4), (1, 8), (1, 16), (2, 8), (2, 16))
]
# Qwen3's q/k norms normalise rows of head_dim = 128: one such row per program
# would leave most threads of even 4 warps idle, so these take 8 to 64 rows per
# program at 32 elements per thread. configs_for_width prunes them at hidden
# widths (the autotune key holds N, so each width is tuned apart).
HEAD_DIM_CONFIGS = [
    triton.Config({"BLOCK_M": m}, num_warps=w)
    for m, w in ((8, 1), (16, 2), (32, 4), (64, 8))
]
GPU_CONFIGS = HIDDEN_CONFIGS + HEAD_DIM_CONFIGS
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32}, num_warps=4)
_CONFIGS = autotune_configs(gpu=GPU_CONFIGS, interpreter=INTERPRETER_CONFIG)


def configs_for_width(configs: list[triton.Config], block_n: int) -> list[triton.Config]:
    """The configs whose rows fit in registers at this (power-of-two) width.

    A thread holds ``BLOCK_M * BLOCK_N / threads`` elements of each row tile;
    the backward keeps several such tiles live. Compiled for sm_90, at most 32
    per thread fit without spilling while a thread may use 255 registers (up to
    256 threads), 16 at 512 threads (128 registers each): at hidden 4096 every
    HIDDEN_CONFIGS entry fits (no HEAD_DIM_CONFIGS one), at 8192 the 4-warp and
    BLOCK_M=2 ones spill (benchmarks/kernels_aot.py --hidden 8192); at head_dim
    128 all fit. If none fits, the config with the fewest elements per thread is
    kept.
    """

    def per_thread(c: triton.Config) -> float:
        return c.kwargs["BLOCK_M"] * block_n / (32 * c.num_warps)

    def fits(c: triton.Config) -> bool:
        return per_thread(c) <= (32 if 32 * c.num_warps <= 256 else 16)

    return [c for c in configs if fits(c)] or [min(configs, key=per_thread)]


def _prune(configs, named_args, **kwargs):
    return configs_for_width(configs, kwargs["BLOCK_N"])


@triton.autotune(
    configs=_CONFIGS, key=["N", "HAS_RESIDUAL"], prune_configs_by={"early_config_prune": _prune}
)
@triton.jit
def _rms_norm_fwd_kernel(
    X,
    R,
    W,
    Y,
    H,
    RSTD,
    stride_x,
    stride_r,
    stride_y,
    stride_h,
    M,
    N,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # int64 rows: offsets into large activations overflow int32.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < N)[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        # Round the sum to the storage dtype first: the norm must see the same
        # residual stream that the next block will read.
        h = (x + r.to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + rows[:, None] * stride_h + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    mean_sq = tl.sum(x * x, axis=1) / N
    rstd = 1.0 / tl.sqrt(mean_sq + eps)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(
        Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask
    )
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.autotune(
    configs=_CONFIGS, key=["N", "HAS_DH"], prune_configs_by={"early_config_prune": _prune}
)
@triton.jit
def _rms_norm_bwd_kernel(
    DY,
    X,
    W,
    RSTD,
    DH,
    DX,
    DW_PARTIAL,
    stride_dy,
    stride_x,
    stride_dh,
    stride_dx,
    M,
    N,
    rows_per_program,
    HAS_DH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Persistent: each program takes a contiguous range of rows and keeps its
    # share of the weight gradient in fp32 registers.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        dy = dy.to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        x_hat = x * rstd[:, None]
        w_dy = w[None, :] * dy
        # d/dx of x * rstd(x): rstd * (w_dy - x_hat * mean(x_hat * w_dy))
        c = tl.sum(x_hat * w_dy, axis=1) / N
        dx = (w_dy - x_hat * c[:, None]) * rstd[:, None]
        if HAS_DH:
            # Gradient reaching the residual output of the fused variant.
            dh = tl.load(
                DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0
            )
            dx += dh.to(tl.float32)
        tl.store(
            DX + rows[:, None] * stride_dx + cols[None, :],
            dx.to(DX.dtype.element_ty),
            mask=mask,
        )
        dw += tl.sum(dy * x_hat, axis=0)
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=col_ok)


# ---------------------------------------------------------------------------
# Launchers


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as a [rows, n] matrix with unit stride along n."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check_args(x: torch.Tensor, weight: torch.Tensor) -> int:
    n = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != n:
        raise ValueError(
            f"rms_norm: weight has shape {tuple(weight.shape)}, expected ({n},) to "
            f"match the last dimension of x {tuple(x.shape)}"
        )
    if n > MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {n} exceeds the kernel's {MAX_HIDDEN}")
    return n


def _out_dtype(x: torch.Tensor, residual: torch.Tensor | None) -> torch.dtype:
    """The dtype of ``x`` or, with a residual, of eager ``x + residual``."""
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def _forward(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    n = _check_args(x, weight)
    check_device(x, weight)
    x2 = _rows(x, n)
    m = x2.shape[0]
    out_dtype = _out_dtype(x, residual)
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(
                f"rms_norm: residual {tuple(residual.shape)} must have the shape of "
                f"x {tuple(x.shape)}"
            )
        r2 = _rows(residual, n)
        h = torch.empty((m, n), dtype=out_dtype, device=x.device)
    else:
        r2 = h = x2  # unused by the kernel
    if m > 0:
        _rms_norm_fwd_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](
            x2,
            r2,
            weight,
            y,
            h,
            rstd,
            x2.stride(0),
            r2.stride(0),
            y.stride(0),
            h.stride(0),
            m,
            n,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK_N=triton.next_power_of_2(n),
        )
    shape = x.shape
    return (
        y.view(shape),
        h.view(shape) if residual is not None else None,
        rstd.view(shape[:-1]),
    )


def _backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dh: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    check_device(x, weight)
    x2 = _rows(x, n)
    dy2 = _rows(dy, n)
    dh2 = _rows(dh, n) if dh is not None else dy2
    m = x2.shape[0]
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    programs = max(1, min(m, num_programs(x.device, per_sm=4, interpreter=4)))
    rows_per_program = triton.cdiv(m, programs) if m else 0
    dw_partial = torch.zeros((programs, n), dtype=torch.float32, device=x.device)
    if m > 0:
        _rms_norm_bwd_kernel[(programs,)](
            dy2,
            x2,
            weight,
            rstd.reshape(-1).contiguous(),
            dh2,
            dx,
            dw_partial,
            dy2.stride(0),
            x2.stride(0),
            dh2.stride(0),
            dx.stride(0),
            m,
            n,
            rows_per_program,
            HAS_DH=dh is not None,
            BLOCK_N=triton.next_power_of_2(n),
        )
    dw = dw_partial.sum(0).to(weight.dtype)
    return dx.view(x.shape), dw


# ---------------------------------------------------------------------------
# Custom ops


@torch.library.custom_op("swallow::rms_norm", mutates_args=())
def _rms_norm_op(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, rstd = _forward(x, None, weight, eps)
    return y, rstd


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("swallow::rms_norm_residual", mutates_args=())
def _rms_norm_residual_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, h, rstd = _forward(x, residual, weight, eps)
    return y, h, rstd


@_rms_norm_residual_op.register_fake
def _(x, residual, weight, eps):
    rstd = x.new_empty(x.shape[:-1], dtype=torch.float32)
    out_dtype = _out_dtype(x, residual)
    y = torch.empty_like(x, dtype=out_dtype)
    return y, torch.empty_like(y), rstd


@torch.library.custom_op("swallow::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dh: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(dy, x, weight, rstd, dh)


@_rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd, dh):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_norm(ctx, inputs, output) -> None:
    x, weight, _ = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)


def _backward_norm(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.swallow.rms_norm_backward(dy, x, weight, rstd, None)
    return dx, dw, None


def _setup_norm_residual(ctx, inputs, output) -> None:
    x, residual, weight, _ = inputs
    _, h, rstd = output
    ctx.save_for_backward(h, weight, rstd)
    ctx.input_dtypes = (x.dtype, residual.dtype)


def _backward_norm_residual(ctx, dy, dh, _drstd):
    h, weight, rstd = ctx.saved_tensors
    dsum, dw = torch.ops.swallow.rms_norm_backward(dy, h, weight, rstd, dh)
    # h = x + residual: both inputs receive the gradient of the sum, each in its
    # own dtype (as eager's add does when it promoted one of them).
    x_dtype, r_dtype = ctx.input_dtypes
    return dsum.to(x_dtype), dsum.to(r_dtype), dw, None


_rms_norm_op.register_autograd(_backward_norm, setup_context=_setup_norm)
_rms_norm_residual_op.register_autograd(
    _backward_norm_residual, setup_context=_setup_norm_residual
)


# ---------------------------------------------------------------------------
# DTensor inputs


def _rms_norm_dtensor(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
) -> DTensor | tuple[DTensor, DTensor]:
    """Run the kernel on local shards: no communication in forward.

    ``x`` may be replicated or sharded on any dimension but the normalised one
    (sequence parallel shards dim 1); ``weight`` must be replicated on ``x``'s
    mesh. Each rank then holds only its tokens' share of the weight gradient, so
    it is declared ``Partial`` on the mesh dimensions that shard ``x``, and
    DTensor sums it across those ranks (the sequence-parallel reduction).
    A sharded weight (FSDP's sharded parameter outside its module's forward) is
    refused rather than gathered: call the norm inside the FSDP module's forward,
    where FSDP has already gathered it.
    """
    if not isinstance(x, DTensor) or not isinstance(weight, DTensor):
        raise TypeError(
            "rms_norm: x and weight must both be DTensors on the same mesh (or both "
            f"plain tensors); got x {type(x).__name__}, weight {type(weight).__name__}"
        )
    mesh = x.device_mesh
    if weight.device_mesh != mesh or any(
        not isinstance(p, Replicate) for p in weight.placements
    ):
        raise ValueError(
            "rms_norm: the weight must be replicated on x's device mesh, got "
            f"{weight.placements} on {weight.device_mesh}; a sharded weight (e.g. an "
            "FSDP parameter outside its module's forward) is not gathered here"
        )
    norm_dim = x.ndim - 1
    weight_grad = []
    for p in x.placements:
        if isinstance(p, Shard) and p.dim % x.ndim != norm_dim:
            weight_grad.append(Partial())
        elif isinstance(p, Replicate):
            weight_grad.append(Replicate())
        else:
            raise ValueError(
                f"rms_norm: x placement {p} is not supported: shard a dimension other "
                "than the normalised (last) one, or replicate"
            )
    if residual is not None and (
        not isinstance(residual, DTensor) or residual.placements != x.placements
    ):
        raise ValueError(
            "rms_norm: residual must be a DTensor with x's placements "
            f"{x.placements}"
        )
    w_local = weight.to_local(grad_placements=weight_grad)
    x_local = x.to_local()

    def wrap(t: torch.Tensor) -> DTensor:
        return DTensor.from_local(
            t, mesh, x.placements, run_check=False, shape=x.shape, stride=x.stride()
        )

    if residual is None:
        return wrap(rms_norm(x_local, w_local, eps))
    y, h = rms_norm(x_local, w_local, eps, residual=residual.to_local())
    return wrap(y), wrap(h)
