"""[eval] configuration: off by default, checked before training, lm-eval optional."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO, TINY_CONFIG
from support.eval import EVAL_TASKS, MC_TASK, QA_TASK
from support.runs import training_env
from swallow_titan.config.errors import ConfigError
from swallow_titan.config.manager import load_job_config
from swallow_titan.components.preflight import check_job_config

lm_eval = pytest.importorskip("lm_eval")

from swallow_titan.eval import eval_problems  # noqa: E402
from swallow_titan.eval.tasks import flatten_results  # noqa: E402

SOURCE = str(TINY_CONFIG)


def eval_config(*overrides: str):
    return load_job_config(
        TINY_CONFIG,
        [
            "--eval.enable", "true",
            "--eval.tasks", f"{MC_TASK},{QA_TASK}",
            "--eval.include_path", str(EVAL_TASKS),
            "--eval.max_gen_toks", "16",
            *overrides,
        ],
    )


def test_eval_is_off_by_default_and_in_the_tiny_config():
    config = load_job_config(TINY_CONFIG)
    assert config.eval.enable is False
    assert eval_problems(config, SOURCE) == []


def test_the_shipped_tasks_pass_the_start_up_check(monkeypatch):
    monkeypatch.chdir(REPO)  # their data paths are relative to the repository
    assert eval_problems(eval_config(), SOURCE) == []


def test_an_unknown_task_is_named(monkeypatch):
    monkeypatch.chdir(REPO)
    config = eval_config("--eval.tasks", f"{MC_TASK},swallow_ja_mc_sampel")
    (problem,) = eval_problems(config, SOURCE, load_data=False)
    assert problem.startswith(f"{SOURCE}: eval.tasks: task 'swallow_ja_mc_sampel'")
    assert "no such task" in problem


def write_task(folder: Path, name: str, body: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(f"task: {name}\n{body}", encoding="utf-8")


def test_a_malformed_task_yaml_is_named_with_its_file(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "broken.yaml").write_text(
        'task: broken_task\ndoc_to_text: "{{question}\n  bad: [unclosed\n', encoding="utf-8"
    )
    config = eval_config("--eval.tasks", "broken_task", "--eval.include_path", str(tmp_path / "tasks"))
    (problem,) = eval_problems(config, SOURCE)
    assert "task 'broken_task'" in problem
    assert str(tmp_path / "tasks" / "broken.yaml") in problem


def test_a_task_whose_dataset_cannot_be_loaded_is_named(tmp_path):
    write_task(
        tmp_path / "tasks",
        "missing_data",
        "dataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'absent.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\n',
    )
    config = eval_config("--eval.tasks", "missing_data", "--eval.include_path", str(tmp_path / "tasks"))
    (problem,) = eval_problems(config, SOURCE)
    assert "task 'missing_data' cannot be loaded" in problem
    assert "absent.jsonl" in problem


def test_a_task_with_an_invalid_field_is_named(tmp_path):
    write_task(
        tmp_path / "tasks",
        "bad_type",
        "dataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {EVAL_TASKS / 'data' / 'ja_qa_test.jsonl'}\n"
        'test_split: test\noutput_type: bogus\ndoc_to_text: "{{question}}"\n'
        'doc_to_target: "{{answer}}"\n',
    )
    config = eval_config("--eval.tasks", "bad_type", "--eval.include_path", str(tmp_path / "tasks"))
    (problem,) = eval_problems(config, SOURCE)
    assert "task 'bad_type' cannot be loaded" in problem and "bogus" in problem


@pytest.mark.parametrize(
    "override, key",
    [
        (["--eval.tasks", ""], "eval.tasks"),
        (["--eval.freq", "0"], "eval.freq"),
        (["--eval.batch_size", "0"], "eval.batch_size"),
        (["--eval.max_gen_toks", "256"], "eval.max_gen_toks"),  # tiny_cpu: seq_len 256
        (["--eval.limit", "-1"], "eval.limit"),
    ],
)
def test_bad_eval_values_are_config_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"^{SOURCE}: {key}: "):
        check_job_config(eval_config(*override), 1, SOURCE)


def test_metric_keys_become_eval_task_metric_scalars():
    results = {
        "t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "sample_len": 4,
              "exact_match,strip": 1.0},
    }
    assert flatten_results(results) == {"eval/t/acc": 0.5, "eval/t/exact_match_strip": 1.0}


HIDE_LM_EVAL = "import sys; sys.modules['lm_eval'] = None\n"


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=training_env(),
        capture_output=True, text=True, timeout=300,
    )


def test_a_run_without_eval_never_imports_lm_eval():
    proc = run_python(
        "import sys\n"
        "import swallow_titan.train, swallow_titan.trainer, swallow_titan.plan\n"
        "from swallow_titan.train import parse_config\n"
        f"parse_config(['--job.config_file', {str(TINY_CONFIG)!r}])\n"
        "print('lm_eval loaded:', 'lm_eval' in sys.modules)\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lm_eval loaded: False" in proc.stdout


def test_without_lm_eval_training_and_evaluate_stop_at_start_up_with_the_install_command():
    proc = run_python(
        HIDE_LM_EVAL
        + "from swallow_titan import evaluate, train\n"
        + f"code = train.main(['--job.config_file', {str(TINY_CONFIG)!r}, '--eval.enable', 'true',"
        + " '--eval.tasks', 'hellaswag', '--eval.max_gen_toks', '16'])\n"
        + "print('train exit', code, file=sys.stderr)\n"
        + "print('evaluate exit', evaluate.main(['.', '--tasks', 'hellaswag']), file=sys.stderr)\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train exit 2" in proc.stderr and "evaluate exit 2" in proc.stderr
    assert f"{TINY_CONFIG}: eval.enable:" in proc.stderr
    assert proc.stderr.count('pip install -e ".[eval]"') == 2
    assert "Training starts" not in proc.stdout + proc.stderr


RECIPE = REPO / "train_configs" / "swallow_8b_v05.toml"


def test_the_recipe_evaluates_tasks_the_pinned_lm_eval_has():
    from swallow_titan.eval.tasks import check_tasks

    config = load_job_config(RECIPE)
    assert config.eval.enable
    assert {"ja_leaderboard_jcommonsenseqa", "hellaswag", "gsm8k", "mmlu"} <= set(config.eval.tasks)
    assert check_tasks(list(config.eval.tasks), load_data=False) == []


def test_the_plan_shows_the_eval_tasks_and_a_cost_within_two_percent():
    from swallow_titan.plan import build_plan, format_plan

    config = load_job_config(RECIPE)
    plan = build_plan(config, 8, 8, str(RECIPE))
    cost = plan["eval"]["cost"]
    assert plan["eval"]["tasks"] == list(config.eval.tasks)
    assert cost["unestimated_tasks"] == []
    assert cost["evaluations"] == config.training.steps // config.eval.freq + 1
    assert 0.1 < cost["share_of_training_pct"] <= 2.0
    # The recipe's EMA is evaluated once more, after the last step, and the share counts it.
    assert config.averaging.ema_decay > 0 and cost["average_evaluations"] == 1
    assert cost["share_of_training_pct"] == pytest.approx(
        100 * (cost["evaluations"] + 1) * cost["per_evaluation_training_steps"] / config.training.steps
    )
    text = format_plan(plan)
    assert "+ 1 of the [averaging] weights at the end" in text
    assert "ja_leaderboard_jcommonsenseqa" in text and "% of training time" in text


def test_the_cost_of_generation_grows_with_the_square_of_the_answer_length():
    from swallow_titan.eval.cost import TaskCost, forward_tokens

    short = forward_tokens(TaskCost(10, 1, 100, 10), 0)[1]
    long = forward_tokens(TaskCost(10, 1, 100, 100), 0)[1]
    # No KV cache: pass k runs the prompt and k tokens: 10 x (G x 100 + G (G - 1) / 2).
    assert (short, long) == (10 * (10 * 100 + 45), 10 * (100 * 100 + 4950))
    assert forward_tokens(TaskCost(10, 4, 100), 5) == (5 * 4 * 100, 0.0)


def test_evaluate_names_a_source_it_cannot_evaluate(tmp_path, capsys):
    from swallow_titan.evaluate import main

    assert main([str(tmp_path / "absent"), "--tasks", MC_TASK]) == 2
    assert "absent: no such file or folder" in capsys.readouterr().err
    assert main([str(tmp_path), "--tasks", MC_TASK]) == 2
    assert f"{tmp_path}: no checkpoint here" in capsys.readouterr().err
