"""Test set-up: swallow_titan must be imported before torchtitan (device selection)."""

import os

# Triton's CPU interpreter for the kernel tests (kernels/). Triton reads this when
# it is first imported, so it is set before anything imports torch or triton;
# nothing else in the tests uses Triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import swallow_titan  # noqa: E402, F401

import pytest  # noqa: E402

from support.runs import run_training  # noqa: E402


@pytest.fixture(scope="session")
def seed_checkpoint(tmp_path_factory):
    """Unsharded initial weights of the tiny model, shared by layout-parity runs."""
    folder = tmp_path_factory.mktemp("seed")
    run_training(
        folder, "--checkpoint.enable", "true", "--checkpoint.create_seed_checkpoint", "true"
    ).check()
    path = folder / "checkpoint" / "step-0"
    assert (path / ".metadata").is_file()
    return path
