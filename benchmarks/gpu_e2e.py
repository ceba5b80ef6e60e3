"""The recipe's real path on one GPU, end to end, before anything is timed.

Trains the ``8B_proxy`` flavor (Llama-3.1-8B width, 6 layers, vocabulary
128,256) with FlexAttention block-causal masking, torch.compile, float8 and
both Triton kernels for 20 steps, then the same with the kernels off, and
checks: every loss finite, the loss falls (mean of the last 5 steps below the
first step's), and kernels-on losses agree with kernels-off ones. Each run has
its own timeout that kills its whole process tree (torchrun's workers
included). Writes ``e2e.json`` and ``e2e.log`` into ``--out``; exit 0 if every
check passed.

Time budget. Each run's timeout is the sum of its phases in :data:`COLD` (the
first run: every graph and kernel compiled from nothing) and :data:`WARM` (the
second: FlexAttention, float8 and shared Triton kernels come from the compile
caches the first run filled, the blocks and loss recompile for the other
kernels); ``--print-budget`` prints the stage limit ``gpu_run.sh`` gives this
script. The smoke compiles FlexAttention without max-autotune (torchtitan does
that in deterministic mode, which is turned on with warnings only): autotuning
FlexAttention's forward and backward alone can take minutes cold, and the
smoke checks losses, not speed (``--flex-max-autotune`` restores it; the
throughput stage times the tuned path). Both runs, and every later stage of
``gpu_run.sh``, share one Inductor and one Triton cache folder. ``e2e.json``
records each run's measured phases (start of logging to step 1, step 1 to the
last step) so the budget can be restated from a real lease.

    python3 benchmarks/gpu_e2e.py --out "$OUT"
    python3 benchmarks/gpu_e2e.py --parse-only       # arguments and overrides only (CPU)
    python3 benchmarks/gpu_e2e.py --print-budget     # seconds the stage needs
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if not __package__:  # run as a script: benchmarks/kernels.py would shadow `kernels`
    import _bootstrap  # noqa: F401
from benchmarks.proctree import run_with_timeout  # noqa: E402
from benchmarks.throughput import KERNELS_ON  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

BASE_CONFIG = REPO / "benchmarks" / "proxy_8b.toml"
# Inductor's and Triton's caches: the same folders for both runs and for the
# later stages of gpu_run.sh (which exports these variables first).
COMPILE_CACHE = "/tmp/swallow-compile"
CACHE_VARIABLES = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}


@dataclass(frozen=True)
class RunBudget:
    """Seconds one training run may take, by phase; its timeout is their sum.

    The phases are estimates until a lease measures them (``e2e.json``,
    ``phases``). What was measured here, without a GPU: ``import
    swallow_titan.train`` took 21 s on this 2-core machine under load (the
    GPU machine has 16 idle cores); compiling one Llama block on CPU takes
    about 20 s cold (CPU_NOTES.md), the device-independent part of Inductor's
    work, to which the GPU adds Triton's compilation of each kernel (in
    parallel workers).
    """

    start: float  # torchrun, imports, config, building 8B_proxy, float8 conversion, data
    compile: float  # blocks (one graph for the 6), loss, FlexAttention fwd+bwd, block mask
    step: float  # one step at 8,192 tokens once compiled (about 90 TFLOP)
    margin: float = 10.0

    def timeout(self, steps: int) -> float:
        return self.start + self.compile + steps * self.step + self.margin


COLD = RunBudget(start=25, compile=100, step=0.5)
# Blocks and loss recompile (other RMSNorm / loss ops); FlexAttention, the block
# mask and the float8 casts come from the caches.
WARM = RunBudget(start=25, compile=50, step=0.5)
OVERHEAD_S = 5  # this script around the two runs
KERNELS_OFF = ["--kernels.rmsnorm", "torch", "--kernels.loss", "torch"]


def stage_seconds(steps: int) -> int:
    """The time limit gpu_run.sh gives this script: both runs and its own overhead."""
    return math.ceil(COLD.timeout(steps) + WARM.timeout(steps) + OVERHEAD_S)


def run_env() -> dict[str, str]:
    """The environment of both training runs: this one, the repo on the path, and
    the shared compile caches (kept where gpu_run.sh set them)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for variable, folder in CACHE_VARIABLES.items():
        env.setdefault(variable, os.path.join(COMPILE_CACHE, folder))
    return env


def recipe_path(steps: int, seq_len: int, flex_max_autotune: bool = False) -> list[str]:
    """Overrides of proxy_8b.toml: the recipe's attention, compile and float8.

    Without ``flex_max_autotune``, torchtitan's deterministic mode, with
    warnings instead of errors for ops that have no deterministic kernel:
    torchtitan then compiles FlexAttention without max-autotune (seam
    ``set_determinism``).
    """
    smoke = [] if flex_max_autotune else [
        "--debug.deterministic", "true", "--debug.deterministic_warn_only", "true"]
    return [*smoke,
        "--model.attn_type", "flex",
        "--model.attn_mask_type", "block_causal",
        "--data.reset_position_ids", "true",
        "--compile.enable", "true",
        "--model.converters", "quantize.linear.float8",
        "--quantize.linear.float8.filter_fqns", "output",
        "--training.steps", str(steps),
        "--training.seq_len", str(seq_len),
        # A learning rate at which 20 steps from random weights visibly learn.
        "--optimizer.lr", "3e-4",
        "--lr_scheduler.warmup_steps", "2",
        "--metrics.log_freq", "1",
        "--metrics.enable_tensorboard", "false",
        # Same initial weights and data in both runs.
        "--debug.seed", "42",
    ]


_STEP = re.compile(r"step:\s*(\d+)(?:/\d+)?\s+loss:\s*([-+0-9.eEnaif]+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def parse_losses(output: str) -> dict[int, float]:
    losses = {}
    for line in _ANSI.sub("", output).splitlines():
        if "validate" not in line and (m := _STEP.search(line)):
            losses[int(m.group(1))] = float(m.group(2))
    return losses


_STAMP = re.compile(r"^\[titan\] (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def phase_seconds(output: str) -> dict[str, float]:
    """Measured phases of a run from torchtitan's log times: ``to_first_step``
    (first log line to step 1: start and compilation) and ``steps`` (step 1 to
    the last step); a phase the log does not reach is left out."""
    first = step_one = last = None
    for line in _ANSI.sub("", output).splitlines():
        m = _STAMP.match(line)
        if not m:
            continue
        t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
        first = first or t
        step = _STEP.search(line)
        if step and "validate" not in line:
            step_one = step_one or t
            last = t
    phases = {}
    if first and step_one:
        phases["to_first_step"] = (step_one - first).total_seconds()
        phases["steps"] = (last - step_one).total_seconds()
    return phases


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(name: str, overrides: list[str], dump: Path, timeout: float, log) -> dict:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", "1", "--master_port", str(free_port()),
        "-m", "swallow_titan.train", "--job.config_file", str(BASE_CONFIG),
        "--job.dump_folder", str(dump), *overrides,
    ]
    log.write(f"\n===== {name} (timeout {timeout:.0f} s): {' '.join(cmd)}\n")
    log.flush()
    begin = time.perf_counter()
    code, output = run_with_timeout(cmd, timeout, cwd=REPO, env=run_env())
    log.write(output)
    log.flush()
    return {"exit": code, "seconds": round(time.perf_counter() - begin, 1),
            "timeout": timeout, "phases": phase_seconds(output),
            "losses": parse_losses(output)}


def checks(on: dict, off: dict, steps: int, rel_tol: float) -> dict[str, bool]:
    """The pass/fail findings of the two runs."""
    result = {}
    for name, run in (("kernels_on", on), ("kernels_off", off)):
        losses = run["losses"]
        result[f"{name}_completed"] = run["exit"] == 0 and sorted(losses) == list(
            range(1, steps + 1)
        )
        result[f"{name}_finite"] = bool(losses) and all(map(math.isfinite, losses.values()))
        last = [losses[s] for s in range(max(1, steps - 4), steps + 1) if s in losses]
        result[f"{name}_loss_falls"] = bool(last) and 1 in losses and (
            sum(last) / len(last) < losses[1]
        )
    common = sorted(set(on["losses"]) & set(off["losses"]))
    result["kernels_agree"] = bool(common) and all(
        abs(on["losses"][s] - off["losses"][s]) <= rel_tol * abs(off["losses"][s])
        for s in common
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per run (tree killed); default: the budget, "
                             "COLD for the first run, WARM for the second")
    parser.add_argument("--flex-max-autotune", action="store_true",
                        help="compile FlexAttention with max-autotune, as training does "
                             "(minutes more when cold)")
    parser.add_argument("--print-budget", action="store_true",
                        help="print the seconds this script needs for --steps, then exit")
    parser.add_argument("--print-caches", action="store_true",
                        help="print the compile-cache variables as shell exports, then exit")
    parser.add_argument("--rel-tol", type=float, default=0.02,
                        help="kernels on/off loss agreement, relative (default 0.02: bf16 "
                             "autocast and float8 on both sides, 20 optimizer steps apart)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO / "outputs" / "e2e")))
    parser.add_argument("--parse-only", action="store_true",
                        help="check the arguments and the training overrides, then exit")
    args = parser.parse_args(argv)
    if args.print_caches:
        env = run_env()
        print("\n".join(f"export {v}={shlex.quote(env[v])}" for v in CACHE_VARIABLES))
        return 0
    if args.print_budget:
        print(stage_seconds(args.steps) if args.timeout is None
              else math.ceil(2 * args.timeout + OVERHEAD_S))
        return 0
    base = recipe_path(args.steps, args.seq_len, args.flex_max_autotune)
    if args.parse_only:
        # The overrides must name real keys with valid values (checked on CPU).
        from swallow_titan.config.checks import check_values
        from swallow_titan.config.manager import load_job_config

        for kernels in (KERNELS_ON, KERNELS_OFF):
            config = load_job_config(BASE_CONFIG, [*base, *kernels])
            check_values(config, 1, str(BASE_CONFIG))
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"steps": args.steps, "seq_len": args.seq_len, "rel_tol": args.rel_tol}
    with open(args.out / "e2e.log", "w") as log:
        for name, kernels, budget in (("kernels_on", KERNELS_ON, COLD),
                                      ("kernels_off", KERNELS_OFF, WARM)):
            timeout = args.timeout or budget.timeout(args.steps)
            report[name] = train(name, [*base, *kernels], args.out / name, timeout, log)
            # Written after each run, so a later timeout keeps this one.
            (args.out / "e2e.json").write_text(json.dumps(report, indent=1))
            print(f"{name}: exit {report[name]['exit']}, {report[name]['seconds']} s, "
                  f"losses {report[name]['losses']}", flush=True)
    report["checks"] = checks(report["kernels_on"], report["kernels_off"], args.steps, args.rel_tol)
    (args.out / "e2e.json").write_text(json.dumps(report, indent=1))
    print("| check | result |\n|---|---|")
    for name, ok in report["checks"].items():
        print(f"| {name} | {'pass' if ok else 'FAIL'} |")
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
