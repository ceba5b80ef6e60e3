"""The lm-eval adapter at its edges, on a model whose answers are known (in-process, fast).

:class:`~support.eval.SuccessorModel` predicts ``successor[t]`` after token t
with a known log-probability, so every score, every generated token and the
work of every forward pass can be written down beforehand: empty
continuations, inputs longer than the model's length, batch sizes that do not
divide the requests, shares over ranks that are not even, generation that
ends at each end-of-generation token, rows that end early, and the cost
estimate's arithmetic against the adapter's real work.
"""

from __future__ import annotations

import math

import pytest
import torch

from support import tiny_tokenizer
from support.eval import SuccessorModel

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from swallow_titan.eval.adapter import ModelRunner, SwallowLM  # noqa: E402
from swallow_titan.eval.cost import (  # noqa: E402
    GENERATION_EFFICIENCY,
    LOGLIKELIHOOD_EFFICIENCY,
    TaskCost,
    estimate_eval_cost,
    evaluation_count,
    examples_evaluated,
    forward_tokens,
    generation_forward_tokens,
)
from swallow_titan.eval.lockstep import run_together  # noqa: E402

NEVER = "\x00"  # a stop string no answer contains
# Per scored token: torch's fp32 log-softmax over 4,096 logits against the
# exact value; its sum of e^x rounds ~4,096 times (2^-24 relative each), a
# random walk of ~sqrt(4096) x 6e-8 = 4e-6; 2e-5 leaves a margin of five.
PER_TOKEN = 2e-5


def make_lm(batch_size: int = 4, max_length: int = 64, **runner: int) -> tuple[SwallowLM, SuccessorModel]:
    tokenizer = tiny_tokenizer()
    model = SuccessorModel(tokenizer.n_words)
    forward = ModelRunner(model, torch.device("cpu"), seq_multiple=1, **runner)
    return SwallowLM(forward, tokenizer, max_length=max_length, batch_size=batch_size), model


def expected_score(model: SuccessorModel, whole: list[int], n: int) -> float:
    """The log-likelihood of the last ``n`` tokens of ``whole``, as the model gives it."""
    return sum(
        model.logprob(whole[j] == int(model.successor[whole[j - 1]]))
        for j in range(len(whole) - n, len(whole))
    )


def chain(model: SuccessorModel, start: int, n: int) -> list[int]:
    """``n`` tokens the model predicts one after the other, after ``start``."""
    out, t = [], start
    for _ in range(n):
        t = int(model.successor[t])
        out.append(t)
    return out


def single_token_words(count: int, spacing: int) -> list[int]:
    """Ordinary token ids that are their own text's encoding, ``spacing`` apart."""
    tokenizer = tiny_tokenizer()
    found: list[int] = []
    for i in range(300, tokenizer.bos_id - spacing):
        if found and i - found[-1] < spacing:
            continue
        text = tokenizer.decode([i])
        if text.strip() == text and tokenizer.encode(text) == [i]:
            found.append(i)
            if len(found) == count:
                return found
    raise AssertionError("the tiny vocabulary has too few single-token words")


# ------------------------------------------------------------------ scoring


def test_an_empty_continuation_scores_zero_and_greedy_and_leaves_the_others_alone():
    lm, model = make_lm()
    context = "質問: 日本の首都は"
    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=(context, " 東京"), idx=0),
        # lm-eval's _encode_pair leaves no continuation token: context + "" == context.
        Instance(request_type="loglikelihood", doc={}, arguments=(context, ""), idx=0),
    ]
    scored, empty = lm.loglikelihood(requests)
    assert empty == (0.0, True)
    whole = lm.tok_encode(context + " 東京")
    n = len(whole) - len(lm.tok_encode(context))
    assert scored[0] == pytest.approx(expected_score(model, whole, n), abs=n * PER_TOKEN)
    assert lm.loglikelihood(requests[:1]) == [scored]


def test_a_context_longer_than_the_model_keeps_its_last_tokens():
    lm, model = make_lm(max_length=32)
    context = [lm.prefix_token_id, *range(500, 700, 2)]  # 101 tokens the model never predicts
    continuation = chain(model, context[-1], 10)
    ((score, greedy),) = lm._loglikelihood_tokens([(None, context, continuation)])
    assert greedy
    assert score == pytest.approx(10 * model.logprob(), abs=10 * PER_TOKEN)
    assert max(width for _, width in model.calls) == 32  # max_length + 1 tokens, less the last


def test_a_continuation_longer_than_the_model_scores_its_last_max_length_tokens():
    lm, model = make_lm(max_length=32)
    context = [lm.prefix_token_id, 700]
    continuation = [*chain(model, 700, 20), 5, *chain(model, 5, 29)]  # one miss, 50 tokens
    ((score, greedy),) = lm._loglikelihood_tokens([(None, context, continuation)])
    whole = (context + continuation)[-33:]
    assert score == pytest.approx(expected_score(model, whole, 32), abs=32 * PER_TOKEN)
    assert score == pytest.approx(31 * model.logprob() + model.logprob(False), abs=32 * PER_TOKEN)
    assert not greedy


@pytest.mark.parametrize("batch_size", [1, 3, 100])
def test_scores_do_not_depend_on_the_batch_size(batch_size):
    reference, _ = make_lm(batch_size=4)
    lm, model = make_lm(batch_size=batch_size)
    requests = [
        (None, [lm.prefix_token_id, *range(800, 800 + k)], chain(model, 800 + k - 1, k % 3 + 1))
        for k in range(1, 8)
    ]
    assert lm._loglikelihood_tokens(requests) == reference._loglikelihood_tokens(requests)
    assert len(model.calls) == math.ceil(7 / batch_size)
    # Rows are padded to the batch's longest only: with one row per batch, no padding.
    if batch_size == 1:
        assert sorted(w for _, w in model.calls) == sorted(len(c) + len(t) - 1 for _, c, t in requests)


@pytest.mark.parametrize("dp_size", [2, 3, 5, 8])
def test_requests_not_dividing_evenly_are_dealt_longest_first_to_every_rank(dp_size):
    lengths = [5, 9, 1, 7, 7, 3, 12]
    shares = [make_lm(dp_rank=r, dp_size=dp_size)[0]._my_share(lengths) for r in range(dp_size)]
    dealt = [i for share in shares for i in share]
    assert sorted(dealt) == list(range(len(lengths)))  # each request exactly once
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    for share in shares:
        assert [lengths[i] for i in share] == sorted((lengths[i] for i in share), reverse=True)
    assert shares[0][0] == lengths.index(12)


# --------------------------------------------------------------- generation


def generation_request(context: str, max_gen_toks: int = 20) -> Instance:
    return Instance(
        request_type="generate_until", doc={},
        arguments=(context, {"until": [NEVER], "max_gen_toks": max_gen_toks}), idx=0,
    )


def ending_rows(model: SuccessorModel, lengths: list[int], stop: int) -> list[tuple[str, list[int]]]:
    """A one-token prompt per length whose answer is ``length - 1`` words and then ``stop``."""
    tokenizer = tiny_tokenizer()
    rows = []
    for start, n in zip(single_token_words(len(lengths), 40), lengths):
        words = chain(model, start, n - 1)
        model.successor[words[-1] if words else start] = stop
        rows.append((tokenizer.decode([start]), words))
    return rows


@pytest.mark.parametrize("name", ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"])
def test_generation_ends_at_each_end_of_generation_token(name):
    lm, model = make_lm()
    stop = tiny_tokenizer().special_tokens[name]
    assert stop in tiny_tokenizer().end_of_generation_ids
    ((context, words),) = ending_rows(model, [4], stop)
    model.successor[stop] = 600  # were decoding to go on, more words would follow
    (answer,) = lm.generate_until([generation_request(context)])
    assert answer == tiny_tokenizer().decode(words)
    assert len(model.calls) == 4


def test_generation_stops_at_max_gen_toks():
    lm, model = make_lm()
    (start,) = single_token_words(1, 1)
    (answer,) = lm.generate_until([generation_request(tiny_tokenizer().decode([start]), 6)])
    assert answer == tiny_tokenizer().decode(chain(model, start, 6))
    assert len(model.calls) == 6


def test_rows_that_are_done_leave_the_batch_and_the_work_is_the_cost_estimates():
    lm, model = make_lm(batch_size=3)
    lengths = [2, 5, 3]
    rows = ending_rows(model, lengths, tiny_tokenizer().special_tokens["<|eot_id|>"])
    answers = lm.generate_until([generation_request(c) for c, _ in rows])
    assert answers == [tiny_tokenizer().decode(words) for _, words in rows]
    # BOS + one word: prompts of 2 tokens; a row leaves the batch when it ends.
    assert model.calls == [(3, 2), (3, 3), (2, 4), (1, 5), (1, 6)]
    work = sum(b * w for b, w in model.calls)
    assert work == sum(generation_forward_tokens(2, g) for g in lengths)
    assert forward_tokens(TaskCost(3, 1, 2, 5), 0) == (0.0, 3 * generation_forward_tokens(2, 5))


def test_a_row_that_ends_gives_its_place_to_the_next_request():
    lm, model = make_lm(batch_size=2)
    rows = ending_rows(model, [2, 5, 3], tiny_tokenizer().special_tokens["<|eot_id|>"])
    answers = lm.generate_until([generation_request(c) for c, _ in rows])
    assert answers == [tiny_tokenizer().decode(words) for _, words in rows]
    # The third request joins when the first ends (step 3), and ends with the second.
    assert [b for b, _ in model.calls] == [2, 2, 2, 2, 2]


def test_a_failure_on_the_only_rank_is_reported_not_raised():
    lm, _ = make_lm()
    lm.inject_failure = "planted"
    result, errors = run_together(
        lambda: lm.generate_until([generation_request("東京")]), torch.device("cpu")
    )
    assert result is None and errors == ["rank 0: RuntimeError: planted"]
    assert lm.generate_until([generation_request("東京", 2)])  # the next call is clean


# --------------------------------------------------------- the cost estimate


def test_examples_evaluated_follow_the_limit_per_subtask():
    group = TaskCost(examples=30, requests=4, prompt_tokens=10, subtasks=3)
    assert examples_evaluated(group, 0) == 30
    assert examples_evaluated(group, 0.25) == 3 * math.ceil(10 * 0.25)  # 3 x 3
    assert examples_evaluated(group, 4) == 12
    assert examples_evaluated(group, 4.9) == 12  # a count is an integer
    assert examples_evaluated(group, 50) == 30  # a set smaller than asked: all of it


@pytest.mark.parametrize("steps, freq, count", [(10, 5, 2), (10, 3, 4), (2, 5, 1), (1, 1, 1)])
def test_evaluation_count_includes_the_last_step_once(steps, freq, count):
    assert evaluation_count(steps, freq) == count


def test_the_estimate_is_the_stated_arithmetic():
    from swallow_titan.eval.cost import TASK_COSTS

    mc, gen = TASK_COSTS["hellaswag"], TASK_COSTS["gsm8k"]
    steps, freq, per_step = 1000, 300, 4_000_000
    got = estimate_eval_cost(["hellaswag", "gsm8k", "nonesuch"], 100, steps, freq, per_step)
    scoring = 100 * mc.requests * mc.prompt_tokens
    generating = 100 * generation_forward_tokens(gen.prompt_tokens, gen.generated_tokens)
    per_eval = (scoring / LOGLIKELIHOOD_EFFICIENCY + generating / GENERATION_EFFICIENCY) / 3
    assert got["evaluations"] == 4
    assert got["unestimated_tasks"] == ["nonesuch"]
    assert got["tasks"]["hellaswag"]["forward_tokens"] == scoring
    assert got["tasks"]["gsm8k"]["forward_tokens"] == generating
    assert got["per_evaluation_training_steps"] == pytest.approx(per_eval / per_step)
    assert got["share_of_training_pct"] == pytest.approx(100 * 4 * per_eval / (steps * per_step))
