"""The tensors of a Hugging Face safetensors folder (Llama-3.1 or Qwen3).

Names and shapes come from torchtitan's own model (built on the meta device)
renamed by the family's torchtitan state-dict adapter (``Llama3StateDictAdapter``
also applies the q/k RoPE permutation; ``Qwen3StateDictAdapter`` drops the tied
output weight and splits grouped experts into one tensor per expert), so the
expected HF tensors are exactly those the model has. A folder is listed from the safetensors headers alone, so checks
read no weights; the load into a sharded model reads, on every rank, only the
slices that rank holds (DCP's ``HuggingFaceStorageReader`` over memory-mapped
files).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torchtitan.protocols.state_dict_adapter import BaseStateDictAdapter

from swallow_titan.checkpoint.integrity import HF_INDEX
from swallow_titan.hf.progress import Progress
from swallow_titan.model.family import family_of_args
from swallow_titan.model.state import model_state, set_model_state

# Some older conversions store RoPE's inverse frequencies; the model computes them.
_IGNORED_HF_TENSOR = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


# torchtitan's MoE buffer of auxiliary-loss-free load balancing (per layer).
EXPERT_BIAS = "moe.expert_bias"


class HFWeightsError(ValueError):
    """An HF weights folder that does not hold the model's tensors."""


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of a safetensors folder is, and what it is."""

    file: Path
    shape: tuple[int, ...]
    dtype: str
    """safetensors' dtype name: BF16, F32, F8_E4M3, BOOL, ..."""

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data (the bits in its dtype name; BOOL is one byte)."""
        bits = re.search(r"\d+", self.dtype)
        return math.prod(self.shape) * (int(bits.group()) // 8 if bits else 1)


def state_dict_adapter(args: Any) -> BaseStateDictAdapter:
    """torchtitan's name mapping (and Llama's q/k permutation) for ``args``' family."""
    return family_of_args(args).state_dict_adapter(args, None)


def native_tensor_shapes(args: Any) -> dict[str, tuple[int, ...]]:
    """The model's state names and shapes, in module order (no memory used)."""
    with torch.device("meta"):
        model = family_of_args(args).model_cls(replace(args, max_seq_len=1))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _hf_tensors_by_native(args: Any) -> dict[str, dict[str, tuple[int, ...]]]:
    """Native name -> {HF name: shape}: one HF tensor for most, one per expert for
    grouped experts, none for what HF does not store (a tied output weight, the
    MoE expert bias)."""
    adapter = state_dict_adapter(args)
    return {
        name: {
            hf: tuple(t.shape)
            for hf, t in adapter.to_hf({name: torch.empty(shape, device="meta")}).items()
        }
        for name, shape in native_tensor_shapes(args).items()
    }


def state_not_in_hf(args: Any) -> dict[str, torch.Tensor]:
    """The model state HF does not store, at its initial value: the MoE expert
    bias of auxiliary-loss-free balancing (zero at the start of training).

    A converted checkpoint holds it, so a run started from it finds every
    entry its model has.
    """
    stored = hf_names(args)
    return {
        name: torch.zeros(shape)
        for name, shape in native_tensor_shapes(args).items()
        if name not in stored and name.endswith(EXPERT_BIAS)
    }


def hf_names(args: Any) -> dict[str, tuple[str, ...]]:
    """Native state name -> its HF tensor names, in module order, for the
    native tensors an HF folder stores."""
    return {
        native: tuple(hf)
        for native, hf in _hf_tensors_by_native(args).items()
        if hf
    }


def hf_tensor_shapes(args: Any) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for the tensors a model with ``args`` has."""
    return {
        hf: shape
        for tensors in _hf_tensors_by_native(args).values()
        for hf, shape in tensors.items()
    }


def list_safetensors(folder: str | Path) -> dict[str, StoredTensor]:
    """Every tensor of an HF folder, from the file headers (reads no weights).

    Uses ``model.safetensors.index.json`` when present (and checks it against
    the files), else every ``*.safetensors`` file of the folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise HFWeightsError(f"{folder}: not a folder (expected an HF model folder)")
    index_path = folder / HF_INDEX
    indexed: dict[str, str] | None = None
    if index_path.is_file():
        try:
            indexed = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise HFWeightsError(
                f"{index_path}: not a safetensors index (needs a \"weight_map\"): {e}"
            ) from None
        files = sorted({folder / f for f in indexed.values()})
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise HFWeightsError(
                f"{index_path}: names files that are not in {folder}: {', '.join(absent)} "
                "(incomplete download?)"
            )
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise HFWeightsError(
            f"{folder}: holds no *.safetensors files (and no {HF_INDEX})"
        )
    listing: dict[str, StoredTensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if name in listing:
                        raise HFWeightsError(
                            f"{folder}: tensor {name} is stored twice, in "
                            f"{listing[name].file.name} and {file.name}"
                        )
                    tensor_slice = f.get_slice(name)
                    listing[name] = StoredTensor(
                        file, tuple(tensor_slice.get_shape()), tensor_slice.get_dtype()
                    )
        except HFWeightsError:
            raise
        except Exception as e:  # safetensors raises its own error types
            raise HFWeightsError(f"{file}: not a readable safetensors file: {e}") from None
    if indexed is not None:
        wrong = [n for n, f in indexed.items() if n not in listing or listing[n].file.name != f]
        if wrong:
            raise HFWeightsError(
                f"{index_path}: {len(wrong)} tensors are not where the index says, e.g. "
                f"{_some(wrong)}"
            )
    return listing


def _some(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def check_hf_tensors(
    listing: dict[str, StoredTensor], args: Any, folder: str | Path
) -> None:
    """Raise naming every missing, unexpected or wrongly shaped tensor."""
    expected = hf_tensor_shapes(args)
    missing = [n for n in expected if n not in listing]
    unexpected = [
        n for n in listing if n not in expected and not _IGNORED_HF_TENSOR.fullmatch(n)
    ]
    wrong_shape = [
        f"{n} is {list(listing[n].shape)}, expected {list(shape)}"
        for n, shape in expected.items()
        if n in listing and listing[n].shape != shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors the model needs are missing: {_some(missing)}")
    if unexpected:
        problems.append(
            f"{len(unexpected)} tensors are not part of this model (unexpected): "
            f"{_some(unexpected)}"
        )
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} tensors have another shape: {_some(wrong_shape, 3)}")
    if problems:
        raise HFWeightsError(
            f"{folder}: the safetensors files do not match config.json's model:\n  "
            + "\n  ".join(problems)
        )


def read_hf_tensors(
    listing: dict[str, StoredTensor], progress: Progress | None = None
) -> dict[str, torch.Tensor]:
    """Every listed tensor, read into memory file by file, in its stored dtype.

    ``progress`` (counting tensors and bytes) advances after each tensor.
    """
    by_file: dict[Path, list[str]] = {}
    for name, stored in listing.items():
        if not _IGNORED_HF_TENSOR.fullmatch(name):
            by_file.setdefault(stored.file, []).append(name)
    tensors = {}
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in names:
                tensors[name] = f.get_tensor(name)
                if progress is not None:
                    progress.advance(1, listing[name].nbytes)
    return tensors


def tensors_to_read(listing: dict[str, StoredTensor]) -> list[StoredTensor]:
    """The listed tensors ``read_hf_tensors`` reads (not the ignored ones)."""
    return [s for name, s in listing.items() if not _IGNORED_HF_TENSOR.fullmatch(name)]


def load_hf_weights(
    model_parts: list[nn.Module], folder: str | Path, args: Any
) -> int:
    """Load an HF folder's weights into a (possibly FSDP/TP-sharded) model in place.

    Collective: every rank calls it. Each rank reads only the slices of its
    own shards. Returns the number of tensors loaded.
    """
    check_hf_tensors(list_safetensors(folder), args, folder)
    adapter = state_dict_adapter(args)
    native = model_state(model_parts)
    # The HF-named views are permuted copies; DCP fills them, then they are
    # permuted back and copied into the parameters.
    hf_state = adapter.to_hf(native)
    dcp.load(hf_state, storage_reader=HuggingFaceStorageReader(str(folder)))
    loaded = adapter.from_hf(hf_state)
    set_model_state(model_parts, loaded)
    return len(loaded)
