"""Every torchtitan / torch seam listed in swallow_titan.runtime.seams still matches the installed packages."""

from __future__ import annotations

import dataclasses

import pytest

import swallow_titan  # noqa: F401  (device selection first)
from swallow_titan.runtime.seams import (
    DEVICE_SEAMS,
    SEAMS,
    DeviceSeam,
    Seam,
    call_site_problems,
    passed_keywords,
    seam_problems,
    source_hash,
)


def test_every_seam_matches_the_installed_torchtitan_and_torch():
    problems = seam_problems()
    assert not problems, (
        "torchtitan / torch changed where swallow-titan relies on it "
        "(see swallow_titan/runtime/seams.py):\n" + "\n".join(problems)
    )


def test_every_keyword_our_code_passes_to_a_seam_is_checked():
    problems = call_site_problems()
    assert not problems, "add these keywords to the seams' params:\n" + "\n".join(problems)


def test_a_seam_missing_a_keyword_the_code_passes_is_reported():
    (loader,) = [s for s in SEAMS if s.target == "lm_eval.tasks._yaml_loader.load_yaml"]
    (problem,) = call_site_problems((dataclasses.replace(loader, params=("path",)),))
    assert problem.startswith(loader.target) and "eval/tasks.py:" in problem
    assert "passes resolve_func" in problem
    # and the full entry makes the installed signature check cover the keyword
    renamed = dataclasses.replace(loader, params=("path", "resolve_functions"))
    (problem,) = seam_problems((renamed,))
    assert "resolve_func" in problem and "expected ('path', 'resolve_functions')" in problem


def test_keywords_are_found_on_method_calls_only_through_self_super_or_the_class():
    (save,) = [s for s in SEAMS if s.target.endswith("CheckpointManager.dcp_save")]
    (load,) = [s for s in SEAMS if s.target.endswith("CheckpointManager.load")]
    assert set().union(*passed_keywords(save).values()) >= {"checkpoint_id", "async_mode"}
    # dcp.load(..., checkpoint_id=...) in the same module is another function
    assert not passed_keywords(load)


def test_every_reimplemented_method_has_a_pinned_source_hash():
    unpinned = [s.target for s in SEAMS if s.kind == "reimplemented" and not s.source_sha256]
    assert not unpinned


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(target="torchtitan.train.Trainer.train_stepp"), "not found"),
        (dict(params=("self", "batches")), "parameters are ('self', 'data_iterator')"),
        (dict(source_sha256="0" * 16), "torchtitan's source changed"),
    ],
)
def test_a_changed_seam_is_reported_by_name(change, expected):
    # The checks above pass on an empty list: make sure each kind of change shows.
    (train_step,) = [s for s in SEAMS if s.target == "torchtitan.train.Trainer.train_step"]
    changed = dataclasses.replace(train_step, **change)
    (problem,) = seam_problems((changed,), ())
    assert problem.startswith(changed.target) and expected in problem


def test_a_missing_attribute_is_reported():
    seam = Seam(
        "torchtitan.components.checkpoint.CheckpointManager.__init__",
        "attributes",
        "test",
        "test",
        attributes=("purge_queue", "no_such_attribute"),
    )
    (problem,) = seam_problems((seam,), ())
    assert problem.endswith("no longer sets self.no_such_attribute")


def test_a_device_seam_naming_a_missing_function_is_reported():
    # The device seams are part of the same registry and the same check.
    seam = DeviceSeam(
        "swallow_titan/runtime/device.py: default_ngpu, no_such_function", "cpu", "cuda", shim=False
    )
    (problem,) = seam_problems((), (seam,))
    assert problem.endswith("no longer defines no_such_function")
    assert len(DEVICE_SEAMS) > 0


def test_the_source_hash_is_of_torchtitans_method_not_ours():
    from torchtitan.train import Trainer

    from swallow_titan.trainer import SwallowTrainer

    assert source_hash(Trainer.train_step) != source_hash(SwallowTrainer.train_step)


def test_every_torchtitan_method_we_override_is_listed():
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.metrics import MetricsProcessor
    from torchtitan.config import ConfigManager
    from torchtitan.train import Trainer

    from swallow_titan.checkpoint.manager import AtomicCheckpointManager
    from swallow_titan.config.manager import SwallowConfigManager
    from swallow_titan.components.metrics import SwallowMetricsProcessor
    from swallow_titan.runtime.seams import resolve
    from swallow_titan.trainer import SwallowTrainer

    listed = {
        id(resolve(s.target)) for s in SEAMS if s.kind in ("override", "reimplemented")
    }
    unlisted = []
    for ours, theirs in (
        (SwallowTrainer, Trainer),
        (AtomicCheckpointManager, CheckpointManager),
        (SwallowConfigManager, ConfigManager),
        (SwallowMetricsProcessor, MetricsProcessor),
    ):
        for name, value in vars(ours).items():
            if name.startswith("__") and name != "__init__" or not callable(value):
                continue
            if not hasattr(theirs, name):
                continue
            original = resolve(f"{theirs.__module__}.{theirs.__qualname__}.{name}")
            if id(original) not in listed:
                unlisted.append(f"{ours.__qualname__}.{name} overrides {theirs.__qualname__}.{name}")
    assert not unlisted, "add these to swallow_titan/runtime/seams.py:\n" + "\n".join(unlisted)
