"""Choosing Qwen3 in the config: its flavors are torchtitan's, and what it cannot do is refused early."""

from __future__ import annotations

import dataclasses

import pytest
from torchtitan.models.qwen3 import qwen3_args

from support import TINY_CONFIG
from swallow_titan.components.preflight import check_job_config, model_args
from swallow_titan.config.manager import ConfigError, load_job_config
from swallow_titan.model.family import LLAMA, QWEN3, family_of_config
from swallow_titan.model.qwen3 import QWEN3_FLAVORS

QWEN3_RUN = ["--model.name", "swallow_qwen3"]


def error_of(*overrides: str, world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as e:
        config = load_job_config(TINY_CONFIG, list(overrides))
        check_job_config(config, world_size, str(TINY_CONFIG))
    return str(e.value)


@pytest.mark.parametrize("flavor", ["0.6B", "1.7B", "4B", "8B", "14B", "32B", "30B-A3B"])
def test_qwen3_flavors_are_torchtitans_own(flavor):
    ours, theirs = QWEN3_FLAVORS[flavor], qwen3_args[flavor]
    for field in dataclasses.fields(theirs):
        if field.name in ("max_seq_len", "moe_args"):
            continue  # positions: the run's seq_len replaces them
        assert getattr(ours, field.name) == getattr(theirs, field.name), field.name
    a, b = dataclasses.asdict(ours.moe_args), dataclasses.asdict(theirs.moe_args)
    a.pop("use_grouped_mm"), b.pop("use_grouped_mm")  # CPU: the per-expert loop
    assert a == b


def test_the_model_name_chooses_the_family_and_its_flavors():
    llama = load_job_config(TINY_CONFIG, [])
    qwen3 = load_job_config(TINY_CONFIG, QWEN3_RUN)
    assert family_of_config(llama) is LLAMA and family_of_config(qwen3) is QWEN3
    assert model_args(qwen3, "x").head_dim == 32  # Qwen3's tiny, not Llama's
    moe = load_job_config(TINY_CONFIG, [*QWEN3_RUN, "--model.flavor", "tiny_moe"])
    args = model_args(moe, "x")
    # [moe] defaults: the auxiliary loss, no expert bias.
    assert args.moe_enabled and args.router_aux_loss_coef == 0.001
    assert args.moe_args.load_balance_coeff is None


@pytest.mark.parametrize(
    "overrides, field, words",
    [
        (["--model.name", "qwen3"], "model.name", "'swallow_qwen3'"),
        ([*QWEN3_RUN, "--model.flavor", "70B"], "model.flavor", "'30B-A3B'"),
        ([*QWEN3_RUN, "--parallelism.expert_parallel_degree", "2"], "parallelism.expert_parallel_degree",
         "is dense"),
    ],
)
def test_what_qwen3_cannot_do_is_refused_naming_the_field(overrides, field, words):
    message = error_of(*overrides, "--data.reset_position_ids", "false")
    assert f"{TINY_CONFIG}: {field}" in message and words in message, message


def test_qwen3_tensor_parallel_with_per_document_positions_is_accepted():
    config = load_job_config(TINY_CONFIG, [*QWEN3_RUN, "--parallelism.tensor_parallel_degree", "2",
                                           "--parallelism.data_parallel_shard_degree", "1"])
    assert config.data.reset_position_ids
    assert check_job_config(config, 2, str(TINY_CONFIG)).tp == 2


def test_experts_split_over_tensor_parallel_ranks_need_one_sequence_per_micro_batch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # the MoE flavor weighs its auxiliary loss by the layout
    moe_tp_ep = [*QWEN3_RUN, "--model.flavor", "tiny_moe", "--parallelism.tensor_parallel_degree", "2",
                 "--parallelism.data_parallel_shard_degree", "1",
                 "--parallelism.expert_parallel_degree", "2"]
    message = error_of(*moe_tp_ep, world_size=2)
    assert f"{TINY_CONFIG}: parallelism.expert_parallel_degree" in message
    assert "training.local_batch_size = 8" in message, message  # the config's
    config = load_job_config(TINY_CONFIG, [*moe_tp_ep, "--training.local_batch_size", "1"])
    assert check_job_config(config, 2, str(TINY_CONFIG)).tp == 2


def test_per_op_selective_checkpointing_with_expert_parallelism_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    moe_ep = [*QWEN3_RUN, "--model.flavor", "tiny_moe", "--parallelism.data_parallel_shard_degree", "2",
              "--parallelism.expert_parallel_degree", "2", "--validation.enable", "false"]
    message = error_of(*moe_ep, "--activation_checkpoint.mode", "selective",
                       "--activation_checkpoint.selective_ac_option", "op", world_size=2)
    assert f"{TINY_CONFIG}: activation_checkpoint.selective_ac_option" in message, message
    assert "expert_parallel_degree = 2" in message and "#3427" in message
    # What the message offers instead passes: full AC, or every second layer.
    for ac in (["--activation_checkpoint.mode", "full"],
               ["--activation_checkpoint.mode", "selective",
                "--activation_checkpoint.selective_ac_option", "2"]):
        config = load_job_config(TINY_CONFIG, [*moe_ep, *ac])
        assert check_job_config(config, 2, str(TINY_CONFIG)).dp_shard == 2
    # Without expert parallelism per-op selective AC is the recipes' choice, and kept.
    config = load_job_config(TINY_CONFIG, [*moe_ep, "--parallelism.expert_parallel_degree", "1",
                                           "--activation_checkpoint.mode", "selective",
                                           "--activation_checkpoint.selective_ac_option", "op"])
    assert check_job_config(config, 2, str(TINY_CONFIG)).dp_shard == 2
    # A dense flavor with EP is told it has no experts first.
    dense = error_of(*QWEN3_RUN, "--parallelism.data_parallel_shard_degree", "2",
                     "--parallelism.expert_parallel_degree", "2", "--validation.enable", "false",
                     "--activation_checkpoint.mode", "selective",
                     "--activation_checkpoint.selective_ac_option", "op", world_size=2)
    assert "is dense" in dense, dense
