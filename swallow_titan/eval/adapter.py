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

from swallow_titan.data.tokenizer import BOS_TOKEN, Llama3Tokenizer

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


def _world() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _max_over_ranks(value: int, device: torch.device) -> int:
    if not _world():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _gather(items: list[tuple[int, Any]]) -> dict[int, Any]:
    """Every rank's (index, result) pairs, merged (TP ranks give equal copies)."""
    if not _world():
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
    ``hf`` model does. Every context starts with BOS (the model was trained on
    BOS + document). Generation is greedy, whatever ``do_sample`` asks.
    """

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Llama3Tokenizer,
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
        self._n_ordinary = tokenizer.bos_id  # special ids follow the BPE ranks

    # ------------------------------------------------------------ tokenizer side

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path)

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        """Token ids; BOS first unless ``add_special_tokens`` is False.

        A string that already starts with the BOS text gets the BOS id for it
        (and no second BOS), as lm-eval's ``hf`` model does.
        """
        if string.startswith(BOS_TOKEN) and add_special_tokens is None:
            return [self.tokenizer.bos_id, *self.tokenizer.encode(string[len(BOS_TOKEN):])]
        add_bos = True if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, add_bos=add_bos)

    def tok_decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without special tokens."""
        return self.tokenizer.decode([i for i in ids if i < self._n_ordinary])

    # ------------------------------------------------------------ model side

    def _my_share(self, lengths: list[int]) -> list[int]:
        """This rank's request indices: longest first, dealt round-robin over DP ranks."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        return order[self.runner.dp_rank :: self.runner.dp_size]

    def _batches(self, indices: list[int]) -> tuple[list[list[int]], int]:
        """This rank's batches and the number every rank runs (the largest)."""
        mine = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        return mine, _max_over_ranks(len(mine), self.runner.device)

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

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation, whether it is the greedy one)."""
        windows: list[tuple[list[int], int]] = []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self._max_length + 1) :]
            windows.append((whole, min(len(continuation), len(whole) - 1)))
        mine, n_batches = self._batches(self._my_share([len(w) - 1 for w, _ in windows]))
        results: list[tuple[int, tuple[float, bool]]] = []
        for b in range(n_batches):
            indices = mine[b] if b < len(mine) else []
            rows = [windows[i][0][:-1] for i in indices] or [[self.prefix_token_id]]
            logits = self._forward(rows)
            for row, i in enumerate(indices):
                whole, n = windows[i]
                end = len(whole) - 1
                logprobs = F.log_softmax(_rows(logits, row, end - n, end), dim=-1)
                target = torch.tensor(whole[-n:], device=logprobs.device)
                picked = logprobs.gather(-1, target[:, None]).squeeze(-1)
                greedy = bool((logprobs.argmax(dim=-1) == target).all())
                results.append((i, (float(picked.sum()), greedy)))
        merged = _gather(results)
        return [merged[i] for i in range(len(requests))]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in lm-eval's disjoint rolling windows.

        The text is encoded with BOS, as lm-eval's ``hf`` model does for a
        tokenizer that adds one (Llama 3's): its first window scores BOS
        after the BOS prefix too, so perplexities compare with published ones.
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
        """Greedy continuations, cut at the first stop sequence or after max_gen_toks."""
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
        mine, n_batches = self._batches(self._my_share([len(j[0]) for j in jobs]))
        results: list[tuple[int, str]] = []
        for b in range(n_batches):
            indices = mine[b] if b < len(mine) else []
            for i, text in self._generate_batch([jobs[i] for i in indices]):
                results.append((indices[i], text))
        merged = _gather(results)
        return [merged[i] for i in range(len(requests))]

    def _generate_batch(self, jobs: list[tuple[list[int], list[str], int]]) -> list[tuple[int, str]]:
        """Greedy decoding of one batch; every rank runs the same number of steps.

        No KV cache (torchtitan's Transformer has none): each step runs the
        rows as they stand and reads the logits at each row's last position.
        A step runs while any row on any rank is still generating.
        """
        rows = [list(ids) for ids, _, _ in jobs]
        generated: list[list[int]] = [[] for _ in jobs]
        active = [True] * len(jobs)
        while _max_over_ranks(int(any(active)), self.runner.device):
            logits = self._forward(rows or [[self.prefix_token_id]])
            for r, (_, until, max_new) in enumerate(jobs):
                if not active[r]:
                    continue
                last = len(rows[r]) - 1
                token = int(_rows(logits, r, last, last + 1)[0].argmax())
                rows[r].append(token)
                generated[r].append(token)
                text = self.tok_decode(generated[r])
                if (
                    token == self.eot_token_id
                    or len(generated[r]) >= max_new
                    or any(stop and stop in text for stop in until)
                ):
                    active[r] = False
        out = []
        for r, (_, until, _) in enumerate(jobs):
            text = self.tok_decode(generated[r])
            out.append((r, postprocess_generated_text(text, stop=until, think_end_token=None)))
        return out
