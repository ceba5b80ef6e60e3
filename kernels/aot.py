"""Compile every kernel and every GPU autotune config ahead of time, without a GPU.

Triton compiles for a named target without a driver: ``triton.compile`` on an
``ASTSource`` with ``GPUTarget("cuda", 90, 32)`` (H100/H200, sm_90a) gives the
PTX and cubin, and the ``ptxas`` bundled with Triton reports registers and
spills (``-v``). This catches, on a CPU-only machine, what would otherwise show
on the first GPU run: a kernel that does not compile for Hopper, a config that
spills registers to local memory, or one that exceeds the SM's registers or the
per-block shared memory.

The process must not have ``TRITON_INTERPRET=1`` (the kernels would then be
interpreted functions); the check runs in a subprocess in the tests and in
``benchmarks/kernels_aot.py``.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import triton

# Hopper (sm_90): 64K 32-bit registers per SM, at most 227 KiB of shared
# memory per block (opt-in), 255 registers per thread.
REGISTERS_PER_SM = 65536
SMEM_PER_BLOCK = 227 * 1024

# The recipe's shapes: Llama-3.1-8B's hidden size and vocabulary, and the
# vocabulary shard of tensor parallel 8; Qwen3's head_dim (every size from
# 0.6B to 32B and 30B-A3B), the row width of its q/k norms.
RECIPE_HIDDEN = 4096
RECIPE_VOCABS = (128_256, 128_256 // 8)
RECIPE_HEAD_DIM = 128


@dataclass(frozen=True)
class CompileJob:
    """One kernel specialisation with one autotune config."""

    kernel: str
    variant: str
    config: triton.Config
    fn: object  # the JITFunction
    signature: dict[str, str]
    constexprs: dict[str, object]
    attrs: dict

    @property
    def config_name(self) -> str:
        blocks = ",".join(f"{k}={v}" for k, v in self.config.kwargs.items())
        return f"{blocks},warps={self.config.num_warps},stages={self.config.num_stages}"


@dataclass
class CompileResult:
    job: CompileJob
    registers: int = -1
    spill_bytes: int = -1
    smem_bytes: int = -1
    error: str = ""

    @property
    def threads(self) -> int:
        return 32 * self.job.config.num_warps

    def problems(self) -> list[str]:
        """Why this config cannot run well on the target (empty if it can)."""
        if self.error:
            return [f"compile error: {self.error}"]
        found = []
        if self.spill_bytes > 0:
            found.append(f"spills {self.spill_bytes} bytes")
        if self.registers * self.threads > REGISTERS_PER_SM:
            found.append(
                f"{self.registers} registers x {self.threads} threads > {REGISTERS_PER_SM}"
            )
        if self.smem_bytes > SMEM_PER_BLOCK:
            found.append(f"shared memory {self.smem_bytes} > {SMEM_PER_BLOCK} bytes")
        return found


def _divisible_by_16(fn, signature: dict[str, str], values: dict[str, int]) -> dict:
    # Triton specialises integer arguments divisible by 16 (and pointers, which
    # the allocator aligns); the launch at these shapes would see the same.
    pointers = [n for n, t in signature.items() if t.startswith("*")]
    names = pointers + [n for n, v in values.items() if v % 16 == 0]
    return {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names}


def recipe_jobs(
    hidden: int = RECIPE_HIDDEN, vocabs=RECIPE_VOCABS, head_dim: int = RECIPE_HEAD_DIM
) -> list[CompileJob]:
    """Every kernel x constexpr variant x pointer dtypes x GPU autotune config,
    at the hidden width and, for the q/k norms, the head_dim width."""
    from kernels import cross_entropy

    jobs = _norm_jobs(hidden)
    if head_dim:
        jobs += _qk_norm_jobs(head_dim)
    ce = cross_entropy._ce_rows_kernel.fn
    # Without TP one launch does both passes; vocabulary parallel does them apart.
    variants = ((True, True), (True, False), (False, True))
    for vocab, (do_lse, do_grad), config in itertools.product(
        vocabs, variants, cross_entropy.GPU_CONFIGS
    ):
        sig = {
            "LOGITS": "*fp32", "DLOGITS": "*bf16", "TARGETS": "*i64", "LSE": "*fp32",
            "TARGET_LOGIT": "*fp32", "stride_l": "i32", "stride_dl": "i32", "M": "i32",
            "V": "i32", "vocab_start": "i32", "ignore_index": "i32", "z_loss": "fp32",
            "DO_LSE": "constexpr", "DO_GRAD": "constexpr",
            "BLOCK_M": "constexpr", "BLOCK_V": "constexpr",
        }
        ints = {"stride_l": vocab, "stride_dl": vocab, "V": vocab, "M": 640}
        jobs.append(CompileJob(
            f"ce_rows[V={vocab}]", f"lse={do_lse},grad={do_grad}", config, ce, sig,
            {"DO_LSE": do_lse, "DO_GRAD": do_grad, **config.kwargs},
            _divisible_by_16(ce, sig, ints),
        ))
    return jobs


def _norm_fwd_job(n: int, variant: str, config: triton.Config, x: str, act: str, w: str,
                  has_residual: bool, rows: int) -> CompileJob:
    """The norm forward at width ``n``: input ``x``, residual and outputs ``act``,
    weight ``w`` (Triton pointer types such as "*bf16")."""
    from kernels import rmsnorm

    fwd = rmsnorm._rms_norm_fwd_kernel.fn
    block_n = triton.next_power_of_2(n)
    sig = {
        "X": x, "R": act, "W": w, "Y": act, "H": act,
        "RSTD": "*fp32", "stride_x": "i32", "stride_r": "i32", "stride_y": "i32",
        "stride_h": "i32", "M": "i32", "N": "i32", "eps": "fp32",
        "HAS_RESIDUAL": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
    }
    ints = {k: n for k in ("stride_x", "stride_r", "stride_y", "stride_h", "N")}
    return CompileJob(
        f"rms_norm_fwd[N={n}]", variant, config, fwd, sig,
        {"HAS_RESIDUAL": has_residual, **config.kwargs, "BLOCK_N": block_n},
        _divisible_by_16(fwd, sig, {**ints, "M": rows}),
    )


def _norm_bwd_job(n: int, variant: str, config: triton.Config, act: str, w: str,
                  has_dh: bool, rows: int, rows_per_program: int) -> CompileJob:
    """The norm backward at width ``n``: activations and gradients ``act``, weight ``w``."""
    from kernels import rmsnorm

    bwd = rmsnorm._rms_norm_bwd_kernel.fn
    block_n = triton.next_power_of_2(n)
    sig = {
        "DY": act, "X": act, "W": w, "RSTD": "*fp32", "DH": act,
        "DX": act, "DW_PARTIAL": "*fp32", "stride_dy": "i32", "stride_x": "i32",
        "stride_dh": "i32", "stride_dx": "i32", "M": "i32", "N": "i32",
        "rows_per_program": "i32",
        "HAS_DH": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
    }
    ints = {k: n for k in ("stride_dy", "stride_x", "stride_dh", "stride_dx", "N")}
    return CompileJob(
        f"rms_norm_bwd[N={n}]", variant, config, bwd, sig,
        {"HAS_DH": has_dh, **config.kwargs, "BLOCK_N": block_n},
        _divisible_by_16(bwd, sig, {**ints, "M": rows, "rows_per_program": rows_per_program}),
    )


def _norm_jobs(hidden: int) -> list[CompileJob]:
    """The block norms (with and without the fused residual add) at ``hidden``."""
    from kernels import rmsnorm

    # The configs the autotuner keeps at this width (rmsnorm.configs_for_width).
    configs = rmsnorm.configs_for_width(rmsnorm.GPU_CONFIGS, triton.next_power_of_2(hidden))
    # Pointer dtypes: "fsdp" is FSDP2's bf16 compute (everything bf16); "amp" is
    # bf16 autocast without FSDP (one GPU, DDP): fp32 weights and residual
    # stream, bf16 attention output entering the fused add.
    jobs: list[CompileJob] = []
    for mode, fused, config in itertools.product(("fsdp", "amp"), (True, False), configs):
        act = "*bf16" if mode == "fsdp" else "*fp32"
        x = "*bf16" if mode == "fsdp" or fused else "*fp32"
        jobs.append(_norm_fwd_job(hidden, f"{mode},residual={fused}", config, x, act, act,
                                  fused, rows=8192))
    for mode, fused, config in itertools.product(("fsdp", "amp"), (True, False), configs):
        act = "*bf16" if mode == "fsdp" else "*fp32"
        jobs.append(_norm_bwd_job(hidden, f"{mode},dh={fused}", config, act, act, fused,
                                  rows=8192, rows_per_program=16))
    return jobs


def _qk_norm_jobs(head_dim: int) -> list[CompileJob]:
    """Qwen3's q/k norms: rows of ``head_dim``, no residual. The query/key heads
    come out of a bf16 GEMM in both modes; under AMP the weight stays fp32."""
    from kernels import rmsnorm

    configs = rmsnorm.configs_for_width(rmsnorm.GPU_CONFIGS, triton.next_power_of_2(head_dim))
    rows = 8192 * 32  # batch x seq x heads, e.g. 1 x 8192 x 32
    jobs: list[CompileJob] = []
    for mode, config in itertools.product(("fsdp", "amp"), configs):
        w = "*bf16" if mode == "fsdp" else "*fp32"
        variant = f"{mode},qk_norm"
        jobs.append(_norm_fwd_job(head_dim, variant, config, "*bf16", "*bf16", w, False, rows))
        jobs.append(_norm_bwd_job(head_dim, variant, config, "*bf16", w, False, rows,
                                  rows_per_program=512))
    return jobs


def _ptxas() -> tuple[str, str]:
    """Path of Triton's bundled ptxas for sm_90, and the arch name Triton uses."""
    from triton.backends.nvidia import compiler as nv

    arch = nv.sm_arch_from_capability(90)
    if hasattr(nv, "get_ptxas"):  # Triton >= 3.7 keeps a separate ptxas for sm_90+
        return nv.get_ptxas(90).path, arch
    from triton import knobs

    return knobs.nvidia.ptxas.path, arch


_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_job(job: CompileJob, workdir: str) -> CompileResult:
    """Compile ``job`` for sm_90a and read registers, spills and shared memory."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = CompileResult(job)
    try:
        src = ASTSource(job.fn, job.signature, constexprs=job.constexprs, attrs=job.attrs)
        options = {"num_warps": job.config.num_warps, "num_stages": job.config.num_stages}
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as e:  # any compiler failure is the finding
        result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
        return result
    result.smem_bytes = int(compiled.metadata.shared)
    ptxas, arch = _ptxas()
    ptx = os.path.join(workdir, f"{compiled.metadata.name}_{compiled.hash[:12]}.ptx")
    with open(ptx, "w") as f:
        f.write(compiled.asm["ptx"])
    proc = subprocess.run(
        [ptxas, "-v", f"--gpu-name={arch}", ptx, "-o", ptx + ".o"],
        capture_output=True, text=True,
    )
    log = proc.stdout + proc.stderr
    regs, spills = _REGS.search(log), _SPILLS.search(log)
    if proc.returncode != 0 or not regs or not spills:
        result.error = f"ptxas: {log.strip()[-300:]}"
        return result
    result.registers = int(regs.group(1))
    result.spill_bytes = int(spills.group(1)) + int(spills.group(2))
    return result


def compile_all(jobs: list[CompileJob]) -> Iterator[CompileResult]:
    """Compile the jobs one by one (yielding each result as it is ready)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the ahead-of-time check needs a process without TRITON_INTERPRET=1")
    done: dict[tuple, CompileResult] = {}
    with tempfile.TemporaryDirectory() as workdir:
        for job in jobs:
            # Shapes reach the compiler only through constexprs and divisibility:
            # identical keys (e.g. both vocabularies) compile to the same binary.
            key = (
                job.fn.__name__, tuple(job.signature.items()),
                tuple(sorted(job.constexprs.items())), repr(sorted(job.attrs.items())),
                job.config.num_warps, job.config.num_stages,
            )
            if key not in done:
                done[key] = compile_job(job, workdir)
            first = done[key]
            yield CompileResult(
                job, first.registers, first.spill_bytes, first.smem_bytes, first.error
            )


def format_table(results: list[CompileResult]) -> str:
    """One row per compile: kernel, variant, config, registers, spills, shared memory."""
    header = ("kernel", "variant", "config", "regs", "regs x threads", "spill B", "smem B", "ok")
    rows = [header]
    for r in results:
        problems = r.problems()
        rows.append((
            r.job.kernel, r.job.variant, r.job.config_name,
            str(r.registers), str(r.registers * r.threads) if r.registers >= 0 else "-",
            str(r.spill_bytes), str(r.smem_bytes),
            "ok" if not problems else "; ".join(problems),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
