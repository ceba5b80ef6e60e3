"""What a person watching a run sees: TensorBoard scalars and text, progress lines, per-domain validation."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import resource
import signal

import pytest

from torchtitan.distributed.parallel_dims import ParallelDims

from support import TINY_CONFIG
from support.overrides import FSDP2
from support.runs import ANSI, from_seed, run_training, series
from support.tensorboard import events, scalars
from swallow_titan.components.metrics import (
    RunLog,
    SwallowMetricsProcessor,
    dense_bf16_peak_flops,
    format_duration,
    read_run_log,
)
from swallow_titan.config.manager import load_job_config

STEPS = 4
SETS = ("ja", "en", "code", "math")
SOURCES = ("ja_sample", "en_sample", "code_sample", "math_sample")
MONITORED = (
    "--training.steps", str(STEPS),
    "--metrics.enable_tensorboard", "true",
    "--validation.enable", "true",
    "--validation.seq_len", "64",
    "--validation.local_batch_size", "2",
    "--validation.freq", "2",
)


def test_mfu_peaks_are_the_dense_bf16_peaks_of_the_recipe_gpus():
    assert dense_bf16_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert dense_bf16_peak_flops("NVIDIA H200") == 989e12
    assert dense_bf16_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert dense_bf16_peak_flops("cpu") is None
    assert dense_bf16_peak_flops("Some Future GPU") is None


def test_eta_is_formatted_as_a_clock():
    assert format_duration(83) == "0:01:23"
    assert format_duration(2 * 86400 + 3725) == "2d 01:02:05"
    assert format_duration(float("nan")) == "--"


def test_run_log_restart_drops_the_steps_after_the_restart_point(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = RunLog(path, first_step=1)
    for step in (1, 2, 3, 4):
        first.write(step, {"train/loss": 10.0 - step})
    first.close()
    # Resumed from the step-2 checkpoint: steps 3 and 4 are redone.
    second = RunLog(path, first_step=3)
    second.write(3, {"train/loss": 0.5})
    second.close()
    assert series(read_run_log(path), "train/loss") == {1: 9.0, 2: 8.0, 3: 0.5}


def test_run_log_drops_a_line_torn_by_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = RunLog(path, first_step=1)
    log.write(1, {"train/loss": 2.0, "train/grad_norm": float("nan")})
    log.close()
    with open(path, "a") as f:
        f.write('{"step":2,"time":1.0,"train/lo')  # a write cut short
    assert [r["step"] for r in read_run_log(path)] == [1]
    assert math.isnan(read_run_log(path)[0]["train/grad_norm"])
    RunLog(path, first_step=2).close()
    assert path.read_text().count("\n") == 1 and path.read_text().endswith("\n")


def _in_child_with_file_size_limit(limit: int, action) -> int:
    """Run ``action`` in a forked child whose files may not grow past ``limit`` bytes.

    RLIMIT_FSIZE gives real short writes and EFBIG errors on a real file, as a
    full disk does; the child keeps the limit from the test process. Returns
    the child's exit code: 0 if ``action`` returned, 1 if it raised.
    """
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
            action(lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard)))
            code = 0
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_run_log_write_that_fails_warns_and_the_run_goes_on(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    log = RunLog(path, first_step=1)
    log.write(1, {"train/loss": 3.0})
    saved = os.dup(log._fd)
    full = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC, as on a full disk
    os.dup2(full, log._fd)
    with caplog.at_level(logging.WARNING):
        log.write(2, {"train/loss": 2.0})
    assert "step 2 not recorded" in caplog.text and "No space left" in caplog.text
    os.dup2(saved, log._fd)  # space again
    log.write(3, {"train/loss": 1.0})
    log.close()
    os.close(saved)
    os.close(full)
    assert series(read_run_log(path), "train/loss") == {1: 3.0, 3: 1.0}


def test_run_log_short_write_never_merges_with_the_next_record(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    log = RunLog(path, first_step=1)
    log.write(1, {"train/loss": 3.0})
    size = path.stat().st_size

    def fill_the_disk_mid_line(free_space):
        log.write(2, {"train/loss": 2.0})  # 10 bytes land, then EFBIG
        free_space()
        log.write(3, {"train/loss": 1.0})

    assert _in_child_with_file_size_limit(size + 10, fill_the_disk_mid_line) == 0
    lines = path.read_text().split("\n")
    assert len(lines[1]) == 10 and lines[1].startswith('{"step":2')  # the torn line
    with caplog.at_level(logging.WARNING):
        records = read_run_log(path)
    assert series(records, "train/loss") == {1: 3.0, 3: 1.0}
    assert f"{path}:2: unreadable run-log line skipped" in caplog.text


def test_run_log_restart_that_cannot_rewrite_the_log_keeps_it_and_trains_on(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = RunLog(path, first_step=1)
    for step in (1, 2, 3):
        log.write(step, {"train/loss": float(step)})
    log.close()
    before = path.read_bytes()

    def restart_on_a_full_disk(free_space):
        restarted = RunLog(path, first_step=2)  # the rewrite hits EFBIG
        restarted.write(2, {"train/loss": 9.0})
        restarted.close()

    assert _in_child_with_file_size_limit(5, restart_on_a_full_disk) == 0
    assert path.read_bytes() == before
    assert not path.with_name(path.name + ".tmp").exists()


def test_run_log_skips_a_malformed_middle_line_naming_it(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    log = RunLog(path, first_step=1)
    for step in (1, 2, 3, 4):
        log.write(step, {"train/loss": float(step)})
    log.close()
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = '{"step":2,"time":1.0,"train/lo\n'  # a line torn in the middle of the file
    lines[2] = '["not", "a", "record"]\n'
    path.write_text("".join(lines))
    with caplog.at_level(logging.WARNING):
        assert series(read_run_log(path), "train/loss") == {1: 1.0, 4: 4.0}
    assert f"{path}:2: unreadable" in caplog.text and f"{path}:3: run-log line without" in caplog.text
    # A restart reads past them too, and its rewrite leaves only readable lines.
    RunLog(path, first_step=4).close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1]


@pytest.fixture
def processor(tmp_path):
    """A metrics processor of a TP=2 run (two GPUs share each rank's tokens), logging to tmp_path."""
    config = load_job_config(TINY_CONFIG, [
        "--job.dump_folder", str(tmp_path), "--metrics.enable_tensorboard", "false"])
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=2, pp=1, ep=1, etp=1, world_size=2)
    processor = SwallowMetricsProcessor(config, dims)
    processor.start(first_step=1)
    yield processor
    processor.close()


def test_throughput_flops_mfu_step_time_and_data_wait_follow_from_what_was_counted(processor):
    steps, tokens, flops_per_token = 5, 8192, 3.0e9
    processor.num_flops_per_token = flops_per_token
    processor.peak_flops = 989e12  # as on an H100/H200 (CPU has none)
    processor.ntokens_since_last_log = tokens
    processor.data_loading_times.extend([0.01, 0.03])
    processor.log(steps, 2.0, 2.5, 1.0)  # five steps since the run began
    (record,) = read_run_log(processor.run_log_path())
    step_time = record["perf/step_time_s"]
    interval = step_time * steps
    # this rank's tokens, shared by the tp = 2 GPUs that processed them
    assert record["perf/tokens_per_s_per_gpu"] == pytest.approx(tokens / (interval * 2), rel=1e-9)
    tflops = record["perf/tokens_per_s_per_gpu"] * flops_per_token / 1e12
    assert record["perf/tflops_per_gpu"] == pytest.approx(tflops, rel=1e-9)
    assert record["perf/mfu_pct"] == pytest.approx(100 * tflops * 1e12 / 989e12, rel=1e-9)
    assert record["perf/data_wait_s"] == pytest.approx(0.02, rel=1e-9)
    assert record["perf/data_wait_pct"] == pytest.approx(100 * 0.04 / interval, rel=1e-9)
    assert record["train/loss"] == 2.0 and record["train/loss_max"] == 2.5


def test_validation_mean_counts_each_set_the_same_whatever_its_loss(processor):
    processor.log_validation_sets(4, {"ja": 2.0, "en": 3.0, "code": 7.0}, 1.5)
    (record,) = read_run_log(processor.run_log_path())
    assert record["val/loss"] == pytest.approx(4.0)
    assert record["val/perplexity"] == pytest.approx(math.exp(4.0))
    assert record["val/code/perplexity"] == pytest.approx(math.exp(7.0))
    assert record["val/time_s"] == 1.5


@pytest.fixture(scope="module")
def monitored(seed_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("monitored") / "run"
    result = run_training(folder, *MONITORED, *from_seed(seed_checkpoint)).check()
    return folder, result


@pytest.mark.slow
def test_tensorboard_has_the_training_scalars_at_every_log_step(monitored):
    folder, _ = monitored
    expected = [
        "train/loss", "train/grad_norm", "train/lr", "train/tokens_seen",
        "train/skipped_steps", "perf/tokens_per_s_per_gpu", "perf/tflops_per_gpu",
        "perf/step_time_s", "perf/data_wait_s", "memory/peak_reserved_gib",
    ]
    for tag in expected:
        assert sorted(scalars(folder, tag)) == list(range(1, STEPS + 1)), tag
    tokens = scalars(folder, "train/tokens_seen")
    assert tokens[STEPS] == STEPS * 8 * 64  # global batch 8 x seq 64 per step


@pytest.mark.slow
def test_run_log_has_every_tensorboard_scalar_at_its_step(monitored):
    folder, result = monitored
    tags = events(folder).Tags()["scalars"]
    assert "train/loss" in tags and "val/ja/loss" in tags
    for tag in tags:
        # TensorBoard keeps float32; the run log the float64 it was given.
        assert series(result.history, tag) == pytest.approx(scalars(folder, tag), rel=1e-6), tag
    assert all(r["time"] > 1e9 for r in result.history)  # wall time, seconds since the epoch


@pytest.mark.slow
def test_tensorboard_has_no_mfu_on_cpu(monitored):
    folder, _ = monitored
    assert not [t for t in events(folder).Tags()["scalars"] if "mfu" in t]


@pytest.mark.slow
def test_tensorboard_has_the_data_mixture_metrics(monitored):
    folder, _ = monitored
    shares = [scalars(folder, f"data/{s}/share")[STEPS] for s in SOURCES]
    assert sum(shares) == pytest.approx(1.0)
    for source in SOURCES:
        assert scalars(folder, f"data/{source}/tokens")[STEPS] > 0
        assert scalars(folder, f"data/{source}/epoch")[STEPS] >= 1


@pytest.mark.slow
def test_config_and_hyperparameters_are_written_once_as_text(monitored):
    folder, _ = monitored
    accumulator = events(folder)
    texts = {
        tag: accumulator.Tensors(tag)
        for tag in ("config/hyperparameters/text_summary", "config/resolved/text_summary")
    }
    for tag, written in texts.items():
        assert [e.step for e in written] == [1], tag
    table = texts["config/hyperparameters/text_summary"][0].tensor_proto.string_val[0].decode()
    assert "| optimizer.lr | 0.003 |" in table and "| data.ja_sample.weight | 0.4 |" in table
    resolved = texts["config/resolved/text_summary"][0].tensor_proto.string_val[0].decode()
    assert '"seq_len": 64' in resolved


@pytest.mark.slow
def test_hyperparameters_are_in_tensorboards_hparams_view(monitored):
    from tensorboard.plugins.hparams import plugin_data_pb2

    folder, _ = monitored
    content = events(folder).PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["optimizer.lr"].number_value == pytest.approx(3e-3)
    assert hparams["model.flavor"].string_value == "tiny"


@pytest.mark.slow
def test_progress_line_has_step_total_tokens_loss_throughput_and_eta(monitored):
    _, result = monitored
    lines = [l for l in ANSI.sub("", result.output).splitlines() if re.search(r"step:\s*\d+/", l)]
    assert len(lines) == STEPS  # one per log step (log_freq 1)
    pattern = re.compile(
        rf"step: (\d+)/{STEPS}  loss: +[\d.]+  tokens: [\d.]+K?  tps: [\d,]+  "
        r"eta: (\d+:\d\d:\d\d|--)  grad_norm:"
    )
    steps = [int(pattern.search(line).group(1)) for line in lines]
    assert steps == list(range(1, STEPS + 1))
    assert pattern.search(lines[-1]).group(2) == "0:00:00"  # nothing left at the last step


@pytest.mark.slow
def test_validation_logs_each_domain_separately(monitored):
    folder, result = monitored
    losses = {name: scalars(folder, f"val/{name}/loss") for name in SETS}
    for name in SETS:
        assert sorted(losses[name]) == [1, 2, 4], name  # step 1, then every 2 steps
        perplexity = scalars(folder, f"val/{name}/perplexity")
        assert perplexity[4] == pytest.approx(math.exp(losses[name][4]), rel=1e-5)
    at_4 = [losses[name][4] for name in SETS]
    assert len(set(at_4)) == len(SETS)  # separate numbers, not one copied
    assert scalars(folder, "val/loss")[4] == pytest.approx(sum(at_4) / len(SETS), rel=1e-6)
    assert sorted(result.validation_losses) == [1, 2, 4]


@pytest.mark.slow
@pytest.mark.distributed
def test_validation_under_fsdp2_matches_one_process(seed_checkpoint, monitored, tmp_path):
    one_folder, _ = monitored
    result = run_training(
        tmp_path / "fsdp",
        *MONITORED,
        *from_seed(seed_checkpoint),
        *FSDP2,
        nproc=2,
    ).check()
    assert "Applied FSDP to the model" in result.output
    for name in SETS:
        assert scalars(tmp_path / "fsdp", f"val/{name}/loss") == pytest.approx(
            scalars(one_folder, f"val/{name}/loss"), rel=1e-4
        ), name
