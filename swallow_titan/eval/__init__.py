"""Downstream evaluation through lm-evaluation-harness (``[eval]``).

lm-eval is the engine: task definitions, few-shot sampling, prompts, answer
extraction and metrics are its own. swallow-titan supplies only the model
side (:mod:`swallow_titan.eval.adapter`, an lm-eval ``LM`` over the
parallelized model and the run's tokenizer), the in-loop hook
(:mod:`swallow_titan.eval.in_loop`), task checks (:mod:`swallow_titan.eval.tasks`)
and ``python -m swallow_titan.evaluate``.

lm-eval is an optional dependency: this package imports it only inside the
modules above, which the trainer imports only when ``[eval] enable = true``.
"""

from __future__ import annotations

import importlib.util

INSTALL_HINT = 'pip install -e ".[eval]"   (or: pip install "lm-eval[hf,japanese-leaderboard]==0.4.13")'


class EvalUnavailableError(RuntimeError):
    """lm-eval is not installed but evaluation was asked for."""


def require_lm_eval(what: str = "[eval] enable = true") -> None:
    """Raise :class:`EvalUnavailableError` naming the install command if lm-eval is missing."""
    try:
        importlib.import_module("lm_eval")
    except ImportError:
        raise EvalUnavailableError(
            f"{what} needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}"
        ) from None


def eval_problems(config, source: str, load_data: bool = True) -> list[str]:
    """What stops ``[eval]`` from running, one message per problem, naming file, key and task.

    Empty when ``[eval]`` is off. Needs lm-eval only when it is on; with
    ``load_data`` each task is built as for an evaluation (YAML parsed,
    dataset loaded), so it runs before training, not at the first evaluation.
    """
    e = config.eval
    if not e.enable:
        return []
    try:
        require_lm_eval()
    except EvalUnavailableError as err:
        return [f"{source}: eval.enable: {err}"]
    from swallow_titan.eval.tasks import check_tasks

    return [
        f"{source}: eval.tasks: {problem}"
        for problem in check_tasks(
            [t.strip() for t in e.tasks if t.strip()], e.include_path, load_data=load_data
        )
    ]
