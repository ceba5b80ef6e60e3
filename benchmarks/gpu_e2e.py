"""The recipe's real path on one GPU, end to end, before anything is timed.

Trains the ``8B_proxy`` flavor (Llama-3.1-8B width, 6 layers, vocabulary
128,256) with FlexAttention block-causal masking, torch.compile, float8 and
both Triton kernels for 20 steps, then the same with the kernels off, and
checks: every loss finite, the loss falls (mean of the last 5 steps below the
first step's), and kernels-on losses agree with kernels-off ones. Each run has
its own timeout that kills its whole process tree (torchrun's workers
included). Writes ``e2e.json`` and ``e2e.log`` into ``--out``; exit 0 if every
check passed.

    python3 benchmarks/gpu_e2e.py --out "$OUT"
    python3 benchmarks/gpu_e2e.py --parse-only       # arguments and overrides only (CPU)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import sys
import time
from pathlib import Path

if not __package__:  # run as a script: benchmarks/kernels.py would shadow `kernels`
    import _bootstrap  # noqa: F401
from benchmarks.proctree import run_with_timeout  # noqa: E402
from benchmarks.throughput import KERNELS_ON  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

BASE_CONFIG = REPO / "benchmarks" / "proxy_8b.toml"
KERNELS_OFF = ["--kernels.rmsnorm", "torch", "--kernels.loss", "torch"]


def recipe_path(steps: int, seq_len: int) -> list[str]:
    """Overrides of proxy_8b.toml: the recipe's attention, compile and float8."""
    return [
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
        # Same initial weights and data in both runs; not --debug.deterministic,
        # which would make CUDA ops without a deterministic kernel raise.
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
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log.write(f"\n===== {name}: {' '.join(cmd)}\n")
    log.flush()
    begin = time.perf_counter()
    code, output = run_with_timeout(cmd, timeout, cwd=REPO, env=env)
    log.write(output)
    log.flush()
    return {"exit": code, "seconds": round(time.perf_counter() - begin, 1),
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
    parser.add_argument("--timeout", type=float, default=110, help="seconds per run (tree killed)")
    parser.add_argument("--rel-tol", type=float, default=0.02,
                        help="kernels on/off loss agreement, relative (default 0.02: bf16 "
                             "autocast and float8 on both sides, 20 optimizer steps apart)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO / "outputs" / "e2e")))
    parser.add_argument("--parse-only", action="store_true",
                        help="check the arguments and the training overrides, then exit")
    args = parser.parse_args(argv)
    base = recipe_path(args.steps, args.seq_len)
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
        for name, kernels in (("kernels_on", KERNELS_ON), ("kernels_off", KERNELS_OFF)):
            report[name] = train(name, [*base, *kernels], args.out / name, args.timeout, log)
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
