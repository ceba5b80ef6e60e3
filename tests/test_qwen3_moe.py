"""Qwen3-MoE training on CPU: load balancing (auxiliary loss or expert bias), layouts, resume, TP router fix."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from support import REPO
from support.hf import QWEN3_MOE_TINY_CONFIG, save_random_qwen3
from support.overrides import TP2
from support.runs import resume_from, run_checks_script, run_training, series
from swallow_titan.checkpoint.dcp_reader import DCPCheckpoint
from swallow_titan.model.qwen3 import QWEN3_FLAVORS, SwallowQwen3Model, load_balancing_loss

transformers = pytest.importorskip("transformers")

MOE_RUN = ["--model.name", "swallow_qwen3", "--model.flavor", "tiny_moe", "--optimizer.lr", "1e-2"]
# The layout runs use an auxiliary-loss coefficient 100 x Qwen3's: its
# gradient then moves step 2's loss by about 1e-3 (relative), so counting it
# twice (as the 2 TP ranks would if each one's were summed) or not at all
# shows far above the layouts' 1e-4 bound.
AUX_RUN = [*MOE_RUN, "--moe.aux_loss_coef", "0.1"]


# ------------------------------------------------------------ in one process


def test_the_auxiliary_loss_is_transformers_qwen3_moe_loss():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(40, 8, generator=generator) * 2 for _ in range(3)]
    ours = load_balancing_loss(logits, top_k=2)
    theirs = load_balancing_loss_func(tuple(logits), num_experts=8, top_k=2)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    # Uniform routing probabilities give top_k.
    assert load_balancing_loss([torch.zeros(40, 8)], top_k=2).item() == pytest.approx(2.0)


def tiny_moe_model(aux_loss_weight: float) -> SwallowQwen3Model:
    args = replace(copy.deepcopy(QWEN3_FLAVORS["tiny_moe"]), max_seq_len=16,
                   aux_loss_weight=aux_loss_weight)
    args.moe_args.load_balance_coeff = None
    torch.manual_seed(0)
    model = SwallowQwen3Model(args)
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))
    return model.train()


def test_the_auxiliary_loss_reaches_the_routers_through_its_gradient_only():
    weight = 0.25
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(1))
    plain, with_aux = tiny_moe_model(0.0), tiny_moe_model(weight)
    with_aux.load_state_dict(plain.state_dict())
    gates = lambda m: [layer.moe.router.gate for layer in m.layers.values()]  # noqa: E731

    # The expected gradient: CE part plus weight x d(aux)/d(gate), by autograd.
    logits_seen = []
    hooks = [g.register_forward_hook(lambda mod, i, out: logits_seen.append(out)) for g in gates(plain)]
    out = plain(ids)
    expected_loss = out.float().logsumexp(-1).sum() + weight * load_balancing_loss(logits_seen, 2)
    expected_loss.backward()
    for h in hooks:
        h.remove()

    got = with_aux(ids)
    torch.testing.assert_close(got, out.detach())  # the output is unchanged
    got.float().logsumexp(-1).sum().backward()
    assert with_aux.take_aux_loss() == pytest.approx(load_balancing_loss(logits_seen, 2).item(), rel=1e-6)
    for ours, reference in zip(gates(with_aux), gates(plain)):
        torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-7)
    # And the auxiliary term does move them: without it the gradients differ.
    no_aux = tiny_moe_model(0.0)
    no_aux.load_state_dict(plain.state_dict())
    no_aux(ids).float().logsumexp(-1).sum().backward()
    difference = max((a.weight.grad - b.weight.grad).abs().max().item()
                     for a, b in zip(gates(no_aux), gates(plain)))
    assert difference > 1e-4


@pytest.mark.distributed
def test_attention_and_router_gradient_under_tensor_parallel_equal_one_process():
    run_checks_script(REPO / "tests" / "qwen3_tp_checks.py")


# ------------------------------------------------------------ training runs


@pytest.fixture(scope="module")
def hf_moe(tmp_path_factory) -> Path:
    """transformers' random Qwen3-MoE with the tiny_moe flavor's shape: every layout starts from it."""
    return save_random_qwen3(tmp_path_factory.mktemp("hf") / "moe", QWEN3_MOE_TINY_CONFIG,
                             max_shard_size="2MB")


@pytest.fixture(scope="module")
def one_process(hf_moe, tmp_path_factory):
    dump = tmp_path_factory.mktemp("moe") / "one"
    result = run_training(dump, *AUX_RUN, "--hf.load_path", str(hf_moe),
                          "--training.steps", "3").check()
    return result


@pytest.mark.slow
def test_moe_run_logs_per_layer_expert_load_and_the_auxiliary_loss(one_process):
    for layer in range(3):
        load = series(one_process.history, f"moe/layer_{layer}/max_load")
        assert sorted(load) == [1, 2, 3]
        # Busiest expert's share over the mean: between balanced and all-in-one.
        assert all(1.0 <= v <= 8.0 for v in load.values())
    aux = series(one_process.history, "moe/aux_loss")
    assert sorted(aux) == [1, 2, 3] and all(v >= 2.0 - 1e-6 for v in aux.values())  # >= top_k


# FSDP alone is the dense layouts' test; here experts are split over the 2 ranks
# (EP 2) and everything else is FSDP-sharded over them. It checkpoints at step 2
# for the elastic resume below.
FSDP2_EP2 = ["--parallelism.data_parallel_shard_degree", "2",
             "--parallelism.expert_parallel_degree", "2"]
CHECKPOINT_AT_2 = ["--checkpoint.enable", "true", "--checkpoint.interval", "2"]


def assert_one_process_losses(result, one_process) -> None:
    """Losses and auxiliary losses of a 2-process layout equal the one process's.

    Step 1 is the HF model's loss; later steps differ only in the order of
    gradient sums (the Llama layouts' bound). Routing is discrete, but a
    flipped expert choice would move the loss by far more than this.
    """
    assert result.losses[1] == pytest.approx(one_process.losses[1], rel=1e-6)
    assert result.losses == pytest.approx(one_process.losses, rel=1e-4)
    assert series(result.history, "moe/aux_loss") == pytest.approx(
        series(one_process.history, "moe/aux_loss"), rel=1e-4)


@pytest.fixture(scope="module")
def fsdp2_ep2(hf_moe, tmp_path_factory):
    dump = tmp_path_factory.mktemp("moe") / "fsdp2_ep2"
    return dump, run_training(dump, *AUX_RUN, "--hf.load_path", str(hf_moe),
                              "--training.steps", "3", *FSDP2_EP2, *CHECKPOINT_AT_2,
                              nproc=2).check()


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_ep2_gives_the_one_process_losses(fsdp2_ep2, one_process):
    _, result = fsdp2_ep2
    assert "Applied FSDP to the model" in result.output
    assert_one_process_losses(result, one_process)


@pytest.mark.slow
@pytest.mark.distributed
def test_tp2_gives_the_one_process_losses_and_auxiliary_loss(hf_moe, one_process, tmp_path):
    # Tensor parallel over the 2 ranks (experts split by their hidden size, the
    # router replicated), both reading the one process's micro-batches of 4.
    result = run_training(tmp_path / "tp2", *AUX_RUN, "--hf.load_path", str(hf_moe),
                          "--training.steps", "3", *TP2, nproc=2).check()
    assert "Tensor Parallelism to the model" in result.output
    # As FSDP 2 + EP 2 above: the auxiliary gradient, taken once per TP rank on
    # the same tokens, is counted once.
    assert_one_process_losses(result, one_process)


@pytest.mark.slow
@pytest.mark.distributed
def test_the_ep2_checkpoint_resumes_on_one_process(fsdp2_ep2, hf_moe, one_process, tmp_path):
    # Elastic resume: each rank saved half of every layer's experts (and their
    # optimizer moments); one process loads them all and continues the same
    # global stream (global batch 8 = 2 x 4, now 2 accumulation steps of 4).
    dump, _ = fsdp2_ep2
    folder = resume_from(dump / "checkpoint" / "step-2", tmp_path / "one")
    # Same options as the run (the HF start included): the checkpoint wins.
    resumed = run_training(folder, *AUX_RUN, "--hf.load_path", str(hf_moe),
                           "--training.steps", "3", *CHECKPOINT_AT_2).check()
    assert "Loading the checkpoint" in resumed.output
    assert sorted(resumed.losses) == [3]
    assert resumed.losses[3] == pytest.approx(one_process.losses[3], rel=1e-4)


# Auxiliary-loss-free balancing: the bias is updated before each optimizer
# step (upstream #3666: never, with torchtitan 0.2.2's own qwen3 spec).
BIAS_RUN = [*MOE_RUN, "--moe.load_balance", "aux_loss_free", "--moe.bias_update_rate", "0.01",
            "--checkpoint.enable", "true", "--checkpoint.interval", "2",
            "--lr_scheduler.total_steps", "4"]
BIAS_NAMES = [f"layers.{i}.moe.expert_bias" for i in range(3)]


@pytest.fixture(scope="module")
def expert_bias_run(hf_moe, tmp_path_factory) -> tuple[Path, object]:
    """Four steps of auxiliary-loss-free balancing in one process, checkpoints at 2 and 4."""
    dump = tmp_path_factory.mktemp("bias") / "full"
    result = run_training(dump, *BIAS_RUN, "--hf.load_path", str(hf_moe),
                          "--training.steps", "4").check()
    return dump, result


@pytest.mark.slow
def test_expert_bias_moves_and_resume_is_exact_with_moe_state(hf_moe, expert_bias_run, tmp_path):
    full_dir, full = expert_bias_run
    common = [*BIAS_RUN, "--hf.load_path", str(hf_moe)]
    first = run_training(tmp_path / "resumed", *common, "--training.steps", "2").check()
    second = run_training(tmp_path / "resumed", *common, "--training.steps", "4").check()
    assert "moe/aux_loss" not in full.history[-1]
    assert sorted(second.losses) == [3, 4]
    assert {**first.losses, **second.losses} == pytest.approx(full.losses, rel=1e-6)

    after_2 = DCPCheckpoint(tmp_path / "resumed" / "checkpoint" / "step-2").read_tensors(BIAS_NAMES)
    straight = DCPCheckpoint(full_dir / "checkpoint" / "step-4").read_tensors(BIAS_NAMES)
    resumed = DCPCheckpoint(tmp_path / "resumed" / "checkpoint" / "step-4").read_tensors(BIAS_NAMES)
    for name in BIAS_NAMES:
        # Each update moves every expert by +-0.01 (minus the mean): two updates
        # leave it at most 0.04 from zero, and not at zero.
        assert 0 < after_2[name].abs().max().item() <= 0.04 + 1e-6, name
        assert torch.equal(resumed[name], straight[name]), name


@pytest.mark.slow
@pytest.mark.distributed
def test_expert_bias_under_tensor_parallel_moves_as_in_one_process(hf_moe, expert_bias_run, tmp_path):
    full_dir, full = expert_bias_run
    result = run_training(tmp_path / "tp2", *BIAS_RUN, "--hf.load_path", str(hf_moe),
                          "--training.steps", "2", *TP2, nproc=2).check()
    assert "Tensor Parallelism to the model" in result.output
    # The same bound as the layouts above; step 2 routes with the moved bias.
    assert result.losses[1] == pytest.approx(full.losses[1], rel=1e-6)
    assert result.losses == pytest.approx({s: full.losses[s] for s in (1, 2)}, rel=1e-4)
    # Both TP ranks count the same tokens per expert: the update is one process's.
    tp = DCPCheckpoint(tmp_path / "tp2" / "checkpoint" / "step-2").read_tensors(BIAS_NAMES)
    one = DCPCheckpoint(full_dir / "checkpoint" / "step-2").read_tensors(BIAS_NAMES)
    for name in BIAS_NAMES:
        assert tp[name].abs().max().item() > 0 and torch.equal(tp[name], one[name]), name
