"""Mixture stages ([[data.stages]]): exact within each stage, resumed exactly
across a stage boundary on the same or another GPU count, refused when the
current stage changed, checked in the config, shown by the plan and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction

import pytest

from support import REPO, TINY_CONFIG
from support.data import make_loaders, make_spec, run_global_batches, sample_sources
from swallow_titan.config.manager import ConfigError, load_job_config
from swallow_titan.config.sections import MixtureStage
from swallow_titan.data.slots import iter_slot_batches

STAGES = [
    MixtureStage("broad", 5, {"ja": 1, "en": 1, "code": 2}),
    MixtureStage("anneal", 0, {"math": 3, "code": 1}),
]


def staged_spec(stages=STAGES, **kw):
    return make_spec(sample_sources(ja=1, en=1, code=1, math=1), seq_len=32, global_batch=8,
                     stages=stages, **kw)


def test_each_stage_keeps_its_own_weights_within_one_sequence():
    spec = staged_spec()
    names = spec.names
    counts = {n: 0 for n in names}
    for b, batch in enumerate(iter_slot_batches(spec, range(8), {})):
        stage = STAGES[0] if b < 5 else STAGES[1]
        start = 0 if b < 5 else 5
        if b == 5:
            counts = {n: 0 for n in names}  # the anneal stage counts from its start
        for window in batch.values():
            counts[names[window.source]] += 1
        done = 8 * (b + 1 - start)
        total = sum(stage.weights.values())
        for n in names:
            target = Fraction(stage.weights.get(n, 0)) / total * done
            assert abs(counts[n] - target) < 1, (b, n, counts)  # Tijdeman's bound
        if b == 11:
            break
    assert counts["ja"] == counts["en"] == 0  # not in the anneal stage


@pytest.mark.parametrize("stop", [3, 5, 7])  # before, at and after the boundary
def test_resume_across_the_stage_boundary_is_exact_on_another_gpu_count(stop):
    spec = staged_spec()
    whole = run_global_batches(make_loaders(spec, 1, 8), 10)
    first = make_loaders(spec, 2, 2)
    part = run_global_batches(first, stop)
    state = {k: v for loader in first for k, v in loader.state_dict().items()}
    again = run_global_batches(make_loaders(spec, 2, 2, state=state), 10 - stop)
    other = run_global_batches(make_loaders(spec, 4, 1, state=state), 10 - stop)
    assert part + again == whole and part + other == whole


def test_stage_metric_and_stage_of_the_state():
    spec = staged_spec()
    (loader,) = make_loaders(spec, 1, 8)
    run_global_batches([loader], 5)
    assert loader.metrics()["data/stage"] == 1
    run_global_batches([loader], 1)  # iterators restart from the consumed state
    assert loader.metrics()["data/stage"] == 2
    assert loader.consumed_states()[0]["stage_name"] == "anneal"


def test_resume_with_the_current_stage_changed_is_refused():
    spec = staged_spec()
    (loader,) = make_loaders(spec, 1, 8)
    run_global_batches([loader], 6)
    changed = staged_spec([STAGES[0], MixtureStage("anneal", 0, {"math": 1, "code": 1})])
    with pytest.raises(ValueError, match="mixture stage 'anneal'"):
        make_loaders(changed, 1, 8, state=loader.state_dict())
    # A later stage may change: resuming inside "broad" ignores "anneal"'s weights.
    (early,) = make_loaders(spec, 1, 8)
    run_global_batches([early], 2)
    make_loaders(changed, 1, 8, state=early.state_dict())


def test_no_stages_is_the_sources_weights_for_the_whole_run():
    plain = make_spec(sample_sources(ja=1, math=3), seq_len=32, global_batch=8)
    staged = make_spec(sample_sources(ja=1, math=3), seq_len=32, global_batch=8,
                       stages=[MixtureStage("all", 0, {"ja": 1, "math": 3})])
    assert run_global_batches(make_loaders(plain, 1, 8), 4) == run_global_batches(
        make_loaders(staged, 1, 8), 4)


STAGE_TOML = """
[[data.stages]]
name = "main"
until_step = {until}
weights = {{ ja_sample = 0.5, en_sample = 0.5 }}

[[data.stages]]
name = "anneal"
weights = {{ {anneal} }}
"""


def config_with_stages(tmp_path, until=40, anneal="math_sample = 1, code_sample = 1"):
    path = tmp_path / "job.toml"
    path.write_text(TINY_CONFIG.read_text() + STAGE_TOML.format(until=until, anneal=anneal))
    return path


@pytest.mark.parametrize("until,anneal,expected", [
    (40, "nope = 1", "data.stages[1].weights: 'nope' is not a [[data.sources]] name"),
    (60, "math_sample = 1", "data.stages[0].until_step: 60 leaves no step"),
    (40, "math_sample = 0", "data.stages[1].weights: give at least one source"),
    (40, "math_sample = -1", "data.stages[1].weights.math_sample: must be >= 0"),
])
def test_bad_stages_are_rejected_naming_the_key(tmp_path, until, anneal, expected):
    from swallow_titan.components.preflight import check_job_config

    path = config_with_stages(tmp_path, until, anneal)
    with pytest.raises(ConfigError) as e:
        check_job_config(load_job_config(path), 1, str(path))
    assert expected in str(e.value)


def test_plan_shows_tokens_per_stage_and_the_lr_at_each_boundary(tmp_path):
    path = config_with_stages(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "swallow_titan.plan", str(path), "--ngpu", "1", "--json",
         "--lr_scheduler.decay_ratio", "0.2"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    plan = json.loads(proc.stdout)
    main, anneal = plan["stages"]
    steps, per_step = plan["steps"], plan["global_batch_tokens"]
    assert (main["first_step"], main["last_step"], anneal["first_step"]) == (1, 40, 41)
    assert anneal["last_step"] == steps
    assert main["tokens"] == {"ja_sample": 20 * per_step, "en_sample": 20 * per_step}
    half = (steps - 40) * per_step // 2
    assert anneal["tokens"] == {"math_sample": half, "code_sample": half}
    assert anneal["lr_at_first_step"] == plan["lr_at_step"]["41"]
    # WSD: torchtitan decays over the last round(0.2 x steps) steps; its lambda at
    # step s - 1 (step s's LR) first drops below the peak one step after the
    # stable phase's end (steps + 1 - decay), so at steps - decay + 2.
    assert plan["lr_decay_start_step"] == steps - round(0.2 * steps) + 2
    sources = {s["name"]: s for s in plan["sources"]}
    assert sources["ja_sample"]["planned_tokens"] == 20 * per_step


def test_the_data_cli_reports_the_current_stage(tmp_path):
    path = config_with_stages(tmp_path, until=2)
    proc = subprocess.run(
        [sys.executable, "-m", "swallow_titan.data", str(path), "--batches", "3", "--json",
         "--training.seq_len", "64"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["stage"] == {"name": "anneal", "number": 2, "stages": 2}
    weights = {s["name"]: s["weight"] for s in report["sources"]}
    assert weights == {"ja_sample": 0, "en_sample": 0, "code_sample": 1, "math_sample": 1}


@pytest.mark.slow
def test_a_run_trains_through_a_stage_boundary_on_megatron_data_and_logs_the_stage(tmp_path):
    # The whole path in a real torchtitan run: a Megatron source in the mixture,
    # two stages, TensorBoard's data/stage switching at the boundary.
    from support import tiny_tokenizer
    from support.data import numbered_docs
    from support.megatron import write_megatron
    from support.runs import run_training
    from support.tensorboard import scalars

    tok = tiny_tokenizer()
    write_megatron(tmp_path / "mega" / "code_text_document",
                   [[*tok.encode_ordinary(t), tok.eos_id] for t in numbered_docs(300, "c")])
    text = TINY_CONFIG.read_text()
    old = 'path = "./assets/samples/code.jsonl"'
    text = text.replace(old, f'format = "megatron"\npath = "{tmp_path}/mega/*.bin"')
    path = tmp_path / "job.toml"
    path.write_text(text + STAGE_TOML.format(until=2, anneal="code_sample = 1, math_sample = 1"))
    result = run_training(tmp_path / "run", "--training.steps", "4",
                          "--metrics.enable_tensorboard", "true", config=path).check()
    assert sorted(result.losses) == [1, 2, 3, 4]
    assert "data stage 'anneal' (2 of 2) begins at step 3" in result.output
    assert scalars(tmp_path / "run", "data/stage") == {1: 1, 2: 1, 3: 2, 4: 2}
    shares = scalars(tmp_path / "run", "data/code_sample/share")
    assert shares[2] == 0 and shares[4] > 0  # read only in the anneal stage
