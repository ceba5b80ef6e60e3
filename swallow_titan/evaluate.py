"""Evaluate a checkpoint with lm-evaluation-harness: ``python -m swallow_titan.evaluate``.

    python -m swallow_titan.evaluate SOURCE --tasks NAMES [--include-path DIR]
        [--num-fewshot K] [--limit N] [--batch-size B] [--max-gen-toks N]
        [--max-length N] [--step N] [--tokenizer DIR] [--dtype D] [--json]
    torchrun --nproc_per_node 8 -m swallow_titan.evaluate SOURCE --tasks ...

SOURCE is a run's checkpoint folder (its latest complete ``step-N``, or
``--step N``), one DCP checkpoint, or a Hugging Face folder (Llama or Qwen3). The model is
swallow-titan's, FSDP2-sharded over the processes (no rank holds the whole
model), and goes through the same lm-eval adapter as in-loop evaluation
(``[eval]``), so the numbers are those the training run would log. With
``--json`` rank 0 prints one JSON object whose ``results`` member is
``lm_eval.simple_evaluate``'s ``results`` dictionary, unchanged.

Precision is training's: FSDP over several processes computes in ``--dtype``
(its mixed-precision policy), and one process keeps fp32 weights and runs the
forward pass under autocast to ``--dtype``, as a one-GPU training run (and its
in-loop evaluation) does.

Exit status: 0 done, 1 the evaluation failed (rank 0 prints every rank's
error; every rank stops), 2 bad input (source, task, option) or lm-eval missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import swallow_titan  # selects the device before torchtitan loads
import torch
import torch.distributed as dist

from swallow_titan.config.errors import ExitCode
from swallow_titan.eval import EvalUnavailableError, require_lm_eval
from swallow_titan.runtime.ranks import job_world_size

# Llama 3's pre-training context, for HF folders without a run record.
DEFAULT_MAX_LENGTH = 8192


class EvaluateInputError(ValueError):
    """SOURCE or an option that cannot be evaluated; the message says why."""


@dataclass
class EvalOptions:
    """The ``[eval]`` fields ``run_simple_evaluate`` reads, from the command line."""

    tasks: list[str]
    include_path: str
    num_fewshot: int
    limit: float


@dataclass
class ModelSource:
    """What to load: model dimensions, where weights and tokenizer are, the step."""

    kind: str  # "hf" or "dcp"
    path: Path
    args: Any
    tokenizer_path: str
    max_length: int
    step: int | None
    tokenizer_kind: str = "auto"  # the run's [model] tokenizer_kind


def resolve_source(source: str, step: int | None, tokenizer: str | None) -> ModelSource:
    """Find out what SOURCE is (HF folder, run folder, one DCP checkpoint)."""
    from swallow_titan.checkpoint.dcp_reader import CheckpointReadError, locate_checkpoint
    from swallow_titan.hf.config import (
        CONFIG_FILE,
        HFConfigError,
        model_args_from_hf_config,
        read_hf_config,
    )
    from swallow_titan.hf.run_record import RunRecordError, find_run_record

    path = Path(source)
    if not path.exists():
        raise EvaluateInputError(f"{source}: no such file or folder")
    if (path / CONFIG_FILE).is_file():
        if step is not None:
            raise EvaluateInputError(f"{source}: --step applies to checkpoint folders, not HF folders")
        try:
            args = model_args_from_hf_config(read_hf_config(path), str(path / CONFIG_FILE))
        except HFConfigError as e:
            raise EvaluateInputError(str(e)) from None
        return ModelSource("hf", path, args, tokenizer or str(path), DEFAULT_MAX_LENGTH, None)
    try:
        step_dir, found = locate_checkpoint(path, step)
        record, record_path = find_run_record(step_dir)
        args = model_args_from_hf_config(record.hf_config, str(record_path))
    except (CheckpointReadError, RunRecordError, HFConfigError) as e:
        raise EvaluateInputError(str(e)) from None
    job = record.job_config or {}
    seq_len = (job.get("training") or {}).get("seq_len")
    tokenizer_path = tokenizer or record.tokenizer_path
    if not tokenizer_path:
        raise EvaluateInputError(f"{record_path} names no tokenizer; pass --tokenizer DIR")
    # A run's tokenizer family as it chose it; another folder (--tokenizer) is read as it is.
    kind = "auto" if tokenizer else (job.get("model") or {}).get("tokenizer_kind", "auto")
    return ModelSource(
        "dcp", step_dir, args, tokenizer_path, seq_len or DEFAULT_MAX_LENGTH, found, kind
    )


def _init_distributed() -> tuple[int, int, torch.device]:
    world = job_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # The device swallow_titan selected for torchtitan when it was imported.
    if swallow_titan.DEVICE_TYPE == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device


def build_model(source: ModelSource, max_length: int, dtype: torch.dtype, device: torch.device):
    """The family's model (Llama-3.1 or Qwen3) with SOURCE's weights, FSDP2-sharded over all processes.

    The weights stay fp32; with several processes FSDP computes in ``dtype``
    (:func:`forward_in` gives one process autocast instead).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from swallow_titan.hf.weights import load_hf_weights
    from swallow_titan.checkpoint.model_weights import load_dcp_model_weights
    from swallow_titan.model.family import family_of_args

    args = replace(source.args, max_seq_len=max_length)
    with torch.device("meta"):
        model = family_of_args(args).model_cls(args)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world,))
        # fp32 weights are gathered as they are; bf16 compute casts them.
        param_dtype = None if dtype == torch.float32 else dtype
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for layer in model.layers.values():
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)  # RoPE table; weights are loaded next
    if source.kind == "hf":
        load_hf_weights([model], source.path, args)
    else:
        load_dcp_model_weights([model], str(source.path))
    return model.eval()


def forward_in(model: torch.nn.Module, dtype: torch.dtype, device: torch.device):
    """The model's forward pass as training runs it in ``dtype``.

    One process: fp32 weights under autocast (torchtitan's ``maybe_enable_amp``
    for a run without FSDP). Several: FSDP's mixed-precision policy already
    casts, so the model is called as it is.
    """
    sharded = dist.is_initialized() and dist.get_world_size() > 1
    if sharded or dtype == torch.float32:
        return model

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype):
            return model(tokens)

    return forward


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m swallow_titan.evaluate", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("source", help="run checkpoint folder, one DCP checkpoint, or an HF folder")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names")
    p.add_argument("--include-path", default="", help="folder of extra task YAML files")
    p.add_argument("--num-fewshot", type=int, default=-1, help="few-shot examples (default: each task's)")
    p.add_argument("--limit", type=float, default=0, help="examples per task (0: all; <1: fraction)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass per process")
    p.add_argument("--max-gen-toks", type=int, default=256, help="most generated tokens per answer")
    p.add_argument("--max-length", type=int, default=0,
                   help="longest input (default: the run's training.seq_len, else 8192)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the run's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--log-samples", action="store_true",
                   help="with --json: add each example's responses as `samples`")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        require_lm_eval("python -m swallow_titan.evaluate")
    except EvalUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    from lm_eval.utils import make_table

    from swallow_titan.data.tokenizer import TokenizerFileError, load_tokenizer
    from swallow_titan.eval.adapter import ModelRunner, SwallowLM
    from swallow_titan.eval.in_loop import run_simple_evaluate
    from swallow_titan.eval.lockstep import run_together
    from swallow_titan.eval.tasks import check_tasks

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        if not tasks:
            raise EvaluateInputError("--tasks: name at least one task")
        source = resolve_source(args.source, args.step, args.tokenizer)
        tokenizer = load_tokenizer(source.tokenizer_path, source.tokenizer_kind)
        max_length = args.max_length or source.max_length
        if not 0 < args.max_gen_toks < max_length:
            raise EvaluateInputError(
                f"--max-gen-toks {args.max_gen_toks}: must be between 1 and the model's "
                f"maximum length {max_length} (--max-length)"
            )
        problems = check_tasks(tasks, args.include_path)
        if problems:
            raise EvaluateInputError("\n".join(problems))
    except (EvaluateInputError, TokenizerFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    rank, world, device = _init_distributed()
    try:
        default_dtype = "bfloat16" if device.type == "cuda" else "float32"
        dtype = getattr(torch, args.dtype or default_dtype)
        model = build_model(source, max_length, dtype, device)
        lm = SwallowLM(
            ModelRunner(
                forward=forward_in(model, dtype, device), device=device, dp_rank=rank, dp_size=world
            ),
            tokenizer,
            max_length=max_length,
            batch_size=args.batch_size,
            max_gen_toks=args.max_gen_toks,
        )
        options = EvalOptions(tasks, args.include_path, args.num_fewshot, args.limit)

        def run() -> dict[str, Any] | None:
            with torch.no_grad():
                return run_simple_evaluate(lm, options, log_samples=args.log_samples)

        result, errors = run_together(run, device)
        if errors:
            if rank == 0:
                print("error: the evaluation failed:\n" + "\n".join(errors), file=sys.stderr)
            return ExitCode.PROBLEMS
        if rank == 0:
            if args.json:
                report = {
                    "source": str(source.path),
                    "step": source.step,
                    "processes": world,
                    "results": result["results"],
                }
                if args.log_samples:
                    report["samples"] = {
                        task: [
                            {k: s[k] for k in ("doc_id", "target", "resps", "filtered_resps")}
                            for s in samples
                        ]
                        for task, samples in result["samples"].items()
                    }
                print(json.dumps(report, default=str))
            else:
                where = f"{source.path}" + (f" (step {source.step})" if source.step is not None else "")
                print(f"{where}, {world} process(es)\n{make_table(result)}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
