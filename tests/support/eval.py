"""Shared pieces of the evaluation tests: the shipped task files, HF tokenizer files."""

from __future__ import annotations

import re
from pathlib import Path

from support import REPO

EVAL_TASKS = REPO / "assets" / "eval_tasks"
MC_TASK = "swallow_ja_mc_sample"  # multiple choice, 12 examples, acc / acc_norm
QA_TASK = "swallow_ja_qa_sample"  # short-answer generation, 8 examples, exact match


def own_copy(folder: Path, task: str, new_name: str) -> Path:
    """A shipped task as ``new_name`` in ``folder``, reading copies of its data files there.

    Returns the copy of its test split (a test may delete it).
    """
    yaml = (EVAL_TASKS / f"{task}.yaml").read_text(encoding="utf-8")
    yaml = yaml.replace(f"task: {task}", f"task: {new_name}")
    for split in ("train", "test"):
        source = re.search(rf"{split}: (\S+)", yaml).group(1)
        copy = folder / f"{new_name}_{split}.jsonl"
        copy.write_bytes((REPO / source).read_bytes())
        yaml = yaml.replace(f"{split}: {source}", f"{split}: {copy}")
    (folder / f"{new_name}.yaml").write_text(yaml, encoding="utf-8")
    return folder / f"{new_name}_test.jsonl"


def write_hf_tokenizer(folder: Path, tokenizer_model: Path) -> None:
    """Write ``tokenizer.json`` (+ config) for a tiktoken ``tokenizer.model`` into ``folder``.

    Converted by transformers' own ``TikTokenConverter`` (the path transformers
    takes for Llama 3's original files), with BOS added like Llama 3's
    tokenizer, so lm-eval's ``hf`` model can load the folder.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from swallow_titan.data.tokenizer import (
        LLAMA3_SPLIT_PATTERN,
        Llama3Tokenizer,
        llama3_special_tokens,
    )

    converted = TikTokenConverter(
        vocab_file=str(tokenizer_model),
        pattern=LLAMA3_SPLIT_PATTERN,
        additional_special_tokens=llama3_special_tokens(),
    ).converted()
    bos = "<|begin_of_text|>"
    converted.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, Llama3Tokenizer(tokenizer_model).bos_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=converted,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
    )
    fast.save_pretrained(folder)


class SuccessorModel:
    """A language model whose answers are known: after token t it predicts ``successor[t]``.

    Its logits are ``scale`` at ``successor[t]`` and 0 elsewhere, so the
    log-probability of the predicted token is ``scale - log(e^scale + V - 1)``
    (:meth:`logprob`) and greedy decoding follows ``successor`` from the
    last prompt token. ``calls`` records each forward batch's shape, the work
    the adapter asked for. (A plain callable, not a module: the adapter only
    calls ``ModelRunner.forward``.)
    """

    def __init__(self, vocab_size: int, scale: float = 10.0):
        import torch

        self.vocab_size = vocab_size
        self.scale = scale
        self.successor = (torch.arange(vocab_size) + 1) % vocab_size
        self.calls: list[tuple[int, int]] = []

    def __call__(self, tokens):
        import torch

        self.calls.append(tuple(tokens.shape))
        logits = torch.zeros(*tokens.shape, self.vocab_size)
        logits.scatter_(-1, self.successor[tokens].unsqueeze(-1), self.scale)
        return logits

    def logprob(self, hit: bool = True) -> float:
        """Log-probability of the predicted token (``hit``) or of any other one."""
        import math

        lse = math.log(math.exp(self.scale) + self.vocab_size - 1)
        return (self.scale if hit else 0.0) - lse
