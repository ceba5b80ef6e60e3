"""Training entry point: ``torchrun ... -m swallow_titan.train --job.config_file X``.

Parses and checks the config (errors name the file and key and stop the run
before any process group is created), then runs :class:`SwallowTrainer`
(torchtitan's Trainer plus the numerical guard, pre-emption handling and
atomic checkpoints) with the ``swallow`` TrainSpec. ``run_train.sh`` wraps
this with torchrun.

Exit status of each process: :class:`~swallow_titan.config.errors.ExitCode`
(0 finished or stopped on SIGTERM after writing its checkpoint: restart the
same command to continue). torchrun itself exits 1 when any process failed
and names each one's status.
"""

from __future__ import annotations

import sys

import swallow_titan  # noqa: F401  (selects the device before torchtitan loads)
import torch
from torchtitan.tools.logging import init_logger, logger

import swallow_titan.train_spec  # noqa: F401  (registers the "swallow" TrainSpec)
from swallow_titan.checkpoint.manager import CheckpointError
from swallow_titan.config.errors import ConfigError, ExitCode, config_error
from swallow_titan.config.manager import SwallowConfigManager
from swallow_titan.eval import eval_problems
from swallow_titan.components.final_export import export_at_end
from swallow_titan.components.guard import NonfiniteError, SpikeError
from swallow_titan.hf.hub import HubPushError
from swallow_titan.components.preflight import check_job_config
from swallow_titan.runtime.ranks import job_world_size, process_rank
from swallow_titan.components.start_rule import start_run
from swallow_titan.trainer import SwallowTrainer


def parse_config(argv: list[str]):
    """Parse and check the config for this process's world size."""
    manager = SwallowConfigManager()
    config = manager.parse_args(argv)
    source = manager.config_file or "<command line>"
    refuse_fake_backend(config, source)
    check_job_config(config, job_world_size(), source)
    # [eval]'s tasks are built here, datasets loaded, before any step (not in
    # the plan: that can take minutes and a network).
    problems = eval_problems(config, source)
    if problems:
        raise ConfigError("\n".join(problems))
    return config


def refuse_fake_backend(config, source: str) -> None:
    """``comm.mode`` other than "default" is refused before anything starts.

    torchtitan's fake backend runs real-size tensors through collectives that
    move nothing, then fails in the checkpoint save; a dry run at the real world
    size is what ``swallow_titan.simulate`` does (fake tensors, memory and
    collectives measured), so the message points there.
    """
    mode = config.comm.mode
    if mode != "default":
        raise config_error(
            source,
            "comm.mode",
            f"{mode!r} is not a training mode. To dry-run this config at its real size "
            f"use: python -m swallow_titan.simulate {source} --ngpu N --nnodes M "
            "(fake process group and fake tensors: memory, collectives, step time)",
        )


def main(argv: list[str] | None = None) -> int:
    init_logger()
    argv = sys.argv[1:] if argv is None else argv
    try:
        config = parse_config(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    trainer: SwallowTrainer | None = None
    trained_step = 0
    try:
        trainer = SwallowTrainer(config)
        # Resume, else [hf] load_path, else initial_load_path (a logged rule);
        # writes the run record that exports read.
        start_run(trainer, config)
        if config.checkpoint.create_seed_checkpoint:
            # Unsharded initial weights at step 0, for runs that must start alike.
            trainer.checkpointer.save(curr_step=0, last_step=True)
            logger.info("Created seed checkpoint")
        else:
            trainer.train()
            if not trainer.preempted:  # a pre-empted run is not finished: no export
                trained_step = trainer.step
    except NonfiniteError as e:
        logger.error(f"Stopped: {e}")
        return ExitCode.NONFINITE
    except SpikeError as e:
        logger.error(f"Stopped: {e}")
        return ExitCode.SPIKES
    except CheckpointError as e:
        logger.error(f"Cannot resume: {e}")
        return ExitCode.NO_USABLE_CHECKPOINT
    finally:
        if trainer is not None:
            trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    logger.info("Training finished")
    # [hf] export_at_end, on rank 0 from the last checkpoint (the process
    # group is gone, so the rank comes from torchrun's environment).
    if config.hf.export_at_end and trained_step and process_rank() == 0:
        try:
            export_at_end(config, trained_step)
        except HubPushError as e:
            print(f"push error: {e}", file=sys.stderr)
            return ExitCode.PUSH_FAILED
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
