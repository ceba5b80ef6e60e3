"""Where a run writes: one object for every output path, and step-folder names.

Every module that needs a run's output folders (the plan, the start rule, the
end-of-run export, the metrics, the config checks) takes them from
:class:`RunPaths`, so they cannot disagree.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

# Checkpoints (torchtitan's naming) and exports: one folder per step, "step-N".
STEP_FOLDER = re.compile(r"^step-(\d+)$")
METRICS_LOG = "metrics.jsonl"
# The W&B run of a job (its id, the last step sent), kept across restarts.
WANDB_STATE = "wandb_run.json"


def step_folder_name(step: int) -> str:
    """``step-<step>``: the folder of a checkpoint or an export of that step."""
    return f"step-{step}"


def step_of_folder(name: str) -> int | None:
    """The step of a ``step-N`` folder name, else None."""
    match = STEP_FOLDER.match(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class RunPaths:
    """A run's output folders, all under ``job.dump_folder``.

    Paths are joined as given (not resolved), so they read as the config
    wrote them; a folder is named even when its feature is switched off.
    """

    dump_folder: str
    checkpoints: str
    tensorboard: str
    hf_exports: str
    metrics_log: str
    wandb_state: str
    """``<dump_folder>/wandb_run.json``; W&B writes its files under ``<dump_folder>/wandb``."""

    @classmethod
    def of(cls, config) -> RunPaths:
        """The output paths of a parsed job config."""
        dump = config.job.dump_folder
        return cls(
            dump_folder=dump,
            checkpoints=os.path.join(dump, config.checkpoint.folder),
            tensorboard=os.path.join(dump, config.metrics.save_tb_folder),
            hf_exports=os.path.join(dump, config.hf.export_folder),
            metrics_log=os.path.join(dump, METRICS_LOG),
            wandb_state=os.path.join(dump, WANDB_STATE),
        )

    def checkpoint(self, step: int) -> str:
        """``<checkpoints>/step-<step>``."""
        return os.path.join(self.checkpoints, step_folder_name(step))

    def hf_export(self, step: int) -> str:
        """``<hf_exports>/step-<step>``: where the export of ``step`` goes."""
        return os.path.join(self.hf_exports, step_folder_name(step))
