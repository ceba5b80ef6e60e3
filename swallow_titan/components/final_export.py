"""``hf.export_at_end``: export the run's final checkpoint when training ends.

Runs on rank 0 after the process group is gone, from the checkpoint the last
step wrote, with the same code as ``python -m swallow_titan.export`` - so the
end-of-run export and a later manual export are the same folder. The
``[averaging]`` weights written after the last step are exported beside it
(``step-N-ema``, ``step-N-tail``).
"""

from __future__ import annotations

from pathlib import Path

from torchtitan.tools.logging import logger

from swallow_titan.checkpoint.dcp_reader import is_dcp_checkpoint, locate_checkpoint
from swallow_titan.components.averaging import AVERAGE_KINDS, averaged_folder
from swallow_titan.config.paths import RunPaths
from swallow_titan.hf.export import ExportResult, export_hf
from swallow_titan.hf.hub import push_to_hub


def export_folder_for(config, step: int | None) -> Path:
    """``<dump_folder>/<hf.export_folder>/step-<N>``."""
    return Path(RunPaths.of(config).hf_export(step))


def export_at_end(config, trained_step: int) -> ExportResult:
    """Export the latest checkpoint (and push it if ``hf.push_to_hub``).

    Raises ``HubPushError`` if the upload fails; the local export is complete.
    """
    folder = Path(RunPaths.of(config).checkpoints)
    _, step = locate_checkpoint(folder)
    if step != trained_step:
        logger.warning(
            f"hf.export_at_end: training stopped at step {trained_step} but the latest "
            f"checkpoint is step {step}; exporting step {step}"
        )
    out = export_folder_for(config, step)
    result = export_hf(
        folder,
        out,
        step=step,
        dtype=config.hf.export_dtype,
        max_shard_size=config.hf.export_max_shard_size,
        repo_id=config.hf.push_to_hub or None,
        overwrite=True,  # the same step exported again (e.g. a re-run at the end)
    )
    for kind in AVERAGE_KINDS:
        averaged = averaged_folder(config, kind, step)
        if is_dcp_checkpoint(averaged):
            beside = out.with_name(f"{out.name}-{kind}")
            export_hf(
                averaged,
                beside,
                dtype=config.hf.export_dtype,
                max_shard_size=config.hf.export_max_shard_size,
                overwrite=True,
            )
            logger.info(f"hf.export_at_end: the {kind} weights of step {step} exported to {beside}")
    if config.hf.push_to_hub:
        url = push_to_hub(out, config.hf.push_to_hub, private=config.hf.push_private)
        logger.info(f"hf.push_to_hub: uploaded {out} to {url}")
    return result
