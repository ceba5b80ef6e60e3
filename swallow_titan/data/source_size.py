"""How many tokens a source holds, so the plan can show how often it repeats.

A Megatron source's size is read from its indexes: exact, BOS/EOS as the
packer adds them (``megatron.packed_tokens``). A text source's size is either the
user's figure, ``num_tokens`` (e.g. from the dataset card), or, for local files,
an estimate: the first ~256 KB of the
source are tokenised and the tokens per byte (per compressed byte for
compressed files; per row for Parquet) are scaled to all its files. Hub sources
without ``num_tokens`` are unknown: the plan does not touch the network.
"""

from __future__ import annotations

from dataclasses import dataclass

from swallow_titan.config.sections import DataSource
from swallow_titan.data.records import (
    _decompressed,
    classify_json_line,
    classify_value,
    open_binary,
    parquet_file,
)
from swallow_titan.data.megatron import open_index, packed_tokens
from swallow_titan.data.sharding import plan_lanes
from swallow_titan.data.sources import DataSourceError, SourceFile, source_files
from swallow_titan.data.packer import frame_tokens
from swallow_titan.data.tokenizer import DocumentTokenizer, load_tokenizer

SAMPLE_BYTES = 256 * 1024


@dataclass(frozen=True)
class SourceSize:
    tokens: int | None  # None when unknown
    basis: str  # "index", "num_tokens", "estimate" or "unknown"


def source_size(source: DataSource, tokenizer: DocumentTokenizer | None) -> SourceSize:
    """The source's size in tokens (BOS/EOS counted): from its indexes, given
    or estimated."""
    if source.format == "megatron":
        return _megatron_size(source, tokenizer)
    if source.num_tokens > 0:
        return SourceSize(int(source.num_tokens), "num_tokens")
    if not source.path or tokenizer is None:
        return SourceSize(None, "unknown")
    try:
        files = source_files(source)
        return SourceSize(_estimate(files, source.text_field, tokenizer), "estimate")
    except (DataSourceError, OSError):
        return SourceSize(None, "unknown")


def _megatron_size(source: DataSource, tokenizer: DocumentTokenizer | None) -> SourceSize:
    try:
        indexes = [open_index(f.path, source.name) for f in source_files(source)]
    except (DataSourceError, OSError):
        return SourceSize(None, "unknown")  # the file problems name it
    if tokenizer is None:  # BOS/EOS ids unknown: count the stored tokens only
        return SourceSize(sum(i.tokens for i in indexes), "index")
    counts = [packed_tokens(i, tokenizer.bos_id, tokenizer.eos_id) for i in indexes]
    exact = all(e for _, e in counts)
    return SourceSize(sum(n for n, _ in counts), "index" if exact else "index_sampled")


def _estimate(files: list[SourceFile], text_field: str, tokenizer: DocumentTokenizer) -> int:
    if files[0].format == "parquet":
        return _estimate_parquet(files, text_field, tokenizer)
    tokens = sampled = 0
    frame = frame_tokens(tokenizer.bos_id)
    for file in files:
        with open_binary(file.path, "") as raw:
            consumed = 0
            for line in _decompressed(raw, file.compression):
                text, _ = classify_json_line(line, text_field)
                if text is not None:
                    tokens += len(tokenizer.encode_ordinary(text)) + frame
                # Bytes of the file read so far (compressed bytes if compressed).
                consumed = raw.tell() if file.compression else consumed + len(line)
                if sampled + consumed >= SAMPLE_BYTES:
                    break
            else:
                consumed = file.size  # read to the end
        sampled += consumed
        if sampled >= SAMPLE_BYTES:
            break
    total_bytes = sum(f.size for f in files)
    return round(tokens * total_bytes / max(sampled, 1))


def _estimate_parquet(files: list[SourceFile], text_field: str,
                      tokenizer: DocumentTokenizer) -> int:
    tokens = rows_sampled = total_rows = 0
    chars = 0
    frame = frame_tokens(tokenizer.bos_id)
    for file in files:
        pf, raw = parquet_file(file.path, "")
        with raw:
            total_rows += pf.metadata.num_rows
            if chars >= SAMPLE_BYTES or text_field not in pf.schema_arrow.names:
                continue
            for batch in pf.iter_batches(batch_size=256, columns=[text_field]):
                for value in batch.column(0).to_pylist():
                    text, _ = classify_value(value)
                    rows_sampled += 1
                    if text is not None:
                        tokens += len(tokenizer.encode_ordinary(text)) + frame
                        chars += len(text)
                if chars >= SAMPLE_BYTES:
                    break
    return round(tokens * total_rows / max(rows_sampled, 1))


def slot_sharing(source: DataSource, slots: int) -> tuple[bool, str | None]:
    """(read whole by every slot, problem) for a local source split among
    ``slots`` (``sharding.py`` step 4); hub sources are not opened: (False, None)."""
    if not source.path:
        return False, None
    try:
        files = source_files(source)
    except (DataSourceError, OSError):
        return False, None  # reported among the config's file problems
    try:
        lanes = plan_lanes(files, slots, source.name, source.text_field, source.max_epochs)
    except DataSourceError as e:
        return False, str(e)
    return bool(lanes and lanes[0].whole), None


def plan_sources(
    config, total_tokens: int, slots: int, planned_tokens: dict[str, int] | None = None
) -> list[dict]:
    """The plan's ``sources`` entries: weight, planned tokens (from the
    weights, or ``planned_tokens`` summed over mixture stages), whether every
    one of the ``slots`` reads it whole (a small source), and, when the
    source's size is known, available tokens and epochs."""
    try:
        tokenizer = load_tokenizer(config.model.hf_assets_path, config.model.tokenizer_kind)
    except (OSError, ValueError):
        tokenizer = None
    sources = config.data.sources
    weights = sum(s.weight for s in sources) or 1.0
    out = []
    for s in sources:
        if planned_tokens is None:
            share = s.weight / weights
            planned = round(total_tokens * share)
        else:
            planned = planned_tokens[s.name]
            share = planned / total_tokens if total_tokens else 0.0
        size = source_size(s, tokenizer)
        epochs = planned / size.tokens if size.tokens else None
        whole, problem = slot_sharing(s, slots)
        out.append(
            {
                "name": s.name,
                "domain": s.domain,
                "weight": s.weight,
                "share": share,
                "tokens": planned,
                "planned_tokens": planned,
                "available_tokens": size.tokens,
                "available_from": size.basis,
                "epochs": epochs,
                "max_epochs": s.max_epochs or None,
                "read_whole_by_every_slot": whole,
                "problem": problem,
            }
        )
    return out


def format_source_line(s: dict, tokens_text) -> str:
    """One plan line: share, planned tokens and how often the source repeats."""
    line = (
        f"    {s['name']:<32} {s['domain']:<6} {100 * s['share']:5.1f}%  "
        f"{tokens_text(s['planned_tokens']):>8} tokens"
    )
    if s["epochs"] is not None:
        basis = {"num_tokens": "given", "index": "exact, from the index",
                 "index_sampled": "from the index"}.get(s["available_from"], "estimated")
        line += (
            f"  of {tokens_text(s['available_tokens'])} ({basis}): "
            f"{s['epochs']:.2f} epochs"
        )
        if s["max_epochs"] and s["epochs"] > s["max_epochs"]:
            line += f", stops at max_epochs = {s['max_epochs']:g}"
        elif s["epochs"] > 1:
            line += ", repeats"
    if s.get("read_whole_by_every_slot"):
        line += "; small: every slot reads all of it"
    return line
