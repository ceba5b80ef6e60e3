"""Training entry point: ``torchrun ... -m swallow_titan.train --job.config_file X``.

Parses and checks the config (errors name the file and key and stop the run
before any process group is created), then runs torchtitan's Trainer with the
``swallow`` TrainSpec. ``run_train.sh`` wraps this with torchrun.
"""

from __future__ import annotations

import os
import sys

import swallow_titan  # noqa: F401  (selects the device before torchtitan loads)
import torch
from torchtitan.tools.logging import init_logger, logger
from torchtitan.train import Trainer

import swallow_titan.train_spec  # noqa: F401  (registers the "swallow" TrainSpec)
from swallow_titan.checkpoint.final_export import export_at_end
from swallow_titan.checkpoint.hub import HubPushError
from swallow_titan.checkpoint.start import start_run
from swallow_titan.config.checks import check_job_config
from swallow_titan.config.manager import ConfigError, SwallowConfigManager
from swallow_titan.profiling import install_cpu_profiler


def parse_config(argv: list[str]):
    """Parse and check the config for this process's world size."""
    manager = SwallowConfigManager()
    config = manager.parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_job_config(config, world_size, manager.config_file or "<command line>")
    return config


def main(argv: list[str] | None = None) -> int:
    init_logger()
    install_cpu_profiler()
    argv = sys.argv[1:] if argv is None else argv
    try:
        config = parse_config(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    trainer: Trainer | None = None
    trained_step = 0
    try:
        trainer = Trainer(config)
        # HF interop (issue 5): resume, else [hf] load_path, else initial_load_path
        # (logged rule); writes the run record that exports read.
        start_run(trainer, config)
        if config.checkpoint.create_seed_checkpoint:
            # Unsharded initial weights at step 0, for runs that must start alike.
            trainer.checkpointer.save(curr_step=0, last_step=True)
            logger.info("Created seed checkpoint")
        else:
            trainer.train()
            trained_step = trainer.step
    finally:
        if trainer is not None:
            trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    logger.info("Training finished")
    # HF interop (issue 5): [hf] export_at_end, on rank 0 from the last checkpoint.
    if config.hf.export_at_end and trained_step and os.environ.get("RANK", "0") == "0":
        try:
            export_at_end(config, trained_step)
        except HubPushError as e:
            print(f"push error: {e}", file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
