"""``[eval]`` inside training: lm-eval on the model being trained, every ``freq`` steps.

:class:`InLoopEvaluator` wraps the trainer's parallelized model in a
:class:`~swallow_titan.eval.adapter.ModelRunner` (the trainer's own input
processing, so attention masks and AMP are as in training) and runs
``lm_eval.simple_evaluate`` with a :class:`~swallow_titan.eval.adapter.SwallowLM`.

Training is unchanged by it: the model goes back to train mode, and every
random generator (Python, NumPy, torch CPU and device; lm-eval seeds them) is
restored afterwards. An evaluation that fails on any rank ends on every rank
(:func:`~swallow_titan.eval.lockstep.run_together`), is logged and skipped;
training goes on. The task objects are those the start-up check built
(:func:`~swallow_titan.eval.tasks.built_task`): no evaluation rebuilds them.

An evaluation that was due at the step a run resumes from and has no result
in the run log (the run stopped during it: the checkpoint of a step is
written before its evaluation) runs before the first step of the restart
(:meth:`InLoopEvaluator.missing_evaluation`).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from lm_eval import simple_evaluate
from torchtitan.tools.logging import logger
from torchtitan.tools.utils import device_type

from swallow_titan.checkpoint.rng import RngState
from swallow_titan.components.metrics import read_run_log
from swallow_titan.config.paths import RunPaths
from swallow_titan.eval.adapter import ModelRunner, SwallowLM
from swallow_titan.eval.lockstep import run_together
from swallow_titan.eval.tasks import built_tasks, flatten_results, task_manager
from swallow_titan.hf.training_log import EVAL_TIME_TAG
from swallow_titan.runtime.ranks import process_rank


def lm_eval_limit(limit: float) -> int | float | None:
    """``[eval] limit`` as lm-eval takes it: None for all, a count, or a fraction below 1."""
    if limit <= 0:
        return None
    return limit if limit < 1 else int(limit)


def run_simple_evaluate(lm: SwallowLM, eval_config: Any, log_samples: bool = False) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` with ``[eval]``'s tasks, few-shot count and limit.

    The tasks are the objects built once per process (:func:`built_tasks`).
    No bootstrap standard errors (they cost minutes of CPU per metric);
    lm-eval's own log at WARNING level.
    """
    tasks = [t.strip() for t in eval_config.tasks if t.strip()]
    return simple_evaluate(
        model=lm,
        tasks=built_tasks(tasks, eval_config.include_path),
        num_fewshot=eval_config.num_fewshot if eval_config.num_fewshot >= 0 else None,
        limit=lm_eval_limit(eval_config.limit),
        task_manager=task_manager(tasks, eval_config.include_path),
        bootstrap_iters=0,
        log_samples=log_samples,
        verbosity="WARNING",
    )


@contextmanager
def eval_mode(model_parts: list[torch.nn.Module], rng: RngState):
    """Models in eval mode and no gradients; train mode and random generators restored after."""
    saved = rng.capture()
    modes = [m.training for m in model_parts]
    try:
        for m in model_parts:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(model_parts, modes):
            m.train(mode)
        rng.restore(saved)


def trainer_runner(trainer: Any) -> ModelRunner:
    """The trainer's model as the adapter calls it: same input processing as training."""
    if len(trainer.model_parts) != 1:
        raise ValueError("[eval] does not support pipeline parallelism")
    model = trainer.model_parts[0]
    dims = trainer.parallel_dims
    if dims.dp_enabled:
        mesh = dims.get_mesh("batch")
        dp_size, dp_rank = mesh.size(), mesh.get_local_rank()
    else:
        dp_size, dp_rank = 1, 0

    def forward(tokens: torch.Tensor) -> Any:
        labels = torch.zeros_like(tokens)
        inputs, _, extra_inputs, extra_kwargs = trainer.post_dataloading_process(
            {"input": tokens}, labels
        )
        with trainer.maybe_enable_amp:
            return model(inputs, **extra_inputs, **extra_kwargs)

    multiple = 16 * max(dims.tp, 1)
    return ModelRunner(forward, trainer.device, dp_rank, dp_size, seq_multiple=multiple)


def _from_rank0(value: Any) -> Any:
    """Rank 0's value on every rank.

    simple_evaluate computes the metrics on every process but returns them
    only where LOCAL_RANK is 0 (None elsewhere).
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class InLoopEvaluator:
    """Runs ``[eval]`` on the trainer's model and logs ``eval/<task>/<metric>``."""

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.config = trainer.job_config.eval
        self.rng = RngState(process_rank(), device_type)
        self.lm = SwallowLM(
            trainer_runner(trainer),
            trainer.tokenizer,
            max_length=trainer.job_config.training.seq_len,
            batch_size=self.config.batch_size,
            max_gen_toks=self.config.max_gen_toks,
        )

    def should_evaluate(self, step: int) -> bool:
        """Every ``freq`` steps and after the last step."""
        return step % self.config.freq == 0 or step == self.trainer.job_config.training.steps

    def missing_evaluation(self, step: int) -> bool:
        """Whether the evaluation due at ``step`` (the step resumed from) has no result.

        Known on the rank that writes the run log (its ``eval/time_s`` record
        at ``step`` is missing); False on the others, so the caller agrees on it.
        """
        if step < 1 or not self.should_evaluate(step):
            return False
        if self.trainer.metrics_processor.run_log is None:
            return False
        path = RunPaths.of(self.trainer.job_config).metrics_log
        return not any(r["step"] == step and EVAL_TIME_TAG in r for r in read_run_log(path))

    def evaluate(self, step: int, prefix: str = "eval") -> dict[str, Any] | None:
        """Evaluate the model's weights now, logged as ``<prefix>/<task>/<metric>``.

        Returns simple_evaluate's ``results``, or None if it failed (logged).
        A failure on any rank ends the evaluation on every rank; rank 0 logs
        each failed rank's error. ``prefix`` "eval/ema" names an average's
        evaluation (:meth:`WeightAveraging.evaluate` swaps it in).
        """
        begin = time.perf_counter()
        debug = self.trainer.job_config.debug
        if step in debug.inject_eval_failure_at_steps and process_rank() == debug.inject_eval_failure_rank:
            self.lm.inject_failure = f"[debug] failure injected into the evaluation at step {step}"

        def run() -> dict[str, Any] | None:
            time.sleep(debug.eval_delay_s)
            with eval_mode(self.trainer.model_parts, self.rng):
                return run_simple_evaluate(self.lm, self.config)

        logger.info(f"[eval] evaluating step {step}" + (f" ({prefix})" if prefix != "eval" else ""))
        result, errors = run_together(run, self.trainer.device)
        self.lm.inject_failure = None
        if errors:  # an evaluation must never stop training
            logger.error(
                f"[eval] evaluation at step {step} failed and is skipped on every rank; "
                f"training goes on: {'; '.join(errors)}"
            )
            return None
        results = _from_rank0(result["results"] if result is not None else None)
        seconds = time.perf_counter() - begin
        scalars = {
            f"{prefix}/{tag.removeprefix('eval/')}": value
            for tag, value in flatten_results(results).items()
        }
        self.trainer.metrics_processor.log_eval(step, scalars, seconds, prefix)
        return results
