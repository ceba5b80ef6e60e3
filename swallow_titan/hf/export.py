"""Export a torchtitan/DCP checkpoint as a Hugging Face Hub-ready folder.

The folder holds ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.
index.json``, ``config.json`` (``LlamaForCausalLM`` or ``Qwen3ForCausalLM`` /
``Qwen3MoeForCausalLM``, RoPE in both spellings),
``generation_config.json``, the run's tokenizer files and a ``README.md``
model card. Weights are read and written one output shard at a time (peak
memory about one shard), renamed to HF names by the family's torchtitan adapter
(``Llama3StateDictAdapter`` with the q/k RoPE permutation; ``Qwen3StateDictAdapter``).
The MoE expert bias of auxiliary-loss-free balancing has no place in HF's
Qwen3-MoE: it is left out, with a warning when it is not zero. The folder appears under its final
name only when complete.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torchtitan.tools.logging import logger

from swallow_titan.checkpoint.average import AveragedCheckpoint
from swallow_titan.checkpoint.dcp_reader import DCPCheckpoint, locate_checkpoint
from swallow_titan.hf.atomic import staged_folder
from swallow_titan.hf.config import CONFIG_FILE, model_args_from_hf_config
from swallow_titan.hf.weights import (
    EXPERT_BIAS,
    HF_INDEX,
    hf_names,
    native_tensor_shapes,
    state_dict_adapter,
)
from swallow_titan.hf.model_card import TrainingSummary, render_model_card
from swallow_titan.hf.progress import Progress
from swallow_titan.hf.run_record import RunRecord, find_run_record
from swallow_titan.hf.training_log import (
    EVAL_PREFIX,
    TRAINING_LOSS_TAGS,
    VALIDATION_LOSS_TAGS,
    last_evaluation,
    last_logged_value,
)

EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_CARD_FILE = "README.md"
# Tokenizer files of an HF model folder; `original/` of a Meta repo also holds
# the full consolidated weights, so only its tokenizer is taken.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "original/tokenizer.model",
)
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", re.IGNORECASE)


class ExportError(ValueError):
    """An export that cannot be made as asked; nothing was written."""


@dataclass
class ExportResult:
    """Where the export went and what it holds."""

    folder: Path
    step: int | None
    shard_files: list[str]
    total_bytes: int


def parse_size(text: str) -> int:
    """Bytes in "5GB", "500MB", "2GiB" or "1000" (GB = 10^9, GiB = 2^30, as HF)."""
    match = _SIZE.fullmatch(str(text))
    if not match:
        raise ExportError(f"max shard size {text!r}: expected e.g. '5GB', '500MB' or '2GiB'")
    number, unit, binary = match.groups()
    power = "KMGT".index(unit.upper()) + 1 if unit else 0
    size = int(float(number) * ((1024 if binary else 1000) ** power))
    if size < 1:
        raise ExportError(f"max shard size {text!r}: must be positive")
    return size


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Group tensors, in order, into shards of at most ``max_bytes`` (a larger tensor gets its own)."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for name, nbytes in sizes:
        if current and current_bytes + nbytes > max_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += nbytes
    if current:
        shards.append(current)
    return shards


def tokenizer_files(tokenizer_path: str | Path) -> list[Path]:
    """The tokenizer files to ship, relative to the tokenizer folder."""
    root = Path(tokenizer_path)
    if root.is_file():
        return [Path(root.name)]
    return [Path(name) for name in TOKENIZER_FILES if (root / name).is_file()]


def training_summary(checkpoint: DCPCheckpoint | AveragedCheckpoint, record: RunRecord, step: int | None) -> TrainingSummary:
    """Steps, tokens, per-source tokens and final losses for the model card."""
    from swallow_titan.data.dataloader import source_token_counts

    from swallow_titan.components.averaging import AVERAGE_KINDS
    from swallow_titan.components.guard import SPIKES_ENTRY, spike_events

    train_state = checkpoint.read_entry("train_state") or {}
    spikes = checkpoint.read_entry(SPIKES_ENTRY)
    trained_step = train_state.get("step", step)
    source_tokens = None
    dataloader_state = checkpoint.read_entry("dataloader")
    if dataloader_state is not None:
        try:
            source_tokens = source_token_counts(dataloader_state)
        except Exception as e:  # noqa: BLE001  (another data format: report, don't fail)
            logger.warning(f"{checkpoint.path}: per-source token counts not readable: {e}")
    tokens = (
        trained_step * record.tokens_per_step
        if trained_step is not None and record.tokens_per_step
        else None
    )
    tb = record.tensorboard_folder
    set_names = [
        s.get("name")
        for s in (((record.job_config or {}).get("validation") or {}).get("sets") or [])
    ]
    # Weights averaged in the loop were validated as val/<kind>/...: their card reports those.
    kind = (record.averaged_in_loop or {}).get("kind")
    val = f"val/{kind}" if kind else "val"
    return TrainingSummary(
        step=trained_step,
        tokens_trained=tokens,
        source_tokens=source_tokens,
        training_loss=last_logged_value(tb, TRAINING_LOSS_TAGS, trained_step) if tb else None,
        validation_loss=(
            last_logged_value(tb, (f"{val}/loss",) if kind else VALIDATION_LOSS_TAGS, trained_step)
            if tb
            else None
        ),
        validation_loss_by_set={
            name: last_logged_value(tb, (f"{val}/{name}/loss",), trained_step) if tb else None
            for name in set_names
            if name
        },
        evaluation=(
            last_evaluation(
                tb,
                trained_step,
                prefix=f"eval/{kind}/" if kind else EVAL_PREFIX,
                exclude=() if kind else tuple(f"{EVAL_PREFIX}{k}/" for k in AVERAGE_KINDS),
            )
            if tb
            else None
        ),
        spike_events=spike_events(spikes) if spikes is not None else None,
    )


def export_hf(
    checkpoint: str | Path | AveragedCheckpoint,
    out_dir: str | Path,
    *,
    step: int | None = None,
    dtype: str = "bfloat16",
    max_shard_size: str = "5GB",
    tokenizer_path: str | Path | None = None,
    repo_id: str | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write a Hub-ready folder for a checkpoint (see the module docstring).

    ``checkpoint`` is a run's checkpoint folder (latest step unless ``step``),
    one DCP checkpoint, or an average of checkpoints (``python -m
    swallow_titan.average --hf``: its newest input's step and run record,
    with the averaged steps and weights); ``repo_id`` (the Hub repository it
    is meant for) names the model in its card. Every input is checked before
    anything is written.
    """
    ckpt: DCPCheckpoint | AveragedCheckpoint
    if isinstance(checkpoint, AveragedCheckpoint):
        ckpt, record, record_path = checkpoint, checkpoint.averaged_record(), checkpoint.record_path
        step = (checkpoint.read_entry("train_state") or {}).get("step")
    else:
        step_dir, step = locate_checkpoint(checkpoint, step)
        record, record_path = find_run_record(step_dir)
        ckpt = DCPCheckpoint(step_dir)
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"dtype {dtype!r}: expected one of {sorted(EXPORT_DTYPES)}")
    target = EXPORT_DTYPES[dtype]
    max_bytes = parse_size(max_shard_size)
    step_dir = ckpt.path
    args = model_args_from_hf_config(record.hf_config, str(record_path))

    names = hf_names(args)
    shapes = native_tensor_shapes(args)
    stored = ckpt.tensors()
    missing = [n for n in names if n not in stored]
    wrong = [n for n in names if n in stored and stored[n][0] != shapes[n]]
    if missing or wrong:
        raise ExportError(
            f"{step_dir}: the checkpoint does not hold the model described by {record_path}: "
            + (f"missing {', '.join(missing[:6])}" if missing else "")
            + (f"; other shapes for {', '.join(wrong[:6])}" if wrong else "")
        )
    _warn_about_dropped_expert_bias(ckpt, args, step_dir)
    tokenizer_root = Path(tokenizer_path or record.tokenizer_path or "")
    tokenizer = tokenizer_files(tokenizer_root) if str(tokenizer_root) else []
    if not tokenizer:
        raise ExportError(
            f"no tokenizer files in {str(tokenizer_root) or '(none recorded)'} (looked for "
            f"{', '.join(TOKENIZER_FILES)}); pass --tokenizer FOLDER"
        )
    if not (tokenizer_root / "tokenizer.json").is_file() and not tokenizer_root.is_file():
        logger.warning(
            f"{tokenizer_root} has no tokenizer.json: transformers' AutoTokenizer needs it; "
            "the export ships the tokenizer files that exist"
        )
    summary = training_summary(ckpt, record, step)
    out_dir = Path(out_dir)

    itemsize = torch.empty((), dtype=target).element_size()
    sizes = [(n, math.prod(shapes[n]) * itemsize) for n in names]
    shards = plan_shards(sizes, max_bytes)
    adapter = state_dict_adapter(args)
    weight_map: dict[str, str] = {}
    shard_files = []
    nbytes = dict(sizes)
    total_bytes = sum(nbytes.values())
    with (
        staged_folder(out_dir, overwrite=overwrite) as staging,
        Progress("export", len(shards), total_bytes, "shards") as progress,
    ):
        for i, group in enumerate(shards, start=1):
            file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            hf_tensors = adapter.to_hf(ckpt.read_tensors(group))
            hf_tensors = {k: v.to(target).contiguous() for k, v in hf_tensors.items()}
            save_file(hf_tensors, str(staging / file_name), metadata={"format": "pt"})
            weight_map.update({k: file_name for k in hf_tensors})
            shard_files.append(file_name)
            logger.info(f"Export: wrote {file_name} ({len(hf_tensors)} tensors)")
            del hf_tensors
            progress.advance(1, sum(nbytes[n] for n in group))
        index = {
            "metadata": {
                "total_size": total_bytes,
                "total_parameters": sum(math.prod(shapes[n]) for n in names),
            },
            "weight_map": weight_map,
        }
        _write_json(staging / HF_INDEX, index)
        hf_config = {**record.hf_config, "dtype": dtype, "torch_dtype": dtype}
        _write_json(staging / CONFIG_FILE, hf_config)
        _write_json(
            staging / GENERATION_CONFIG_FILE,
            {
                "bos_token_id": hf_config.get("bos_token_id"),
                "eos_token_id": hf_config.get("eos_token_id"),
            },
        )
        for relative in tokenizer:
            source = tokenizer_root if tokenizer_root.is_file() else tokenizer_root / relative
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, staging / relative)
        description = (record.job_config or {}).get("job", {}).get("description")
        card = render_model_card(
            record,
            summary,
            title=repo_id or description or out_dir.name,
            model_id=repo_id or str(out_dir.resolve()),
            dtype=dtype,
        )
        (staging / MODEL_CARD_FILE).write_text(card)
    logger.info(
        f"Exported {step_dir} (step {summary.step}) to {out_dir}: {len(shard_files)} "
        f"safetensors files, {total_bytes / 1e9:.2f} GB in {dtype}"
    )
    return ExportResult(out_dir, summary.step, shard_files, total_bytes)


def _warn_about_dropped_expert_bias(ckpt: DCPCheckpoint | AveragedCheckpoint, args: Any, step_dir: Path) -> None:
    """Warn when the export changes routing: a non-zero expert bias is not exported."""
    names = [n for n in ckpt.tensors() if n.endswith(EXPERT_BIAS)]
    if not names:
        return
    largest = max(t.abs().max().item() for t in ckpt.read_tensors(names).values())
    if largest > 0:
        logger.warning(
            f"{step_dir}: the MoE expert bias ([moe] load_balance = \"aux_loss_free\") is "
            f"non-zero (largest |bias| {largest:.3g}) and Hugging Face's Qwen3-MoE has no "
            "place for it: the exported model routes tokens without it, not as trained"
        )


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")

