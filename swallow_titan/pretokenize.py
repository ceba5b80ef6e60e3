"""Tokenize a config's text sources once, in parallel, into Megatron indexed datasets.

    python -m swallow_titan.pretokenize CONFIG --out DIR [--sources NAMES]
                                        [--workers N] [--shard-mb MB] [--section.key value ...]

Each text source of ``[[data.sources]]`` (or only those in ``--sources``, a
comma-separated list of names) becomes ``DIR/<name>/<name>_<k>_text_document.bin``
+ ``.idx`` pairs, one per shard of about ``--shard-mb`` MB of input (a whole
file, or a byte range / row groups of a large one, in file order), written by
``--workers`` processes with the config's tokenizer (``[model]
hf_assets_path``). Records go through the training reader: the same bad
records are skipped and counted by reason (``<name>_<k>.stats.json`` beside
each pair, totals printed). A document is stored as its token ids followed by
EOS, as Megatron's ``preprocess_data.py --append-eod`` writes it, so a
``format = "megatron"`` source over ``DIR/<name>/*.bin`` gives exactly the
windows that streaming the text gives.

A pair is published only when whole (``megatron.IndexedDatasetWriter``: the
``.idx`` is renamed into place last). Run again after an interruption and
finished shards are kept (their stats name the same input piece, tokenizer and
record limit), unfinished ones are redone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import swallow_titan  # noqa: F401  (device selection before torchtitan loads)
from swallow_titan.config.manager import ConfigError, SwallowConfigManager
from swallow_titan.config.sections import DataSource
from swallow_titan.data.lane import tokenize_text
from swallow_titan.data.megatron import (
    IndexedDatasetWriter,
    dtype_for_vocab,
    idx_path_for,
    read_index,
)
from swallow_titan.data.records import ReadUnit, check_text_field, iter_records
from swallow_titan.data.sharding import split_units
from swallow_titan.data.sources import DataSourceError, check_source, source_files
from swallow_titan.data.tokenizer import DocumentTokenizer, TokenizerFileError, load_tokenizer

STATS_FORMAT = 1


@dataclass(frozen=True)
class Shard:
    """One output pair: which piece of which source, and where it goes."""

    source: DataSource
    unit: ReadUnit
    bin_path: str
    tokenizer_path: str
    max_chars: int
    # The family ([model] tokenizer_kind): it decides the ids only where
    # "auto" could not tell, so it is not part of the identity.
    tokenizer_kind: str = "auto"

    @property
    def stats_path(self) -> str:
        return self.bin_path[: -len("_text_document.bin")] + ".stats.json"

    def identity(self) -> dict:
        """What the shard was made from; a finished shard is kept only if equal."""
        return {
            "format": STATS_FORMAT,
            "source": self.source.name,
            "text_field": self.source.text_field,
            "unit": asdict(self.unit),
            "tokenizer": self.tokenizer_path,
            "max_chars": self.max_chars,
        }


def plan_shards(
    sources: list[DataSource], out: str, tokenizer_path: str, max_chars: int, shard_bytes: int,
    tokenizer_kind: str = "auto",
) -> list[Shard]:
    """Every shard of ``sources``, in file order within each source."""
    shards = []
    for source in sources:
        files = source_files(source)
        check_text_field(source, files)
        total = sum(f.size for f in files)
        units = split_units(files, max(1, math.ceil(total / shard_bytes)), source.name,
                            join_row_groups=True)
        folder = os.path.join(out, source.name)
        width = max(5, len(str(len(units))))
        for k, unit in enumerate(units):
            name = f"{source.name}_{k:0{width}d}_text_document.bin"
            shards.append(Shard(source, unit, os.path.join(folder, name), tokenizer_path,
                                max_chars, tokenizer_kind))
    return shards


def foreign_pairs(shards: list[Shard]) -> list[str]:
    """Megatron files in the shards' folders that this plan would not write (an
    earlier run with another --shard-mb or other input): a ``*.bin`` glob over
    the folder would read them too."""
    planned = {p for s in shards for p in (s.bin_path, idx_path_for(s.bin_path))}
    found = []
    for folder in sorted({os.path.dirname(s.bin_path) for s in shards}):
        if os.path.isdir(folder):
            found += [os.path.join(folder, n) for n in sorted(os.listdir(folder))
                      if n.endswith((".bin", ".idx"))
                      and os.path.join(folder, n) not in planned]
    return found


def finished(shard: Shard) -> dict | None:
    """The stats of a shard already written from the same input, else None."""
    if not (os.path.exists(idx_path_for(shard.bin_path)) and os.path.exists(shard.stats_path)):
        return None
    try:
        with open(shard.stats_path) as f:
            stats = json.load(f)
        read_index(shard.bin_path, shard.source.name)  # whole and valid
    except (OSError, ValueError):
        return None
    return stats if stats.get("identity") == shard.identity() else None


_tokenizer: DocumentTokenizer | None = None


def _worker_tokenizer(path: str, kind: str) -> DocumentTokenizer:
    global _tokenizer
    if _tokenizer is None or str(_tokenizer.path) != path:
        _tokenizer = load_tokenizer(path, kind)
    return _tokenizer


def write_shard(shard: Shard) -> dict:
    """Tokenize one shard's records and publish its pair; returns its stats."""
    tokenizer = _worker_tokenizer(shard.tokenizer_path, shard.tokenizer_kind)
    os.makedirs(os.path.dirname(shard.bin_path), exist_ok=True)
    # A redone shard must not pair its new .bin with an old .idx.
    for stale in (idx_path_for(shard.bin_path), shard.stats_path):
        if os.path.exists(stale):
            os.remove(stale)
    writer = IndexedDatasetWriter(shard.bin_path, dtype_for_vocab(tokenizer.n_words))
    documents = tokens = 0
    skipped: dict[str, int] = {}
    begin = time.perf_counter()
    try:
        for record in iter_records(shard.unit, shard.source.text_field, shard.source.name,
                                   max_chars=shard.max_chars):
            ids, reason = (None, record.reason) if record.text is None else tokenize_text(
                tokenizer, record.text)
            if ids is None:
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            ids.append(tokenizer.eos_id)
            writer.add_document(ids)
            documents += 1
            tokens += len(ids)
        stats = {
            "identity": shard.identity(),
            "documents": documents,
            "tokens": tokens,
            "skipped": skipped,
            "seconds": time.perf_counter() - begin,
        }
        with open(shard.stats_path + ".tmp", "w") as f:
            json.dump(stats, f, indent=1)
        os.replace(shard.stats_path + ".tmp", shard.stats_path)
        writer.finish()  # the .idx last: from here on the shard is finished
    except BaseException:
        writer.abandon()
        raise
    return stats


def pretokenize(shards: list[Shard], workers: int, log=print) -> dict:
    """Write every unfinished shard with ``workers`` processes; totals per source."""
    todo, totals = [], {}
    for shard in shards:
        stats = finished(shard)
        if stats is None:
            todo.append(shard)
        else:
            _add(totals, shard.source.name, stats, kept=True)
    log(f"{len(shards) - len(todo)} of {len(shards)} shard(s) already written; "
        f"writing {len(todo)} with {workers} worker(s)")
    begin = time.perf_counter()
    if workers <= 1:
        results = map(write_shard, todo)
    else:
        pool = ProcessPoolExecutor(workers)
        results = pool.map(write_shard, todo)
    try:
        for shard, stats in zip(todo, results):
            _add(totals, shard.source.name, stats, kept=False)
            log(f"  {shard.bin_path}: {stats['documents']:,} documents, "
                f"{stats['tokens']:,} tokens")
    finally:
        if workers > 1:
            pool.shutdown(cancel_futures=True)
    elapsed = time.perf_counter() - begin
    written = sum(t["tokens_written"] for t in totals.values())
    return {"sources": totals, "seconds": elapsed, "tokens_per_s": written / max(elapsed, 1e-9)}


def _add(totals: dict, name: str, stats: dict, kept: bool) -> None:
    t = totals.setdefault(name, {"documents": 0, "tokens": 0, "tokens_written": 0,
                                 "shards": 0, "kept": 0, "skipped": {}})
    t["documents"] += stats["documents"]
    t["tokens"] += stats["tokens"]
    t["shards"] += 1
    if kept:
        t["kept"] += 1
    else:
        t["tokens_written"] += stats["tokens"]
    for reason, n in stats["skipped"].items():
        t["skipped"][reason] = t["skipped"].get(reason, 0) + n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m swallow_titan.pretokenize", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("config", help="TOML config file")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--sources", default="",
                        help="comma-separated source names (default: every text source)")
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    parser.add_argument("--shard-mb", type=float, default=1024.0,
                        help="input megabytes per output pair (default 1024)")
    parser.add_argument("--json", action="store_true", help="print the totals as one JSON object")
    args, overrides = parser.parse_known_args(argv)
    if args.workers < 1 or args.shard_mb <= 0:
        parser.error("need --workers >= 1 and --shard-mb > 0")
    try:
        config = SwallowConfigManager().parse_args(["--job.config_file", args.config, *overrides])
        tokenizer = load_tokenizer(config.model.hf_assets_path, config.model.tokenizer_kind)
        sources = [s for s in config.data.sources if s.format == "text"]
        if args.sources:
            wanted = [n for n in args.sources.split(",") if n]
            unknown = sorted(set(wanted) - {s.name for s in sources})
            if unknown:
                raise DataSourceError(
                    f"--sources: {unknown[0]!r} is not a text source of {args.config} "
                    f"(text sources: {[s.name for s in sources]})"
                )
            sources = [s for s in sources if s.name in wanted]
        for s in sources:
            check_source(s)
        shards = plan_shards(sources, args.out, str(tokenizer.path),
                             config.data.max_document_chars, int(args.shard_mb * 2**20),
                             config.model.tokenizer_kind)
        foreign = foreign_pairs(shards)
        if foreign:
            raise DataSourceError(
                f"--out {args.out}: {len(foreign)} Megatron file(s) there are not part of "
                f"this split (e.g. {foreign[0]!r}, from a run with another --shard-mb or "
                "other input); a *.bin glob would read them too. Remove them or choose "
                "another --out"
            )
    except (ConfigError, DataSourceError, TokenizerFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = pretokenize(shards, args.workers, log=(lambda *_: None) if args.json else print)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for name, t in report["sources"].items():
        skipped = ", ".join(f"{r} {n}" for r, n in sorted(t["skipped"].items())) or "none"
        print(f"{name}: {t['documents']:,} documents, {t['tokens']:,} tokens in {t['shards']} "
              f"pair(s) ({t['kept']} kept from before); skipped: {skipped}")
        print(f'  use: format = "megatron", path = "{os.path.join(args.out, name)}/*.bin"')
    print(f"{report['tokens_per_s']:,.0f} tokens/s written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
