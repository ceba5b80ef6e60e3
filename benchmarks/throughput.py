"""Single-GPU training throughput: swallow-titan against stock torchtitan.

Trains the 8B proxy (Llama-3.1-8B width, 6 layers, vocab 128,256, seq 8192) for a
fixed number of steps in each configuration, one after another, each in its own
torchrun process:

    stock        stock torchtitan 0.2.2 llama3, same dims, bf16, compile on
    bf16         swallow-titan bf16, compile on, kernels off
    bf16+kernels swallow-titan bf16, compile on, Triton RMSNorm + fused linear-CE
    fp8+kernels  swallow-titan float8 tensorwise, compile on, kernels on

and prints one table: median tokens/s over the steps after warm-up, MFU against
the card's measured (not datasheet) bf16 matmul rate, peak memory, and the ratio
to stock torchtitan. Then one short profiled run of the fastest configuration
prints the top 15 GPU kernels by time. With $OUT set (the device machine) the log,
a JSON of the results and the trace are written there.

    python benchmarks/throughput.py                 # GPU
    python benchmarks/throughput.py --cpu-smoke     # same code path, tiny flavor, CPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if not __package__:  # run as a script: benchmarks/kernels.py would shadow `kernels`
    import _bootstrap  # noqa: F401
from benchmarks.proctree import run_with_timeout  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

BASE_CONFIG = REPO / "benchmarks" / "proxy_8b.toml"

KERNELS_ON = ["--kernels.rmsnorm", "triton", "--kernels.loss", "fused_linear_ce"]
FLOAT8 = [
    "--model.converters", "quantize.linear.float8",
    "--quantize.linear.float8.filter_fqns", "output",
]


@dataclass(frozen=True)
class BenchConfig:
    name: str
    entry: str  # python module run by torchrun
    overrides: tuple[str, ...] = ()


CONFIGS = [
    BenchConfig("stock", "benchmarks.stock_torchtitan", ("--model.name", "llama3_stock")),
    BenchConfig("bf16", "swallow_titan.train"),
    BenchConfig("bf16+kernels", "swallow_titan.train", tuple(KERNELS_ON)),
    BenchConfig("fp8+kernels", "swallow_titan.train", tuple(KERNELS_ON + FLOAT8)),
]

# TensorBoard tags torchtitan's MetricsProcessor writes (stock and ours).
TPS_TAGS = ("throughput(tps)", "perf/tokens_per_s_per_gpu")
MEMORY_TAGS = ("memory/max_reserved(GiB)", "memory/peak_reserved_gib")


@dataclass
class Result:
    name: str
    ok: bool
    tokens_per_s: float = 0.0
    mfu_pct: float = 0.0
    peak_memory_gib: float = 0.0
    vs_stock: float = 0.0
    steps_measured: int = 0
    error: str = ""
    per_step_tps: list[float] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_matmul_rate(device: str) -> float:
    """The card's bf16 matmul rate in FLOP/s (fp32 on CPU), measured here."""
    import torch

    if device == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 20
    else:
        n, dtype, reps = 512, torch.float32, 5
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        seconds = time.perf_counter() - t0
    return 2 * n**3 * reps / seconds


def flops_per_token(flavor: str, seq_len: int) -> int:
    import swallow_titan  # noqa: F401
    from swallow_titan.model.args import FLAVORS
    from swallow_titan.plan import count_params_and_flops

    return count_params_and_flops(FLAVORS[flavor], seq_len)[1]


def read_scalars(tb_dir: Path, tags: tuple[str, ...]) -> dict[int, float]:
    """Scalars of the first tag present in the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[int, float] = {}
    for events in sorted(tb_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        available = acc.Tags().get("scalars", [])
        for tag in tags:
            if tag in available:
                out.update({e.step: e.value for e in acc.Scalars(tag)})
                break
    return out


def run_config(
    config: BenchConfig, common: list[str], dump: Path, log, env: dict[str, str], timeout: float
) -> tuple[int, str]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nproc_per_node", "1",
        "--master_port", str(free_port()),
        "-m", config.entry,
        "--job.config_file", str(BASE_CONFIG),
        "--job.dump_folder", str(dump),
        *common,
        *config.overrides,
    ]
    log.write(f"\n===== {config.name}: {' '.join(cmd)}\n")
    log.flush()
    # torchrun's workers run in sessions of their own: a timeout kills the tree.
    code, output = run_with_timeout(cmd, timeout, cwd=REPO, env=env)
    log.write(output)
    log.flush()
    return code, output


def summarise(
    config: BenchConfig, code: int, output: str, dump: Path, warmup: int, flops: int, rate: float
) -> Result:
    if code != 0:
        tail = [line for line in output.splitlines() if line.strip()][-3:]
        return Result(config.name, ok=False, error=f"exit {code}: " + " | ".join(tail)[-300:])
    tps = read_scalars(dump / "tb", TPS_TAGS)
    memory = read_scalars(dump / "tb", MEMORY_TAGS)
    measured = [v for step, v in sorted(tps.items()) if step > warmup]
    if not measured:
        return Result(config.name, ok=False, error="no throughput scalars after warm-up")
    median = statistics.median(measured)
    return Result(
        config.name,
        ok=True,
        tokens_per_s=median,
        mfu_pct=100 * median * flops / rate,
        peak_memory_gib=max(memory.values(), default=0.0),
        steps_measured=len(measured),
        per_step_tps=measured,
    )


def top_kernels(trace_dir: Path, n: int = 15) -> list[tuple[str, float, int]]:
    """(name, total ms, calls) of the n most expensive GPU kernels in a trace.

    Falls back to CPU operators when the trace has no GPU kernels (CPU smoke).
    """
    traces = sorted(trace_dir.rglob("*trace.json"))
    if not traces:
        return []
    with open(traces[-1]) as f:
        events = json.load(f).get("traceEvents", [])
    categories = {e.get("cat") for e in events}
    wanted = "kernel" if "kernel" in categories else "cpu_op"
    totals: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == wanted and "dur" in e:
            entry = totals.setdefault(e.get("name", "?"), [0.0, 0])
            entry[0] += e["dur"] / 1000
            entry[1] += 1
    ranked = sorted(totals.items(), key=lambda kv: kv[1][0], reverse=True)[:n]
    return [(name, ms, int(calls)) for name, (ms, calls) in ranked]


def format_table(results: list[Result], rate: float, device: str) -> str:
    unit = "bf16" if device == "cuda" else "fp32 (CPU)"
    lines = [
        f"measured matmul rate: {rate / 1e12:.1f} TFLOP/s {unit}",
        f"{'config':<14} {'tokens/s':>10} {'MFU %':>7} {'peak GiB':>9} {'vs stock':>9}",
    ]
    for r in results:
        if r.ok:
            lines.append(
                f"{r.name:<14} {r.tokens_per_s:>10,.0f} {r.mfu_pct:>7.1f} "
                f"{r.peak_memory_gib:>9.1f} {r.vs_stock:>8.2f}x"
            )
        else:
            lines.append(f"{r.name:<14} FAILED  {r.error}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny flavor on CPU, few steps, no compile: tests the harness")
    parser.add_argument("--steps", type=int, help="steps per configuration (default 10; smoke 3)")
    parser.add_argument("--warmup", type=int, help="steps excluded from the median (default 4; smoke 1)")
    parser.add_argument("--configs", default=",".join(c.name for c in CONFIGS),
                        help="comma-separated subset of: " + ", ".join(c.name for c in CONFIGS))
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled run")
    parser.add_argument("--timeout", type=float, default=420, help="seconds per configuration")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO / "outputs" / "bench")))
    parser.add_argument("--parse-only", action="store_true",
                        help="check the arguments and exit (gpu_run.sh --check)")
    args = parser.parse_args(argv)
    if args.parse_only:
        return 0

    import torch

    device = "cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu"
    steps = args.steps or (3 if args.cpu_smoke else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.cpu_smoke else 4)
    if steps <= warmup:
        parser.error("--steps must exceed --warmup")
    selected = [c for c in CONFIGS if c.name in args.configs.split(",")]
    unknown = set(args.configs.split(",")) - {c.name for c in CONFIGS}
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}")

    common = ["--training.steps", str(steps)]
    flavor, seq_len = "8B_proxy", 8192
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if args.cpu_smoke:
        flavor, seq_len = "tiny", 64
        common += [
            "--model.flavor", flavor, "--training.seq_len", str(seq_len),
            "--training.local_batch_size", "2", "--training.global_batch_size", "2",
            "--compile.enable", "false", "--activation_checkpoint.mode", "none",
            "--optimizer.implementation", "foreach",
            "--training.mixed_precision_param", "float32",
            # float8 on CPU runs only emulated.
            "--quantize.linear.float8.emulate", "true",
        ]
        env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))

    args.out.mkdir(parents=True, exist_ok=True)
    runs_dir = args.out / "runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    rate = measure_matmul_rate(device)
    flops = flops_per_token(flavor, seq_len)
    results: list[Result] = []
    with open(args.out / "throughput.log", "w") as log:
        log.write(f"device {device}; torch {torch.__version__}; flops/token {flops}; rate {rate:.3e}\n")
        for config in selected:
            dump = runs_dir / config.name.replace("+", "_")
            code, output = run_config(config, common, dump, log, env, args.timeout)
            result = summarise(config, code, output, dump, warmup, flops, rate)
            results.append(result)
            print(f"{config.name}: {'ok' if result.ok else result.error}", flush=True)
        stock = next((r for r in results if r.name == "stock" and r.ok), None)
        for r in results:
            if r.ok and stock:
                r.vs_stock = r.tokens_per_s / stock.tokens_per_s
        table = format_table(results, rate, device)
        print(table)
        log.write("\n" + table + "\n")

        kernels: list[tuple[str, float, int]] = []
        fastest = max((r for r in results if r.ok), key=lambda r: r.tokens_per_s, default=None)
        if fastest and not args.no_profile:
            config = next(c for c in selected if c.name == fastest.name)
            dump = runs_dir / "profile"
            profile = [
                "--training.steps", str(warmup + 2),
                "--profiling.enable_profiling", "true",
                "--profiling.profile_freq", str(warmup + 2),
                "--profiling.profiler_warmup", "1",
                "--profiling.profiler_active", "1",
                "--profiling.save_traces_folder", "profile_traces",
            ]
            code, _ = run_config(config, common + profile, dump, log, env, args.timeout)
            kernels = top_kernels(dump / "profile_traces") if code == 0 else []
            kind = "GPU kernels" if device == "cuda" else "CPU operators"
            lines = [f"top {len(kernels)} {kind} of '{fastest.name}' (one profiled step):"]
            lines += [f"  {ms:9.2f} ms  {calls:5d}x  {name[:110]}" for name, ms, calls in kernels]
            print("\n".join(lines))
            log.write("\n".join(lines) + "\n")
            traces = sorted((dump / "profile_traces").rglob("*trace.json"))
            if traces and os.environ.get("OUT"):
                shutil.copy(traces[-1], args.out / "profile_trace.json")

    report = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "flavor": flavor,
        "seq_len": seq_len,
        "steps": steps,
        "warmup": warmup,
        "matmul_flops_per_s": rate,
        "flops_per_token": flops,
        "results": [asdict(r) for r in results],
        "top_kernels": [{"name": n, "ms": ms, "calls": c} for n, ms, c in kernels],
    }
    (args.out / "throughput.json").write_text(json.dumps(report, indent=2))
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
