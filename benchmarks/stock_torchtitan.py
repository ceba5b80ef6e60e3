"""Stock torchtitan 0.2.2 llama3 for the throughput comparison.

torchtitan's own llama3 TrainSpec (model, parallelize_llama, loss, optimizer,
LR schedule, its Trainer), with two substitutions so the comparison is fair:
the model dimensions are swallow-titan's flavor's (torchtitan has no 6-layer
8B proxy), and the data (tokenizer + dataloader) is swallow-titan's, so both
sides train on the same sequences. Run as

    torchrun ... -m benchmarks.stock_torchtitan --job.config_file X --model.name llama3_stock ...
"""

from __future__ import annotations

import dataclasses
import sys

import swallow_titan  # noqa: F401  (device selection; a no-op on a GPU machine)
import torch
from torchtitan.models.llama3 import get_train_spec
from torchtitan.models.llama3.model.args import TransformerModelArgs
from torchtitan.protocols.train_spec import _extra_train_specs, register_train_spec
from torchtitan.tools.logging import init_logger
from torchtitan.train import Trainer

from swallow_titan.config.manager import SwallowConfigManager
from swallow_titan.data.dataloader import build_dataloader
from swallow_titan.data.tokenizer import build_tokenizer
from swallow_titan.model.args import FLAVORS
from swallow_titan.runtime.seams import use_cpu_profiler_in_stock_trainer

STOCK_MODEL_NAME = "llama3_stock"


def stock_model_args() -> dict[str, TransformerModelArgs]:
    """Our flavors as plain torchtitan llama3 arguments."""
    names = [f.name for f in dataclasses.fields(TransformerModelArgs)]
    return {
        flavor: TransformerModelArgs(**{n: getattr(args, n) for n in names})
        for flavor, args in FLAVORS.items()
    }


def register_stock_spec() -> None:
    if STOCK_MODEL_NAME in _extra_train_specs:
        return
    spec = dataclasses.replace(
        get_train_spec(),
        model_args=stock_model_args(),
        build_dataloader_fn=build_dataloader,
        build_tokenizer_fn=build_tokenizer,
        build_validator_fn=None,
    )
    register_train_spec(STOCK_MODEL_NAME, spec)


def main() -> int:
    init_logger()
    use_cpu_profiler_in_stock_trainer()  # CPU smoke runs only; torchtitan's own on a GPU
    register_stock_spec()
    # Our parser only for [[data.sources]] tables; torchtitan's Trainer does the rest.
    config = SwallowConfigManager().parse_args(sys.argv[1:])
    trainer = Trainer(config)
    try:
        trainer.train()
    finally:
        trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
