"""Reading a torchtitan/DCP checkpoint offline, one piece at a time.

Used by the export: no process group, and only the tensors asked for are
read, so exporting an 8B model needs about one output shard of memory, not
the whole checkpoint with its optimizer state.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from swallow_titan.checkpoint.integrity import (
    DCP_METADATA,
    checkpoint_problems,
    published_steps,
)
from swallow_titan.config.paths import step_of_folder


class CheckpointReadError(ValueError):
    """A checkpoint path that does not lead to a readable checkpoint."""


def is_dcp_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a complete DCP checkpoint (its metadata is written last)."""
    return (Path(path) / DCP_METADATA).is_file()


def checkpoint_steps(folder: str | Path) -> dict[int, Path]:
    """The complete ``step-N`` checkpoints in a run's checkpoint folder, by step.

    Same rule as the resume (``AtomicCheckpointManager``): a published
    ``step-N`` DCP folder that passes ``integrity.checkpoint_problems``; a
    truncated or otherwise broken one does not count.
    """
    return {
        step: Path(path)
        for step, path in published_steps(str(folder)).items()
        if is_dcp_checkpoint(path) and not checkpoint_problems(path)
    }


def locate_checkpoint(path: str | Path, step: int | None = None) -> tuple[Path, int | None]:
    """The checkpoint folder for ``path`` and its step.

    ``path`` is either one DCP checkpoint (``.../step-N`` or a converted
    folder) or a run's checkpoint folder of ``step-N`` checkpoints, where the
    latest is taken unless ``step`` is given.
    """
    path = Path(path)
    if is_dcp_checkpoint(path):
        found = step_of_folder(path.name)
        if step is not None and found != step:
            raise CheckpointReadError(
                f"{path}: --step {step} was asked for, but this folder is one checkpoint "
                f"({path.name}); pass its parent folder to choose a step"
            )
        return path, found
    steps = checkpoint_steps(path)
    if not steps:
        raise CheckpointReadError(
            f"{path}: no checkpoint here; expected a DCP checkpoint folder (with "
            f"{DCP_METADATA}) or a run's checkpoint folder of step-N checkpoints "
            "(<job.dump_folder>/<checkpoint.folder>)"
        )
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise CheckpointReadError(
            f"{path}: no complete checkpoint for step {step}; available steps: "
            f"{', '.join(str(s) for s in sorted(steps))}"
        )
    return steps[step], step


class DCPCheckpoint:
    """One DCP checkpoint folder, read selectively without a process group."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.metadata = FileSystemReader(str(self.path)).read_metadata()
        except Exception as e:  # noqa: BLE001  (DCP raises several error types)
            raise CheckpointReadError(
                f"{self.path}: cannot read the DCP metadata: {type(e).__name__}: {e}"
            ) from None

    def tensors(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every tensor entry."""
        return {
            name: (tuple(md.size), md.properties.dtype)
            for name, md in self.metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)
        }

    def read_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors in their stored dtype."""
        shapes = self.tensors()
        state = {
            name: torch.empty(shapes[name][0], dtype=shapes[name][1]) for name in names
        }
        self._load(state)
        return state

    def read_entry(self, prefix: str) -> dict[str, Any] | None:
        """A non-tensor entry such as "dataloader" or "train_state", or None if absent."""
        keys = [
            key
            for key, md in self.metadata.state_dict_metadata.items()
            if isinstance(md, BytesStorageMetadata) and key.startswith(prefix + ".")
        ]
        if not keys:
            return None
        state: dict[str, Any] = {key: None for key in keys}
        self._load(state)
        return {key[len(prefix) + 1 :]: value for key, value in state.items()}

    def _load(self, state: dict[str, Any]) -> None:
        with warnings.catch_warnings():
            # Loading without a process group is the intent here.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(self.path), no_dist=True)
