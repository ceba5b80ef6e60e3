"""Export a checkpoint as a Hugging Face Hub-ready folder.

    python -m swallow_titan.export CKPT_DIR OUT_DIR [--step N]
        [--dtype bfloat16|float32] [--max-shard-size 5GB] [--tokenizer DIR]
        [--overwrite] [--push-to-hub REPO_ID [--private]]

CKPT_DIR is a run's checkpoint folder (<dump_folder>/checkpoint; the latest
step unless --step) or one DCP checkpoint (a step-N folder or the output of
``convert hf-to-dcp``). Progress (shards, bytes, rate, ETA) goes to stderr.
Exit status (``ExitCode``): 0 done, 2 bad input (nothing written), 3 the Hub
upload failed (the local folder is complete).
"""

from __future__ import annotations

import argparse
import sys

import swallow_titan  # noqa: F401  (selects the device before torchtitan loads)
from torchtitan.tools.logging import init_logger

from swallow_titan.checkpoint.dcp_reader import CheckpointReadError
from swallow_titan.config.errors import ExitCode
from swallow_titan.hf.atomic import OutputFolderError
from swallow_titan.hf.config import HFConfigError
from swallow_titan.hf.export import EXPORT_DTYPES, ExportError, export_hf
from swallow_titan.hf.hub import HubPushError, push_to_hub
from swallow_titan.hf.run_record import RunRecordError

INPUT_ERRORS = (
    CheckpointReadError,
    ExportError,
    HFConfigError,
    OutputFolderError,
    RunRecordError,
)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The export options (shared with ``convert dcp-to-hf``)."""
    parser.add_argument("checkpoint", metavar="CKPT_DIR", help="run checkpoint folder or one DCP checkpoint")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (created)")
    parser.add_argument("--step", type=int, default=None, help="step to export (default: latest)")
    parser.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default="bfloat16")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the run's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="upload to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")


def run_export(args: argparse.Namespace) -> int:
    """Export (and push) as the parsed arguments say; returns the exit status."""
    if args.private and not args.push_to_hub:
        print("export: --private needs --push-to-hub REPO_ID", file=sys.stderr)
        return ExitCode.BAD_INPUT
    try:
        result = export_hf(
            args.checkpoint,
            args.out_dir,
            step=args.step,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            tokenizer_path=args.tokenizer,
            repo_id=args.push_to_hub,
            overwrite=args.overwrite,
        )
    except INPUT_ERRORS as e:
        print(f"export error: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    print(f"exported step {result.step} to {result.folder} ({len(result.shard_files)} safetensors files)")
    if args.push_to_hub:
        try:
            url = push_to_hub(result.folder, args.push_to_hub, private=args.private)
        except HubPushError as e:
            print(f"push error: {e}", file=sys.stderr)
            return ExitCode.PUSH_FAILED
        print(f"uploaded to {url}")
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    init_logger()
    parser = argparse.ArgumentParser(
        prog="python -m swallow_titan.export",
        description="Export a checkpoint as a Hugging Face Hub-ready folder.",
    )
    add_export_arguments(parser)
    return run_export(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
