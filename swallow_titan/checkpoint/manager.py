"""torchtitan's CheckpointManager with atomic publication and checked resume.

What changes compared to torchtitan 0.2.2 (``components/checkpoint.py``):

- **Write, then publish.** ``step-N`` is written as ``.incomplete-step_N`` (a
  name torchtitan's step discovery never matches). When every rank has
  finished, rank 0 writes a manifest (file sizes), renames the folder to
  ``step-N`` and fsyncs the parent folder. A kill at any moment leaves either
  the previous checkpoints untouched or the new one complete. Async saves
  (``async_mode = "async"``) are published the same way when their write
  completes.
- **Checked resume.** The newest ``step-N`` that passes
  :func:`~swallow_titan.checkpoint.integrity.checkpoint_problems` is loaded;
  newer broken ones are skipped with a warning. If checkpoints exist but none
  is usable the run stops instead of silently starting from scratch.
  Leftover staging folders are removed at start.
- **Safe pruning.** ``keep_latest_k`` counts complete checkpoints only, never
  deletes the newest complete one or the one this run resumed from, and
  moves a folder out of the way (rename) before deleting it, so a kill
  during deletion never leaves a half-deleted ``step-N``.
- **Optional entries.** The random generators of every rank
  (:mod:`swallow_titan.checkpoint.rng`) and the numerical guard's counters
  are saved and restored when the checkpoint has them, so checkpoints
  written before they existed, or by a job of another size, still load.
- ``save_now`` writes a full, synchronous checkpoint at any step (pre-emption).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import Future
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse
from torchtitan.components.checkpoint import AsyncMode, CheckpointManager
from torchtitan.tools.logging import logger

from swallow_titan.checkpoint.integrity import (
    checkpoint_problems,
    checkpoints_to_prune,
    deleting_name,
    fsync_folder,
    leftover_folders,
    published_steps,
    staging_name,
    write_manifest,
)
from swallow_titan.checkpoint.rng import RNG
from swallow_titan.config.paths import step_folder_name, step_of_folder
from swallow_titan.runtime.ranks import process_rank


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected; the message says what to do."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _from_rank0(value: Any) -> Any:
    """``value`` as computed on rank 0, on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class AtomicCheckpointManager(CheckpointManager):
    """CheckpointManager whose checkpoints appear complete or not at all."""

    def __init__(
        self,
        *args: Any,
        optional_entries: tuple[str, ...] = (RNG,),
        publish_delay_s: float = 0.0,
        **kwargs: Any,
    ):
        """torchtitan's arguments, plus ``optional_entries``: the names in
        ``states`` restored only when a checkpoint holds them."""
        super().__init__(*args, **kwargs)
        self.optional_entries = optional_entries
        self.resumed_from: int | None = None
        # Test hook ([debug] checkpoint_publish_delay_s): a window in which the
        # checkpoint is fully written but not yet published.
        self._publish_delay_s = publish_delay_s
        self._prune_lock = threading.Lock()

    # ----------------------------------------------------------------- writing

    def _own_step(self, checkpoint_id: str) -> int | None:
        """The step if ``checkpoint_id`` is one of this manager's ``step-N`` folders."""
        parent, name = os.path.split(os.path.normpath(checkpoint_id))
        step = step_of_folder(name)
        if step is not None and os.path.normpath(parent) == os.path.normpath(self.folder):
            return step
        return None

    def dcp_save(
        self,
        state_dict: dict[str, Any],
        checkpoint_id: str,
        async_mode: AsyncMode,
        enable_garbage_collection: bool = False,
        to_hf: bool = False,
    ) -> Future | AsyncSaveResponse | None:
        step = self._own_step(checkpoint_id)
        if step is None:
            return super().dcp_save(
                state_dict, checkpoint_id, async_mode, enable_garbage_collection, to_hf
            )
        staging = os.path.join(self.folder, staging_name(step))
        result = super().dcp_save(
            state_dict, staging, async_mode, enable_garbage_collection, to_hf
        )
        if async_mode == AsyncMode.DISABLED:
            # HF export consolidates on every rank after dcp.save: wait for all.
            _barrier()
            if process_rank() == 0:
                self._publish(staging, checkpoint_id, step)
            _barrier()
            return result
        if isinstance(result, AsyncSaveResponse):
            return AsyncSaveResponse(
                staging_completion=result.staging_completion,
                upload_completion=self._publish_when_done(
                    result.upload_completion, staging, checkpoint_id, step
                ),
            )
        return self._publish_when_done(result, staging, checkpoint_id, step)

    def _publish_when_done(
        self, written: Future, staging: str, final: str, step: int
    ) -> Future:
        """A future that completes once ``written`` has and the checkpoint is published.

        DCP's coordinator (rank 0) writes ``.metadata`` only after every rank
        reported its files written, so when rank 0's future completes the
        whole checkpoint is on disk and rank 0 can publish without a barrier.
        """
        published: Future = Future()

        def publish(done: Future) -> None:
            try:
                done.result()
                if process_rank() == 0:
                    self._publish(staging, final, step)
            except BaseException as e:
                published.set_exception(e)
            else:
                published.set_result(None)

        written.add_done_callback(publish)
        return published

    def _publish(self, staging: str, final: str, step: int) -> None:
        """Rank 0: manifest, rename ``staging`` to ``final``, fsync, prune."""
        if self._publish_delay_s > 0:
            logger.info(
                f"[debug] waiting {self._publish_delay_s:.1f}s before publishing {final}"
            )
            time.sleep(self._publish_delay_s)
        write_manifest(staging, step)
        if os.path.exists(final):
            # A checkpoint of this step from an earlier attempt (e.g. a broken
            # one that was skipped on resume): move it away, then replace it.
            self._discard(final, step)
        os.rename(staging, final)
        fsync_folder(self.folder)
        logger.info(f"Published checkpoint {final}")
        self._purge_stale_checkpoints()

    def save_now(self, step: int) -> None:
        """Write a full checkpoint of ``step`` now, synchronously, whatever the interval."""
        if not self.enable or self.load_only:
            return
        begin = time.monotonic()
        self._async_wait()
        self.dcp_save(
            self._flattened_model_states_sd(),
            checkpoint_id=self._create_checkpoint_id(step),
            async_mode=AsyncMode.DISABLED,
            enable_garbage_collection=True,
        )
        logger.info(f"Saved checkpoint {step_folder_name(step)} in {time.monotonic() - begin:.2f}s")

    def will_save(self, step: int, last_step: bool, forced: bool = False) -> bool:
        """Whether ``save`` (or ``save_now`` when ``forced``) writes at this step."""
        if forced:
            return self.enable and not self.load_only
        return self._should_save(step, last_step)

    # ----------------------------------------------------------------- pruning

    def _discard(self, path: str, step: int) -> None:
        """Rank 0: take a checkpoint out of view at once, delete it in the background."""
        doomed = os.path.join(self.folder, deleting_name(step, str(time.time_ns())))
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            return  # already discarded
        if self.purge_thread is not None and self.purge_thread.is_alive():
            self.purge_queue.put(doomed)
        else:
            shutil.rmtree(doomed, ignore_errors=True)

    def _purge_stale_checkpoints(self) -> None:
        if self.keep_latest_k <= 0 or process_rank() != 0:
            return
        with self._prune_lock:
            steps = published_steps(self.folder)
            complete = {s: not checkpoint_problems(p) for s, p in steps.items()}
            protected = {self.resumed_from} if self.resumed_from is not None else set()
            for step in checkpoints_to_prune(complete, self.keep_latest_k, protected):
                logger.info(f"keep_latest_k={self.keep_latest_k}: deleting {step_folder_name(step)}")
                self._discard(steps[step], step)

    # ----------------------------------------------------------------- loading

    def _remove_leftovers(self) -> None:
        """Rank 0 removes what killed runs left; the folder goes if nothing else is in it."""
        if process_rank() == 0:
            for path in leftover_folders(self.folder):
                logger.warning(f"Removing {path}, left by an interrupted save or prune")
                shutil.rmtree(path, ignore_errors=True)
            if os.path.isdir(self.folder) and not os.listdir(self.folder):
                # No checkpoint was ever published: start as a fresh run, so
                # that initial_load_path is honoured.
                os.rmdir(self.folder)
        _barrier()

    def _find_load_step(self, folder: str = "") -> int:
        if folder and os.path.normpath(folder) != os.path.normpath(self.folder):
            return super()._find_load_step(folder)
        # Rank 0 checks, everyone gets the same answer (or the same error).
        step, error = _from_rank0(self._newest_complete_step() if process_rank() == 0 else None)
        if error:
            raise CheckpointError(error)
        return step

    def _newest_complete_step(self) -> tuple[int, str | None]:
        """Rank 0: the newest step that passes the checks, or an error message."""
        steps = published_steps(self.folder)
        for step in sorted(steps, reverse=True):
            problems = checkpoint_problems(steps[step])
            if not problems:
                return step, None
            shown = "; ".join(problems[:5])
            more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
            logger.warning(
                f"Skipping checkpoint {steps[step]}: it is incomplete or corrupted "
                f"({shown}{more}). Trying the previous one."
            )
        if steps:
            return -1, (
                f"{self.folder}: none of the checkpoints {sorted(steps)} is complete "
                "(see the warnings above). Move them away to start from "
                "checkpoint.initial_load_path or from scratch."
            )
        return -1, None

    def _check_requested_step(self, step: int) -> None:
        path = self._create_checkpoint_id(step)
        problems = _from_rank0(checkpoint_problems(path) if process_rank() == 0 else None)
        if problems:
            raise CheckpointError(
                f"checkpoint.load_step = {step}: {path} cannot be loaded: "
                + "; ".join(problems)
            )

    def load(self, step: int = -1) -> bool:
        if not self.enable:
            return super().load(step)
        self._remove_leftovers()
        if os.path.isdir(self.folder):
            if step == -1:
                step = self._find_load_step()
            else:
                self._check_requested_step(step)
            self.resumed_from = step if step >= 0 else None
        return super().load(step)

    def dcp_load(
        self,
        state_dict: dict[str, Any],
        checkpoint_id: str,
        from_hf: bool,
        from_quantized: bool,
    ) -> None:
        optional = {k: state_dict.pop(k) for k in self.optional_entries if k in state_dict}
        super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)
        for name, entry in optional.items():
            if not load_entry_if_present(name, entry, checkpoint_id):
                logger.warning(
                    f"{checkpoint_id} has no '{name}' entry for rank {process_rank()} (written by "
                    "an older version or a job of another size); it keeps its current state"
                )

    def close(self) -> None:
        # An async save still in flight must finish (and be published) before
        # the process exits; torchtitan's close does not wait for it. close() also
        # runs from torchtitan's __del__ after a failed __init__, hence getattr.
        if getattr(self, "enable", False) and getattr(self, "save_future", None):
            try:
                self._async_wait()
            except Exception as e:
                logger.error(f"The last asynchronous checkpoint save failed: {e}")
        super().close()


def load_entry_if_present(name: str, entry: Any, checkpoint_id: str) -> bool:
    """Load the Stateful ``entry`` from a DCP checkpoint if it holds all its keys.

    Collective (DCP plans the load across ranks): every rank calls it, also
    one that finds nothing for itself (it then loads nothing). Returns
    whether ``entry`` was restored.
    """
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    present = all(f"{name}.{key}" in stored for key in entry.state_dict())
    dcp.load({name: entry} if present else {}, checkpoint_id=checkpoint_id)
    return present
