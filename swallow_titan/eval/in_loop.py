"""``[eval]`` inside training: lm-eval on the model being trained, every ``freq`` steps.

:class:`InLoopEvaluator` wraps the trainer's parallelized model in a
:class:`~swallow_titan.eval.adapter.ModelRunner` (the trainer's own input
processing, so attention masks and AMP are as in training) and runs
``lm_eval.simple_evaluate`` with a :class:`~swallow_titan.eval.adapter.SwallowLM`.

Training is unchanged by it: the model goes back to train mode, and every
random generator (Python, NumPy, torch CPU and device; lm-eval seeds them) is
restored afterwards. An evaluation that fails is logged and skipped; training
goes on.
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
from swallow_titan.eval.adapter import ModelRunner, SwallowLM
from swallow_titan.eval.tasks import flatten_results, task_manager
from swallow_titan.runtime.ranks import process_rank


def lm_eval_limit(limit: float) -> int | float | None:
    """``[eval] limit`` as lm-eval takes it: None for all, a count, or a fraction below 1."""
    if limit <= 0:
        return None
    return limit if limit < 1 else int(limit)


def run_simple_evaluate(lm: SwallowLM, eval_config: Any, log_samples: bool = False) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` with ``[eval]``'s tasks, few-shot count and limit.

    No bootstrap standard errors (they cost minutes of CPU per metric);
    lm-eval's own log at WARNING level.
    """
    tasks = [t.strip() for t in eval_config.tasks if t.strip()]
    return simple_evaluate(
        model=lm,
        tasks=tasks,
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

    def evaluate(self, step: int) -> dict[str, Any] | None:
        """Evaluate now; returns simple_evaluate's ``results``, or None if it failed (logged)."""
        begin = time.perf_counter()
        try:
            with eval_mode(self.trainer.model_parts, self.rng):
                result = run_simple_evaluate(self.lm, self.config)
        except Exception as e:  # noqa: BLE001 - an evaluation must never stop training
            logger.error(
                f"[eval] evaluation at step {step} failed and is skipped; training goes on: "
                f"{type(e).__name__}: {e}"
            )
            return None
        results = _from_rank0(result["results"] if result is not None else None)
        seconds = time.perf_counter() - begin
        self.trainer.metrics_processor.log_eval(step, flatten_results(results), seconds)
        return results
