"""Build the small tokenizer shipped in assets/tokenizer/ for the CPU example.

It is a byte-level BPE with Llama 3's pre-tokenisation regex, trained on the
sample corpus (assets/samples/*.jsonl) and written in tiktoken's
``tokenizer.model`` format, so it loads through exactly the same code as the
real Llama 3 tokenizer. 3,840 ranks + 256 special tokens = 4,096 ids, the
``tiny`` flavor's vocabulary.

    python scripts/build_tiny_tokenizer.py [--samples assets/samples] [--out assets/tokenizer]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from swallow_titan.data.tokenizer import (
    LLAMA3_SPLIT_PATTERN,
    NUM_SPECIAL_TOKENS,
    Llama3Tokenizer,
    bytes_from_byte_level,
    write_tiktoken_ranks,
)
from swallow_titan.model.args import TINY_VOCAB_SIZE

N_RANKS = TINY_VOCAB_SIZE - NUM_SPECIAL_TOKENS


def read_texts(samples: Path):
    for path in sorted(samples.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]


def train_ranks(samples: Path, n_ranks: int) -> dict[bytes, int]:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=n_ranks,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(read_texts(samples), trainer=trainer)
    vocab = tokenizer.get_vocab()
    if len(vocab) != n_ranks:
        raise SystemExit(
            f"the corpus yields {len(vocab)} tokens, not {n_ranks}: add text or lower it"
        )
    return {bytes_from_byte_level(tok): rank for tok, rank in vocab.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=Path, default=Path("assets/samples"))
    parser.add_argument("--out", type=Path, default=Path("assets/tokenizer"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ranks = train_ranks(args.samples, N_RANKS)
    write_tiktoken_ranks(ranks, args.out / "tokenizer.model")
    tok = Llama3Tokenizer(args.out)
    sample = "東京の大学でPythonを学びました。 x = 12 + 30"
    print(
        f"wrote {args.out / 'tokenizer.model'}: {len(ranks)} ranks, vocab "
        f"{tok.get_vocab_size()}, bos {tok.bos_id}, eos {tok.eos_id}; "
        f"{len(sample)} chars -> {len(tok.encode(sample))} tokens"
    )


if __name__ == "__main__":
    main()
