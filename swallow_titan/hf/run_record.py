"""``swallow_run.json``: what a checkpoint folder needs to be exported on its own.

A DCP checkpoint holds tensors and training state but not the model's
configuration, the tokenizer or the recipe. A run writes this record into its
checkpoint folder when it starts (``swallow_titan.components.start_rule``), and ``convert
hf-to-dcp`` writes one into its output, so ``python -m swallow_titan.export
CKPT_DIR OUT_DIR`` needs nothing else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from swallow_titan.hf.atomic import write_json_atomically

RUN_RECORD_FILE = "swallow_run.json"
FORMAT_VERSION = 1


class RunRecordError(ValueError):
    """A missing or unreadable ``swallow_run.json``."""


@dataclass
class RunRecord:
    """The description of a run (or a conversion) that an export reads."""

    hf_config: dict[str, Any]
    """The model as a Hugging Face config.json (see ``hf_config``)."""

    tokenizer_path: str = ""
    """Folder of the tokenizer files to ship with an export."""

    base_model: str = ""
    """What the weights started from (Hub id or folder); empty: random init."""

    job_config: dict[str, Any] | None = None
    """The run's full job config (None for a converted checkpoint)."""

    config_file: str = ""
    """The TOML file the run was started with."""

    tokens_per_step: int | None = None
    """Global batch x sequence length."""

    tensorboard_folder: str = ""
    """Where the run's TensorBoard events are (for the model card's losses)."""

    averaged_from: list[dict[str, Any]] | None = None
    """For an average of checkpoints (``python -m swallow_titan.average``): each
    input's ``checkpoint``, ``step`` and normalised ``weight``."""

    averaged_in_loop: dict[str, Any] | None = None
    """For an average kept while training (``[averaging]``, the ``ema-step-N`` /
    ``tail-step-N`` folders): ``kind`` ("ema" or "tail"), the ``step`` it was
    written at and its settings (``ema_decay``; ``tail_steps`` and the window's
    ``first_step``). See ``WeightAveraging.description``."""

    format_version: int = field(default=FORMAT_VERSION)

    def write(self, folder: str | Path) -> Path:
        """Write (atomically) into ``folder``; returns the file's path."""
        path = Path(folder) / RUN_RECORD_FILE
        write_json_atomically(path, asdict(self))
        return path


def read_run_record(folder: str | Path) -> RunRecord | None:
    """The record in ``folder``, or None if there is none."""
    path = Path(folder) / RUN_RECORD_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        known = {f.name for f in fields(RunRecord)}
        return RunRecord(**{k: v for k, v in data.items() if k in known})
    except (json.JSONDecodeError, TypeError) as e:
        raise RunRecordError(f"{path}: not a valid {RUN_RECORD_FILE}: {e}") from None


def find_run_record(checkpoint: str | Path) -> tuple[RunRecord, Path]:
    """The record of a checkpoint: beside it (converted) or in its parent (a run's step-N)."""
    checkpoint = Path(checkpoint)
    for folder in (checkpoint, checkpoint.parent):
        record = read_run_record(folder)
        if record is not None:
            return record, folder / RUN_RECORD_FILE
    raise RunRecordError(
        f"{checkpoint}: no {RUN_RECORD_FILE} in {checkpoint} or {checkpoint.parent}. "
        "A swallow-titan run writes it into its checkpoint folder when it starts, and "
        "`python -m swallow_titan.convert hf-to-dcp` into its output; the export needs "
        "it for the model's configuration and tokenizer"
    )
