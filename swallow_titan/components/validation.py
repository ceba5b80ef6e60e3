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

The forward pass and the loss reduction are torchtitan's: each set has its own
``Validator``, built through torchtitan's constructor (so every attribute its
``validate`` reads is set by torchtitan itself), whose dataloader is the set's
:class:`HeldOutLoader` and whose metrics sink is the set's :class:`SetLossRecorder`
(it does TP, CP and PP). :class:`PerDomainValidator` composes them and logs the
losses of all sets in one record. With ``[kernels] loss = "fused_linear_ce"`` the
labels go into the input dict, as in training (``data.dataloader.with_labels``),
so the model's output layer returns the loss without materialising the logits
(``[batch, seq_len, vocab]`` in fp32 would be about 21 GiB per rank at the
recipe's validation shapes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import torchtitan.components.validate as torchtitan_validate
from torchtitan.components.validate import BaseValidator, Validator
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


class SetLossRecorder:
    """The metrics sink of one set's torchtitan ``Validator``: keeps the set's loss.

    torchtitan's ``Validator.validate`` adds the tokens it read to
    ``ntokens_since_last_log`` and reports one loss through ``log_validation``;
    kept here, validation tokens stay out of the next training throughput.
    """

    def __init__(self) -> None:
        self.ntokens_since_last_log = 0
        self.loss: float | None = None

    def log_validation(self, loss: float, step: int, extra_metrics: Any = None) -> None:
        self.loss = float(loss)

    def take(self) -> float | None:
        """The loss of the last validation (None if none was reported), then forget it."""
        loss, self.loss = self.loss, None
        return loss


class HeldOutLoader:
    """One set's batches for this rank, built on first use and then reused.

    torchtitan's ``validate`` moves tensors to the device by assigning into the
    input dict, so each pass hands out copies of the cached CPU dicts.
    """

    def __init__(
        self,
        validation_set: ValidationSet,
        job_config: Any,
        tokenizer: Any,
        dp_rank: int,
        dp_world_size: int,
    ):
        self.validation_set = validation_set
        self.job_config = job_config
        self.tokenizer = tokenizer
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.labels_in_inputs = job_config.kernels.loss == FUSED_LOSS
        self._batches: list[Batch] | None = None

    def batches(self) -> list[Batch]:
        """This rank's batches of the set (built on first use, then reused)."""
        if self._batches is None:
            self._batches = self._build()
        return self._batches

    def _build(self) -> list[Batch]:
        vset, config = self.validation_set, self.job_config.validation
        per_batch = sequences_per_batch(self.job_config, self.dp_world_size)
        wanted = vset.sequences // per_batch * per_batch
        batches = held_out_batches(
            set_source(vset),
            self.tokenizer,
            seq_len=config.seq_len,
            sequences=vset.sequences,
            local_batch_size=config.local_batch_size,
            dp_rank=self.dp_rank,
            dp_world_size=self.dp_world_size,
            emit_positions=self.job_config.data.reset_position_ids,
            max_chars=self.job_config.data.max_document_chars,
        )
        got = len(batches) * per_batch
        if got < vset.sequences:
            logger.warning(
                f"validation set '{vset.name}': evaluating {got} of the "
                f"{vset.sequences} sequences asked for (whole batches of "
                f"{per_batch} x {config.seq_len} tokens"
                + ("; the documents hold no more)" if got < wanted else ")")
            )
        return batches

    def __iter__(self) -> Iterator[Batch]:
        for inputs, labels in self.batches():
            if self.labels_in_inputs:
                # The fused output layer computes the loss from the labels.
                yield with_labels(inputs, labels), labels
            else:
                yield dict(inputs), labels


@contextlib.contextmanager
def _validator_reads(loader: HeldOutLoader) -> Iterator[None]:
    """Make torchtitan's ``Validator.__init__`` take ``loader`` as its dataloader.

    Its constructor always builds torchtitan's own text dataloader (C4 from the
    Hub) through this module-level name; for the duration of one constructor
    call it returns the set's loader instead (a listed seam).
    """
    original = torchtitan_validate.build_text_validation_dataloader
    torchtitan_validate.build_text_validation_dataloader = lambda **_: loader
    try:
        yield
    finally:
        torchtitan_validate.build_text_validation_dataloader = original


class PerDomainValidator(BaseValidator):
    """One torchtitan ``Validator`` per ``[[validation.sets]]`` entry, logged together."""

    def __init__(
        self,
        job_config: Any,
        dp_world_size: int,
        dp_rank: int,
        tokenizer: Any,
        parallel_dims: Any,
        loss_fn: Any,
        validation_context: Any,
        maybe_enable_amp: Any,
        metrics_processor: Any,
        pp_schedule: Any = None,
        pp_has_first_stage: bool | None = None,
        pp_has_last_stage: bool | None = None,
    ):
        super().__init__(job_config)
        self.metrics_processor = metrics_processor
        self.sets: list[ValidationSet] = list(job_config.validation.sets)
        self.loaders: dict[str, HeldOutLoader] = {}
        self.recorders: dict[str, SetLossRecorder] = {}
        self.validators: dict[str, Validator] = {}
        for vset in self.sets:
            loader = HeldOutLoader(vset, job_config, tokenizer, dp_rank, dp_world_size)
            recorder = SetLossRecorder()
            with _validator_reads(loader):
                self.validators[vset.name] = Validator(
                    job_config=job_config,
                    dp_world_size=dp_world_size,
                    dp_rank=dp_rank,
                    tokenizer=tokenizer,
                    parallel_dims=parallel_dims,
                    loss_fn=loss_fn,
                    validation_context=validation_context,
                    maybe_enable_amp=maybe_enable_amp,
                    metrics_processor=recorder,
                    pp_schedule=pp_schedule,
                    pp_has_first_stage=pp_has_first_stage,
                    pp_has_last_stage=pp_has_last_stage,
                )
            self.loaders[vset.name] = loader
            self.recorders[vset.name] = recorder

    def batches(self, validation_set: ValidationSet) -> list[Batch]:
        """This rank's batches of a set (built on first use, then reused)."""
        return self.loaders[validation_set.name].batches()

    def validate(self, model_parts: list, step: int) -> None:
        """Validate every set with its torchtitan ``Validator``; log all losses at once."""
        begin = time.perf_counter()
        losses: dict[str, float] = {}
        for vset in self.sets:
            if not self.batches(vset):
                continue  # the same on every rank: the stream is global
            self.validators[vset.name].validate(model_parts, step)
            loss = self.recorders[vset.name].take()
            if loss is not None:
                losses[vset.name] = loss
        self.metrics_processor.log_validation_sets(step, losses, time.perf_counter() - begin)


def build_validator(**kwargs) -> PerDomainValidator:
    """TrainSpec ``build_validator_fn``."""
    return PerDomainValidator(**kwargs)
