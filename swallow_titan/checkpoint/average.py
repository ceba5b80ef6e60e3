"""Averaging the model weights of DCP checkpoints, one tensor at a time.

A weighted mean of checkpoints (``python -m swallow_titan.average``): the
weights are accumulated in fp32 and stored back in each tensor's own dtype.
Only model weights are averaged (the tensors the run record's model has),
never optimizer or data state. One tensor name is read from one checkpoint at
a time and dropped before the next is read, so an average holds the output
(one copy of the weights) plus one fp32 accumulator and one input tensor.

The arithmetic is :func:`accumulate`, which the in-loop averaging
(:mod:`swallow_titan.components.averaging`) uses too, so an in-loop tail
average and the offline average of the same steps agree bit for bit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from swallow_titan.checkpoint.dcp_reader import DCPCheckpoint, locate_checkpoint
from swallow_titan.hf.atomic import staged_folder
from swallow_titan.hf.config import model_args_from_hf_config
from swallow_titan.hf.run_record import RunRecord, find_run_record
from swallow_titan.hf.weights import native_tensor_shapes


class AverageError(ValueError):
    """Checkpoints or weights that cannot be averaged as asked; nothing was written."""


def accumulate(total: torch.Tensor | None, value: torch.Tensor, weight: float) -> torch.Tensor:
    """``total + weight * value`` in fp32 (``total`` None: the first term).

    Two separate elementwise operations (a multiply, then an add), each
    rounded once, so the result does not depend on how the tensor is laid
    out or sharded (a fused multiply-add could be used on some elements and
    not on others).
    """
    term = value.to(torch.float32) * weight
    return term if total is None else total.add_(term)


def parse_weights(text: str | None, count: int) -> list[float]:
    """The averaging weights: ``"w1,w2,..."`` (positive, ``count`` of them), normalised.

    None means uniform. The weights are divided by their sum here, once, so
    the accumulation is ``sum_i (w_i / W) * x_i``.
    """
    if text is None:
        raw = [1.0] * count
    else:
        try:
            raw = [float(part) for part in text.split(",")]
        except ValueError:
            raise AverageError(
                f"--weights {text!r}: expected comma-separated numbers, e.g. 1,2,1"
            ) from None
        if len(raw) != count:
            raise AverageError(
                f"--weights {text!r}: {len(raw)} weights for {count} checkpoints; give one "
                "weight per checkpoint, in the same order"
            )
        bad = [w for w in raw if not (math.isfinite(w) and w > 0)]
        if bad:
            raise AverageError(f"--weights {text!r}: every weight must be positive and finite")
    total = sum(raw)
    return [w / total for w in raw]


@dataclass(frozen=True)
class AveragedInput:
    """One checkpoint of an average, as the model card and the run record list it."""

    checkpoint: str
    step: int | None
    weight: float

    def as_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "step": self.step, "weight": self.weight}


def _first_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return key
    return None


class AveragedCheckpoint:
    """The weighted mean of DCP checkpoints, read like one ``DCPCheckpoint``.

    ``tensors()`` and ``read_tensors()`` give the averaged model weights;
    ``read_entry()`` (training state, data state) and ``path`` are those of
    the newest input, the run the average stands for. Construction checks
    that every input holds the same model (the run record's configuration,
    then every tensor's shape and dtype) and reads no weights.
    """

    def __init__(self, paths: Sequence[str | Path], weights: Sequence[float] | None = None):
        if not paths:
            raise AverageError("no checkpoints to average")
        located = [locate_checkpoint(p) for p in paths]
        self.weights = list(weights) if weights is not None else parse_weights(None, len(paths))
        if len(self.weights) != len(located):
            raise AverageError(f"{len(self.weights)} weights for {len(located)} checkpoints")
        self.checkpoints = [DCPCheckpoint(path) for path, _ in located]
        self.inputs = [
            AveragedInput(str(path), step, weight)
            for (path, step), weight in zip(located, self.weights)
        ]
        records = [find_run_record(path) for path, _ in located]
        self.record, self.record_path = records[-1]
        self._check_same_model(records)
        args = model_args_from_hf_config(self.record.hf_config, str(self.record_path))
        self._names = list(native_tensor_shapes(args))
        self._stored = self._check_same_tensors(native_tensor_shapes(args))
        newest = max(range(len(located)), key=lambda i: located[i][1] or -1)
        self.newest = self.checkpoints[newest]
        self.path = self.newest.path

    def _check_same_model(self, records: list[tuple[RunRecord, Path]]) -> None:
        first, first_path = records[0]
        first_flavor = ((first.job_config or {}).get("model") or {}).get("flavor")
        for record, path in records[1:]:
            flavor = ((record.job_config or {}).get("model") or {}).get("flavor")
            if first_flavor and flavor and flavor != first_flavor:
                raise AverageError(
                    f"{path}: model.flavor {flavor!r}, but {first_path} has {first_flavor!r}; "
                    "only checkpoints of one model can be averaged"
                )
            key = _first_difference(first.hf_config, record.hf_config)
            if key is not None:
                raise AverageError(
                    f"{path}: hf_config.{key} = {record.hf_config.get(key)!r}, but {first_path} "
                    f"has {first.hf_config.get(key)!r}; only checkpoints of one model can be "
                    "averaged"
                )

    def _check_same_tensors(
        self, expected: dict[str, tuple[int, ...]]
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        stored = [ckpt.tensors() for ckpt in self.checkpoints]
        for name, shape in expected.items():
            first = None
            for ckpt, tensors in zip(self.checkpoints, stored):
                if name not in tensors:
                    raise AverageError(
                        f"{ckpt.path}: no tensor {name!r}; the run record "
                        f"({self.record_path}) describes a model that has it"
                    )
                if tensors[name][0] != shape:
                    raise AverageError(
                        f"{ckpt.path}: tensor {name!r} has shape {list(tensors[name][0])}, "
                        f"the model ({self.record_path}) has {list(shape)}"
                    )
                if first is None:
                    first = (ckpt, tensors[name][1])
                elif tensors[name][1] != first[1]:
                    raise AverageError(
                        f"{ckpt.path}: tensor {name!r} is {tensors[name][1]}, but in "
                        f"{first[0].path} it is {first[1]}"
                    )
        return {name: stored[0][name] for name in expected}

    def tensors(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of the model weights, in module order."""
        return dict(self._stored)

    def average(self, name: str) -> torch.Tensor:
        """The fp32 weighted mean of tensor ``name``, inputs read one at a time."""
        total: torch.Tensor | None = None
        for ckpt, weight in zip(self.checkpoints, self.weights):
            value = ckpt.read_tensors([name])[name]
            total = accumulate(total, value, weight)
            del value  # before the next checkpoint's copy is read
        assert total is not None
        return total

    def read_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The averaged tensors, each in its stored dtype."""
        return {name: self.average(name).to(self._stored[name][1]) for name in names}

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, averaged tensor in its stored dtype), one at a time, in module order."""
        for name in self._names:
            yield name, self.read_tensors([name])[name]

    def read_entry(self, prefix: str) -> dict[str, Any] | None:
        """A non-tensor entry of the newest checkpoint (``train_state``, ``dataloader``)."""
        return self.newest.read_entry(prefix)

    def averaged_record(self) -> RunRecord:
        """The newest input's run record, listing what was averaged."""
        return replace(self.record, averaged_from=[i.as_dict() for i in self.inputs])


def save_average_dcp(average: AveragedCheckpoint, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the average as a DCP checkpoint of model weights, with its run record.

    Loadable as a run's start (``checkpoint.initial_load_path``), by
    ``evaluate`` and by ``export``. The tensors keep their names and dtypes;
    the folder appears only when complete.
    """
    out_dir = Path(out_dir)
    state: dict[str, torch.Tensor] = {}
    with staged_folder(out_dir, overwrite=overwrite) as staging:
        for name, tensor in average.iter_tensors():
            state[name] = tensor
        with warnings.catch_warnings():
            # Saving without a process group is the intent here.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, checkpoint_id=str(staging), no_dist=True)
        average.averaged_record().write(staging)
    return out_dir
