"""Kernel benchmark: swallow-titan's Triton RMSNorm and fused linear + CE vs PyTorch.

On a GPU, in bf16:

- correctness: each op against an fp32 reference, next to eager PyTorch's error
  against the same reference;
- RMSNorm forward+backward at [65536, 4096] (eager, torch.compile, ours; and
  add-then-norm eager / compiled / our fused residual variant): ms and GB/s,
  as a share of the card's measured copy bandwidth;
- linear + cross-entropy forward+backward at N = 8192 and 16384 tokens,
  H = 4096, V = 128,256 (eager with the fp32 upcast torchtitan does,
  torch.compile, ``torch.nn.functional.linear_cross_entropy`` chunked where
  this torch has it, ours): ms, TFLOP/s, peak extra memory, against the three
  bare GEMMs the loss needs.

It prints one table (and with ``--out DIR`` writes it and a JSON there).

    python benchmarks/kernels.py               # GPU, about 2 minutes on an H100
    python benchmarks/kernels.py --cpu-smoke   # the same code on CPU at tiny sizes,
                                               # Triton's interpreter, fp32

Targets: RMSNorm at >= 85% of copy bandwidth and faster than
torch.compile; the fused loss at <= 1.15x the three bare GEMMs and < 10% of
eager's extra memory. CPU numbers are not performance claims.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch  # does not import triton; kernels are imported after the set-up
import torch.nn.functional as F

if not __package__:  # run as a script: this file would shadow the `kernels` package
    import _bootstrap  # noqa: F401

REPO = Path(__file__).resolve().parent.parent

IGNORE = -100
EPS = 1e-5
GIB = 2**30


@dataclass(frozen=True)
class Sizes:
    norm_rows: int
    hidden: int
    loss_tokens: tuple[int, ...]
    vocab: int
    check_tokens: int
    dtype: torch.dtype
    device: str
    warmup: int
    iters: int


GPU_SIZES = Sizes(65536, 4096, (8192, 16384), 128_256, 1024, torch.bfloat16, "cuda", 2, 5)
# The interpreter mishandles bf16, so the CPU smoke test runs fp32.
CPU_SIZES = Sizes(64, 256, (64,), 1000, 32, torch.float32, "cpu", 1, 1)


@dataclass
class Row:
    section: str
    variant: str
    ms: float
    rate: str = ""
    memory: str = ""
    ratio: str = ""


@dataclass
class Report:
    device: str
    versions: dict[str, str]
    copy_gbps: float
    checks: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)

    def table(self) -> str:
        head = f"{'section':<24} {'variant':<32} {'ms':>9} {'rate':>18} {'peak extra':>12}  ratio"
        lines = [
            f"device: {self.device}",
            "versions: " + ", ".join(f"{k} {v}" for k, v in self.versions.items()),
            f"measured copy bandwidth: {self.copy_gbps:,.0f} GB/s",
            "",
            "correctness:",
            *(f"  {c}" for c in self.checks),
            "",
            head,
            "-" * len(head),
        ]
        for r in self.rows:
            lines.append(
                f"{r.section:<24} {r.variant:<32} {r.ms:9.3f} {r.rate:>18} "
                f"{r.memory:>12}  {r.ratio}"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# Measuring


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], None], sizes: Sizes) -> float:
    """Median wall time of ``fn`` in ms, after warm-up (compile, autotune)."""
    for _ in range(sizes.warmup):
        fn()
    _sync(sizes.device)
    times = []
    for _ in range(sizes.iters):
        if sizes.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_gib(fn: Callable[[], None], sizes: Sizes) -> float | None:
    """Memory ``fn`` allocates beyond what exists before it (GPU only)."""
    if sizes.device != "cuda":
        return None
    _sync(sizes.device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    _sync(sizes.device)
    return (torch.cuda.max_memory_allocated() - base) / GIB


def copy_bandwidth_gbps(sizes: Sizes) -> float:
    n = 2**28 if sizes.device == "cuda" else 2**22  # 512 MiB of bf16 on a GPU
    src = torch.empty(n, dtype=sizes.dtype, device=sizes.device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), sizes)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def _clear_grads(*tensors: torch.Tensor) -> None:
    for t in tensors:
        t.grad = None


# ---------------------------------------------------------------------------
# Correctness (bf16 on a GPU)


def _leaf(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh leaf copy of ``t`` that requires grad."""
    return t.detach().to(dtype or t.dtype, copy=True).requires_grad_()


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.float() - expected.float()).norm()
    return (diff / expected.float().norm().clamp(min=1e-30)).item()


def check_rms_norm(kernels, sizes: Sizes) -> list[str]:
    g = torch.Generator(device=sizes.device).manual_seed(0)
    shape = (min(sizes.norm_rows, 4096), sizes.hidden)
    x = torch.randn(shape, device=sizes.device, generator=g).to(sizes.dtype)
    r = torch.randn(shape, device=sizes.device, generator=g).to(sizes.dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], device=sizes.device, generator=g)).to(sizes.dtype)
    dy = torch.randn(shape, device=sizes.device, generator=g).to(sizes.dtype)
    out = []
    for residual in (None, r):
        xs, ws = _leaf(x), _leaf(w)
        rs = _leaf(residual) if residual is not None else None
        got = kernels.rms_norm(xs, ws, EPS, residual=rs)
        y = got[0] if rs is not None else got
        y.backward(dy)

        # fp32 reference from the same bf16 inputs, and eager bf16 PyTorch.
        x32, w32 = _leaf(x, torch.float32), _leaf(w, torch.float32)
        r32 = residual.float() if residual is not None else None
        h32 = x32 + r32 if r32 is not None else x32
        if r32 is not None:
            h32 = h32.to(sizes.dtype).float()  # eager rounds the sum to bf16
        y32 = F.rms_norm(h32, (shape[-1],), w32, EPS)
        y32.backward(dy.float())
        xe, we = _leaf(x), _leaf(w)
        he = xe + residual if residual is not None else xe
        ye = F.rms_norm(he, (shape[-1],), we, EPS)
        ye.backward(dy)

        name = "rms_norm" + (" + residual" if residual is not None else "")
        errs = {
            "y": (_rel_err(y, y32), _rel_err(ye, y32)),
            "dx": (_rel_err(xs.grad, x32.grad), _rel_err(xe.grad, x32.grad)),
            "dw": (_rel_err(ws.grad, w32.grad), _rel_err(we.grad, w32.grad)),
        }
        ok = all(ours <= 2 * eager + 1e-3 for ours, eager in errs.values())
        detail = ", ".join(f"{k} {o:.1e} (eager {e:.1e})" for k, (o, e) in errs.items())
        out.append(f"{'ok  ' if ok else 'FAIL'} {name}: rel. error vs fp32: {detail}")
    return out


def check_loss(kernels, sizes: Sizes) -> list[str]:
    g = torch.Generator(device=sizes.device).manual_seed(1)
    n, h, v = sizes.check_tokens, sizes.hidden, sizes.vocab
    hidden = torch.randn(n, h, device=sizes.device, generator=g).to(sizes.dtype)
    weight = (torch.randn(v, h, device=sizes.device, generator=g) / h**0.5).to(sizes.dtype)
    targets = torch.randint(0, v, (n,), device=sizes.device, generator=g)
    targets[::7] = IGNORE
    out = []
    for z_loss in (0.0, 1e-4):
        hs, ws = _leaf(hidden), _leaf(weight)
        loss, _ = kernels.fused_linear_cross_entropy(hs, ws, targets, IGNORE, z_loss)
        loss.backward()
        h32, w32 = _leaf(hidden, torch.float32), _leaf(weight, torch.float32)
        ref, _ = kernels.fused_linear_cross_entropy_reference(h32, w32, targets, IGNORE, z_loss)
        ref.backward()
        errs = {
            "loss": _rel_err(loss, ref),
            "dh": _rel_err(hs.grad, h32.grad),
            "dw": _rel_err(ws.grad, w32.grad),
        }
        ok = errs["loss"] < 1e-4 and errs["dh"] < 2e-2 and errs["dw"] < 2e-2
        detail = ", ".join(f"{k} {e:.1e}" for k, e in errs.items())
        out.append(
            f"{'ok  ' if ok else 'FAIL'} fused linear+CE (z_loss {z_loss:g}, {n} tokens): "
            f"rel. error vs fp32: {detail}"
        )
    all_ignored = torch.full_like(targets, IGNORE)
    hs, ws = _leaf(hidden), _leaf(weight)
    loss, _ = kernels.fused_linear_cross_entropy(hs, ws, all_ignored, IGNORE, 1e-4)
    loss.backward()
    ok = loss.item() == 0 and not hs.grad.any() and not ws.grad.any()
    out.append(
        f"{'ok  ' if ok else 'FAIL'} fused linear+CE, every target ignored: "
        f"loss {loss.item()}"
    )
    return out


# ---------------------------------------------------------------------------
# RMSNorm timings


def bench_rms_norm(kernels, sizes: Sizes, copy_gbps: float, compile_: bool) -> list[Row]:
    m, n = sizes.norm_rows, sizes.hidden
    dev, dt = sizes.device, sizes.dtype
    x = torch.randn(m, n, device=dev, dtype=dt, requires_grad=True)
    r = torch.randn(m, n, device=dev, dtype=dt, requires_grad=True)
    w = torch.ones(n, device=dev, dtype=dt, requires_grad=True)
    dy = torch.randn(m, n, device=dev, dtype=dt)
    dh = torch.randn(m, n, device=dev, dtype=dt)
    elt = x.element_size()
    # Ideal traffic: norm reads x, writes y, reads x and dy, writes dx (5 passes);
    # add+norm reads x and r, writes y and h, reads h, dy and dh, writes dx (8).
    norm_bytes, add_norm_bytes = 5 * m * n * elt, 8 * m * n * elt

    def norm_eager(x, w):
        return F.rms_norm(x, (n,), w, EPS)

    def add_norm_eager(x, r, w):
        h = x + r
        return F.rms_norm(h, (n,), w, EPS), h

    norm_variants: list[tuple[str, Callable]] = [("eager", norm_eager)]
    add_variants: list[tuple[str, Callable]] = [("eager add, norm", add_norm_eager)]
    if compile_:
        norm_variants.append(("torch.compile", torch.compile(norm_eager)))
        add_variants.append(("torch.compile add+norm", torch.compile(add_norm_eager)))
    norm_variants.append(("ours (Triton)", lambda x, w: kernels.rms_norm(x, w, EPS)))
    add_variants.append(
        ("ours, fused residual", lambda x, r, w: kernels.rms_norm(x, w, EPS, residual=r))
    )

    rows = []
    times: dict[str, float] = {}
    for name, fn in norm_variants:

        def step(fn=fn):
            _clear_grads(x, w)
            fn(x, w).backward(dy)

        ms = time_ms(step, sizes)
        times[name] = ms
        gbps = norm_bytes / ms / 1e6
        rows.append(Row(f"rmsnorm [{m}x{n}]", name, ms, f"{gbps:,.0f} GB/s",
                        ratio=f"{gbps / copy_gbps:.0%} of copy"))
    for name, fn in add_variants:

        def step(fn=fn):
            _clear_grads(x, r, w)
            torch.autograd.backward(list(fn(x, r, w)), [dy, dh])

        ms = time_ms(step, sizes)
        times[name] = ms
        gbps = add_norm_bytes / ms / 1e6
        rows.append(Row(f"add+rmsnorm [{m}x{n}]", name, ms, f"{gbps:,.0f} GB/s",
                        ratio=f"{gbps / copy_gbps:.0%} of copy"))
    for ours, base in (
        ("ours (Triton)", "torch.compile"),
        ("ours, fused residual", "torch.compile add+norm"),
    ):
        if base in times:
            row = next(r for r in rows if r.variant == ours)
            row.ratio += f", {times[base] / times[ours]:.2f}x vs compile"
    return rows


# ---------------------------------------------------------------------------
# Linear + cross-entropy timings


def _bare_gemms(h: torch.Tensor, w: torch.Tensor, dlogits: torch.Tensor) -> None:
    torch.mm(h, w.t(), out=dlogits)  # logits
    torch.mm(dlogits, w)  # d hidden
    torch.mm(dlogits.t(), h)  # d weight


def bench_loss(kernels, sizes: Sizes, tokens: int, compile_: bool) -> list[Row]:
    dev, dt, hd, v = sizes.device, sizes.dtype, sizes.hidden, sizes.vocab
    h = torch.randn(tokens, hd, device=dev, dtype=dt, requires_grad=True)
    w = (torch.randn(v, hd, device=dev, dtype=dt) / hd**0.5).requires_grad_()
    t = torch.randint(0, v, (tokens,), device=dev)
    t[::50] = IGNORE
    flops = 6 * tokens * hd * v
    section = f"linear+CE N={tokens}"

    def eager(h, w, t):
        # torchtitan: bf16 logits from the model, upcast in the loss.
        return F.cross_entropy((h @ w.t()).float(), t, reduction="sum", ignore_index=IGNORE)

    variants: list[tuple[str, Callable]] = [("eager (fp32 upcast)", eager)]
    if compile_:
        variants.append(("torch.compile", torch.compile(eager)))
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        options = torch.nn.LinearCrossEntropyOptions()
        variants.append((
            "F.linear_cross_entropy chunked",
            lambda h, w, t: F.linear_cross_entropy(
                h, w, t, reduction="sum", ignore_index=IGNORE, options=options
            ),
        ))
    variants.append(
        ("ours (fused, Triton)", lambda h, w, t: kernels.fused_linear_cross_entropy(h, w, t)[0])
    )

    rows: list[Row] = []
    dlogits = torch.empty(tokens, v, device=dev, dtype=dt)
    with torch.no_grad():
        gemm_ms = time_ms(lambda: _bare_gemms(h, w, dlogits), sizes)
    del dlogits
    rows.append(
        Row(section, "3 bare GEMMs (floor)", gemm_ms, f"{flops / gemm_ms / 1e9:,.0f} TFLOP/s")
    )
    memory: dict[str, float | None] = {}
    for name, fn in variants:

        def step(fn=fn):
            _clear_grads(h, w)
            fn(h, w, t).backward()

        ms = time_ms(step, sizes)
        _clear_grads(h, w)
        memory[name] = peak_extra_gib(step, sizes)
        _clear_grads(h, w)
        mem = memory[name]
        rows.append(Row(
            section, name, ms, f"{flops / ms / 1e9:,.0f} TFLOP/s",
            f"{mem:.2f} GiB" if mem is not None else "n/a",
            f"{ms / gemm_ms:.2f}x GEMMs",
        ))
    eager_mem = memory.get("eager (fp32 upcast)")
    if eager_mem:
        for row in rows[1:]:
            mem = memory[row.variant]
            row.ratio += f", {mem / eager_mem:.0%} of eager memory"
    return rows


# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny sizes on CPU under Triton's interpreter (fp32)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile baselines (they take the longest)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for kernels.txt and kernels.json")
    parser.add_argument("--parse-only", action="store_true",
                        help="check the arguments and exit (gpu_run.sh --check)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Report:
    if args.cpu_smoke:
        # Triton reads this when it is imported (by `kernels`, just below).
        os.environ.setdefault("TRITON_INTERPRET", "1")
        sizes = CPU_SIZES
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/kernels.py needs a CUDA GPU; use --cpu-smoke on CPU")
        sizes = GPU_SIZES
    import triton

    import kernels

    compile_ = not args.no_compile
    device = torch.cuda.get_device_name() if sizes.device == "cuda" else "cpu (Triton interpreter)"
    versions = {"torch": torch.__version__, "triton": triton.__version__}
    torch.manual_seed(0)
    report = Report(device, versions, copy_bandwidth_gbps(sizes))
    report.checks += check_rms_norm(kernels, sizes)
    report.checks += check_loss(kernels, sizes)
    report.rows += bench_rms_norm(kernels, sizes, report.copy_gbps, compile_)
    for tokens in sizes.loss_tokens:
        report.rows += bench_loss(kernels, sizes, tokens, compile_)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.parse_only:
        return 0
    report = run(args)
    text = report.table()
    print(text, flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernels.txt").write_text(text + "\n")
        (args.out / "kernels.json").write_text(json.dumps(asdict(report), indent=2))
    return 1 if any(c.startswith("FAIL") for c in report.checks) else 0


if __name__ == "__main__":
    sys.exit(main())
