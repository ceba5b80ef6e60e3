"""What a person watching a run sees: TensorBoard scalars and text, progress lines, per-domain validation."""

from __future__ import annotations

import math
import re

import pytest

from support.overrides import FSDP2
from support.runs import ANSI, from_seed, run_training, series
from support.tensorboard import events, scalars
from swallow_titan.components.metrics import RunLog, dense_bf16_peak_flops, format_duration, read_run_log

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
