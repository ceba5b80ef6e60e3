"""Fused output projection + cross-entropy that never holds the [tokens, vocab] logits.

``loss = sum over non-ignored tokens of (lse_i - logit_i[target_i] + z * lse_i^2)``
with ``logits = hidden @ weight.T`` and ``lse_i = logsumexp(logits_i)``.

How it runs. Tokens are processed in chunks of ``chunk_tokens`` rows. For each
chunk one GEMM writes the chunk's logits in fp32; a Triton kernel then walks each
row in vocabulary blocks with an online log-sum-exp (fp32), picks the target
logit, and writes the fp32-computed logit gradient ``softmax * (1 + 2 z lse) -
onehot`` in the GEMM dtype; two more GEMMs turn it into the chunk's hidden
gradient and add its share of the weight gradient. The gradients are therefore
computed during the forward pass (three GEMMs in all, the minimum; recomputing
the logits in backward would cost a fourth) and the backward only scales them by
the incoming scalar gradient. That is why ``reduction`` must be ``"sum"``: the
upstream gradient is one number. Peak extra memory is one chunk of fp32 logits
plus one chunk of logit gradients (``chunk_tokens * vocab * 6`` bytes in bf16),
by default about 512 MiB whatever the token count.

Numerics: the GEMMs run in the GEMM dtype: autocast's dtype when autocast is on
for the tensors' device (torchtitan's bf16 autocast without FSDP, where hidden
states and weight are fp32), else the hidden states' dtype. Logits, LSE and
logit gradients are fp32; the logit gradient is rounded to the GEMM dtype only as
a GEMM operand, like any bf16 matmul input. The hidden gradient is rounded to the
GEMM dtype once by its GEMM and once when scaled. The weight gradient is
accumulated over token chunks in fp32 and rounded to the weight's dtype once, at
the end (an fp32 [vocab, hidden] buffer: 2 GiB at Llama 3 8B's full vocabulary,
a quarter of that per rank under TP 4).

Where torch offers bf16/fp16 GEMMs with fp32 output (``out_dtype``, CUDA in
torch >= 2.8; probed once per device type, see :func:`out_dtype_gemm_available`)
the logits come out of their GEMM in fp32 and the weight-gradient GEMM adds into
the fp32 buffer directly. Elsewhere (CPU) the fallback rounds the logits to the
GEMM dtype before the fp32 log-sum-exp, exactly as eager ``linear`` + fp32
cross-entropy does, and runs the weight-gradient GEMM in fp32 on the upcast
operands (same precision as ``out_dtype``: the products of bf16 values are exact
in fp32).

``ignore_index`` targets contribute nothing; a batch in which every target is
ignored gives a loss of 0 and zero gradients. Targets must otherwise lie in
``[0, vocab)``; they are not checked (that would cost a host sync).

Vocabulary parallel: with the weight sharded on the vocabulary over a tensor-
parallel group (a DTensor ``Shard(0)``, which is what torchtitan's
``ColwiseParallel`` output layer holds) and the hidden states replicated over
that group, each rank computes its shard's logits, the per-token LSE is combined
across the group (an all-gather of one fp32 per token and shard, and an
all-reduce of the target logits), and the hidden gradient is returned as a
partial sum that DTensor reduces. See :func:`fused_linear_cross_entropy`.
"""

from __future__ import annotations

import warnings

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
import torch.distributed as dist
import triton
import triton.language as tl
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from kernels.runtime import autotune_configs, check_device

# Bytes one chunk of logits and logit gradients may take by default.
CHUNK_BUDGET_BYTES = 512 * 2**20


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    reduction: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: materialise the logits (at least fp32), then the same loss."""
    if reduction != "sum":
        raise ValueError(f"reduction must be 'sum', got {reduction!r}")
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    logits = h @ weight.to(dtype).t()
    t = targets.reshape(-1)
    valid = t != ignore_index
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, torch.where(valid, t, 0).unsqueeze(1)).squeeze(1)
    ce = torch.where(valid, lse - target_logit, 0.0).sum()
    z = z_loss * torch.where(valid, lse * lse, 0.0).sum()
    return ce + z, z.detach()


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    reduction: str = "sum",
    *,
    chunk_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets``, summed over tokens.

    Args:
        hidden: ``[..., H]`` final hidden states.
        weight: ``[V, H]`` output projection.
        targets: ``[...]`` token ids (``hidden``'s leading shape); ``ignore_index``
            marks tokens that do not count.
        z_loss: coefficient of the z-loss ``z * lse^2`` added per counted token.
        reduction: only ``"sum"``; divide by the (global) count of counted tokens
            outside, as torchtitan does.
        chunk_tokens: tokens per chunk; 0 picks a chunk of about
            :data:`CHUNK_BUDGET_BYTES` of logits.

    Returns:
        ``(loss, z_term)``: the fp32 scalar to backpropagate (cross-entropy plus
        z-loss), and the z-loss part of it, detached, for logging.

    DTensor inputs are supported in two layouts, with no gathering of the weight:
    the weight sharded on the vocabulary (``Shard(0)``, 1-D mesh) with the hidden
    states replicated (vocabulary parallel; loss replicated); or the weight
    replicated with the hidden states replicated or sharded on token dimensions
    (loss and weight gradient then partial over the sharded mesh dimensions).
    """
    if reduction != "sum":
        raise ValueError(
            f"fused_linear_cross_entropy: reduction must be 'sum' (the gradients are "
            f"computed in the forward pass for a scalar upstream gradient), got "
            f"{reduction!r}"
        )
    if isinstance(hidden, DTensor) or isinstance(weight, DTensor):
        return _flce_dtensor(hidden, weight, targets, ignore_index, z_loss, chunk_tokens)
    return _flce_local(
        hidden, weight, targets, ignore_index, z_loss, chunk_tokens, 0, ""
    )


def _flce_local(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    z_loss: float,
    chunk_tokens: int,
    vocab_start: int,
    group_name: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    gemm_dtype = _gemm_dtype(hidden)
    if t.shape[0] != h2.shape[0]:
        raise ValueError(
            f"fused_linear_cross_entropy: {t.shape[0]} targets for {h2.shape[0]} "
            f"tokens (hidden {tuple(hidden.shape)}, targets {tuple(targets.shape)})"
        )
    grad_enabled = torch.is_grad_enabled()
    loss, z, _, _ = torch.ops.swallow.fused_linear_cross_entropy(
        h2,
        weight,
        t,
        ignore_index,
        float(z_loss),
        grad_enabled and hidden.requires_grad,
        grad_enabled and weight.requires_grad,
        chunk_tokens,
        vocab_start,
        group_name,
        gemm_dtype,
    )
    return loss, z


# ---------------------------------------------------------------------------
# Triton kernel: one program per row of a logits chunk


GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 1, "BLOCK_V": b}, num_warps=w)
    for b in (2048, 4096, 8192)
    for w in (8, 16)
]
# The interpreter pays per operation: many rows and a wide block per step.
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_V": 2048}, num_warps=4)


@triton.autotune(
    configs=autotune_configs(gpu=GPU_CONFIGS, interpreter=INTERPRETER_CONFIG),
    key=["V", "DO_LSE", "DO_GRAD"],
)
@triton.jit
def _ce_rows_kernel(
    LOGITS,
    DLOGITS,
    TARGETS,
    LSE,
    TARGET_LOGIT,
    stride_l,
    stride_dl,
    M,
    V,
    vocab_start,
    ignore_index,
    z_loss,
    DO_LSE: tl.constexpr,
    DO_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    logits_rows = LOGITS + rows[:, None] * stride_l
    target = tl.load(TARGETS + rows, mask=row_ok, other=ignore_index)
    local_target = target - vocab_start
    counted = target != ignore_index
    in_shard = counted & (local_target >= 0) & (local_target < V)
    if DO_LSE:
        # Online log-sum-exp, one running (max, sum) per lane. The finite
        # initial max keeps lanes that only ever see padding at exp(...) = 0
        # instead of exp(-inf - -inf) = nan.
        run_max = tl.full([BLOCK_M, BLOCK_V], -1e30, dtype=tl.float32)
        run_sum = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = row_ok[:, None] & (cols < V)[None, :]
            x = tl.load(logits_rows + cols[None, :], mask=mask, other=float("-inf"))
            new_max = tl.maximum(run_max, x)
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(x - new_max)
            run_max = new_max
        row_max = tl.max(run_max, axis=1)
        sum_exp = tl.sum(run_sum * tl.exp(run_max - row_max[:, None]), axis=1)
        # Rows past the end hold no logits; keep them finite.
        lse = tl.where(row_ok, row_max + tl.log(tl.where(row_ok, sum_exp, 1.0)), 0.0)
        t_logit = tl.load(
            LOGITS + rows * stride_l + local_target, mask=row_ok & in_shard, other=0.0
        )
        tl.store(LSE + rows, lse, mask=row_ok)
        tl.store(TARGET_LOGIT + rows, t_logit, mask=row_ok)
    else:
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    if DO_GRAD:
        # d(lse - x_t + z lse^2)/dx_j = softmax_j * (1 + 2 z lse) - [j == t]
        scale = tl.where(counted, 1.0 + 2.0 * z_loss * lse, 0.0)
        dl_rows = DLOGITS + rows[:, None] * stride_dl
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = row_ok[:, None] & (cols < V)[None, :]
            x = tl.load(logits_rows + cols[None, :], mask=mask, other=0.0)
            grad = tl.exp(x - lse[:, None]) * scale[:, None]
            is_target = in_shard[:, None] & (cols[None, :] == local_target[:, None])
            grad = tl.where(is_target, grad - 1.0, grad)
            tl.store(dl_rows + cols[None, :], grad.to(DLOGITS.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------
# The chunked forward (with gradients)


def _gemm_dtype(hidden: torch.Tensor) -> torch.dtype:
    """Autocast's dtype when it is on for ``hidden``'s device, else ``hidden``'s.

    Custom ops are invisible to autocast, so the op is told the dtype that an
    autocast ``linear`` would have used.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


# Per device type: whether GEMMs with out_dtype=float32 work (see below).
_OUT_DTYPE_GEMM: dict[str, bool] = {}


def out_dtype_gemm_available(device: torch.device) -> bool:
    """Whether ``torch.mm``/``torch.addmm`` with ``out_dtype=torch.float32`` work on
    bf16 operands on this device type (CUDA in torch >= 2.8; not CPU).

    Probed once per device type on a small product checked against an fp32 GEMM,
    so a torch that has the overload but computes it differently is not used.
    """
    if device.type not in _OUT_DTYPE_GEMM:
        ok = _probe_out_dtype_gemm(device)
        _OUT_DTYPE_GEMM[device.type] = ok
        if not ok and device.type == "cuda":
            warnings.warn(
                "fused_linear_cross_entropy: this torch has no bf16 GEMM with fp32 "
                "output on CUDA; logits are rounded to bf16 before the fp32 "
                "log-sum-exp (as eager PyTorch does) and the weight-gradient GEMM "
                "runs in fp32 (slower, same precision)"
            )
    return _OUT_DTYPE_GEMM[device.type]


def _probe_out_dtype_gemm(device: torch.device) -> bool:
    g = torch.Generator().manual_seed(0)
    a, b, acc = (torch.randn(shape, generator=g) for shape in ((16, 32), (32, 8), (16, 8)))
    a, b = (t.to(device=device, dtype=torch.bfloat16) for t in (a, b))
    acc = acc.to(device)
    # Products of bf16 values are exact in fp32 (and in TF32).
    expected = a.float() @ b.float()
    try:
        with torch.autocast(device.type, enabled=False):
            product = torch.mm(a, b, out_dtype=torch.float32)
            total = acc.clone()
            torch.addmm(total, a, b, out_dtype=torch.float32, out=total)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return (
        product.dtype == total.dtype == torch.float32
        and torch.allclose(product, expected, rtol=1e-5, atol=1e-4)
        and torch.allclose(total, acc + expected, rtol=1e-5, atol=1e-4)
    )


def _chunk_logits(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 logits of one chunk (a bf16/fp16 GEMM with fp32 output where offered)."""
    if h.dtype == torch.float32:
        return h @ w.t()
    if out_dtype_gemm_available(h.device):
        return torch.mm(h, w.t(), out_dtype=torch.float32)
    return torch.mm(h, w.t()).float()


def _add_weight_grad(dw: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor) -> None:
    """``dw += dlogits.T @ h`` into the fp32 ``dw``, the product never rounded below fp32."""
    if dlogits.dtype == torch.float32:
        dw.addmm_(dlogits.t(), h)
    elif out_dtype_gemm_available(dw.device):
        torch.addmm(dw, dlogits.t(), h, out_dtype=torch.float32, out=dw)
    else:
        dw.addmm_(dlogits.t().float(), h.float())


def default_chunk_tokens(vocab: int, gemm_dtype: torch.dtype) -> int:
    """Tokens per chunk so that its logits and gradients fit CHUNK_BUDGET_BYTES."""
    per_token = vocab * (4 + torch.empty((), dtype=gemm_dtype).element_size())
    return max(128, CHUNK_BUDGET_BYTES // per_token // 128 * 128)


def _launch_rows(
    logits: torch.Tensor,
    dlogits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    target_logit: torch.Tensor,
    vocab_start: int,
    ignore_index: int,
    z_loss: float,
    do_lse: bool,
    do_grad: bool,
) -> None:
    rows, vocab = logits.shape
    if rows == 0:
        return
    _ce_rows_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),)](
        logits,
        dlogits,
        targets,
        lse,
        target_logit,
        logits.stride(0),
        dlogits.stride(0),
        rows,
        vocab,
        vocab_start,
        ignore_index,
        z_loss,
        DO_LSE=do_lse,
        DO_GRAD=do_grad,
    )


def _combine_over_group(
    lse: torch.Tensor, target_logit: torch.Tensor, group: dist.ProcessGroup
) -> torch.Tensor:
    """Global LSE from each vocabulary shard's LSE; target logits summed in place."""
    shards = [torch.empty_like(lse) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, lse, group=group)
    dist.all_reduce(target_logit, group=group)
    return torch.logsumexp(torch.stack(shards), dim=0)


# ---------------------------------------------------------------------------
# Custom op


@torch.library.custom_op("swallow::fused_linear_cross_entropy", mutates_args=())
def _flce_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    z_loss: float,
    grad_hidden: bool,
    grad_weight: bool,
    chunk_tokens: int,
    vocab_start: int,
    group_name: str,
    gemm_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, z_term, d loss/d hidden, d loss/d weight); the gradients are
    empty when not requested and are scaled by the upstream gradient in backward.
    The hidden gradient is in ``gemm_dtype``, the weight gradient in fp32."""
    # The dtypes are chosen by gemm_dtype, not by autocast.
    with torch.autocast(hidden.device.type, enabled=False):
        n, h_dim = hidden.shape
        vocab = weight.shape[0]
        if weight.dim() != 2 or weight.shape[1] != h_dim:
            raise ValueError(
                f"fused_linear_cross_entropy: weight {tuple(weight.shape)} does not match "
                f"hidden size {h_dim}"
            )
        check_device(hidden, weight, targets)
        group = dist.distributed_c10d._resolve_process_group(group_name) if group_name else None
        h = hidden.to(gemm_dtype)
        w = weight.to(gemm_dtype)
        chunk = chunk_tokens or default_chunk_tokens(vocab, gemm_dtype)
        do_grad = grad_hidden or grad_weight

        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        target_logit = torch.empty(n, dtype=torch.float32, device=hidden.device)
        dh = torch.empty((n, h_dim) if grad_hidden else (0,), dtype=gemm_dtype, device=h.device)
        # fp32 across chunks whatever the GEMM dtype; rounded once, in backward.
        dw = torch.zeros(
            (vocab, h_dim) if grad_weight else (0,), dtype=torch.float32, device=h.device
        )
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            h_c, t_c = h[start:end], targets[start:end]
            lse_c, tl_c = lse[start:end], target_logit[start:end]
            logits = _chunk_logits(h_c, w)
            dlogits = torch.empty_like(logits, dtype=gemm_dtype) if do_grad else logits
            if group is None:
                _launch_rows(
                    logits, dlogits, t_c, lse_c, tl_c, vocab_start, ignore_index, z_loss,
                    do_lse=True, do_grad=do_grad,
                )
            else:
                _launch_rows(
                    logits, dlogits, t_c, lse_c, tl_c, vocab_start, ignore_index, z_loss,
                    do_lse=True, do_grad=False,
                )
                lse_c.copy_(_combine_over_group(lse_c, tl_c, group))
                if do_grad:
                    _launch_rows(
                        logits, dlogits, t_c, lse_c, tl_c, vocab_start, ignore_index,
                        z_loss, do_lse=False, do_grad=True,
                    )
            del logits
            if grad_hidden:
                torch.mm(dlogits, w, out=dh[start:end])
            if grad_weight:
                _add_weight_grad(dw, dlogits, h_c)
            del dlogits

        counted = targets != ignore_index
        ce = torch.where(counted, lse - target_logit, 0.0).sum()
        z = z_loss * torch.where(counted, lse * lse, 0.0).sum()
        return ce + z, z, dh, dw


@_flce_op.register_fake
def _(hidden, weight, targets, ignore_index, z_loss, grad_hidden, grad_weight,
      chunk_tokens, vocab_start, group_name, gemm_dtype):
    scalar = hidden.new_empty((), dtype=torch.float32)
    dh = hidden.new_empty(hidden.shape if grad_hidden else (0,), dtype=gemm_dtype)
    dw = weight.new_empty(weight.shape if grad_weight else (0,), dtype=torch.float32)
    return scalar, torch.empty_like(scalar), dh, dw


def _setup_flce(ctx, inputs, output) -> None:
    hidden, weight = inputs[0], inputs[1]
    grad_hidden, grad_weight = inputs[5], inputs[6]
    _, z, dh, dw = output
    ctx.mark_non_differentiable(z, dh, dw)
    ctx.save_for_backward(dh, dw)
    ctx.grads = (grad_hidden, grad_weight)
    ctx.dtypes = (hidden.dtype, weight.dtype)
    ctx.consumed = False


def _backward_flce(ctx, g_loss, _g_z, _g_dh, _g_dw):
    grad_hidden, grad_weight = ctx.grads
    h_dtype, w_dtype = ctx.dtypes
    if ctx.needs_input_grad[0] and not grad_hidden or (
        ctx.needs_input_grad[1] and not grad_weight
    ):
        raise RuntimeError(
            "fused_linear_cross_entropy: backward needs the gradients that the "
            "forward computes; it was run without grad enabled or with inputs that "
            "did not require grad"
        )
    if ctx.consumed:
        raise RuntimeError(
            "fused_linear_cross_entropy: a second backward through the same forward "
            "is not supported (its gradients were scaled in place by the first)"
        )
    dh, dw = ctx.saved_tensors
    # Eager: scale the precomputed gradients in place, so the weight gradient
    # is not held twice. Traced graphs (compile, opcheck) see fake or functional
    # tensor subclasses and get the out-of-place form.
    in_place = type(dh) is torch.Tensor and not torch.compiler.is_compiling()
    ctx.consumed = in_place

    def scaled(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        grad = grad.mul_(g_loss) if in_place else grad * g_loss
        return grad.to(dtype)

    d_hidden = scaled(dh, h_dtype) if grad_hidden else None
    d_weight = scaled(dw, w_dtype) if grad_weight else None
    return d_hidden, d_weight, None, None, None, None, None, None, None, None, None


_flce_op.register_autograd(_backward_flce, setup_context=_setup_flce)


# ---------------------------------------------------------------------------
# DTensor inputs


def _flce_dtensor(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    z_loss: float,
    chunk_tokens: int,
) -> tuple[DTensor, DTensor]:
    if not isinstance(hidden, DTensor) or not isinstance(weight, DTensor):
        raise TypeError(
            "fused_linear_cross_entropy: hidden and weight must both be DTensors on "
            f"one mesh (or both plain); got hidden {type(hidden).__name__}, weight "
            f"{type(weight).__name__}"
        )
    mesh = weight.device_mesh
    if hidden.device_mesh != mesh:
        raise ValueError(
            "fused_linear_cross_entropy: hidden and weight live on different meshes"
        )
    t_local = targets.to_local() if isinstance(targets, DTensor) else targets
    w_pl = weight.placements
    if mesh.ndim == 1 and isinstance(w_pl[0], Shard) and w_pl[0].dim == 0:
        if not isinstance(hidden.placements[0], Replicate):
            raise ValueError(
                "fused_linear_cross_entropy: with the weight sharded on the vocabulary "
                "(vocabulary parallel) the hidden states must be replicated on its "
                f"mesh, got {hidden.placements}"
            )
        # DTensor computes the offset from index tensors; under a fake mode
        # (swallow_titan.simulate) they must stay real for the offset to be an int.
        with unset_fake_temporarily():
            _, offset = compute_local_shape_and_global_offset(weight.shape, mesh, w_pl)
        loss, z = _flce_local(
            # Each rank's hidden gradient covers its vocabulary shard only.
            hidden.to_local(grad_placements=[Partial()]),
            weight.to_local(),
            t_local,
            ignore_index,
            z_loss,
            chunk_tokens,
            offset[0],
            mesh.get_group().group_name,
        )
        out = [Replicate()]
    elif all(isinstance(p, Replicate) for p in w_pl):
        out = []
        for p in hidden.placements:
            if isinstance(p, Shard) and p.dim % hidden.ndim != hidden.ndim - 1:
                out.append(Partial())
            elif isinstance(p, Replicate):
                out.append(Replicate())
            else:
                raise ValueError(
                    f"fused_linear_cross_entropy: hidden placement {p} is not supported "
                    "with a replicated weight (shard token dimensions or replicate)"
                )
        loss, z = _flce_local(
            hidden.to_local(),
            weight.to_local(grad_placements=out),
            t_local,
            ignore_index,
            z_loss,
            chunk_tokens,
            0,
            "",
        )
    else:
        raise ValueError(
            f"fused_linear_cross_entropy: weight placements {w_pl} on a {mesh.ndim}-D "
            "mesh are not supported: use Shard(0) on a 1-D tensor-parallel mesh "
            "(vocabulary parallel) or a replicated weight; an FSDP-sharded weight "
            "must be used inside its module's forward, where FSDP has gathered it"
        )
    return (
        DTensor.from_local(loss, mesh, out, run_check=False),
        DTensor.from_local(z, mesh, out, run_check=False),
    )
