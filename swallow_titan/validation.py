"""Validation on held-out documents, with torchtitan's Validator loop.

The foundation validates on one local source, ``[validation] dataset_path``
(a path or glob of JSONL/Parquet files), packed like the training data.
torchtitan's ``Validator`` builds a C4 dataloader in its constructor, so this
subclass sets up the same attributes with swallow-titan's dataloader instead
and inherits ``validate``.
"""

from __future__ import annotations

from torchtitan.components.validate import Validator

from swallow_titan.config.sections import DataSource
from swallow_titan.data.dataloader import GlobalStreamDataLoader
from swallow_titan.data.mixture import MixtureStream

VALIDATION_SOURCE_NAME = "validation"


def validation_source(job_config) -> DataSource:
    return DataSource(
        name=VALIDATION_SOURCE_NAME,
        path=job_config.validation.dataset_path or "",
        max_epochs=1,
    )


class HeldOutValidator(Validator):
    """torchtitan's Validator over a local held-out source."""

    def __init__(
        self,
        job_config,
        dp_world_size: int,
        dp_rank: int,
        tokenizer,
        parallel_dims,
        loss_fn,
        validation_context,
        maybe_enable_amp,
        metrics_processor,
        pp_schedule=None,
        pp_has_first_stage=None,
        pp_has_last_stage=None,
    ):
        self.job_config = job_config
        self.tokenizer = tokenizer
        self.parallel_dims = parallel_dims
        self.loss_fn = loss_fn
        self.validation_context = validation_context
        self.maybe_enable_amp = maybe_enable_amp
        self.metrics_processor = metrics_processor
        self.pp_schedule = pp_schedule
        self.pp_has_first_stage = pp_has_first_stage
        self.pp_has_last_stage = pp_has_last_stage
        self._dp = (dp_rank, dp_world_size)

    @property
    def validation_dataloader(self) -> GlobalStreamDataLoader:
        # A fresh pass over the same held-out windows at every validation.
        rank, world = self._dp
        config = self.job_config.validation
        stream = MixtureStream(
            [validation_source(self.job_config)], self.tokenizer, config.seq_len
        )
        return GlobalStreamDataLoader(
            stream,
            config.local_batch_size,
            rank,
            world,
            emit_positions=self.job_config.data.reset_position_ids,
        )


def build_validator(**kwargs) -> HeldOutValidator:
    """TrainSpec ``build_validator_fn``."""
    return HeldOutValidator(**kwargs)
