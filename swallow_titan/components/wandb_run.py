"""``[metrics] enable_wandb``: one W&B run per job, resumed across restarts.

torchtitan 0.2.2's ``WandBLogger`` starts a new W&B run (a new id, a new
timestamped folder) every time the trainer starts. Here the metrics
processor (:mod:`swallow_titan.components.metrics`) opens W&B when a run or
a restart begins and sends it exactly the scalars TensorBoard and the run
log get, under the same tags and steps.

Restarts: the run id is kept in ``<dump_folder>/wandb_run.json``
(:class:`~swallow_titan.config.paths.RunPaths` ``wandb_state``) with the
last step sent; a restart resumes that run (``resume="allow"``). W&B cannot
delete logged steps (TensorBoard and the run log purge the steps a crashed
attempt did after its last checkpoint), and it drops or rejects a step lower
than one it has, so a restart sends nothing for the steps an earlier attempt
already sent: W&B keeps the first attempt's values for those steps (the same
values on a deterministic run; TensorBoard and ``metrics.jsonl`` hold the
redone ones). W&B's rewind (``resume_from``) would replace them, but it
needs the server and is not available offline.

The W&B settings torchtitan reads from the environment are honoured
(``WANDB_PROJECT`` default ``swallow-titan``, ``WANDB_TEAM``,
``WANDB_RUN_NAME``, ``WANDB_RUN_ID`` for the first start, ``WANDB_RUN_NOTES``,
``WANDB_RUN_TAGS``, ``WANDB_RUN_GROUP``, ``WANDB_RUN_JOB_TYPE``), as is
``WANDB_MODE=offline``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torchtitan.tools.logging import logger

from swallow_titan.config.paths import RunPaths
from swallow_titan.hf.atomic import write_json_atomically

DEFAULT_PROJECT = "swallow-titan"


class WandBRun:
    """The job's W&B run, opened at ``first_step``; steps sent before are not sent again."""

    def __init__(self, job_config: Any, first_step: int):
        import wandb  # the optional `wandb` extra; only imported when enabled

        paths = RunPaths.of(job_config)
        self.state_path = Path(paths.wandb_state)
        state = self._read_state()
        # None on a first start without WANDB_RUN_ID: W&B makes one, stored below.
        run_id = state.get("run_id") or os.getenv("WANDB_RUN_ID")
        # Steps an earlier attempt sent: W&B keeps those, this attempt skips them.
        self.sent_before: int = int(state.get("last_step", 0))
        self.last_step = self.sent_before
        os.makedirs(paths.dump_folder, exist_ok=True)
        tags = os.getenv("WANDB_RUN_TAGS")
        self.run = wandb.init(
            entity=os.getenv("WANDB_TEAM"),
            project=os.getenv("WANDB_PROJECT", DEFAULT_PROJECT),
            name=os.getenv("WANDB_RUN_NAME") or os.path.basename(os.path.normpath(paths.dump_folder)),
            id=run_id,
            resume="allow",
            notes=os.getenv("WANDB_RUN_NOTES"),
            tags=tags.split(",") if tags else None,
            group=os.getenv("WANDB_RUN_GROUP"),
            job_type=os.getenv("WANDB_RUN_JOB_TYPE"),
            dir=paths.dump_folder,
            config=job_config.to_dict(),
        )
        self._write_state()
        redone = (
            f"; steps {first_step}-{self.sent_before} were sent by an earlier attempt "
            "and are not sent again"
            if self.sent_before >= first_step
            else ""
        )
        logger.info(f"W&B: run {self.run.id} (project {self.run.project}) from step {first_step}{redone}")

    def _read_state(self) -> dict[str, Any]:
        if not self.state_path.is_file():
            return {}
        try:
            return json.loads(self.state_path.read_text())
        except json.JSONDecodeError:
            logger.warning(f"{self.state_path}: unreadable, a new W&B run is started")
            return {}

    def _write_state(self) -> None:
        write_json_atomically(self.state_path, {"run_id": self.run.id, "last_step": self.last_step})

    def log(self, scalars: dict[str, float], step: int) -> None:
        """Send ``scalars`` at ``step`` unless an earlier attempt already sent that step."""
        if step <= self.sent_before:
            return
        self.run.log(dict(scalars), step=step)
        if step > self.last_step:
            self.last_step = step
            self._write_state()

    def close(self) -> None:
        self.run.finish()
