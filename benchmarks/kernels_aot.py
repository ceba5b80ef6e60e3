"""Compile every Triton kernel and GPU autotune config for sm_90 (H100/H200), no GPU needed.

Prints one row per compile (kernel, variant, config, registers, registers x
threads, spill bytes, shared memory) and exits 1 if any config fails to
compile, spills, needs more than the SM's 65,536 registers or more than 227 KiB
of shared memory per block. See ``kernels/aot.py``.

    python benchmarks/kernels_aot.py                         # this environment's Triton
    python benchmarks/kernels_aot.py --triton-path /tmp/t36  # e.g. pip install --target /tmp/t36 triton==3.6.0
    python benchmarks/kernels_aot.py --hidden 8192           # another model width
    python benchmarks/kernels_aot.py --head-dim 0            # without the q/k-norm rows
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--triton-path", type=Path,
                        help="a folder holding another Triton (pip install --target DIR triton==X)")
    parser.add_argument("--hidden", type=int, default=4096, help="model width (default: 4096)")
    parser.add_argument("--head-dim", type=int, default=128,
                        help="q/k norm row width (default: Qwen3's 128; 0: none)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[128_256, 128_256 // 8],
                        help="vocabulary sizes per rank (default: Llama 3's, and its TP 8 shard)")
    args = parser.parse_args(argv)
    if args.triton_path:
        if not (args.triton_path / "triton" / "__init__.py").is_file():
            parser.error(f"--triton-path {args.triton_path}: no triton package there")
        sys.path.insert(0, str(args.triton_path))
    # Compiling needs Triton in its normal (not interpreted) mode; it reads this
    # when first imported, which happens below.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default; silences 3.9's notice
    sys.path.insert(0, str(REPO))

    import triton

    from kernels import aot

    jobs = aot.recipe_jobs(hidden=args.hidden, vocabs=tuple(args.vocab), head_dim=args.head_dim)
    start = time.perf_counter()
    results = list(aot.compile_all(jobs))
    elapsed = time.perf_counter() - start
    print(f"Triton {triton.__version__} ({Path(triton.__file__).parent}), target sm_90a, "
          f"hidden {args.hidden}, head_dim {args.head_dim}, vocab {args.vocab}, "
          f"bf16 (FSDP) and AMP dtypes; "
          f"{len(results)} compiles in {elapsed:.0f} s")
    print(aot.format_table(results))
    bad = [r for r in results if r.problems()]
    if bad:
        print(f"\n{len(bad)} of {len(results)} configs cannot run well on sm_90", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
