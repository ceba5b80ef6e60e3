"""[eval] inside real training runs, and python -m swallow_titan.evaluate on their checkpoints.

The runs are tensor parallel over 2 processes (gloo), so the adapter reads
vocabulary-sharded logits (DTensors) and every collective of evaluation has to
line up across ranks; a run without [eval] of the same layout is the
reference for the losses. The run with [eval] keeps an EMA of the weights
([averaging]), evaluated beside them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO
from support.eval import EVAL_TASKS, MC_TASK, QA_TASK, own_copy
from support.runs import (
    RunResult,
    TrainingProcess,
    free_port,
    loaded_step,
    run_log,
    run_training,
    series,
    training_env,
)

pytest.importorskip("lm_eval")
pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 3
FREQ = 2
LIMIT = 4
EVAL = [
    "--eval.enable", "true",
    "--eval.freq", str(FREQ),
    "--eval.tasks", f"{MC_TASK},{QA_TASK}",
    "--eval.include_path", str(EVAL_TASKS.relative_to(REPO)),
    "--eval.max_gen_toks", "16",
    "--eval.limit", str(LIMIT),
    "--eval.batch_size", "3",
]
EMA_DECAY = 0.5
RUN = [
    "--training.steps", str(STEPS),
    "--parallelism.tensor_parallel_degree", "2",
    "--checkpoint.enable", "true",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval_runs")
    with_eval = run_training(
        base / "with", *RUN, *EVAL, "--metrics.enable_tensorboard", "true",
        "--averaging.ema_decay", str(EMA_DECAY), nproc=2,
    ).check()
    without = run_training(base / "without", *RUN, nproc=2).check()
    return base / "with", with_eval, without


def eval_lines(result: RunResult, prefix: str = "eval/") -> dict[int, dict[str, float]]:
    """step -> {"<task>/<metric>": value} of the evaluations in the run log.

    ``prefix`` "eval/" is the trained weights' (the EMA's, eval/ema/..., left
    out), "eval/ema/" the EMA's.
    """
    logged = {}
    for record in result.history:
        scores = {
            tag.removeprefix(prefix): value for tag, value in record.items()
            if tag.startswith(prefix) and tag != f"{prefix}time_s"
            and (prefix != "eval/" or not tag.startswith("eval/ema/"))
        }
        if scores:
            logged[record["step"]] = scores
    return logged


def test_training_losses_are_the_same_with_and_without_evaluation(runs):
    _, with_eval, without = runs
    assert eval_lines(with_eval)  # evaluation did run in between
    assert sorted(with_eval.losses) == list(range(1, STEPS + 1))
    assert with_eval.losses == without.losses


def test_evaluation_runs_every_freq_steps_and_after_the_last_step(runs):
    _, with_eval, _ = runs
    lines = eval_lines(with_eval)
    assert sorted(lines) == [FREQ, STEPS]
    assert set(lines[STEPS]) == {
        f"{MC_TASK}/acc", f"{MC_TASK}/acc_norm", f"{QA_TASK}/exact_match_strip"
    }


def test_the_ema_is_evaluated_beside_the_trained_weights_after_the_last_step(runs):
    from support.tensorboard import scalars

    folder, with_eval, _ = runs
    raw, ema = eval_lines(with_eval), eval_lines(with_eval, "eval/ema/")
    assert sorted(raw) == [FREQ, STEPS] and sorted(ema) == [STEPS]
    assert set(ema[STEPS]) == set(raw[STEPS])
    assert all(0.0 <= v <= 1.0 for v in ema[STEPS].values())
    assert sorted(scalars(folder, "eval/ema/time_s")) == [STEPS]
    logged = scalars(folder, f"eval/ema/{MC_TASK}/acc")
    assert logged[STEPS] == pytest.approx(ema[STEPS][f"{MC_TASK}/acc"], rel=1e-6)


def test_the_exported_emas_card_has_the_emas_evaluation(runs, tmp_path):
    from swallow_titan.hf.export import export_hf

    folder, with_eval, _ = runs
    export_hf(folder / "checkpoint" / f"ema-step-{STEPS}", tmp_path / "ema", dtype="float32")
    card = (tmp_path / "ema" / "README.md").read_text(encoding="utf-8")
    assert f"`[averaging] ema_decay = {EMA_DECAY:g}`" in card
    assert f"in-loop at step {STEPS}" in card
    ema = eval_lines(with_eval, "eval/ema/")[STEPS]
    rows = [line for line in card.splitlines() if line.startswith(f"| {MC_TASK} |")
            or line.startswith(f"| {QA_TASK} |")]
    assert len(rows) == len(ema)  # the EMA's rows only, not the trained weights' too
    for tag, value in ema.items():
        task, metric = tag.rsplit("/", 1)
        assert f"| {task} | {metric} | {value:.4f} |" in card


def test_eval_scalars_are_in_tensorboard(runs):
    from support.tensorboard import scalars

    folder, with_eval, _ = runs
    lines = eval_lines(with_eval)
    for tag in (f"{MC_TASK}/acc", f"{MC_TASK}/acc_norm", f"{QA_TASK}/exact_match_strip"):
        logged = scalars(folder, f"eval/{tag}")
        assert sorted(logged) == [FREQ, STEPS]
        assert logged[STEPS] == pytest.approx(lines[STEPS][tag], rel=1e-6)  # TensorBoard: float32
    assert sorted(scalars(folder, "eval/time_s")) == [FREQ, STEPS]


def evaluate_cli(source: Path, *args: str, nproc: int = 1) -> dict:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
         "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
         "--master_port", str(free_port())]
        if nproc > 1 else [sys.executable]
    )
    proc = subprocess.run(
        [*launcher, "-m", "swallow_titan.evaluate", str(source), *args],
        cwd=REPO, env=training_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout[-2000:]  # one object, from rank 0 only
    return json.loads(lines[0])


CLI_ARGS = [
    "--tasks", f"{MC_TASK},{QA_TASK}", "--include-path", str(EVAL_TASKS),
    "--limit", str(LIMIT), "--max-gen-toks", "16", "--batch-size", "3",
    "--json", "--log-samples",
]


@pytest.fixture(scope="module")
def cli_results(runs):
    folder, _, _ = runs
    checkpoints = folder / "checkpoint"
    return (
        evaluate_cli(checkpoints, *CLI_ARGS),
        evaluate_cli(checkpoints, *CLI_ARGS, nproc=2),
    )


def test_a_finished_checkpoint_scores_what_the_run_logged_after_its_last_step(runs, cli_results):
    _, with_eval, _ = runs
    one, _ = cli_results
    assert one["step"] == STEPS
    logged = eval_lines(with_eval)[STEPS]
    assert one["results"][MC_TASK]["acc,none"] == pytest.approx(logged[f"{MC_TASK}/acc"], abs=1e-4)
    assert one["results"][QA_TASK]["exact_match,strip"] == pytest.approx(
        logged[f"{QA_TASK}/exact_match_strip"], abs=1e-4
    )


def test_one_and_two_processes_give_the_same_scores_and_answers(cli_results):
    one, two = cli_results
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["results"] == two["results"]
    for task in (MC_TASK, QA_TASK):
        a = {s["doc_id"]: s for s in one["samples"][task]}
        b = {s["doc_id"]: s for s in two["samples"][task]}
        assert sorted(a) == sorted(b) == list(range(LIMIT))
        for doc_id, sample in a.items():
            if task == QA_TASK:
                assert sample["resps"] == b[doc_id]["resps"]
                continue
            for (ll, greedy), (ll2, greedy2) in zip(
                [r[0] for r in sample["resps"]], [r[0] for r in b[doc_id]["resps"]], strict=True
            ):
                # FSDP gathers the exact fp32 weights: the same operations on the
                # same numbers, so only summation order in the kernels may differ.
                assert abs(ll - ll2) <= 1e-4 and greedy == greedy2


def test_json_results_are_simple_evaluates_results_dictionary(cli_results):
    one, _ = cli_results
    for task in (MC_TASK, QA_TASK):
        assert one["results"][task]["alias"] == task
        assert one["results"][task]["sample_len"] == LIMIT
    assert set(one["results"][MC_TASK]) >= {"acc,none", "acc_stderr,none", "acc_norm,none"}


def test_a_failure_on_one_rank_ends_the_evaluation_on_both_and_training_goes_on(tmp_path):
    """Rank 1 of 2 fails while scoring its first batch at step 1 (rank 0 is about to run
    the next forward pass); both leave that evaluation, log it, train on and evaluate
    again. The tasks' data files are deleted once training starts: the later
    evaluations use the tasks built at start-up."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = [own_copy(tasks, MC_TASK, "copied_mc"), own_copy(tasks, QA_TASK, "copied_qa")]
    run = TrainingProcess(
        tmp_path / "run", "--training.steps", str(STEPS),
        "--parallelism.tensor_parallel_degree", "2",
        "--eval.enable", "true", "--eval.freq", "1", "--eval.max_gen_toks", "8",
        "--eval.limit", "2", "--eval.batch_size", "1",
        "--eval.tasks", "copied_mc,copied_qa", "--eval.include_path", str(tasks),
        "--debug.inject_eval_failure_at_steps", "1", "--debug.inject_eval_failure_rank", "1",
        nproc=2,
    )
    run.wait_for(lambda: "Training starts at step" in run.output, "the start of training")
    for path in data:
        path.unlink()
    try:
        result = run.wait(timeout=300)  # a rank left waiting in a collective: no exit
    except subprocess.TimeoutExpired:
        run.kill()
        pytest.fail("the run hung after the failed evaluation:\n" + run.output[-4000:])
    assert result.returncode == 0, result.output[-4000:]
    (line,) = [x for x in result.output.splitlines() if "failed and is skipped" in x]
    assert "[eval] evaluation at step 1 failed and is skipped on every rank" in line
    assert "rank 1: RuntimeError: [debug] failure injected into the evaluation at step 1" in line
    assert "rank 0: " not in line  # rank 0 did not fail: it was told
    assert sorted(result.losses) == list(range(1, STEPS + 1))
    assert sorted(series(result.history, "eval/time_s")) == list(range(2, STEPS + 1))
    assert "eval/copied_qa/exact_match_strip" in [r for r in result.history if r["step"] == STEPS][-1]


def test_an_evaluation_cut_short_by_a_kill_runs_first_on_restart(tmp_path):
    """Killed during the evaluation of step 2, the restart resumes at step 3 after
    evaluating step 2; killed during the final one, the restart only evaluates."""
    folder = tmp_path / "run"
    args = [
        "--training.steps", str(STEPS), "--checkpoint.enable", "true",
        "--checkpoint.interval", "1",
        "--eval.enable", "true", "--eval.freq", str(FREQ), "--eval.tasks", MC_TASK,
        "--eval.include_path", str(EVAL_TASKS.relative_to(REPO)), "--eval.limit", "2",
        "--eval.max_gen_toks", "8",
    ]
    first = TrainingProcess(folder, *args, "--debug.eval_delay_s", "300")
    first.wait_for(lambda: f"[eval] evaluating step {FREQ}" in first.output, "the evaluation")
    first.kill()

    second = TrainingProcess(folder, *args, "--debug.eval_delay_s", "2")
    second.wait_for(lambda: f"[eval] evaluating step {STEPS}" in second.output, "the last one")
    second.kill()
    assert loaded_step(second.output) == FREQ
    assert f"the evaluation of step {FREQ} has no result: running it first" in second.output
    second_log = run_log(folder, second.started)
    evaluated = [r["time"] for r in second_log if r["step"] == FREQ and "eval/time_s" in r]
    trained = [r["time"] for r in second_log if "train/loss" in r]
    assert len(evaluated) == 1 and evaluated[0] < min(trained)
    assert sorted(series(second_log, "train/loss")) == [STEPS]

    third = run_training(folder, *args).check()
    assert loaded_step(third.output) == STEPS
    assert f"the evaluation of step {STEPS} has no result: running it first" in third.output
    assert f"evaluating step {FREQ}" not in third.output
    assert third.losses == {}  # a finished run: nothing to train
    assert sorted(series(third.history, "eval/time_s")) == [FREQ, STEPS]


def test_the_exported_model_card_has_the_last_evaluation_table(runs, tmp_path):
    from swallow_titan.hf.export import export_hf

    folder, with_eval, _ = runs
    export_hf(folder / "checkpoint", tmp_path / "hf", dtype="float32")
    card = (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    assert f"in-loop at step {STEPS}" in card
    raw = eval_lines(with_eval)[STEPS]
    rows = [line for line in card.splitlines() if line.startswith((f"| {MC_TASK} |", f"| {QA_TASK} |"))]
    assert len(rows) == len(raw)  # the EMA's evaluation (eval/ema/...) is not the trained weights'
    for tag, value in raw.items():
        task, metric = tag.rsplit("/", 1)
        assert f"| {task} | {metric} | {value:.4f} |" in card
