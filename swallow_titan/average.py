"""Average the model weights of checkpoints.

    python -m swallow_titan.average CKPT [CKPT ...] --out DIR [--weights w1,w2,...]
        [--hf [--dtype bfloat16|float32] [--max-shard-size 5GB] [--tokenizer DIR]]
        [--overwrite]

Each CKPT is one DCP checkpoint (a ``step-N`` folder) or a run's checkpoint
folder (its latest step). The weights (default: equal) are normalised to sum
to one; the mean is accumulated in fp32, one tensor at a time. The output is
a DCP checkpoint of model weights in the checkpoints' dtype, with its run
record (start a run from it with ``checkpoint.initial_load_path``, evaluate
or export it), or with ``--hf`` a Hub-ready Hugging Face folder whose model
card lists the averaged steps and weights. Checkpoints of different models
are refused, naming the first difference. Exit status: 0 done, 2 bad input
(nothing written).
"""

from __future__ import annotations

import argparse
import sys

import swallow_titan  # noqa: F401  (selects the device before torchtitan loads)
from torchtitan.tools.logging import init_logger

from swallow_titan.checkpoint.average import (
    AverageError,
    AveragedCheckpoint,
    parse_weights,
    save_average_dcp,
)
from swallow_titan.config.errors import ExitCode
from swallow_titan.export import INPUT_ERRORS
from swallow_titan.hf.export import EXPORT_DTYPES, export_hf


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m swallow_titan.average",
        description="Average the model weights of DCP checkpoints (fp32 accumulation).",
    )
    parser.add_argument("checkpoints", metavar="CKPT", nargs="+", help="DCP checkpoints to average")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write (created)")
    parser.add_argument(
        "--weights", default=None, help="one positive weight per CKPT, e.g. 1,2,1 (default: equal)"
    )
    parser.add_argument("--hf", action="store_true", help="write a Hugging Face folder, not DCP")
    parser.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default="bfloat16", help="--hf: weights dtype")
    parser.add_argument("--max-shard-size", default="5GB", help="--hf: largest safetensors file")
    parser.add_argument("--tokenizer", default=None, help="--hf: tokenizer folder (default: the run's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    init_logger()
    try:
        weights = parse_weights(args.weights, len(args.checkpoints))
        average = AveragedCheckpoint(args.checkpoints, weights)
        steps = ", ".join(str(i.step) for i in average.inputs)
        if args.hf:
            result = export_hf(
                average,
                args.out,
                dtype=args.dtype,
                max_shard_size=args.max_shard_size,
                tokenizer_path=args.tokenizer,
                overwrite=args.overwrite,
            )
            print(f"averaged steps {steps} into {result.folder} (Hugging Face, {args.dtype})")
        else:
            out = save_average_dcp(average, args.out, overwrite=args.overwrite)
            print(f"averaged steps {steps} into {out} (DCP)")
    except (AverageError, *INPUT_ERRORS) as e:
        print(f"average error: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
