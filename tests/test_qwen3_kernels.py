"""``[kernels]`` for the Qwen3 family: the Triton RMSNorm (block, final and q/k
norms) and the fused output layer + cross-entropy, with tied embeddings.

The tiny Qwen3 flavor (3 layers, head_dim 32, tied embeddings), one process,
Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch
from torchtitan.components.loss import IGNORE_INDEX

from support import TINY_CONFIG
from support.model import build_model, kernel_ops_of_train_step
from support.overrides import KERNELS_ON
from support.runs import run_training
from swallow_titan.components.preflight import check_job_config
from swallow_titan.config.manager import load_job_config
from swallow_titan.model.qwen3 import FusedNormQwen3Block
from swallow_titan.model.transformer import FusedLossOutput, TritonQKNorm, TritonRMSNorm

QWEN3_TINY = ["--model.name", "swallow_qwen3", "--model.flavor", "tiny"]


@pytest.mark.parametrize("flavor", ["tiny", "tiny_moe"])
def test_qwen3_kernels_from_the_toml_reach_the_model_and_their_ops_run(flavor):
    model, _ = build_model("--model.name", "swallow_qwen3", "--model.flavor", flavor, *KERNELS_ON)
    plain, _ = build_model("--model.name", "swallow_qwen3", "--model.flavor", flavor)
    with torch.no_grad():  # the MoE experts are torch.empty until initialised
        model.init_weights(buffer_device=None)
        plain.init_weights(buffer_device=None)
    # torchtitan's parameter names, so checkpoints and HF conversion are unchanged.
    assert list(dict(model.named_parameters())) == list(dict(plain.named_parameters()))
    n = len(model.layers)
    assert all(type(block) is FusedNormQwen3Block for block in model.layers.values())
    assert type(model.norm) is TritonRMSNorm
    for block in model.layers.values():
        assert type(block.attention_norm) is TritonRMSNorm and type(block.ffn_norm) is TritonRMSNorm
        assert type(block.attention.q_norm) is TritonQKNorm
        assert type(block.attention.k_norm) is TritonQKNorm
    assert type(model.output) is FusedLossOutput
    tied = model.model_args.enable_weight_tying
    assert tied == (flavor == "tiny")  # the tiny flavor ties, tiny_moe does not (as 30B-A3B)
    assert (model.output.weight is model.tok_embeddings.weight) == tied
    ops = kernel_ops_of_train_step(model, with_labels=True)
    # Per layer: attention_norm, q_norm, k_norm plain, ffn_norm fused with the
    # residual add; plus the final norm. Each has one backward.
    assert ops["swallow.rms_norm"] == 3 * n + 1, ops
    assert ops["swallow.rms_norm_residual"] == n, ops
    assert ops["swallow.rms_norm_backward"] == 4 * n + 1, ops
    assert ops["swallow.fused_linear_cross_entropy"] == 1, ops
    assert not kernel_ops_of_train_step(plain, with_labels=False)


def _loss_and_shared_grad(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor,
                          fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad()
    if fused:
        loss = model(ids, labels=labels)[0]
    else:
        logits = model(ids).double()  # a float64 model gives float64 logits anyway
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    loss.backward()
    return loss.detach().double(), model.tok_embeddings.weight.grad.double()


def test_qwen3_tied_embedding_gradient_with_kernels_equals_eagers():
    fused, _ = build_model(*QWEN3_TINY, *KERNELS_ON)
    eager, _ = build_model(*QWEN3_TINY)
    with torch.no_grad():
        fused.init_weights(buffer_device=None)
    eager.load_state_dict(fused.state_dict())
    assert fused.output.weight is fused.tok_embeddings.weight
    assert eager.output.weight is eager.tok_embeddings.weight
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (2, 24), generator=g)
    labels = torch.randint(0, 4096, (2, 24), generator=g)
    labels[0, :5] = IGNORE_INDEX  # ignored positions add nothing to either gradient
    loss, grad = _loss_and_shared_grad(fused, ids, labels, fused=True)
    loss32, grad32 = _loss_and_shared_grad(eager, ids, labels, fused=False)
    loss64, grad64 = _loss_and_shared_grad(eager.double(), ids, labels, fused=False)
    # The shared weight's gradient is the sum of the output layer's part and the
    # embedding rows' part; a broken tie loses the first (most of the norm).
    assert grad.count_nonzero() > 0.5 * grad.numel()
    # Both fp32 computations are the same sums in different orders (chunked
    # vocabulary, Triton norms): the worst-case rounding bound is the same for
    # both, so the kernels' error against the float64 result must be of the
    # order of eager fp32's own; 4x leaves room for the different orders.
    eager_error = (grad32 - grad64).norm()
    assert 0 < eager_error < 1e-4 * grad64.norm()
    assert (grad - grad64).norm() <= 4 * eager_error
    assert abs(loss - loss64) <= 4 * abs(loss32 - loss64) + 4 * torch.finfo(torch.float32).eps * loss64


@pytest.mark.slow
def test_qwen3_losses_match_with_kernels_on_and_off(tmp_path):
    run = [
        *QWEN3_TINY,
        "--training.steps", "3",
        "--lr_scheduler.warmup_steps", "1",
        "--training.local_batch_size", "2",
        "--training.global_batch_size", "2",
        "--kernels.z_loss", "1e-4",
    ]
    off = run_training(tmp_path / "off", *run).check()
    on = run_training(tmp_path / "on", *run, *KERNELS_ON, env={"TRITON_INTERPRET": "1"}).check()
    assert "Triton kernels: rmsnorm = 'triton', loss = 'fused_linear_ce'" in on.output
    assert "Triton kernels:" not in off.output
    assert sorted(on.losses) == sorted(off.losses) == [1, 2, 3]
    for step in off.losses:
        # Llama's kernels-on/off tolerance (tests/test_kernels_training.py). A
        # step's loss is an fp32 sum over its 128 tokens (2 x 64) whose terms the
        # kernels compute in another order; the worst-case rounding bound of such
        # a sum is 128 x eps = 1.5e-5 relative, within 2e-5. Measured: 1e-7 (one
        # ulp), so the updates of steps 1 and 2 did not drift apart either.
        assert on.losses[step] == pytest.approx(off.losses[step], rel=2e-5), (step, on, off)


def test_qwen3_accepts_the_kernels_without_tensor_parallel():
    config = load_job_config(TINY_CONFIG, [*QWEN3_TINY, *KERNELS_ON])
    check_job_config(config, 1, str(TINY_CONFIG))


def test_qwen3_accepts_the_kernels_with_tensor_parallel():
    # Verified in a 2-process run: tests/test_qwen3_training.py.
    config = load_job_config(TINY_CONFIG, [
        *QWEN3_TINY, *KERNELS_ON,
        "--parallelism.tensor_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "1",
    ])
    assert check_job_config(config, 2, str(TINY_CONFIG)).tp == 2
