"""What ``[eval]`` costs, estimated for the plan (no lm-eval import, no data read).

The model of the estimate:

- Work is counted in tokens through the model's forward pass. A
  log-likelihood task runs one request per answer choice, each the whole
  few-shot prompt (the adapter shares no prefixes): ``examples x choices x
  prompt tokens``. A generation task has no KV cache (torchtitan's
  Transformer has none), so each generated token is a forward pass over the
  row so far: pass k (from 0) runs the prompt and the k tokens before it,
  ``examples x (G x prompt + G x (G - 1) / 2)`` for G generated tokens
  (:func:`generation_forward_tokens`). The adapter stops decoding a row at
  its end (stop string, end-of-generation token, ``max_gen_toks``) and gives
  its place to the next request, so each row costs its own answer's length,
  not the batch's longest; G is the typical answer, not ``max_gen_toks``.
- A forward token costs a third of a training token (``flops_per_token / 3``:
  forward only, no backward).
- Evaluation runs at a fraction of training's MFU: :data:`LOGLIKELIHOOD_EFFICIENCY`
  for scoring (shorter, padded rows) and :data:`GENERATION_EFFICIENCY` for
  generation (one token per pass, a collective per step). These are
  assumptions, not measurements; the ``eval/time_s`` scalar of a real run is
  the measurement to compare.
- Cost share = time of all evaluations / time of training, both at training's
  FLOP rate, so the GPU count cancels.

Per-task sizes (:data:`TASK_COSTS`) are the evaluated split's size and
typical prompt/answer lengths in Llama 3 tokens with each task's default
few-shot count, rounded; a task not in the table is reported as unestimated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LOGLIKELIHOOD_EFFICIENCY = 0.5
GENERATION_EFFICIENCY = 0.25


@dataclass(frozen=True)
class TaskCost:
    """Assumed size of one lm-eval task or group, for the estimate."""

    examples: int
    """Examples in the evaluated split (all subtasks of a group)."""

    requests: int
    """Requests per example: answer choices, or 1 for generation."""

    prompt_tokens: int
    """Tokens per request, few-shot examples included."""

    generated_tokens: int = 0
    """Tokens generated per request (0: log-likelihood only)."""

    subtasks: int = 1
    """A group's subtasks: ``limit`` applies to each of them."""


TASK_COSTS: dict[str, TaskCost] = {
    # Japanese (japanese_leaderboard, MGSM, Global-MMLU-Lite ja)
    "ja_leaderboard_jcommonsenseqa": TaskCost(1119, 5, 220),
    "ja_leaderboard_jsquad": TaskCost(4442, 1, 900, 12),
    "ja_leaderboard_mgsm": TaskCost(250, 1, 1100, 160),
    "ja_leaderboard_xlsum": TaskCost(889, 1, 1700, 100),
    "ja_leaderboard_xwinograd": TaskCost(959, 2, 40),
    "ja_leaderboard_jaqket_v2": TaskCost(2059, 1, 700, 12),
    "mgsm_direct_ja": TaskCost(250, 1, 80, 32),
    "xwinograd_jp": TaskCost(959, 2, 40),
    "global_mmlu_ja": TaskCost(400, 4, 150, 0, subtasks=6),
    # English
    "hellaswag": TaskCost(10042, 4, 110),
    "openbookqa": TaskCost(500, 4, 30),
    "triviaqa": TaskCost(17944, 1, 40, 12),
    "gsm8k": TaskCost(1319, 1, 950, 180),
    "mmlu": TaskCost(14042, 4, 600, 0, subtasks=57),
    "xwinograd_en": TaskCost(2325, 2, 40),
    "squad_completion": TaskCost(10570, 1, 200, 8),
}


def examples_evaluated(cost: TaskCost, limit: float) -> int:
    """Examples lm-eval takes with ``[eval] limit`` (per subtask, like lm-eval)."""
    if limit <= 0:
        return cost.examples
    per_subtask = cost.examples / cost.subtasks
    taken = math.ceil(per_subtask * limit) if limit < 1 else min(per_subtask, int(limit))
    return int(taken * cost.subtasks)


def generation_forward_tokens(prompt: int, generated: int) -> int:
    """Tokens through the forward pass to generate ``generated`` tokens after ``prompt``.

    No KV cache: pass k (from 0) runs the prompt and the k tokens generated
    before it, so ``generated x prompt + generated x (generated - 1) / 2``.
    """
    return generated * prompt + generated * (generated - 1) // 2


def forward_tokens(cost: TaskCost, limit: float) -> tuple[float, float]:
    """(log-likelihood tokens, generation tokens) through the forward pass, per evaluation."""
    n = examples_evaluated(cost, limit) * cost.requests
    g = cost.generated_tokens
    if g:  # the prompt is the first pass of the generation
        return 0.0, float(n * generation_forward_tokens(cost.prompt_tokens, g))
    return float(n * cost.prompt_tokens), 0.0


def evaluation_count(steps: int, freq: int) -> int:
    """Evaluations in a run: every ``freq`` steps, and after the last one."""
    return steps // freq + (1 if steps % freq else 0)


def estimate_eval_cost(
    tasks: list[str], limit: float, steps: int, freq: int, tokens_per_step: int,
    averages: int = 0,
) -> dict:
    """The estimate as a JSON-able dict (see the module docstring for the model).

    ``averages``: the ``[averaging]`` averages kept; each is evaluated once
    more, at the last step's evaluation.
    """
    per_task = {}
    unknown = []
    train_equivalent = 0.0  # eval work in training tokens (training's FLOP rate)
    for name in tasks:
        cost = TASK_COSTS.get(name)
        if cost is None:
            unknown.append(name)
            continue
        scoring, generating = forward_tokens(cost, limit)
        equivalent = (
            scoring / LOGLIKELIHOOD_EFFICIENCY + generating / GENERATION_EFFICIENCY
        ) / 3
        per_task[name] = {
            "examples": examples_evaluated(cost, limit),
            "forward_tokens": scoring + generating,
            "training_token_equivalent": equivalent,
        }
        train_equivalent += equivalent
    evaluations = evaluation_count(steps, freq)
    training_tokens = steps * tokens_per_step
    share = (evaluations + averages) * train_equivalent / training_tokens if training_tokens else 0.0
    return {
        "evaluations": evaluations,
        "average_evaluations": averages,
        "per_evaluation_training_steps": train_equivalent / tokens_per_step if tokens_per_step else 0.0,
        "share_of_training_pct": 100 * share,
        "tasks": per_task,
        "unestimated_tasks": unknown,
    }
