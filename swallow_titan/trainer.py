"""swallow-titan's Trainer: torchtitan's, plus the guard, pre-emption and safe checkpoints.

What differs from torchtitan 0.2.2's ``Trainer`` (everything else — model
building, parallelism, forward/backward, the dataloader loop — is inherited):

- ``train_step``: after clipping, one all-reduce (MAX over all ranks) of three
  flags — this rank's loss is non-finite, the gradient norm is non-finite, a
  stop signal arrived — decides, the same on every rank, whether the
  optimizer steps (``[guard]``, :mod:`swallow_titan.components.guard`) and whether the
  run stops after this step (SIGTERM, :mod:`swallow_titan.runtime.preemption`).
  Cost: that all-reduce and one host sync per step, before the optimizer
  step. torchtitan already syncs once per step (``dist_sum(...)`` of the
  token count at the start of the step), so the GPU only idles while the
  optimizer's first kernels are launched, well under a millisecond against
  steps of seconds.
- Loss spikes (``[guard] on_spike``, :class:`SpikeGuard`): with the finite
  verdict, the global loss (one more all-reduce) and gradient norm go to the
  spike detector; a spike's event gets the per-domain losses of the step's
  batch (an extra forward without gradients, only then). "skip" drops the
  update like a non-finite step; "rollback" is carried out by ``train``:
  reload the newest checkpoint, keep the data position (the batches since the
  checkpoint are skipped), write that checkpoint again, restart the curves.
- ``train``: the loop writes a full checkpoint and ends after the step in
  which a stop signal arrived, never writes a checkpoint whose parameters or
  optimizer state are not finite, opens TensorBoard at the first step of
  this attempt, and shortens process-group timeouts after the first step of
  every attempt (torchtitan: only after step 1, so never on resume).
- Checkpoints are written by :class:`AtomicCheckpointManager` and include the
  random generators, the guard's counters and the spike guard's state.
- MoE models: per-layer expert load and the auxiliary loss are logged
  (:mod:`swallow_titan.components.moe_metrics`).
- ``[eval]``: downstream evaluation (lm-eval) after validation, every
  ``eval.freq`` steps and after the last one (:mod:`swallow_titan.eval.in_loop`);
  a restart first runs the evaluation of the step it resumes from if that
  one has no result (the run stopped during it).
- ``[averaging]``: the EMA / tail average of the weights is updated after
  each step, saved in checkpoints, validated after the raw weights, evaluated
  (``[eval]``) before them after the last step and written then (:mod:`swallow_titan.components.averaging`).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torchtitan.components.dataloader import DataloaderExhaustedError
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools.logging import logger
from torchtitan.tools.utils import device_type
from torchtitan.tools.profiling import maybe_enable_memory_snapshot
from torchtitan.train import Trainer

from swallow_titan.checkpoint.manager import AtomicCheckpointManager
from swallow_titan.checkpoint.rng import RNG, RngState
from swallow_titan.config.paths import step_folder_name
from swallow_titan.data.dataloader import LABELS_KEY, Batch
from swallow_titan.components.guard import (
    NonfiniteError,
    NonfiniteGuard,
    NonfiniteInjector,
    SPIKES_ENTRY,
    SpikeGuard,
    describe_spike,
    state_is_finite,
)
from swallow_titan.components.averaging import AVERAGING, WeightAveraging
from swallow_titan.components.loss import SwallowLoss
from swallow_titan.components.metrics import SwallowMetricsProcessor
from swallow_titan.components.moe_metrics import ExpertLoadMeter
from swallow_titan.runtime.preemption import PreemptionSignal
from swallow_titan.components.profiling import profiling_context
from swallow_titan.runtime.ranks import process_rank

# Checkpoint entry of the guard's counters (skipped steps).
GUARD = "guard"
# spike/action in the run log and TensorBoard.
SPIKE_ACTION_CODES = {"log": 1, "skip": 2, "rollback": 3}

def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _z_loss_per_token(loss_fn: SwallowLoss, mesh: Any) -> float | None:
    """z-loss per token over all data-parallel ranks since the last log step.

    Taken from the loss (:meth:`SwallowLoss.take_z_loss`: training forwards add
    their z-loss sum and counted tokens, taking returns and resets them) when a
    z-loss is on; else None.
    """
    taken = loss_fn.take_z_loss()
    if taken is None:
        return None
    z_sum, tokens = taken
    total = dist_utils.dist_sum(z_sum, mesh)
    counted = dist_utils.dist_sum(tokens.float(), mesh)
    return total / max(counted, 1.0)


class SwallowTrainer(Trainer):
    """torchtitan's Trainer with the numerical guard, pre-emption and atomic checkpoints."""

    # What the swallow TrainSpec builds (narrower than torchtitan's annotations).
    metrics_processor: SwallowMetricsProcessor

    @record
    def __init__(self, job_config: Any):
        self.guard = NonfiniteGuard.from_config(job_config)
        self.spikes = SpikeGuard.from_config(job_config)
        # A spike event whose rollback the loop carries out after the step.
        self._rollback: dict[str, Any] | None = None
        super().__init__(job_config)
        # The TrainSpec's loss, kept before any wrapping: it holds the z-loss meter.
        self.swallow_loss: SwallowLoss = self.loss_fn
        self.preempted = False
        self.preemption = PreemptionSignal()
        inject = job_config.debug.inject_nonfinite_at_steps
        if inject:
            logger.warning(f"[debug] the loss will be made NaN at steps {sorted(inject)}")
            self.loss_fn = NonfiniteInjector(self.loss_fn, inject, lambda: self.step)
        self.averaging = WeightAveraging(job_config, self.model_parts)
        self.checkpointer = self._atomic_checkpointer(self.checkpointer)
        self.expert_load = ExpertLoadMeter(self.model_parts)
        self.evaluator = None
        if job_config.eval.enable:
            # Imported only here: a run without [eval] never loads lm-eval.
            from swallow_titan.eval.in_loop import InLoopEvaluator

            self.evaluator = InLoopEvaluator(self)

    def _atomic_checkpointer(self, stock: Any) -> AtomicCheckpointManager:
        """Replace the CheckpointManager torchtitan built with the atomic one."""
        config = self.job_config
        # torchtitan's manager sets sd_adapter only when checkpointing is enabled.
        adapter = getattr(stock, "sd_adapter", None)
        if adapter is None and self.train_spec.state_dict_adapter is not None:
            adapter = self.train_spec.state_dict_adapter(
                self.model_args, config.model.hf_assets_path
            )
        stock.close()
        rank = process_rank()
        states: dict[str, Any] = {
            "train_state": self,
            RNG: RngState(rank, device_type),
            GUARD: self.guard,
            SPIKES_ENTRY: self.spikes,
        }
        if self.averaging.enabled:
            states[AVERAGING] = self.averaging
        return AtomicCheckpointManager(
            dataloader=self.dataloader,
            model_parts=self.model_parts,
            optimizers=self.optimizers,
            lr_schedulers=self.lr_schedulers,
            states=states,
            checkpoint_config=config.checkpoint,
            sd_adapter=adapter,
            base_folder=config.job.dump_folder,
            optional_entries=(RNG, GUARD, SPIKES_ENTRY, AVERAGING),
            publish_delay_s=config.debug.checkpoint_publish_delay_s,
        )

    # ------------------------------------------------------------------ a step

    def train_step(self, data_iterator: Iterator[Batch]) -> bool:
        """One optimizer step (or a skipped one); returns whether to stop after it."""
        self.optimizers.zero_grad()
        lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]
        dims = self.parallel_dims

        microbatches = [next(data_iterator) for _ in range(self.gradient_accumulation_steps)]
        local_tokens = sum((labels != IGNORE_INDEX).sum() for _, labels in microbatches)
        local_tokens = torch.as_tensor(local_tokens).to(self.device)
        if dims.dp_enabled:
            global_tokens = dist_utils.dist_sum(local_tokens, dims.get_mesh("batch"))
        else:
            global_tokens = local_tokens.float()

        losses = []
        for inputs, labels in microbatches:
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            loss = self.forward_backward_step(
                input_dict=inputs,
                labels=labels.to(self.device),
                global_valid_tokens=global_tokens,
            )
            losses.append(loss.detach())
        loss = _full(torch.stack(losses).sum())

        grad_norm = _full(
            dist_utils.clip_grad_norm_(
                [p for m in self.model_parts for p in m.parameters()],
                self.job_config.training.max_norm,
                foreach=True,
                pp_mesh=dims.get_optional_mesh("pp"),
                ep_enabled=dims.ep_enabled,
            )
        )
        loss_bad, grad_bad, stop = self._agree(
            ~torch.isfinite(loss), ~torch.isfinite(grad_norm), self.preemption.requested
        )
        self.expert_load.record()
        apply = self.guard.judge(self.step, not loss_bad, not grad_bad)
        spike = self._judge_spike(loss, grad_norm, microbatches) if apply else None
        if spike is not None and spike["action"] != "log":
            apply = False
        if apply:
            self.checkpointer.maybe_wait_for_staging()
            self.optimizers.step()
        else:
            self.optimizers.zero_grad()  # drop the poisoned gradients
        if spike is not None and spike["action"] == "rollback":
            self._rollback = spike  # train() reloads; this step is not logged
            return stop
        if spike is not None:
            self.spikes.record(spike)
            self._log_spike(self.step, spike)
        self.lr_schedulers.step()

        if self.metrics_processor.should_log(self.step):
            self._log_step(loss, grad_norm, lr, local_tokens, global_tokens)
        return stop

    # ------------------------------------------------------------ loss spikes

    def _judge_spike(
        self, loss: torch.Tensor, grad_norm: torch.Tensor, microbatches: list[Batch]
    ) -> dict[str, Any] | None:
        """The spike event of this (finite) step, or None; decided alike on every rank.

        The global loss is this rank's share summed over the data-parallel
        ranks (as logged), then the MAX over all ranks, so that pipeline stages
        without the loss (-1) judge the same value.
        """
        if not self.spikes.enabled:
            return None
        loss_value, norm_value = self._spike_values(loss, grad_norm).tolist()
        event = self.spikes.judge(self.step, {"loss": loss_value, "grad_norm": norm_value})
        if event is None:
            return None
        event["data_batch"] = self.dataloader.batches_consumed()
        event["domain_losses"] = self._domain_losses(microbatches)
        if event["action"] == "rollback" and self.checkpointer.newest_step() is None:
            logger.warning(
                f"step {self.step}: no checkpoint to roll back to yet; skipping the "
                "update instead"
            )
            self.spikes.skip_instead(event)
        return event

    def _spike_values(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """``[global loss, grad norm]`` in float64, the same on every rank: the
        collectives of the spike check (read by the caller)."""
        dims = self.parallel_dims
        if dims.dp_cp_enabled:
            loss = loss.detach().clone()
            dist.all_reduce(loss, group=dims.get_mesh("loss").get_group())
        values = torch.stack([loss.reshape(()), grad_norm.reshape(())]).to(
            self.device, torch.float64
        )
        if dist.is_initialized():
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return values

    def _domain_losses(self, microbatches: list[Batch]) -> dict[str, float]:
        """Training loss per ``[[data.sources]]`` domain of this step's batch, with
        the weights before the update: one extra forward per microbatch and
        domain, without gradients (only when a spike is seen). Not under
        pipeline parallelism (returns {})."""
        if self.parallel_dims.pp_enabled:
            return {}
        domain_of = {s.name: s.domain for s in self.job_config.data.sources}
        domains = sorted(set(domain_of.values()))
        sums = torch.zeros(len(domains), 2, dtype=torch.float64, device=self.device)
        model = self.model_parts[0]
        with torch.no_grad(), self.expert_load.unchanged_counts():
            for (inputs, labels), rows in zip(microbatches, self.dataloader.last_step_sources()):
                for d, domain in enumerate(domains):
                    keep = torch.tensor([domain_of[r] == domain for r in rows])
                    masked = labels.masked_fill(~keep.unsqueeze(1), IGNORE_INDEX).to(self.device)
                    input_dict = {k: v.to(self.device) for k, v in inputs.items()}
                    if LABELS_KEY in input_dict:
                        input_dict[LABELS_KEY] = masked  # the fused loss reads them here
                    x, y, extra_inputs, extra_kwargs = self.post_dataloading_process(
                        input_dict, masked
                    )
                    with self.train_context(), self.maybe_enable_amp:
                        loss_sum = _full(self.loss_fn(model(x, **extra_inputs, **extra_kwargs), y))
                    sums[d, 0] += loss_sum.double()
                    sums[d, 1] += (y != IGNORE_INDEX).sum()
        # FSDP keeps the root's parameters gathered after a forward (a backward
        # normally follows); without one they would stay gathered, and the
        # optimizer's parameters would no longer be the model's (a rollback's
        # checkpoint load then fails to map them).
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        dims = self.parallel_dims
        if dims.dp_cp_enabled:
            # Token sums over the data- (and context-) parallel ranks, as for the loss.
            dist.all_reduce(sums, group=dims.get_mesh("loss").get_group())
        return {
            domain: float(total / count)
            for domain, (total, count) in zip(domains, sums.tolist())
            if count > 0
        }

    def _log_spike(self, step: int, event: dict[str, Any]) -> None:
        """A spike event to the run log and TensorBoard (scalars and a note) at ``step``."""
        scalars: dict[str, float] = {
            "spike/step": event["step"],
            "spike/action": SPIKE_ACTION_CODES[event["action"]],
            "spike/data_batch": event["data_batch"],
            "spike/count": len(self.spikes.events),
            "spike/rollbacks": self.spikes.rollbacks,
        }
        for metric, found in event["spikes"].items():
            scalars[f"spike/{metric}"] = found["value"]
            scalars[f"spike/{metric}_median"] = found["median"]
            scalars[f"spike/{metric}_score"] = found["score"]
        for domain, value in event["domain_losses"].items():
            scalars[f"spike/domain/{domain}/loss"] = value
        if event["action"] == "rollback":
            scalars["spike/rolled_back_to"] = event["rolled_back_to"]
            first, last = event["skipped_batches"]
            scalars["spike/skipped_batches"] = last - first + 1
        self.metrics_processor.log_event(step, scalars, ("guard/spikes", describe_spike(event)))

    def _roll_back(self, event: dict[str, Any]) -> None:
        """Reload the newest checkpoint but keep the data position (past the
        spike's batch): the batches since the checkpoint are skipped. The
        checkpoint is then written again with that position and the event, so
        a kill from now on resumes past the skipped data."""
        data_state = self.dataloader.state_dict()
        back_to = self.checkpointer.newest_step()
        assert back_to is not None  # checked when the spike was judged
        self.checkpointer.load(step=back_to)
        first_skipped = self.dataloader.batches_consumed() + 1
        self.dataloader.load_state_dict(data_state)
        event["rolled_back_to"] = back_to
        event["skipped_batches"] = [first_skipped, self.dataloader.batches_consumed()]
        self.spikes.record(event)
        self.checkpointer.save_now(self.step)
        # The curves and the run log restart at the reloaded step, as after a restart.
        self.metrics_processor.start(self.step + 1)
        self._log_spike(self.step, event)
        logger.warning(
            f"step {event['step']}: rolled back to {step_folder_name(back_to)}; data batches "
            f"{first_skipped}-{event['skipped_batches'][1]} are skipped; training goes on "
            f"at step {self.step + 1}"
        )

    def _evaluate(self, step: int) -> None:
        """``[eval]`` of the trained weights; after the last step, of each complete average first.

        The averages only at the end: each evaluation of one costs as much as
        the trained weights' (the recipe budgets ~1% of training time for
        evaluation). The trained weights' ``eval/time_s`` record, written
        last, marks the evaluation of ``step`` complete
        (:meth:`InLoopEvaluator.missing_evaluation`), so a run killed during
        it evaluates everything again on restart.
        """
        assert self.evaluator is not None
        if self.averaging.enabled and step == self.job_config.training.steps:
            self.averaging.evaluate(self.evaluator, step)
        self.evaluator.evaluate(step)

    def _agree(self, *flags: torch.Tensor | bool) -> list[bool]:
        """Each flag, OR-ed over all ranks: one all-reduce, one host sync."""
        return [bool(v) for v in self._max_over_ranks(flags).tolist()]

    def _max_over_ranks(self, flags: tuple[torch.Tensor | bool, ...]) -> torch.Tensor:
        """The flags as int32, all-reduced with MAX (on the device, no sync)."""
        values = torch.stack(
            [torch.as_tensor(f, device=self.device).reshape(()) for f in flags]
        ).to(torch.int32)
        if dist.is_initialized():
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return values

    def _log_step(
        self,
        loss: torch.Tensor,
        grad_norm: torch.Tensor,
        lr: float,
        local_tokens: torch.Tensor,
        global_tokens: Any,
    ) -> None:
        dims = self.parallel_dims
        mesh = dims.get_optional_mesh("loss") if dims.dp_cp_enabled else None
        # `loss` is this rank's token-loss sum / global tokens: summing it over
        # ranks gives the global mean; scaled back it is this rank's mean.
        avg_loss = dist_utils.dist_sum(loss, mesh)
        max_loss = dist_utils.dist_max(loss * global_tokens / local_tokens, mesh)
        tokens_seen = dist_utils.dist_sum(
            torch.tensor(self.ntokens_seen, dtype=torch.int64, device=self.device), mesh
        )
        extra: dict[str, float] = {
            "train/lr": lr,
            "train/tokens_seen": tokens_seen,
            "train/skipped_steps": self.guard.skipped_steps + self.spikes.skipped_steps,
        }
        z_loss = _z_loss_per_token(self.swallow_loss, mesh)
        if z_loss is not None:
            extra["train/z_loss"] = z_loss
        extra.update(self.dataloader.metrics())
        extra.update(self.expert_load.metrics(mesh.get_group() if mesh is not None else None))
        self.metrics_processor.log(
            self.step, avg_loss, max_loss, grad_norm.item(), extra_metrics=extra
        )

    # ------------------------------------------------------------------ the loop

    @record
    def train(self) -> None:
        config = self.job_config
        self.checkpointer.load(step=config.checkpoint.load_step)
        first_step = self.step + 1
        self.metrics_processor.start(first_step)
        logger.info(f"Training starts at step {first_step} of {config.training.steps}")
        if self.evaluator is not None and self._agree(self.evaluator.missing_evaluation(self.step))[0]:
            # The run stopped during the evaluation of the step it resumes from.
            logger.info(f"[eval] the evaluation of step {self.step} has no result: running it first")
            self._evaluate(self.step)

        with (
            profiling_context(
                config.profiling, global_step=self.step, base_folder=config.job.dump_folder
            ) as torch_profiler,
            maybe_enable_memory_snapshot(
                config.profiling, global_step=self.step, base_folder=config.job.dump_folder
            ) as memory_profiler,
        ):
            data_iterator = self.batch_generator(self.dataloader)
            while self.should_continue_training():
                self.step += 1
                self.gc_handler.run(self.step)
                try:
                    stop = self.train_step(data_iterator)
                except DataloaderExhaustedError:
                    logger.warning("Ran out of data; the last step was not taken.")
                    break
                if self._rollback is not None:
                    data_iterator.close()  # ends its worker processes, if any
                    self._roll_back(self._rollback)
                    self._rollback = None
                    data_iterator = self.batch_generator(self.dataloader)
                    continue
                if self.averaging.enabled:
                    self.averaging.update(self.step)
                self._save_checkpoint(forced=stop)
                if config.validation.enable and self.validator.should_validate(self.step):
                    self.validator.validate(self.model_parts, self.step)
                    self.averaging.validate(self.validator, self.model_parts, self.step)
                if self.evaluator is not None and not stop and self.evaluator.should_evaluate(self.step):
                    self._evaluate(self.step)
                if torch_profiler:
                    torch_profiler.step()
                if memory_profiler:
                    memory_profiler.step()
                if self.step == first_step:
                    # Compilation and warm-up are done: fail fast from now on.
                    dist_utils.set_pg_timeouts(
                        timeout=timedelta(seconds=config.comm.train_timeout_seconds),
                        parallel_dims=self.parallel_dims,
                    )
                if stop:
                    self.preempted = True
                    saved = self.checkpointer.will_save(self.step, False, forced=True)
                    logger.warning(
                        f"Stopped after step {self.step} on {self._stop_reason()}; "
                        + (
                            f"the next start resumes from {step_folder_name(self.step)}"
                            if saved
                            else "checkpointing is off, nothing was saved"
                        )
                    )
                    break
        if self.averaging.enabled and self.step == config.training.steps and config.checkpoint.enable:
            self.averaging.save_final(self.step)
        if dist.is_initialized():
            dist.barrier()
        logger.info("Training completed" if not self.preempted else "Training paused")

    def _stop_reason(self) -> str:
        received = self.preemption.received
        return received.name if received is not None else "a stop signal on another rank"

    def _save_checkpoint(self, forced: bool) -> None:
        last_step = self.step == self.job_config.training.steps
        if not self.checkpointer.will_save(self.step, last_step, forced):
            return
        if not state_is_finite(self.model_parts, self.optimizers, self.device):
            raise NonfiniteError(
                f"step {self.step}: the model or optimizer state holds NaN/Inf; refusing "
                "to write a checkpoint from it. Resume from the last checkpoint with a "
                "lower learning rate or check the data."
            )
        if forced:
            self.checkpointer.save_now(self.step)
        else:
            self.checkpointer.save(self.step, last_step=last_step)

    def close(self) -> None:
        self.preemption.restore()
        super().close()
