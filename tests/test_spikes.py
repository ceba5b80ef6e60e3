"""Loss-spike detection ([guard] on_spike): log, skip and rollback, on a poisoned data window.

The end-to-end runs train the tiny model on the shipped samples through three
mixture stages: clean data, then one step (``SPIKE``) whose batch is mostly a
source of random characters (real documents through the real pipeline), then
clean data again. The loss and gradient norm jump at that step only.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

from support import TINY_CONFIG
from support.data import make_loaders, make_spec, sample_sources
from support.runs import TrainingProcess, run_training, series
from support.tensorboard import events
from swallow_titan.checkpoint.dcp_reader import DCPCheckpoint
from swallow_titan.checkpoint.integrity import write_manifest
from swallow_titan.components.guard import (
    SPIKES_ENTRY,
    SpikeDetector,
    SpikeError,
    SpikeGuard,
    describe_spike,
    robust_score,
    spike_events,
)
from swallow_titan.config.errors import ExitCode
from swallow_titan.data.dataloader import LabelsInInputs

# ------------------------------------------------------------------ units


def test_robust_score_is_median_and_scaled_mad():
    median, spread, score = robust_score(10.0, [1.0, 2.0, 3.0, 4.0, 100.0])
    # median 3; |deviations| 2, 1, 0, 1, 97 -> MAD 1; spread 1.4826.
    assert (median, spread) == (3.0, 1.4826)
    assert score == pytest.approx(7 / 1.4826)


def test_robust_score_spread_has_a_floor_for_a_flat_window():
    _, spread, score = robust_score(2.001, [2.0] * 8)
    assert spread == pytest.approx(2e-3)
    assert score == pytest.approx(0.5)


def test_detector_judges_only_a_full_window_and_only_upward_jumps():
    detector = SpikeDetector(window=4, threshold=6.0, metrics=["loss"])
    assert detector.observe({"loss": 100.0}) == {}  # window empty: no verdict
    detector.load_state_dict({"loss": [2.0, 2.1, 1.9, 2.0]})
    assert detector.observe({"loss": 0.1}) == {}  # a fall is no spike
    found = detector.observe({"loss": 5.0})
    assert set(found) == {"loss"} and found["loss"]["score"] > 6


def test_detector_learns_a_lasting_change_of_level():
    detector = SpikeDetector(window=8, threshold=6.0, metrics=["loss"])
    detector.load_state_dict({"loss": [2.0, 2.02, 1.98, 2.01, 1.99, 2.0, 2.03, 1.97]})
    verdicts = [bool(detector.observe({"loss": 3.0 + 0.01 * i})) for i in range(8)]
    # The new level is flagged until it holds half the window, then it is normal.
    assert verdicts[0] and not verdicts[-1]
    assert verdicts.index(False) <= 5


def _guard(action: str, **kw) -> SpikeGuard:
    args = dict(window=4, threshold=6.0, metrics=["loss", "grad_norm"],
                max_rollbacks=1, max_consecutive_skips=2)
    args.update(kw)
    guard = SpikeGuard(action, **args)
    guard.detector.load_state_dict({"loss": [2.0, 2.1, 1.9, 2.0], "grad_norm": [1.0, 1.1, 0.9, 1.0]})
    return guard


def test_skip_counts_and_stops_after_too_many_spikes_in_a_row():
    guard = _guard("skip")
    event = guard.judge(5, {"loss": 9.0, "grad_norm": 1.0})
    assert event["action"] == "skip" and set(event["spikes"]) == {"loss"}
    assert guard.skipped_steps == 1
    with pytest.raises(SpikeError, match="2 steps in a row"):
        guard.judge(6, {"loss": 9.0, "grad_norm": 9.0})


def test_rollback_stops_after_max_rollbacks():
    guard = _guard("rollback")
    event = guard.judge(5, {"loss": 9.0, "grad_norm": 1.0})
    guard.record(event)
    assert guard.rollbacks == 1
    with pytest.raises(SpikeError, match=r"after 1 rollback\(s\) \(\[guard\] max_rollbacks = 1\)"):
        guard.judge(6, {"loss": 2.0, "grad_norm": 9.0})


def test_spike_guard_state_survives_a_checkpoint():
    guard = _guard("log")
    guard.record(guard.judge(5, {"loss": 9.0, "grad_norm": 1.0}))
    restored = _guard("log")
    restored.load_state_dict(guard.state_dict())
    assert restored.detector.history == guard.detector.history
    assert restored.events == guard.events == spike_events(guard.state_dict())


def test_on_spike_rollback_needs_writable_checkpoints(tmp_path):
    from swallow_titan.config.errors import ConfigError
    from swallow_titan.config.manager import SwallowConfigManager
    from swallow_titan.config.checks import check_values

    def check(*args):
        config = SwallowConfigManager().parse_args(["--job.config_file", str(TINY_CONFIG), *args])
        check_values(config, 1, "job.toml")

    check("--guard.on_spike", "rollback")  # the tiny config checkpoints
    with pytest.raises(ConfigError, match="job.toml: guard.on_spike: .*checkpoint.enable"):
        check("--guard.on_spike", "rollback", "--checkpoint.enable", "false")
    with pytest.raises(ConfigError, match="guard.spike_metrics"):
        check("--guard.spike_metrics", "perplexity")
    with pytest.raises(ConfigError, match="guard.spike_window: must be >= 4"):
        check("--guard.spike_window", "3")


def test_the_loader_names_each_rows_source_and_its_position():
    loaders = make_loaders(make_spec(sample_sources(ja=1, en=1), global_batch=8), dp=1, local=4)
    loader = loaders[0]
    it = iter(loader)
    for _ in range(2 * loader.microsteps):  # two global batches
        next(it)
    rows = loader.last_step_sources()
    assert len(rows) == loader.microsteps and all(len(r) == 4 for r in rows)
    # The schedule gives each of two equal sources half of every batch.
    assert sorted(sum(rows, [])) == ["en"] * 4 + ["ja"] * 4
    assert loader.batches_consumed() == 2
    # The fused loss's wrapper (labels in the inputs) answers the same.
    wrapped = LabelsInInputs(loader)
    assert (wrapped.last_step_sources(), wrapped.batches_consumed()) == (rows, 2)


# ------------------------------------------------------------------ end to end

SPIKE = 14  # the poisoned step
STEPS = 16
WINDOW = "8"  # the default threshold (6), a window a short run fills

JUNK_SOURCE = """
[[data.sources]]
name = "junk"
domain = "junk"
weight = 0.2
path = "{junk}"
"""
STAGE = """
[[data.stages]]
name = "{name}"
{until}weights = {{ {weights} }}
"""
CLEAN = "ja_sample = 0.5, en_sample = 0.5"
POISON = "en_sample = 0.25, junk = 0.75"  # 6 junk and 2 en windows of 8


def poisoned_config(folder: Path, poisoned_batches: list[int]) -> Path:
    """The tiny config with a junk source that only ``poisoned_batches`` read."""
    rng = random.Random(0)
    alphabet = [chr(c) for c in (*range(0x21, 0x7F), *range(0x3041, 0x3097), *range(0x4E00, 0x50F4))]
    junk = folder / "junk.jsonl"
    junk.write_text("".join(
        json.dumps({"text": "".join(rng.choice(alphabet) for _ in range(400))}) + "\n"
        for _ in range(100)
    ))
    stages = ""
    for i, batch in enumerate(poisoned_batches):
        stages += STAGE.format(name=f"clean{i}", until=f"until_step = {batch - 1}\n", weights=CLEAN)
        stages += STAGE.format(name=f"poison{i}", until=f"until_step = {batch}\n", weights=POISON)
    stages += STAGE.format(name="clean", until="", weights=CLEAN)
    config = folder / "job.toml"
    config.write_text(TINY_CONFIG.read_text() + JUNK_SOURCE.format(junk=junk) + stages)
    return config


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory) -> Path:
    """The tiny config with a junk source read only at step SPIKE."""
    return poisoned_config(tmp_path_factory.mktemp("poisoned"), [SPIKE])


def _train(folder: Path, config: Path, *overrides: str):
    return run_training(folder, "--training.steps", str(STEPS),
                        "--guard.spike_window", WINDOW, *overrides, config=config)


def _events(history: list[dict]) -> list[dict]:
    return [r for r in history if "spike/step" in r]


@pytest.fixture(scope="module")
def skip_run(poisoned, tmp_path_factory):
    """on_spike = "skip", a checkpoint every 2 steps, TensorBoard on."""
    folder = tmp_path_factory.mktemp("skip") / "run"
    result = _train(folder, poisoned, "--guard.on_spike", "skip",
                    "--checkpoint.enable", "true", "--checkpoint.interval", "2",
                    "--metrics.enable_tensorboard", "true").check()
    return folder, result


@pytest.mark.slow
def test_the_poisoned_step_alone_is_a_spike_with_its_domain_losses(skip_run):
    folder, result = skip_run
    (event,) = _events(result.history)
    assert event["step"] == SPIKE and event["spike/step"] == SPIKE
    assert event["spike/action"] == 2 and event["spike/data_batch"] == SPIKE
    assert event["spike/loss_score"] > 6 and event["spike/loss"] == result.losses[SPIKE]
    # The junk rows carry the spike; the clean rows of the same batch do not.
    junk, en = event["spike/domain/junk/loss"], event["spike/domain/en/loss"]
    assert junk > en + 2 and en < result.losses[SPIKE - 1]
    # The stage's 8 rows are 6 junk and 2 en windows of equal length, so the
    # domain losses average to the step's loss (same weights, another forward).
    assert (6 * junk + 2 * en) / 8 == pytest.approx(result.losses[SPIKE], rel=1e-5)
    assert "step 14: loss spike" in result.output
    tb = events(folder)
    assert tb.Scalars("spike/step")[0].step == SPIKE
    (note,) = [t for t in tb.Tensors("guard/spikes/text_summary")]
    assert "action: skip" in note.tensor_proto.string_val[0].decode()
    # The checkpoint holds the event (what the model card reads).
    ckpt = DCPCheckpoint(folder / "checkpoint" / f"step-{STEPS}")
    (saved,) = spike_events(ckpt.read_entry(SPIKES_ENTRY))
    assert saved["step"] == SPIKE and saved["domain_losses"]["junk"] == pytest.approx(junk)


@pytest.mark.slow
def test_skip_equals_a_run_without_that_update(skip_run, poisoned, tmp_path):
    """The reference drops the same update through the NaN guard (no spike detection)."""
    _, skipped = skip_run
    reference = _train(tmp_path / "run", poisoned, "--guard.on_spike", "off",
                       "--debug.inject_nonfinite_at_steps", str(SPIKE)).check()
    assert _events(reference.history) == []
    assert {s: v for s, v in skipped.losses.items() if s != SPIKE} == {
        s: v for s, v in reference.losses.items() if s != SPIKE
    }
    assert series(skipped.history, "train/skipped_steps")[STEPS] == 1


def _splice(checkpoint: Path, data_from: Path, out: Path, step: int) -> None:
    """``checkpoint`` with the dataloader entry of ``data_from``, published as ``out``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

    dcp_to_torch_save(checkpoint, out.parent / "model.pt")
    dcp_to_torch_save(data_from, out.parent / "data.pt")
    state = torch.load(out.parent / "model.pt", weights_only=False)
    state["dataloader"] = torch.load(out.parent / "data.pt", weights_only=False)["dataloader"]
    torch.save(state, out.parent / "spliced.pt")
    torch_save_to_dcp(out.parent / "spliced.pt", out)
    write_manifest(str(out), step)


@pytest.mark.slow
def test_rollback_equals_a_run_that_never_saw_the_window_even_after_a_sigkill(
    skip_run, poisoned, tmp_path
):
    """Rollback from the spike at step 14 to the checkpoint of step 12 skips data
    batches 13-14. The reference resumes from the skip run's step-12 checkpoint
    with the data position of its step 14 spliced in: a model that never saw
    those batches. The rollback run is killed after the rollback and restarted."""
    skip_folder, skipped = skip_run
    back_to = 12
    reference_folder = tmp_path / "reference"
    (reference_folder / "checkpoint").mkdir(parents=True)
    _splice(skip_folder / "checkpoint" / f"step-{back_to}",
            skip_folder / "checkpoint" / f"step-{SPIKE}",
            reference_folder / "checkpoint" / f"step-{back_to}", back_to)
    never_saw = _train(reference_folder, poisoned, "--checkpoint.enable", "true",
                       "--checkpoint.interval", "100").check()
    assert sorted(never_saw.losses) == list(range(back_to + 1, STEPS + 1))

    rollback = ("--training.steps", str(STEPS), "--guard.spike_window", WINDOW,
                "--guard.on_spike", "rollback", "--checkpoint.enable", "true",
                "--checkpoint.interval", "4")
    run = TrainingProcess(tmp_path / "run", *rollback, config=poisoned)
    # The message comes after the checkpoint is written again and the run log
    # restarted, so the step waited for is the first one after the rollback.
    run.wait_for(lambda: "rolled back to step-12" in run.output, "the rollback")
    run.wait_for_step(back_to + 1)
    run.kill()
    killed = run.wait()
    assert STEPS not in killed.losses, "the run finished before it was killed"
    assert "step 14: rolled back to step-12; data batches 13-14 are skipped" in killed.output

    resumed = run_training(tmp_path / "run", *rollback, config=poisoned).check()
    # From the checkpoint written again at the rollback: past the skipped data,
    # so the poisoned batch is not met again.
    assert f"Loading the checkpoint from {tmp_path / 'run'}/checkpoint/step-12" in resumed.output
    assert "loss spike" not in resumed.output
    # Bit for bit: before the checkpoint the skip run's losses, after it the
    # losses of the model that never saw the window. series() refuses a step
    # logged twice, so the run log holds each step once.
    expected = {s: skipped.losses[s] for s in range(1, back_to + 1)} | never_saw.losses
    assert series(resumed.history, "train/loss") == expected
    (event,) = _events(resumed.history)
    assert (event["step"], event["spike/step"], event["spike/action"]) == (back_to, SPIKE, 3)
    assert event["spike/rolled_back_to"] == back_to and event["spike/skipped_batches"] == 2
    (saved,) = spike_events(
        DCPCheckpoint(tmp_path / "run" / "checkpoint" / f"step-{STEPS}").read_entry(SPIKES_ENTRY)
    )
    assert saved["skipped_batches"] == [13, 14] and saved["rolled_back_to"] == back_to
    assert "data batches 13-14 skipped" in describe_spike(saved)
    # The export's model card reads the same events from the checkpoint.
    from swallow_titan.hf.export import training_summary
    from swallow_titan.hf.run_record import RunRecord

    checkpoint = DCPCheckpoint(tmp_path / "run" / "checkpoint" / f"step-{STEPS}")
    assert training_summary(checkpoint, RunRecord(hf_config={}), None).spike_events == [saved]


@pytest.mark.slow
@pytest.mark.distributed
def test_under_fsdp_a_spike_after_max_rollbacks_stops_with_status_6(tmp_path):
    """Two poisoned batches, FSDP over 2 processes, max_rollbacks = 1: the first
    spike rolls back (an in-process checkpoint load after the domain losses'
    extra forward), the second ends the run with status 6. Data batch 18 is
    trained at step 16, two batches having been skipped."""
    config = poisoned_config(tmp_path, [SPIKE, 18])
    result = run_training(tmp_path / "run", "--training.steps", "20",
                          "--guard.spike_window", WINDOW, "--guard.on_spike", "rollback",
                          "--guard.max_rollbacks", "1", "--checkpoint.enable", "true",
                          "--checkpoint.interval", "4", nproc=2, config=config)
    assert ExitCode.SPIKES == 6
    assert re.search(r"exitcode\s*:\s*6\b", result.output), result.output[-3000:]
    assert "step 14: rolled back to step-12; data batches 13-14 are skipped" in result.output
    assert "step 16: loss spike" in result.output
    assert "after 1 rollback(s) ([guard] max_rollbacks = 1); stopping" in result.output
    assert sorted(series(result.history, "train/loss")) == list(range(1, 16))
    (event,) = _events(result.history)
    junk, en = event["spike/domain/junk/loss"], event["spike/domain/en/loss"]
    # Per-domain sums over both ranks: they average to the step's global loss.
    assert (6 * junk + 2 * en) / 8 == pytest.approx(event["spike/loss"], rel=1e-5)
