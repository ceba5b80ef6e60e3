"""End-to-end training on CPU: loss falls, parallel layouts agree, resume is exact."""

from __future__ import annotations

import pytest

from support.overrides import FSDP2, TP2
from support.runs import from_seed, run_training

pytestmark = pytest.mark.slow


def test_tiny_model_trains_and_loss_falls(tmp_path):
    result = run_training(
        tmp_path / "run",
        "--training.steps", "12",
        "--optimizer.lr", "3e-3",
        "--checkpoint.enable", "true",
        "--checkpoint.interval", "6",
        "--metrics.enable_tensorboard", "true",
    ).check()
    losses = result.losses
    assert sorted(losses) == list(range(1, 13))
    first = losses[1]
    last = sum(losses[s] for s in (10, 11, 12)) / 3
    assert last < first - 1.0, losses
    # A checkpoint and TensorBoard events were written.
    assert (tmp_path / "run" / "checkpoint" / "step-12" / ".metadata").is_file()
    assert list((tmp_path / "run" / "tb").rglob("events.out.tfevents.*"))


PARITY_STEPS = ["--training.steps", "4"]


@pytest.fixture(scope="module")
def single_process_losses(seed_checkpoint, tmp_path_factory):
    # local 4 x 2 accumulation steps = the same 8 sequences per step as 2 ranks x 4.
    result = run_training(
        tmp_path_factory.mktemp("single"), *from_seed(seed_checkpoint), *PARITY_STEPS
    ).check()
    assert sorted(result.losses) == [1, 2, 3, 4]
    return result.losses


# Each layout sees the same 8 sequences per step as one process (local 4 x 2
# accumulation steps): 2 ranks x 4, or TP over 2 ranks with local 8, or 2
# replicas x 2 shards x local 2.
LAYOUTS = {
    "fsdp2": (2, "Applied FSDP to the model", FSDP2),
    "tp2": (2, "Tensor Parallelism to the model", [*TP2, "--training.local_batch_size", "8"]),
    # Logits replicated on both TP ranks, plain cross-entropy on each.
    "tp2_no_loss_parallel": (2, "Tensor Parallelism to the model", [
        *TP2,
        "--parallelism.disable_loss_parallel", "true",
        "--training.local_batch_size", "8",
    ]),
    "hsdp2x2": (4, "Applied HSDP to the model", [
        "--parallelism.data_parallel_replicate_degree", "2",
        "--parallelism.data_parallel_shard_degree", "2",
        "--training.local_batch_size", "2",
    ]),
}


@pytest.mark.distributed
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_parallel_layouts_match_one_process(
    layout, seed_checkpoint, single_process_losses, tmp_path
):
    nproc, applied, overrides = LAYOUTS[layout]
    result = run_training(
        tmp_path / layout,
        *from_seed(seed_checkpoint),
        *PARITY_STEPS,
        *overrides,
        nproc=nproc,
    ).check()
    assert applied in result.output
    assert result.losses == pytest.approx(single_process_losses, rel=1e-4)


def test_restart_from_checkpoint_continues_with_the_same_losses(tmp_path):
    common = [
        "--checkpoint.enable", "true",
        "--checkpoint.interval", "3",
        "--lr_scheduler.total_steps", "6",
    ]
    full = run_training(tmp_path / "full", *common, "--training.steps", "6").check()

    # The same run, stopped after its step-3 checkpoint, then started again
    # with the same folder and more steps.
    resumed_dir = tmp_path / "resumed"
    first = run_training(resumed_dir, *common, "--training.steps", "3").check()
    second = run_training(resumed_dir, *common, "--training.steps", "6").check()

    assert "Loading the checkpoint" in second.output
    assert sorted(second.losses) == [4, 5, 6]
    assert {**first.losses, **second.losses} == pytest.approx(full.losses, rel=1e-6)


def test_torch_compile_gives_the_eager_losses(tmp_path):
    # Per-block torch.compile (inductor, CPU) with selective op-level AC, as the recipe.
    common = ["--training.steps", "3", "--activation_checkpoint.mode", "selective",
              "--activation_checkpoint.selective_ac_option", "op"]
    eager = run_training(tmp_path / "eager", *common).check()
    compiled = run_training(tmp_path / "compiled", *common, "--compile.enable", "true").check()
    assert "Compiling each TransformerBlock with torch.compile" in compiled.output
    assert sorted(eager.losses) == sorted(compiled.losses) == [1, 2, 3]
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)
