"""What a run starts from, decided by one explicit, logged rule.

1. The run's own checkpoint folder holds a checkpoint: resume from it
   (torchtitan's resume); ``[hf] load_path`` and ``checkpoint.initial_load_path``
   are not read.
2. Otherwise, ``[hf] load_path`` names HF weights: load them (config.json
   checked against the flavor, every tensor accounted for), each rank reading
   only its shards.
3. Otherwise, ``checkpoint.initial_load_path`` names a DCP checkpoint (e.g.
   from ``convert hf-to-dcp``): load its model weights.
4. Otherwise: random initialisation, said so in the log.

torchtitan 0.2.2 applies its own initial load only when the checkpoint folder
does not exist (an empty or crashed-early folder silently means random
weights) and never with checkpointing off; here steps 2 and 3 run before
``Trainer.train()`` and torchtitan's own initial load is switched off.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from torchtitan.tools.logging import logger

from swallow_titan.checkpoint.dcp_reader import checkpoint_steps
from swallow_titan.checkpoint.model_weights import load_dcp_model_weights
from swallow_titan.config.checks import global_batch_sequences, resolve_layout
from swallow_titan.config.paths import RunPaths, step_folder_name
from swallow_titan.hf.config import (
    check_hf_config_matches_flavor,
    hf_config_from_model_args,
    read_hf_config,
)
from swallow_titan.hf.weights import load_hf_weights
from swallow_titan.hf.run_record import RunRecord, read_run_record
from swallow_titan.runtime.ranks import job_world_size, process_rank

StartKind = Literal["resume", "hf", "dcp", "random"]


@dataclass(frozen=True)
class StartDecision:
    """What the run starts from and the log line that says why."""

    kind: StartKind
    path: str
    message: str


def checkpoint_folder(config) -> Path:
    """The run's own checkpoint folder, as torchtitan names it."""
    return Path(RunPaths.of(config).checkpoints)


def decide_start(config) -> StartDecision:
    """Apply the start rule to the config and what is on disk (reads no weights)."""
    folder = checkpoint_folder(config)
    hf_path = config.hf.load_path
    dcp_path = config.checkpoint.initial_load_path or ""
    steps = checkpoint_steps(folder) if config.checkpoint.enable else {}
    if steps:
        step = config.checkpoint.load_step if config.checkpoint.load_step >= 0 else max(steps)
        not_read = [
            f"{name} = {path!r}"
            for name, path in (
                ("hf.load_path", hf_path),
                ("checkpoint.initial_load_path", dcp_path),
            )
            if path
        ]
        note = f"; {' and '.join(not_read)} not read" if not_read else ""
        return StartDecision(
            "resume",
            str(folder / step_folder_name(step)),
            f"Start rule: resuming from the run's own checkpoint "
            f"{folder / step_folder_name(step)}{note}",
        )
    where = (
        f"no checkpoint in {folder}"
        if config.checkpoint.enable
        else "checkpointing is off (checkpoint.enable = false)"
    )
    if hf_path:
        return StartDecision(
            "hf", hf_path, f"Start rule: {where}; loading Hugging Face weights from {hf_path}"
        )
    if dcp_path:
        return StartDecision(
            "dcp",
            dcp_path,
            f"Start rule: {where}; loading model weights from checkpoint.initial_load_path "
            f"= {dcp_path}",
        )
    return StartDecision(
        "random",
        "",
        f"Start rule: {where} and no hf.load_path or checkpoint.initial_load_path; "
        "starting from random initial weights",
    )


def start_run(trainer, config) -> StartDecision:
    """Load the starting weights by the start rule; call between ``Trainer()`` and ``train()``.

    Collective (every rank calls it). Also writes the run record into the
    checkpoint folder (rank 0), so its checkpoints can be exported alone.
    """
    decision = decide_start(config)
    logger.info(decision.message)
    if decision.kind == "hf":
        check_hf_config_matches_flavor(decision.path, trainer.model_args, config.model.flavor)
        count = load_hf_weights(trainer.model_parts, decision.path, trainer.model_args)
        logger.info(f"Loaded {count} tensors of Hugging Face weights from {decision.path}")
    elif decision.kind == "dcp":
        count = load_dcp_model_weights(trainer.model_parts, decision.path)
        logger.info(f"Loaded {count} model tensors from {decision.path}")
    checkpointer = trainer.checkpointer
    if hasattr(checkpointer, "initial_load_path"):  # only set when checkpointing is on
        # The start weights are loaded above (or the run resumes): torchtitan
        # must neither load them again nor warn that it skips them.
        checkpointer.initial_load_path = None
        checkpointer.initial_load_in_hf = False
    if config.checkpoint.enable and not config.checkpoint.load_only:
        if process_rank() == 0:
            record = run_record_for(trainer, config)
            folder = checkpoint_folder(config)
            folder.mkdir(parents=True, exist_ok=True)
            record.write(folder)
    return decision


def run_record_for(trainer, config) -> RunRecord:
    """The record of this run: model config, tokenizer, recipe, where its logs are."""
    previous = read_run_record(checkpoint_folder(config))
    # A converted DCP start (hf-to-dcp) carries the base model in its own record.
    origin = (
        read_run_record(config.checkpoint.initial_load_path)
        if config.checkpoint.initial_load_path
        else None
    )
    base_config = None
    if config.hf.load_path and os.path.isfile(os.path.join(config.hf.load_path, "config.json")):
        base_config = read_hf_config(config.hf.load_path)
    max_positions = None
    for known in (base_config, origin and origin.hf_config, previous and previous.hf_config):
        if known and known.get("max_position_embeddings"):
            max_positions = known["max_position_embeddings"]
            break
    tokenizer = trainer.tokenizer
    hf_config = hf_config_from_model_args(
        trainer.model_args,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        dtype="bfloat16",
        max_position_embeddings=max_positions,
    )
    base_model = (
        config.hf.base_model
        or (base_config or {}).get("_name_or_path")
        or config.hf.load_path
        or (origin.base_model if origin else "")
        or (previous.base_model if previous else "")
    )
    config_file = config.job.config_file or ""
    layout = resolve_layout(config, job_world_size(), config_file)
    return RunRecord(
        hf_config=hf_config,
        tokenizer_path=os.path.abspath(config.model.hf_assets_path),
        base_model=base_model,
        job_config=asdict(config),
        config_file=os.path.abspath(config_file) if config_file else "",
        tokens_per_step=global_batch_sequences(config, layout) * config.training.seq_len,
        tensorboard_folder=str(Path(RunPaths.of(config).tensorboard).resolve()),
    )
