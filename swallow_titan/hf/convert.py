"""Convert a Hugging Face folder (Llama-3.1 or Qwen3) into a torchtitan/DCP checkpoint.

For runs on many nodes, where every rank reading the HF files at once is slow:
convert once, then start runs from the DCP checkpoint
(``checkpoint.initial_load_path``). Model dimensions come from config.json,
so any Llama-architecture or Qwen3 (dense or MoE) model converts, not only
the registered flavors. State HF does not store (the MoE expert bias) is
written at its initial value, zero.
The output holds the model weights under torchtitan's names (as a seed
checkpoint does) in their stored dtype, plus ``swallow_run.json`` so it can
be exported back.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torchtitan.tools.logging import logger

from swallow_titan.hf.atomic import staged_folder
from swallow_titan.hf.config import (
    CONFIG_FILE,
    hf_config_from_model_args,
    model_args_from_hf_config,
    read_hf_config,
)
from swallow_titan.hf.export import tokenizer_files
from swallow_titan.hf.weights import (
    check_hf_tensors,
    list_safetensors,
    read_hf_tensors,
    state_dict_adapter,
    state_not_in_hf,
    tensors_to_read,
)
from swallow_titan.hf.progress import Progress
from swallow_titan.hf.run_record import RunRecord


def convert_hf_to_dcp(hf_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the DCP checkpoint of an HF folder; returns ``out_dir``.

    Checks config.json and that the safetensors hold exactly the model's
    tensors before writing anything. Needs memory for the whole model in its
    stored dtype (16 GB for an 8B model in bf16).
    """
    hf_dir = Path(hf_dir)
    config = read_hf_config(hf_dir)
    args = model_args_from_hf_config(config, str(hf_dir / CONFIG_FILE))
    listing = list_safetensors(hf_dir)
    check_hf_tensors(listing, args, hf_dir)
    to_read = tensors_to_read(listing)
    with Progress(
        "convert: read", len(to_read), sum(s.nbytes for s in to_read), "tensors"
    ) as progress:
        hf_tensors = read_hf_tensors(listing, progress)
    dtype = str(next(iter(hf_tensors.values())).dtype).removeprefix("torch.")
    native = state_dict_adapter(args).from_hf(hf_tensors)
    del hf_tensors
    native.update(state_not_in_hf(args))
    record = RunRecord(
        hf_config=hf_config_from_model_args(
            args,
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=config.get("eos_token_id"),
            dtype=dtype,
            max_position_embeddings=config.get("max_position_embeddings"),
        ),
        tokenizer_path=str(hf_dir.resolve()) if tokenizer_files(hf_dir) else "",
        base_model=config.get("_name_or_path") or str(hf_dir.resolve()),
    )
    with staged_folder(out_dir, overwrite=overwrite) as staging:
        with warnings.catch_warnings():
            # One process, no process group: that is the intent.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(native, checkpoint_id=str(staging), no_dist=True)
        record.write(staging)
    logger.info(
        f"Converted {hf_dir} ({len(native)} tensors, {dtype}) to the DCP checkpoint "
        f"{out_dir}; start a run from it with checkpoint.initial_load_path = "
        f"{os.path.abspath(out_dir)!r}"
    )
    return Path(out_dir)
