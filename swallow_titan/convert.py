"""Convert between Hugging Face safetensors and torchtitan/DCP checkpoints.

    python -m swallow_titan.convert hf-to-dcp HF_DIR OUT_DIR [--overwrite]
    python -m swallow_titan.convert dcp-to-hf CKPT_DIR OUT_DIR [export options]

``hf-to-dcp`` works for any Llama-architecture config.json; start a run from
its output with ``checkpoint.initial_load_path = OUT_DIR``. ``dcp-to-hf`` is
``python -m swallow_titan.export``. Progress (tensors or shards, bytes, rate,
ETA) goes to stderr. Exit status (``ExitCode``): 0 done, 2 bad input (nothing
written), 3 the Hub upload failed (the local folder is complete).
"""

from __future__ import annotations

import argparse
import sys

import swallow_titan  # noqa: F401  (selects the device before torchtitan loads)
from torchtitan.tools.logging import init_logger

from swallow_titan.hf.convert import convert_hf_to_dcp
from swallow_titan.config.errors import ExitCode
from swallow_titan.hf.weights import HFWeightsError
from swallow_titan.export import INPUT_ERRORS, add_export_arguments, run_export


def main(argv: list[str] | None = None) -> int:
    init_logger()
    parser = argparse.ArgumentParser(
        prog="python -m swallow_titan.convert",
        description="Convert between Hugging Face safetensors and DCP checkpoints.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    to_dcp = commands.add_parser("hf-to-dcp", help="HF model folder -> DCP checkpoint")
    to_dcp.add_argument("hf_dir", metavar="HF_DIR")
    to_dcp.add_argument("out_dir", metavar="OUT_DIR")
    to_dcp.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    add_export_arguments(commands.add_parser("dcp-to-hf", help="DCP checkpoint -> HF folder"))
    args = parser.parse_args(argv)
    if args.command == "dcp-to-hf":
        return run_export(args)
    try:
        out = convert_hf_to_dcp(args.hf_dir, args.out_dir, overwrite=args.overwrite)
    except (*INPUT_ERRORS, HFWeightsError) as e:
        print(f"convert error: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    print(f"converted {args.hf_dir} to {out}")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
