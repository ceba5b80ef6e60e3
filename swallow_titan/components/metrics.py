"""What a run reports: TensorBoard scalars and text, and one progress line per log step.

``SwallowMetricsProcessor`` is torchtitan's MetricsProcessor (TrainSpec
``build_metrics_processor_fn``) with these differences:

- TensorBoard is written here, into one run folder for the whole job
  (``<dump_folder>/<metrics.save_tb_folder>``): every restart appends a new
  event file with ``purge_step`` = its first step, so the steps a crashed
  attempt logged after its last checkpoint are hidden and the curves stay
  continuous across restarts. (torchtitan makes a new timestamped run per
  restart.) Other torchtitan backends (W&B) are kept.
- Scalars at every log step (tag names in :data:`SCALARS` and the README):
  loss, z-loss when the kernels' loss computes one, gradient norm, learning
  rate, tokens seen, skipped steps, tokens/s and TFLOP/s per GPU, MFU against
  the GPU's dense bf16 peak (none on CPU or on a GPU not in
  :func:`dense_bf16_peak_flops`), step time, data wait, peak memory, and
  the dataloader's per-source metrics; per-set validation loss/perplexity.
- The hyper-parameters (text table and the HPARAMS plugin) and the resolved
  config (JSON text) are written when a run (or restart) begins.
- The same scalars go to ``<dump_folder>/metrics.jsonl`` (:class:`RunLog`),
  one JSON object per log step, with the same purge rule on restart.
- The console line carries step/total, tokens seen, loss, tokens/s and ETA.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.tools.logging import logger
from torchtitan.tools.utils import device_type

from swallow_titan.components.wandb_run import WandBRun
from swallow_titan.config.paths import RunPaths
from swallow_titan.runtime.ranks import process_rank

# Scalar tags logged at every log step (data/<source>/... come on top).
SCALARS = {
    "loss": "train/loss",
    "loss_max": "train/loss_max",
    "z_loss": "train/z_loss",
    "grad_norm": "train/grad_norm",
    "lr": "train/lr",
    "tokens_seen": "train/tokens_seen",
    "skipped_steps": "train/skipped_steps",
    "tps": "perf/tokens_per_s_per_gpu",
    "tflops": "perf/tflops_per_gpu",
    "mfu": "perf/mfu_pct",
    "step_time": "perf/step_time_s",
    "data_wait": "perf/data_wait_s",
    "data_wait_pct": "perf/data_wait_pct",
    "mem_active": "memory/peak_active_gib",
    "mem_reserved": "memory/peak_reserved_gib",
    "mem_reserved_pct": "memory/peak_reserved_pct",
    "alloc_retries": "memory/alloc_retries",
    "ooms": "memory/ooms",
}
# torchtitan's own extra-metric names, accepted from callers that use them.
_TORCHTITAN_EXTRAS = {"n_tokens_seen": SCALARS["tokens_seen"], "lr": SCALARS["lr"]}

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from NVIDIA's data
# sheets; the first pattern that matches the device name wins.
_DENSE_BF16_PEAKS: tuple[tuple[str, float], ...] = (
    (r"GH200", 989e12),
    (r"H200", 989e12),
    (r"H100.*NVL", 835e12),
    (r"H100.*PCIe", 756e12),
    (r"H100", 989e12),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    (r"B200", 2250e12),
    (r"A100", 312e12),
)


def dense_bf16_peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by its name, or None if unknown."""
    for pattern, peak in _DENSE_BF16_PEAKS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return peak
    return None


def format_duration(seconds: float) -> str:
    """``1d 02:03:04`` / ``0:01:23`` for an ETA; ``--`` if unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "--"
    total = int(round(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}d {hours:02d}:{minutes:02d}:{secs:02d}" if days else clock


def format_count(n: float) -> str:
    """A token count for a console line: 950, 98.3K, 1.05B."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def hyperparameters(job_config: Any, world_size: int) -> dict[str, Any]:
    """The settings people compare runs by, flat, for the HPARAMS plugin."""
    keys = (
        "model.flavor", "training.steps", "training.seq_len",
        "training.global_batch_size", "training.local_batch_size",
        "training.max_norm", "training.mixed_precision_param", "optimizer.name",
        "optimizer.lr", "optimizer.beta1", "optimizer.beta2", "optimizer.eps",
        "optimizer.weight_decay", "lr_scheduler.warmup_steps",
        "lr_scheduler.decay_type", "lr_scheduler.min_lr_factor", "data.seed",
        "parallelism.data_parallel_replicate_degree",
        "parallelism.data_parallel_shard_degree",
        "parallelism.tensor_parallel_degree", "parallelism.pipeline_parallel_degree",
        "parallelism.context_parallel_degree", "guard.on_nonfinite", "guard.on_spike",
    )
    values: dict[str, Any] = {"world_size": world_size}
    for key in keys:
        section, name = key.split(".")
        value = getattr(getattr(job_config, section, None), name, None)
        if value is not None:
            values[key] = value
    for source in getattr(job_config.data, "sources", []):
        values[f"data.{source.name}.weight"] = source.weight
    return values


class _Writer:
    """TensorBoard for one job: one folder, restarts purge what they redo."""

    def __init__(self, log_dir: str, first_step: int):
        os.makedirs(log_dir, exist_ok=True)
        self.log_dir = log_dir
        self.summary = SummaryWriter(log_dir, max_queue=1000, purge_step=first_step)
        logger.info(f"TensorBoard: {log_dir} (from step {first_step})")

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.summary.add_scalar(tag, value, step)

    def text(self, tag: str, markdown: str, step: int) -> None:
        self.summary.add_text(tag, markdown, step)

    def hparams(self, values: dict[str, Any], metric_tags: list[str]) -> None:
        plain = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for k, v in values.items()
        }
        for summary in hparams_summaries(plain, {tag: 0.0 for tag in metric_tags}):
            self.summary.file_writer.add_summary(summary)

    def flush(self) -> None:
        self.summary.flush()

    def close(self) -> None:
        self.summary.close()


class RunLog:
    """``<dump_folder>/metrics.jsonl``: one JSON object per log step, across restarts.

    Each line is ``{"step": N, "time": <unix seconds>, "<tag>": value, ...}``
    with the TensorBoard tags of that step (training and validation steps
    are separate lines). Non-finite values are written as ``NaN`` /
    ``Infinity`` (what Python's ``json`` reads back). A restart at
    ``first_step`` first drops every line with ``step >= first_step``, as
    TensorBoard's ``purge_step`` does, so the file never shows steps a
    crashed attempt did after its last checkpoint. Each line is one
    ``write`` on an ``O_APPEND`` descriptor, so a killed process leaves at
    most an incomplete last line, which the next restart and
    :func:`read_run_log` drop.

    The log is a record, not part of training: a write that fails or stops
    short (full disk, NFS) is a warning and training goes on (an exception
    here, on the metrics rank only, would leave the other ranks waiting in
    a collective). After a short write the next record starts on a fresh
    line, so the torn line is skipped on reading and never merges with it.
    """

    def __init__(self, path: str | os.PathLike, first_step: int):
        self.path = Path(path)
        self._fd = -1
        # True while the file ends inside a line (a write stopped short).
        self._torn = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_run_log(self.path) if r["step"] < first_step]
        # Rewrite through a temporary file: a kill now leaves the old or the new file.
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(_line(r) for r in kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as e:
            # Appending to the old file would keep the steps this restart redoes.
            tmp.unlink(missing_ok=True)
            logger.warning(
                f"Run log {self.path}: could not rewrite it for the restart at step "
                f"{first_step} ({e}); this attempt writes no run log, training goes on"
            )

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """Append one line for ``step`` (a failed write is a warning, not an error)."""
        if self._fd < 0:
            return
        record = {"step": step, "time": time.time()}
        record.update((k, float(v)) for k, v in scalars.items())
        data = _line(record).encode("utf-8")
        if self._torn:
            # End the torn line first: it is then one unreadable line, skipped on reading.
            data = b"\n" + data
        written, error = 0, None
        try:
            while written < len(data):
                n = os.write(self._fd, data[written:])
                if n <= 0:
                    break
                written += n
        except OSError as e:
            error = e
        if written == len(data):
            self._torn = False
            return
        if written:
            self._torn = not data[:written].endswith(b"\n")
        reason = error or f"only {written} of {len(data)} bytes written"
        logger.warning(f"Run log {self.path}: step {step} not recorded ({reason}); training goes on")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":")) + "\n"


def read_run_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, in file order ([] if there is none).

    A last line without its newline (a write cut short by a kill) is left out.
    A line that is not a JSON object with an integer ``step`` (a write torn by
    a full disk, an edit) is skipped with a warning naming file and line, so
    one bad line cannot stop every restart.
    """
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    records = []
    # The part after the last newline is empty, or a torn write.
    for number, line in enumerate(lines[:-1], start=1):
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            logger.warning(f"{path}:{number}: unreadable run-log line skipped ({e})")
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            logger.warning(f"{path}:{number}: run-log line without an integer \"step\" skipped")
            continue
        records.append(record)
    return records


class SwallowMetricsProcessor(MetricsProcessor):
    """torchtitan's MetricsProcessor with swallow-titan's TensorBoard and console line."""

    def __init__(self, job_config: Any, parallel_dims: Any, tag: str | None = None):
        # torchtitan's TensorBoard and W&B loggers are replaced by _Writer and
        # WandBRun, opened in start() when the first step of this attempt is known.
        base_config = copy.copy(job_config)
        base_config.metrics = dataclasses.replace(
            job_config.metrics, enable_tensorboard=False, enable_wandb=False
        )
        super().__init__(base_config, parallel_dims, tag)
        self.job_config = job_config
        self.total_steps = job_config.training.steps
        device_name = self.device_memory_monitor.device_name
        self.peak_flops = None if device_type == "cpu" else dense_bf16_peak_flops(device_name)
        if self.peak_flops is not None:
            logger.info(f"MFU against {device_name}'s dense bf16 peak, {self.peak_flops:.3e} FLOP/s")
        elif device_type == "cpu":
            logger.info("MFU is not reported on CPU (TFLOP/s is)")
        else:
            logger.warning(f"No dense bf16 peak known for {device_name!r}: MFU is not reported")
        self.writer: _Writer | None = None
        self.run_log: RunLog | None = None
        self.wandb: WandBRun | None = None
        self._started = time.perf_counter()
        self._first_logged: tuple[float, int] | None = None
        self._start_step = 0
        # The step of the last training log line (None before the first).
        self._last_step: int | None = None

    # --------------------------------------------------------------- run start

    def _logs_here(self) -> bool:
        return self.job_config.metrics.save_for_all_ranks or self._is_metrics_rank()

    def _is_metrics_rank(self) -> bool:
        rank = process_rank()
        dims = self.parallel_dims
        # With pipelining the loss lives on the last stage's first rank.
        metrics_rank = (dims.world_size // dims.pp) * (dims.pp - 1) if dims.pp_enabled else 0
        return rank == metrics_rank

    def run_log_path(self) -> str:
        return RunPaths.of(self.job_config).metrics_log

    def tensorboard_folder(self) -> str:
        m = self.job_config.metrics
        folder = RunPaths.of(self.job_config).tensorboard
        if m.save_for_all_ranks:
            folder = os.path.join(folder, f"rank_{process_rank()}")
        return folder

    def start(self, first_step: int) -> None:
        """The run (or a restart) begins at ``first_step``: open TensorBoard, write the config."""
        self._started = time.perf_counter()
        self._start_step = first_step - 1
        self._first_logged = None
        if self._is_metrics_rank():
            if self.run_log is not None:
                self.run_log.close()
            self.run_log = RunLog(self.run_log_path(), first_step)
            if self.job_config.metrics.enable_wandb and self.wandb is None:
                self.wandb = WandBRun(self.job_config, first_step)
        if self.writer is not None:
            self.writer.close()  # a rollback restarts the curves in-process
            self.writer = None
        if not (self.job_config.metrics.enable_tensorboard and self._logs_here()):
            return
        self.writer = _Writer(self.tensorboard_folder(), first_step)
        values = hyperparameters(self.job_config, self.parallel_dims.world_size)
        table = "| setting | value |\n|---|---|\n" + "\n".join(
            f"| {k} | {v} |" for k, v in values.items()
        )
        self.writer.text("config/hyperparameters", table, first_step)
        resolved = json.dumps(self.job_config.to_dict(), indent=2, default=str)
        # Four-space indentation renders as a code block in TensorBoard's markdown.
        self.writer.text(
            "config/resolved", "\n".join("    " + line for line in resolved.splitlines()),
            first_step,
        )
        self.writer.hparams(values, [SCALARS["loss"], "val/loss"])
        self.writer.flush()

    # ----------------------------------------------------------- training logs

    def log(
        self,
        step: int,
        global_avg_loss: float,
        global_max_loss: float,
        grad_norm: float,
        extra_metrics: dict[str, Any] | None = None,
    ) -> None:
        now = time.perf_counter()
        interval = max(now - self.time_last_log, 1e-9)
        steps_in_interval = max(step - self._last_logged_step(), 1)
        # Tokens this rank consumed, per GPU that shares them (TP/CP/PP ranks).
        tps = self.ntokens_since_last_log / (
            interval * self.parallel_dims.non_data_parallel_size
        )
        flops = self.num_flops_per_token * tps
        waits = self.data_loading_times
        memory = self.device_memory_monitor.get_peak_stats()

        scalars: dict[str, float] = {
            SCALARS["loss"]: global_avg_loss,
            SCALARS["loss_max"]: global_max_loss,
            SCALARS["grad_norm"]: grad_norm,
            SCALARS["tps"]: tps,
            SCALARS["tflops"]: flops / 1e12,
            SCALARS["step_time"]: interval / steps_in_interval,
            SCALARS["data_wait"]: sum(waits) / len(waits) if waits else 0.0,
            SCALARS["data_wait_pct"]: 100 * sum(waits) / interval,
            SCALARS["mem_active"]: memory.max_active_gib,
            SCALARS["mem_reserved"]: memory.max_reserved_gib,
            SCALARS["mem_reserved_pct"]: memory.max_reserved_pct,
            SCALARS["alloc_retries"]: memory.num_alloc_retries,
            SCALARS["ooms"]: memory.num_ooms,
        }
        if self.peak_flops:
            scalars[SCALARS["mfu"]] = 100 * flops / self.peak_flops
        for key, value in (extra_metrics or {}).items():
            scalars[_TORCHTITAN_EXTRAS.get(key, key)] = value

        self._emit(scalars, step, flush=False)
        logger.info(self.progress_line(step, scalars, now))

        if self._first_logged is None:
            self._first_logged = (now, step)
        self._last_step = step
        self.ntokens_since_last_log = 0
        self.data_loading_times.clear()
        self.time_last_log = time.perf_counter()
        self.device_memory_monitor.reset_peak_stats()

    def _emit(self, scalars: dict[str, float], step: int, flush: bool = True) -> None:
        """Scalars to TensorBoard, the run log and torchtitan's other backends (W&B)."""
        if self.writer is not None:
            self.writer.scalars(scalars, step)
            if flush:
                self.writer.flush()
        if self.run_log is not None:
            self.run_log.write(step, scalars)
        if self.wandb is not None:
            self.wandb.log(scalars, step)

    def _last_logged_step(self) -> int:
        return self._start_step if self._last_step is None else self._last_step

    def eta_seconds(self, step: int, now: float) -> float:
        """Seconds to ``training.steps`` at the pace since the first log of this process.

        The pace includes validation and checkpoints; the first logged step
        (warm-up, compilation) is left out once a later one exists.
        """
        if self._first_logged is not None and step > self._first_logged[1]:
            since, since_step = self._first_logged
        else:
            since, since_step = self._started, self._start_step
        done = step - since_step
        if done <= 0:
            return float("nan")
        return (now - since) / done * (self.total_steps - step)

    def progress_line(self, step: int, scalars: dict[str, float], now: float) -> str:
        c = self.color
        line = (
            f"{c.red}step: {step:>{len(str(self.total_steps))}}/{self.total_steps}  "
            f"{c.green}loss: {scalars[SCALARS['loss']]:8.5f}  "
            f"{c.blue}tokens: {format_count(scalars.get(SCALARS['tokens_seen'], 0))}  "
            f"tps: {round(scalars[SCALARS['tps']]):,}  "
            f"{c.cyan}eta: {format_duration(self.eta_seconds(step, now))}  "
            f"{c.orange}grad_norm: {scalars[SCALARS['grad_norm']]:7.4f}  "
            f"lr: {scalars.get(SCALARS['lr'], float('nan')):.3e}  "
            f"{c.turquoise}mem: {scalars[SCALARS['mem_reserved']]:5.2f}GiB  "
            f"{c.magenta}tflops: {scalars[SCALARS['tflops']]:,.2f}"
        )
        if SCALARS["mfu"] in scalars:
            line += f"  mfu: {scalars[SCALARS['mfu']]:.1f}%"
        if scalars.get(SCALARS["z_loss"]) is not None:
            line += f"  z_loss: {scalars[SCALARS['z_loss']]:.4g}"
        if scalars.get(SCALARS["skipped_steps"]):
            line += f"  {c.red}skipped: {int(scalars[SCALARS['skipped_steps']])}"
        return line + c.reset

    # ---------------------------------------------------------- guard events

    def log_event(self, step: int, scalars: dict[str, float], text: tuple[str, str]) -> None:
        """An event of the ``[guard]`` (a loss spike): scalars to TensorBoard,
        the run log and the other backends, plus a markdown ``(tag, text)``
        note in TensorBoard."""
        self._emit(scalars, step)
        if self.writer is not None:
            self.writer.text(*text, step)
            self.writer.flush()

    # --------------------------------------------------------- validation logs

    def log_validation_sets(
        self, step: int, losses: dict[str, float], seconds: float, prefix: str = "val"
    ) -> None:
        """Per-set validation losses: <prefix>/<set>/loss and /perplexity, plus their mean.

        ``prefix`` is ``val`` for the trained weights, ``val/ema`` or
        ``val/tail`` for an ``[averaging]`` average of them.
        """
        scalars: dict[str, float] = {}
        for name, loss in losses.items():
            scalars[f"{prefix}/{name}/loss"] = loss
            scalars[f"{prefix}/{name}/perplexity"] = _perplexity(loss)
        if losses:
            mean = sum(losses.values()) / len(losses)
            scalars[f"{prefix}/loss"] = mean
            scalars[f"{prefix}/perplexity"] = _perplexity(mean)
        scalars[f"{prefix}/time_s"] = seconds
        self._emit(scalars, step)
        parts = "  ".join(
            f"{name}: {loss:.4f} (ppl {_perplexity(loss):.4g})"
            for name, loss in losses.items()
        )
        c = self.color
        what = "validate" if prefix == "val" else f"validate {prefix.removeprefix('val/')}"
        logger.info(
            f"{c.yellow}{what} step: {step:2}  loss: {scalars.get(f'{prefix}/loss', float('nan')):8.5f}  "
            f"{parts}  [{seconds:.1f}s]{c.reset}"
        )
        # Keep validation time out of the next training throughput.
        self.time_last_log += seconds

    # --------------------------------------------------------- evaluation logs

    def log_eval(
        self, step: int, scalars: dict[str, float], seconds: float, prefix: str = "eval"
    ) -> None:
        """Downstream evaluation ([eval]): ``<prefix>/<task>/<metric>`` scalars, the
        duration as ``<prefix>/time_s`` and one console line (``prefix`` "eval/ema" for an
        average's)."""
        values = {**scalars, f"{prefix}/time_s": seconds}
        self._emit(values, step)
        parts = "  ".join(
            f"{tag.removeprefix('eval/')}: {value:.4f}" for tag, value in scalars.items()
        )
        c = self.color
        logger.info(f"{c.cyan}eval step: {step:2}  {parts}  [{seconds:.1f}s]{c.reset}")
        # Keep evaluation time out of the next training throughput.
        self.time_last_log += seconds

    def log_validation(
        self, loss: float, step: int, extra_metrics: dict[str, Any] | None = None
    ) -> None:
        self.log_validation_sets(step, {"heldout": loss}, 0.0)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.run_log is not None:
            self.run_log.close()
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None
        super().close()


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # NaN stays NaN


def build_metrics_processor(
    job_config: Any,
    parallel_dims: Any,
    model_args: Any = None,
    tag: str | None = None,
) -> SwallowMetricsProcessor:
    """TrainSpec ``build_metrics_processor_fn``."""
    return SwallowMetricsProcessor(job_config, parallel_dims, tag)
