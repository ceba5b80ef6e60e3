"""Validation with the fused loss never materialises the logits, and gives their loss."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
from torchtitan.distributed import ParallelDims

from support import TINY_CONFIG, tiny_tokenizer
from swallow_titan.config.manager import load_job_config
from swallow_titan.components.loss import SwallowLoss
from swallow_titan.model.args import FLAVORS
from swallow_titan.model.transformer import SwallowTransformer
from swallow_titan.components.validation import PerDomainValidator


class _Sets:
    """Receives the per-set losses that the validator logs."""

    def log_validation_sets(self, step, losses, seconds, prefix="val"):
        self.losses = losses


def _validate(model, *overrides: str) -> dict[str, float]:
    config = load_job_config(
        TINY_CONFIG,
        ["--training.seq_len", "32", "--validation.seq_len", "32",
         "--validation.local_batch_size", "2", *overrides],
    )
    sink = _Sets()
    validator = PerDomainValidator(
        job_config=config,
        dp_world_size=1,
        dp_rank=0,
        tokenizer=tiny_tokenizer(),
        parallel_dims=ParallelDims(1, 1, 1, 1, 1, 1, 1, world_size=1),
        loss_fn=SwallowLoss(config),
        validation_context=contextlib.nullcontext,
        maybe_enable_amp=contextlib.nullcontext(),
        metrics_processor=sink,
    )
    validator.validate([model], step=1)
    return sink.losses


def test_validation_with_the_fused_loss_gives_the_logits_loss_without_logits():
    args = replace(FLAVORS["tiny"], n_layers=2, max_seq_len=32)
    torch.manual_seed(0)
    plain = SwallowTransformer(args)
    with torch.no_grad():
        plain.init_weights()
    fused = SwallowTransformer(replace(args, loss_impl="fused_linear_ce"))
    fused.load_state_dict(plain.state_dict())
    outputs: list[torch.Size] = []
    fused.output.register_forward_hook(lambda m, i, out: outputs.append(out.shape))

    expected = _validate(plain)
    losses = _validate(fused, "--kernels.loss", "fused_linear_ce")

    # Every forward of the output layer returned [loss_sum, z_loss_sum].
    assert outputs and all(shape == (2,) for shape in outputs)
    assert set(losses) == set(expected) == {"ja", "en", "code", "math"}
    for name, loss in expected.items():
        # fp32 logits either way; only the summation order differs.
        assert abs(losses[name] - loss) <= 1e-5 * loss, (name, losses, expected)
