"""Per-domain validation: one loss and perplexity per ``[[validation.sets]]`` entry.

Every ``validation.freq`` steps each set is evaluated and logged as
``val/<name>/loss`` and ``val/<name>/perplexity``, with their mean as
``val/loss`` / ``val/perplexity`` (each set counts the same, whatever its size).

A set is the first ``sequences`` windows of its documents, tokenised and
packed like the training data at ``validation.seq_len`` by the training path's
reader and lane (``data.dataloader.held_out_batches``: file order, bad records
skipped and counted), rounded down to whole global batches
(``validation.local_batch_size`` x data-parallel degree). The windows are built
once, on first use, and are the same on every rank; each rank keeps its slice.
So every rank runs the same number of batches (FSDP/TP collectives stay
matched) and every validation sees the same tokens, for any number of GPUs up
to that rounding.

The forward pass and the loss reduction are torchtitan's ``Validator.validate``
(which handles TP, CP and PP), run once per set: it hands each set's loss to
``log_validation``, which :class:`_SetLoss` captures. With ``[kernels] loss =
"fused_linear_ce"`` the labels go into the input dict, as in training
(``data.dataloader.with_labels``), so the
model's output layer returns the loss without materialising the logits
(``[batch, seq_len, vocab]`` in fp32 would be about 21 GiB per rank at the
recipe's validation shapes).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

from torchtitan.components.validate import Validator
from torchtitan.tools.logging import logger

from swallow_titan.config.sections import FUSED_LOSS, DataSource, ValidationSet
from swallow_titan.data.dataloader import Batch, held_out_batches, with_labels


def set_source(validation_set: ValidationSet) -> DataSource:
    """The set's documents as a data source read once (no repeats)."""
    fields = {f.name: getattr(validation_set, f.name) for f in dataclasses.fields(DataSource)}
    return DataSource(**{**fields, "weight": 1.0, "max_epochs": 1})


def sequences_per_batch(job_config: Any, dp_world_size: int) -> int:
    """Windows in one global validation batch (all data-parallel ranks)."""
    return job_config.validation.local_batch_size * dp_world_size


class _SetLoss:
    """Stands in for the metrics processor while torchtitan validates one set."""

    def __init__(self) -> None:
        self.ntokens_since_last_log = 0
        self.loss: float | None = None

    def log_validation(self, loss: float, step: int, extra_metrics: Any = None) -> None:
        self.loss = float(loss)


class PerDomainValidator(Validator):
    """torchtitan's Validator, run over each ``[[validation.sets]]`` entry."""

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
        # Validator.__init__ builds torchtitan's C4 dataloader; set what
        # validate() uses instead.
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
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.sets: list[ValidationSet] = list(job_config.validation.sets)
        self._batches: dict[str, list[Batch]] = {}
        self._current: str | None = None
        self._labels_in_inputs = job_config.kernels.loss == FUSED_LOSS

    def batches(self, validation_set: ValidationSet) -> list[Batch]:
        """This rank's batches of a set (built on first use, then reused)."""
        if validation_set.name not in self._batches:
            self._batches[validation_set.name] = self._build_batches(validation_set)
        return self._batches[validation_set.name]

    def _build_batches(self, validation_set: ValidationSet) -> list[Batch]:
        config = self.job_config.validation
        per_batch = sequences_per_batch(self.job_config, self.dp_world_size)
        wanted = validation_set.sequences // per_batch * per_batch
        batches = held_out_batches(
            set_source(validation_set),
            self.tokenizer,
            seq_len=config.seq_len,
            sequences=validation_set.sequences,
            local_batch_size=config.local_batch_size,
            dp_rank=self.dp_rank,
            dp_world_size=self.dp_world_size,
            emit_positions=self.job_config.data.reset_position_ids,
            max_chars=self.job_config.data.max_document_chars,
        )
        got = len(batches) * per_batch
        if got < validation_set.sequences:
            logger.warning(
                f"validation set '{validation_set.name}': evaluating {got} of the "
                f"{validation_set.sequences} sequences asked for (whole batches of "
                f"{per_batch} x {config.seq_len} tokens"
                + ("; the documents hold no more)" if got < wanted else ")")
            )
        return batches

    @property
    def validation_dataloader(self) -> Iterator[Batch]:
        # validate() moves tensors to the device by assigning into the input
        # dict: hand it copies so the cached CPU batches stay as they are.
        for inputs, labels in self._batches[self._current]:
            if self._labels_in_inputs:
                # The fused output layer computes the loss from the labels.
                yield with_labels(inputs, labels), labels
            else:
                yield dict(inputs), labels

    def validate(self, model_parts: list, step: int) -> None:
        begin = time.perf_counter()
        processor = self.metrics_processor
        losses: dict[str, float] = {}
        try:
            for validation_set in self.sets:
                if not self.batches(validation_set):
                    continue  # the same on every rank: the stream is global
                self._current = validation_set.name
                capture = _SetLoss()
                self.metrics_processor = capture
                super().validate(model_parts, step)
                if capture.loss is not None:
                    losses[validation_set.name] = capture.loss
        finally:
            self.metrics_processor = processor
            self._current = None
        processor.log_validation_sets(step, losses, time.perf_counter() - begin)


def build_validator(**kwargs) -> PerDomainValidator:
    """TrainSpec ``build_validator_fn``."""
    return PerDomainValidator(**kwargs)
