"""lm-eval tasks: built once per process, and the task index a task list needs (in-process).

No test downloads a dataset: the built-in task used here gets a local data
file through a group's overrides.
"""

from __future__ import annotations

import json

import pytest
import torch

from support import REPO, tiny_tokenizer
from support.eval import EVAL_TASKS, MC_TASK, QA_TASK, SuccessorModel, own_copy

pytest.importorskip("lm_eval")

from swallow_titan.eval.adapter import ModelRunner, SwallowLM  # noqa: E402
from swallow_titan.eval.in_loop import run_simple_evaluate  # noqa: E402
from swallow_titan.eval.tasks import (  # noqa: E402
    _all_own,
    _indexed,
    built_task,
    check_tasks,
    group_members,
    task_manager,
)
from swallow_titan.evaluate import EvalOptions  # noqa: E402


def test_an_evaluation_reuses_the_tasks_built_at_start_up(tmp_path):
    """The second evaluation neither rebuilds the task nor reads its data file again."""
    data = own_copy(tmp_path, QA_TASK, "built_once_qa")
    assert check_tasks(["built_once_qa"], str(tmp_path)) == []  # the start-up check builds it
    (task,) = built_task("built_once_qa", str(tmp_path))
    tokenizer = tiny_tokenizer()
    lm = SwallowLM(
        ModelRunner(SuccessorModel(tokenizer.n_words), torch.device("cpu")),
        tokenizer, max_length=64, max_gen_toks=4,
    )
    options = EvalOptions(["built_once_qa"], str(tmp_path), -1, 3)
    first = run_simple_evaluate(lm, options, log_samples=True)
    data.unlink()  # a rebuild would have to read it: lm-eval loads the dataset when it builds
    second = run_simple_evaluate(lm, options, log_samples=True)
    assert built_task("built_once_qa", str(tmp_path)) == (task,)
    assert second["results"] == first["results"]
    assert [s["resps"] for s in second["samples"]["built_once_qa"]] == [
        s["resps"] for s in first["samples"]["built_once_qa"]
    ]
    assert len(first["samples"]["built_once_qa"]) == 3


def test_a_local_group_with_a_built_in_task_is_built_with_lm_evals_index(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the shipped task's data paths are relative to the repository
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for path in EVAL_TASKS.glob("*.yaml"):
        (tmp_path / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    rows = [
        {"id": str(i), "question_stem": q, "answerKey": a,
         "choices": {"text": ["hot", "cold"], "label": ["A", "B"]}}
        for i, (q, a) in enumerate([("The sun is", "A"), ("Ice is", "B")])
    ]
    data = tmp_path / "obqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "mixed.yaml").write_text(
        f"group: mixed_sample_group\ntask:\n  - {MC_TASK}\n"
        "  - task: openbookqa\n    dataset_path: json\n    dataset_name: null\n"
        "    dataset_kwargs:\n      data_files:\n"
        + "".join(f"        {split}: {data}\n" for split in ("train", "validation", "test")),
        encoding="utf-8",
    )
    assert check_tasks(["mixed_sample_group"], str(tmp_path)) == []
    (group,) = built_task("mixed_sample_group", str(tmp_path))
    tasks = {t.task_name: t for t in group.get_all_tasks()}
    assert sorted(tasks) == sorted([MC_TASK, "openbookqa"])
    # openbookqa's own prompt and choices, on the local rows.
    assert tasks["openbookqa"].config.doc_to_text == "question_stem"
    assert [tasks["openbookqa"].doc_to_target(d) for d in tasks["openbookqa"].test_docs()] == [0, 1]


def test_only_the_include_path_is_indexed_when_every_name_and_member_is_its_own(tmp_path):
    (tmp_path / "local.yaml").write_text(
        "group: local_group\ntask:\n  - local_task\n  - group: inline\n    task: [other_task]\n",
        encoding="utf-8",
    )
    for name in ("local_task", "other_task"):
        (tmp_path / f"{name}.yaml").write_text(
            (EVAL_TASKS / f"{QA_TASK}.yaml").read_text(encoding="utf-8").replace(QA_TASK, name),
            encoding="utf-8",
        )
    own = _indexed(str(tmp_path), False)
    assert _all_own(["local_group", "local_task"], own)
    assert task_manager(["local_group"], str(tmp_path)) is own
    assert not _all_own(["local_task", "hellaswag"], own)
    (tmp_path / "local.yaml").write_text(
        "group: local_group\ntask:\n  - local_task\n  - group: inline\n    task: [hellaswag]\n",
        encoding="utf-8",
    )
    _indexed.cache_clear()
    assert not _all_own(["local_group"], _indexed(str(tmp_path), False))


def test_group_members_reads_every_form_of_a_task_list():
    members = [
        "plain",
        {"task": "with_overrides", "num_fewshot": 3},
        {"group": "referenced"},
        {"group": "inline", "task": ["deep", {"task": "deeper"}]},
    ]
    assert group_members(members) == ["plain", "with_overrides", "referenced", "deep", "deeper"]
    assert group_members("single") == ["single"]
    assert group_members(None) == []


def test_flattened_results_keep_numbers_and_filters_and_drop_errors_and_aliases():
    from swallow_titan.eval.tasks import flatten_results

    results = {
        "group": {"alias": "group", "acc,none": 0.25, "acc_stderr,none": 0.01, " ": " "},
        "task": {
            "exact_match,strict-match": 1, "exact_match_stderr,strict-match": 0.5,
            "sample_len": 4, "flag,none": True, "note,none": "N/A",
        },
    }
    assert flatten_results(results) == {
        "eval/group/acc": 0.25,
        "eval/task/exact_match_strict-match": 1.0,
    }
