"""Shared pieces of the evaluation tests: the shipped task files, HF tokenizer files."""

from __future__ import annotations

from pathlib import Path

from support import REPO

EVAL_TASKS = REPO / "assets" / "eval_tasks"
MC_TASK = "swallow_ja_mc_sample"  # multiple choice, 12 examples, acc / acc_norm
QA_TASK = "swallow_ja_qa_sample"  # short-answer generation, 8 examples, exact match


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
