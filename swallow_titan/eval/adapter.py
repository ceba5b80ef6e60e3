"""lm-eval's ``LM`` interface over swallow-titan's model and tokenizer.

:class:`SwallowLM` subclasses lm-eval's ``TemplateLM``, so the pairing of
context and continuation, the empty-context rule and everything above the
token level are lm-eval's; rolling windows, generation arguments and stop
handling are lm-eval's helpers too. What is written here is the model side:
batching token ids, running the model, reading log-probabilities and greedy
tokens out of its logits.

The model is the one being trained, as parallelized (FSDP2/HSDP, TP,
activation checkpointing, compile, kernels on or off); it is reached through a
:class:`ModelRunner`, which every rank calls together. lm-eval itself is told
it runs on one process (rank 0 of 1) on every rank: each rank builds the same
requests, this adapter deals them out over the data-parallel ranks, runs the
same number of forward passes on every rank (padding with dummy batches, and
agreeing each decoding step), and all-gathers the results, so every rank
returns every answer and lm-eval computes the same metrics everywhere. TP
ranks of one data-parallel group get the same rows, as in training. No rank
ever holds more than its shards of the weights; a vocabulary-sharded output
(TP with loss parallel) is gathered only for the positions that are scored.

Every collective of the adapter's own is a sync point of
:mod:`swallow_titan.eval.lockstep`, and the work between them that is local to
a rank holds its failure for the next one, so a failure on one rank ends the
evaluation on every rank instead of leaving the others in a collective.

Generation decodes greedily with refill: a row that is done (a stop string,
an end-of-generation token, ``max_gen_toks``) leaves the batch and the next
request of this rank takes its place, so no row is decoded past its end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch.distributed.tensor import DTensor

from swallow_titan.data.tokenizer import DocumentTokenizer
from swallow_titan.eval.lockstep import HeldFailure, world

# Token ids of a (context, continuation) pair, as TemplateLM hands them over.
Pair = tuple[list[int], list[int]]


@dataclass
class ModelRunner:
    """How the adapter reaches the model. Every rank calls ``forward`` together.

    ``forward`` maps token ids ``[batch, seq]`` (on ``device``) to logits
    ``[batch, seq, vocab]``: a tensor, or a DTensor sharded on the vocabulary
    (tensor parallel with loss parallel). Rows of one data-parallel rank go to
    all its TP ranks alike; ``dp_rank``/``dp_size`` say which share is this
    rank's. ``seq_multiple``: sequence lengths are padded to a multiple of it
    (sequence parallel needs the TP degree; a few fixed lengths also keep
    torch.compile from recompiling at every new length).
    """

    forward: Callable[[torch.Tensor], Any]
    device: torch.device
    dp_rank: int = 0
    dp_size: int = 1
    seq_multiple: int = 16


def _gather(items: list[tuple[int, Any]]) -> dict[int, Any]:
    """Every rank's (index, result) pairs, merged (TP ranks give equal copies)."""
    if not world():
        return dict(items)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, items)
    return {i: r for part in everyone for i, r in part}


def _rows(logits: Any, row: int, start: int, end: int) -> torch.Tensor:
    """Logits of positions ``[start, end)`` of one row, whole vocabulary, fp32."""
    piece = logits[row, start:end]
    if isinstance(piece, DTensor):
        piece = piece.full_tensor()
    return piece.float()


class SwallowLM(TemplateLM):
    """lm-eval model over swallow-titan's (parallelized) Transformer.

    ``max_length``: the longest sequence the model takes (its RoPE table,
    ``training.seq_len``); longer inputs keep their last tokens, as lm-eval's
    ``hf`` model does. Texts are framed as the family's documents were in
    training: Llama 3 contexts start with BOS (BOS + document); Qwen has no
    BOS and its contexts start with the text itself, as lm-eval's ``hf`` model
    encodes them with either family's tokenizer. Generation is greedy,
    whatever ``do_sample`` asks.
    """

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: DocumentTokenizer,
        *,
        max_length: int,
        batch_size: int = 8,
        max_gen_toks: int = 256,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.runner = runner
        self.tokenizer = tokenizer
        self._max_length = max_length
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self._end_of_generation = frozenset(tokenizer.end_of_generation_ids)
        self._prefix_text = tokenizer.decode([self.prefix_token_id])
        self._held = HeldFailure()
        # Test hook ([debug] inject_eval_failure_*): the next batch this rank
        # scores or decodes raises RuntimeError(inject_failure).
        self.inject_failure: str | None = None

    # ------------------------------------------------------------ tokenizer side

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context stands for: BOS, or for a family without
        one (Qwen) the end of the previous document, ``<|endoftext|>`` (lm-eval's
        ``hf`` model: the tokenizer's BOS, else its EOS)."""
        bos = self.tokenizer.bos_id
        return self.tokenizer.eos_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path)

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        """Token ids; BOS first (in a family that has one) unless
        ``add_special_tokens`` is False.

        A string that already starts with the prefix token's text (BOS;
        Qwen: ``<|endoftext|>``) gets that token's id for it (and no second
        BOS), as lm-eval's ``hf`` model does.
        """
        prefix = self._prefix_text
        if string.startswith(prefix) and add_special_tokens is None:
            return [self.prefix_token_id, *self.tokenizer.encode(string[len(prefix):])]
        add_bos = True if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, add_bos=add_bos)

    def tok_decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without special tokens (lm-eval's ``hf`` model's
        ``skip_special_tokens=True``)."""
        return self.tokenizer.decode_text(ids)

    # ------------------------------------------------------------ model side

    def _my_share(self, lengths: list[int]) -> list[int]:
        """This rank's request indices: longest first, dealt round-robin over DP ranks."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        return order[self.runner.dp_rank :: self.runner.dp_size]

    def _batches(self, indices: list[int]) -> tuple[list[list[int]], int]:
        """This rank's batches and the number every rank runs (the largest; a sync point)."""
        mine = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        return mine, self._held.sync(len(mine), self.runner.device)

    def _padded_length(self, n: int) -> int:
        m = self.runner.seq_multiple
        return max(min(-(-n // m) * m, self._max_length), n)

    def _forward(self, rows: list[list[int]]) -> Any:
        """Logits for right-padded rows (causal: padding never affects real positions)."""
        width = self._padded_length(max(len(r) for r in rows))
        batch = torch.full((len(rows), width), self.tokenizer.eos_id, dtype=torch.long)
        for i, r in enumerate(rows):
            batch[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        with torch.no_grad():
            return self.runner.forward(batch.to(self.runner.device))

    def _exchange(self, results: list[tuple[int, Any]]) -> dict[int, Any]:
        """Every rank's results, once every rank knows that none failed (a sync point first)."""
        self._held.sync(0, self.runner.device)
        return _gather(results)

    def _check_injected_failure(self) -> None:
        if self.inject_failure:
            message, self.inject_failure = self.inject_failure, None
            raise RuntimeError(message)

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation, whether it is the greedy one).

        An empty continuation (lm-eval's ``_encode_pair`` can leave none when
        the tokenizer merges the last context character with the whole
        continuation, e.g. ``":A"``) scores (0.0, True): the log-probability
        of no tokens is 0, and no token differs from the greedy one. lm-eval
        0.4.13's ``hf`` model asserts instead (``len(continuation_enc) > 0``),
        so it gives no result to match; its ONNX model returns (0.0, True).
        A context plus continuation longer than ``max_length + 1`` keeps its
        last tokens, and at most ``max_length`` continuation tokens are
        scored, as in the ``hf`` model.
        """
        self._held = HeldFailure()
        windows: list[tuple[list[int], int]] = []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self._max_length + 1) :]
            windows.append((whole, min(len(continuation), len(whole) - 1)))
        scored = [i for i, (_, n) in enumerate(windows) if n > 0]
        share = self._my_share([len(windows[i][0]) - 1 for i in scored])
        mine, n_batches = self._batches([scored[k] for k in share])
        results: list[tuple[int, tuple[float, bool]]] = []
        for b in range(n_batches):
            indices = mine[b] if b < len(mine) else []
            rows = [windows[i][0][:-1] for i in indices] or [[self.prefix_token_id]]
            logits = self._forward(rows)
            # Collectives (a vocabulary-sharded output is gathered): on every rank, always.
            pieces = [
                _rows(logits, row, len(windows[i][0]) - 1 - windows[i][1], len(windows[i][0]) - 1)
                for row, i in enumerate(indices)
            ]
            self._held.run(lambda: results.extend(self._score(pieces, indices, windows)))
        merged = self._exchange(results)
        return [merged[i] if n > 0 else (0.0, True) for i, (_, n) in enumerate(windows)]

    def _score(
        self, pieces: list[torch.Tensor], indices: list[int], windows: list[tuple[list[int], int]]
    ) -> list[tuple[int, tuple[float, bool]]]:
        """(request index, (log-likelihood, greedy)) of one batch's rows, from their scored logits."""
        self._check_injected_failure()
        out = []
        for piece, i in zip(pieces, indices, strict=True):
            whole, n = windows[i]
            logprobs = F.log_softmax(piece, dim=-1)
            target = torch.tensor(whole[-n:], device=logprobs.device)
            picked = logprobs.gather(-1, target[:, None]).squeeze(-1)
            greedy = bool((logprobs.argmax(dim=-1) == target).all())
            out.append((i, (float(picked.sum()), greedy)))
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in lm-eval's disjoint rolling windows.

        The text is encoded as :meth:`tok_encode` does, as lm-eval's ``hf``
        model does: with BOS for a tokenizer that adds one (Llama 3's; its first
        window scores BOS after the BOS prefix too, so perplexities compare
        with published ones), without for Qwen's (the first window scores the
        text's first token after ``<|endoftext|>``).
        """
        pieces: list[tuple[Any, list[int], list[int]]] = []
        owners: list[int] = []
        for k, request in enumerate(requests):
            (text,) = request.args
            token_windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self._max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, token_windows):
                pieces.append((None, context, continuation))
                owners.append(k)
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owners, self._loglikelihood_tokens(pieces)):
            totals[k] += logprob
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first stop sequence or after max_gen_toks.

        Decoding stops at a stop string, at ``max_gen_toks``, or at any of the
        tokenizer's end-of-generation tokens (Llama 3.1:
        ``<|end_of_text|>``, ``<|eom_id|>``, ``<|eot_id|>``: the
        ``eos_token_id`` list of Llama-3.1-Instruct's generation config, at
        which lm-eval's ``hf`` model stops through transformers' ``generate``;
        Qwen: ``<|endoftext|>``, ``<|im_end|>``, Qwen3's list).
        """
        self._held = HeldFailure()
        eos_text = self.tokenizer.decode([self.eot_token_id])
        jobs: list[tuple[list[int], list[str], int]] = []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self._max_length:
                raise ValueError(
                    f"max_gen_toks {max_new} must be below the model's maximum length "
                    f"{self._max_length}"
                )
            ids = self.tok_encode(context)[-(self._max_length - max_new) :]
            jobs.append((ids, until, max_new))
        queue = self._my_share([len(j[0]) for j in jobs])
        results = self._decode(queue, jobs)
        merged = self._exchange(results)
        return [merged[i] for i in range(len(requests))]

    def _decode(
        self, queue: list[int], jobs: list[tuple[list[int], list[str], int]]
    ) -> list[tuple[int, str]]:
        """Greedy decoding of this rank's requests, ``batch_size`` rows at a time, with refill.

        No KV cache (torchtitan's Transformer has none): each step runs the
        active rows as they stand and reads the logits at each row's last
        position. A row that is done leaves the batch and the next request
        of ``queue`` joins it. A step runs while any row on any rank is
        still generating (a sync point per step); a rank without rows runs
        a one-token batch so that the model's collectives line up.
        """
        pending = list(queue)
        active: list[tuple[int, list[int], list[int]]] = []  # (request, row, generated)
        results: list[tuple[int, str]] = []

        def refill() -> None:
            while pending and len(active) < self.batch_size:
                i = pending.pop(0)
                active.append((i, list(jobs[i][0]), []))

        def step(last: list[torch.Tensor]) -> None:
            self._check_injected_failure()
            still = []
            for (i, row, generated), scores in zip(active, last, strict=True):
                token = int(scores[0].argmax())
                row.append(token)
                generated.append(token)
                if self._row_done(generated, jobs[i]):
                    results.append((i, self._answer(generated, jobs[i][1])))
                else:
                    still.append((i, row, generated))
            active[:] = still

        while True:
            self._held.run(refill)
            if not self._held.sync(int(bool(active)), self.runner.device):
                break
            logits = self._forward([row for _, row, _ in active] or [[self.prefix_token_id]])
            # Collectives (a vocabulary-sharded output is gathered): on every rank, always.
            last = [_rows(logits, r, len(row) - 1, len(row)) for r, (_, row, _) in enumerate(active)]
            self._held.run(lambda: step(last))
        return results

    def _row_done(self, generated: list[int], job: tuple[list[int], list[str], int]) -> bool:
        _, until, max_new = job
        if generated[-1] in self._end_of_generation or len(generated) >= max_new:
            return True
        text = self.tok_decode(generated)
        return any(stop and stop in text for stop in until)

    def _answer(self, generated: list[int], until: list[str]) -> str:
        text = self.tok_decode(generated)
        return postprocess_generated_text(text, stop=until, think_end_token=None)
