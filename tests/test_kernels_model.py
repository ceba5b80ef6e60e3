"""[kernels] in the model and the trainer's wiring: same numbers, same parameters.

The Triton kernels run under Triton's interpreter (``tests/conftest.py``), on a
2-layer tiny model with a short sequence.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from support import REPO, TINY_CONFIG
from support.overrides import KERNELS_ON
from swallow_titan.components.preflight import check_job_config
from swallow_titan.config.manager import ConfigError, load_job_config
from swallow_titan.components.loss import SwallowLoss
from swallow_titan.data.dataloader import LabelsInInputs
from swallow_titan.model.args import FLAVORS
from swallow_titan.model.transformer import (
    FusedLossOutput,
    FusedNormBlock,
    SwallowTransformer,
    TritonRMSNorm,
)

RECIPE = REPO / "train_configs" / "swallow_8b_v05.toml"


def _args(**kernels):
    return replace(FLAVORS["tiny"], n_layers=2, max_seq_len=32, **kernels)


def _models(z_loss: float = 0.0):
    torch.manual_seed(0)
    plain = SwallowTransformer(_args(z_loss=z_loss))
    with torch.no_grad():
        plain.init_weights()
    fused = SwallowTransformer(
        _args(rmsnorm_impl="triton", loss_impl="fused_linear_ce", z_loss=z_loss)
    )
    fused.load_state_dict(plain.state_dict())
    return plain, fused


def _batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (2, 16), generator=g)
    labels = torch.randint(0, vocab, (2, 16), generator=g)
    labels[0, :3] = -100
    return tokens, labels


def _config(*overrides: str, path=TINY_CONFIG):
    return load_job_config(path, list(overrides))


def test_kernel_options_keep_parameter_names_and_shapes():
    plain, fused = _models()
    assert {k: v.shape for k, v in plain.state_dict().items()} == {
        k: v.shape for k, v in fused.state_dict().items()
    }
    assert isinstance(fused.layers["0"], FusedNormBlock)
    assert isinstance(fused.norm, TritonRMSNorm)
    assert isinstance(fused.output, FusedLossOutput)


def test_fused_model_gives_the_loss_and_gradients_of_the_logits_model():
    plain, fused = _models(z_loss=1e-4)
    config = _config("--kernels.z_loss", "1e-4")
    loss_fn = SwallowLoss(config)
    tokens, labels = _batch(plain.vocab_size)

    expected = loss_fn(plain(tokens), labels)
    expected.backward()
    packed = fused(tokens, labels=labels)
    assert packed.shape == (2,)
    loss = loss_fn(packed, labels)
    loss.backward()

    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    grads = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_model_without_labels_returns_logits():
    plain, fused = _models()
    tokens, _ = _batch(plain.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(fused(tokens), plain(tokens), rtol=1e-5, atol=1e-5)


def test_labels_given_to_a_logits_model_are_refused():
    plain, _ = _models()
    tokens, labels = _batch(plain.vocab_size)
    with pytest.raises(ValueError, match="fused_linear_ce"):
        plain(tokens, labels=labels)


def test_fused_norm_block_compiles_fullgraph():
    torch.manual_seed(2)
    block = FusedNormBlock(0, _args(rmsnorm_impl="triton"))
    with torch.no_grad():
        block.init_weights()
    x = torch.randn(2, 16, 256, requires_grad=True)
    freqs = SwallowTransformer(_args())._precompute_freqs_cis()[:16]
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x, freqs, None)
    out.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    eager = block(x, freqs, None)
    eager.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, x.grad, rtol=1e-4, atol=1e-5)


def test_z_loss_is_recorded_for_logging_in_training_forwards_only():
    config = _config("--kernels.z_loss", "1e-3")
    loss_fn = SwallowLoss(config)
    logits = torch.randn(1, 4, 10, requires_grad=True)
    labels = torch.tensor([[1, 2, -100, 3]])
    with torch.no_grad():  # validation
        loss_fn(logits, labels)
    assert loss_fn.take_z_loss() is None
    loss = loss_fn(logits, labels)
    z_sum, tokens = loss_fn.take_z_loss()
    lse = torch.logsumexp(logits[0, [0, 1, 3]], dim=-1)
    torch.testing.assert_close(z_sum, 1e-3 * (lse**2).sum())
    assert tokens.item() == 3
    ce = torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="sum")
    torch.testing.assert_close(loss, ce + z_sum)


def test_labels_in_inputs_adds_labels_and_keeps_the_loader_state():
    class Loader:
        def __iter__(self):
            yield {"input": torch.zeros(1, 3)}, torch.ones(1, 3)

        def state_dict(self):
            return {"position": 7}

        def load_state_dict(self, state):
            self.loaded = state

        def metrics(self):
            return {"data/x/tokens": 3}

    wrapped = LabelsInInputs(Loader())
    inputs, labels = next(iter(wrapped))
    assert set(inputs) == {"input", "labels"}
    assert inputs["labels"] is labels
    assert wrapped.state_dict() == {"position": 7}
    wrapped.load_state_dict({"position": 9})
    assert wrapped.loader.loaded == {"position": 9}
    assert wrapped.metrics() == {"data/x/tokens": 3}


def test_kernels_are_off_by_default_and_in_the_tiny_config():
    config = _config()
    assert (config.kernels.rmsnorm, config.kernels.loss, config.kernels.z_loss) == (
        "torch",
        "torch",
        0.0,
    )


def test_recipe_turns_both_kernels_on_with_z_loss_off():
    config = _config(path=RECIPE)
    assert (config.kernels.rmsnorm, config.kernels.loss, config.kernels.z_loss) == (
        "triton",
        "fused_linear_ce",
        0.0,
    )


def _check_error(*overrides: str, world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as e:
        check_job_config(_config(*overrides), world_size, str(TINY_CONFIG))
    return str(e.value)


def test_unknown_kernel_choice_lists_the_choices(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(TINY_CONFIG.read_text() + '\n[kernels]\nloss = "fused"\n')
    with pytest.raises(ConfigError) as e:
        load_job_config(path)
    assert "kernels.loss" in str(e.value) and "'fused_linear_ce'" in str(e.value)


def test_kernels_on_cpu_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr("kernels.runtime.INTERPRET", False)
    message = _check_error(*KERNELS_ON)
    assert "TRITON_INTERPRET=1" in message and 'rmsnorm = "torch"' in message


def test_fused_loss_with_pipeline_parallel_is_refused():
    message = _check_error(
        *KERNELS_ON, "--parallelism.pipeline_parallel_degree", "2", world_size=2
    )
    assert "pipeline_parallel_degree" in message and "fused_linear_ce" in message


def test_fused_loss_with_float8_output_layer_is_refused():
    message = _check_error(
        *KERNELS_ON,
        "--model.converters", "quantize.linear.float8",
        "--quantize.linear.float8.emulate", "true",
    )
    assert "filter_fqns" in message and '"output"' in message


def test_negative_z_loss_is_refused():
    assert "kernels.z_loss" in _check_error("--kernels.z_loss", "-1e-4")
