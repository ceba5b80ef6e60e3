"""The tensors of a Hugging Face Llama safetensors folder.

Names and shapes come from torchtitan's own model (built on the meta device)
renamed by torchtitan's ``Llama3StateDictAdapter`` (which also applies the
q/k RoPE permutation), so the expected HF tensors are exactly those the
model has. A folder is listed from the safetensors headers alone, so checks
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

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torchtitan.models.llama3.model.model import Transformer
from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter

from swallow_titan.checkpoint.integrity import HF_INDEX
from swallow_titan.hf.progress import Progress
from swallow_titan.model.args import SwallowModelArgs
from swallow_titan.model.state import model_state, set_model_state

# Some older conversions store RoPE's inverse frequencies; the model computes them.
_IGNORED_HF_TENSOR = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


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


def state_dict_adapter(args: SwallowModelArgs) -> Llama3StateDictAdapter:
    """torchtitan's Llama-3 name mapping and q/k permutation for ``args``."""
    return Llama3StateDictAdapter(args, None)


def native_tensor_shapes(args: SwallowModelArgs) -> dict[str, tuple[int, ...]]:
    """The model's parameter names and shapes, in module order (no memory used)."""
    with torch.device("meta"):
        model = Transformer(replace(args, max_seq_len=1))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def hf_names(args: SwallowModelArgs) -> dict[str, str]:
    """Native parameter name -> HF tensor name, in module order."""
    adapter = state_dict_adapter(args)
    names = {}
    for name, shape in native_tensor_shapes(args).items():
        (hf_name,) = adapter.to_hf({name: torch.empty(shape, device="meta")})
        names[name] = hf_name
    return names


def hf_tensor_shapes(args: SwallowModelArgs) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for the tensors a Llama with ``args`` has."""
    shapes = native_tensor_shapes(args)
    return {hf: shapes[native] for native, hf in hf_names(args).items()}


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
    listing: dict[str, StoredTensor], args: SwallowModelArgs, folder: str | Path
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
            f"{len(unexpected)} tensors are not part of this Llama model (unexpected): "
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
    model_parts: list[nn.Module], folder: str | Path, args: SwallowModelArgs
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
