"""Run the data pipeline of a config without a model, and report what it read.

    python -m swallow_titan.data CONFIG [--batches N] [--ngpu G] [--nnodes M]
                                        [--dp-rank R] [--dp-size S]
                                        [--dump FILE] [--json] [--section.key value ...]

Reads ``N`` global batches as data-parallel rank ``R`` of ``S`` would (its
slots only; ``S`` defaults to the data-parallel degree of the config's layout
on ``G`` x ``M`` processes, ``G`` to the visible GPUs, else 1), then prints per
source the input tokens, documents, realised share, epochs and skipped records
by reason, the tokens per second and the mixture stage reached. ``--json``
prints one object instead: ``{"sources": [{"name", "domain", "weight",
"tokens", "documents", "share", "epochs", "skipped": {reason: n}}],
"sequences": n, "tokens_per_s": x, "stage": {"name", "number", "stages"}}``
(``stage``: the ``[[data.stages]]`` entry of the last batch read). ``--dump
FILE`` writes every packed sequence as a JSON line ``{"tokens": [...], "segments": [{"source", "start",
"end"}]}`` (one segment per document piece, token ranges with ``end``
exclusive), exactly what the model would see (inputs are ``tokens[:-1]``,
labels ``tokens[1:]``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import swallow_titan  # noqa: F401  (device selection before torchtitan loads)
from swallow_titan.config.checks import resolve_layout
from swallow_titan.config.errors import ConfigError, ExitCode
from swallow_titan.config.manager import load_job_config
from swallow_titan.data.dataloader import SlotDataLoader, build_dataloader
from swallow_titan.data.slots import SlotWindow
from swallow_titan.data.sources import DataSourceError
from swallow_titan.data.tokenizer import TokenizerFileError, load_tokenizer
from swallow_titan.runtime.device import add_process_arguments


def window_segments(window: SlotWindow, source_name: str) -> list[dict]:
    """The document pieces of a window: token ranges between position restarts."""
    starts = np.flatnonzero(window.positions == 0).tolist()
    ends = [*starts[1:], len(window.tokens)]
    return [
        {"source": source_name, "start": int(a), "end": int(b)}
        for a, b in zip(starts, ends)
    ]


def source_report(loader: SlotDataLoader, sequences_by_source: dict[str, int]) -> list[dict]:
    """Per source: its weight (in the mixture stage reached), and what this
    rank's slots read and packed."""
    seq_len = loader.spec.seq_len
    total = sum(sequences_by_source.values()) or 1
    states = loader.consumed_states()
    weights = loader.spec.stages[max(states[0]["stage"], 0)].weights
    out = []
    for source, weight in zip(loader.spec.sources, weights):
        lanes = [s["lanes"][source.name] for s in states]
        skipped: dict[str, int] = {}
        for lane in lanes:
            for reason, n in lane["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
        sequences = sequences_by_source.get(source.name, 0)
        out.append(
            {
                "name": source.name,
                "domain": source.domain,
                "weight": weight,
                "tokens": sequences * seq_len,
                "documents": sum(lane["documents"] for lane in lanes),
                "share": sequences / total,
                "epochs": max(lane["epoch"] + (not lane["stopped"]) for lane in lanes),
                "skipped": dict(sorted(skipped.items())),
            }
        )
    return out


def run(loader: SlotDataLoader, batches: int, dump=None) -> dict:
    """Read ``batches`` global batches; the report as a JSON-able dict."""
    names = loader.spec.names
    sequences_by_source = {name: 0 for name in names}
    sequences = 0
    start = time.perf_counter()
    microbatches = loader.microbatches()
    for _ in range(batches * loader.microsteps):
        rows = next(microbatches, None)
        if rows is None:
            break
        for window in rows:
            name = names[window.source]
            sequences_by_source[name] += 1
            sequences += 1
            if dump is not None:
                record = {
                    "tokens": window.tokens.tolist(),
                    "segments": window_segments(window, name),
                }
                dump.write(json.dumps(record) + "\n")
    elapsed = time.perf_counter() - start
    stage = loader.consumed_states()[0]["stage"]
    return {
        "sources": source_report(loader, sequences_by_source),
        "sequences": sequences,
        "tokens_per_s": sequences * loader.spec.seq_len / max(elapsed, 1e-9),
        "stage": {
            "name": loader.spec.stages[stage].name if stage >= 0 else "",
            "number": stage + 1,
            "stages": len(loader.spec.stages),
        },
    }


def format_report(report: dict, header: str) -> str:
    lines = [
        header,
        f"  {'source':<32} {'domain':<6} {'weight':>7} {'tokens':>12} {'documents':>10} "
        f"{'share':>7} {'epochs':>6}  skipped",
    ]
    for s in report["sources"]:
        skipped = ", ".join(f"{r} {n}" for r, n in s["skipped"].items() if n) or "-"
        lines.append(
            f"  {s['name']:<32} {s['domain']:<6} {s['weight']:>7g} {s['tokens']:>12,} "
            f"{s['documents']:>10,} {100 * s['share']:6.2f}% {s['epochs']:>6}  {skipped}"
        )
    lines.append(
        f"  {report['sequences']:,} sequences, {report['tokens_per_s']:,.0f} tokens/s"
    )
    stage = report["stage"]
    if stage["stages"] > 1:
        lines.append(
            f"  mixture stage {stage['name']!r} ({stage['number']} of {stage['stages']}) "
            "at the last batch read"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m swallow_titan.data", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("config", help="TOML config file")
    parser.add_argument("--batches", type=int, default=10, help="global batches to read (default 10)")
    add_process_arguments(parser)
    parser.add_argument("--dp-rank", type=int, default=0, help="data-parallel rank to read as")
    parser.add_argument(
        "--dp-size",
        type=int,
        default=None,
        help="data-parallel size (default: the layout's on --ngpu x --nnodes processes)",
    )
    parser.add_argument("--dump", help="write the packed sequences to this JSON Lines file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args, overrides = parser.parse_known_args(argv)
    try:
        config = load_job_config(args.config, overrides)
        if args.dp_size is None:
            args.dp_size = resolve_layout(config, args.ngpu * args.nnodes, args.config).dp
        if args.batches < 1 or args.dp_size < 1 or not 0 <= args.dp_rank < args.dp_size:
            parser.error("need --batches >= 1 and 0 <= --dp-rank < --dp-size")
        tokenizer = load_tokenizer(config.model.hf_assets_path, config.model.tokenizer_kind)
        loader = build_dataloader(args.dp_size, args.dp_rank, tokenizer, config)
    except (ConfigError, DataSourceError, TokenizerFileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    if args.dump:
        with open(args.dump, "w", encoding="utf-8") as dump:
            report = run(loader, args.batches, dump)
    else:
        report = run(loader, args.batches)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        header = (
            f"data of {args.config}: rank {args.dp_rank} of {args.dp_size}, "
            f"{args.batches} global batches of {loader.spec.slots} sequences "
            f"(this rank: {len(loader.slots)} per batch), seq_len {loader.spec.seq_len}"
        )
        print(format_report(report, header))
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
