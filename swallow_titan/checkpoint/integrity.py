"""Is a checkpoint folder complete? Names, manifests and the checks done before loading.

A checkpoint is written under a staging name that torchtitan's step discovery
(``step-(\\d+)`` plus a ``.metadata`` file) can never match, and published by
renaming it to ``step-N`` once every rank has finished. Just before the rename
a manifest with the size of every file is written into it. Before a checkpoint
is loaded (or kept by pruning) it is checked against that manifest and against
DCP's own ``.metadata`` (every byte range it references must exist), so a
folder truncated or half-copied after publication is detected and skipped.
"""

from __future__ import annotations

import json
import os

from swallow_titan.config.paths import step_of_folder

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
DCP_METADATA = ".metadata"
HF_INDEX = "model.safetensors.index.json"

# Published checkpoints: exactly "step-N" (config.paths.STEP_FOLDER). Other
# entries of the checkpoint folder are ignored or, for the two prefixes below,
# cleaned up at start.
# Neither prefix may contain "step-<digits>": torchtitan searches names for it.
STAGING_PREFIX = ".incomplete-"
DELETING_PREFIX = ".deleting-"


def staging_name(step: int) -> str:
    """Folder name a checkpoint of ``step`` is written under before publication."""
    return f"{STAGING_PREFIX}step_{step}"


def deleting_name(step: int, unique: str) -> str:
    """Folder name a checkpoint is moved to before it is deleted."""
    return f"{DELETING_PREFIX}step_{step}.{unique}"


def published_steps(folder: str) -> dict[int, str]:
    """Published checkpoints in ``folder``: step -> path (complete or not)."""
    if not os.path.isdir(folder):
        return {}
    steps = {}
    for name in os.listdir(folder):
        step = step_of_folder(name)
        path = os.path.join(folder, name)
        if step is not None and os.path.isdir(path):
            steps[step] = path
    return steps


def leftover_folders(folder: str) -> list[str]:
    """Staging and half-deleted folders a killed run left behind."""
    if not os.path.isdir(folder):
        return []
    return sorted(
        os.path.join(folder, name)
        for name in os.listdir(folder)
        if name.startswith((STAGING_PREFIX, DELETING_PREFIX))
    )


def _files_with_sizes(folder: str) -> dict[str, int]:
    sizes = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative != MANIFEST_NAME:
                sizes[relative] = os.path.getsize(path)
    return sizes


def fsync_folder(path: str) -> None:
    """Make a folder's entries (created or renamed files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: str, step: int) -> None:
    """Record the size of every file of a finished checkpoint, durably."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "step": step,
        "files": _files_with_sizes(folder),
    }
    path = os.path.join(folder, MANIFEST_NAME)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    fsync_folder(folder)


def _manifest_problems(folder: str) -> list[str]:
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.exists(path):
        return []  # written by another tool; DCP's metadata is still checked
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{MANIFEST_NAME} is unreadable ({e})"]
    problems = []
    for relative, size in sorted(files.items()):
        full = os.path.join(folder, relative)
        if not os.path.isfile(full):
            problems.append(f"{relative} is missing")
        elif os.path.getsize(full) != size:
            problems.append(
                f"{relative} has {os.path.getsize(full):,} bytes, the manifest says {size:,}"
            )
    return problems


def _dcp_problems(folder: str) -> list[str]:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(folder).read_metadata()
    except Exception as e:  # a truncated pickle raises many kinds of errors
        return [f"{DCP_METADATA} is unreadable ({type(e).__name__}: {e})"]
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    problems = []
    for relative, end in sorted(needed.items()):
        full = os.path.join(folder, relative)
        if not os.path.isfile(full):
            problems.append(f"{relative} (referenced by {DCP_METADATA}) is missing")
        elif os.path.getsize(full) < end:
            problems.append(
                f"{relative} has {os.path.getsize(full):,} bytes but {DCP_METADATA} "
                f"references bytes up to {end:,}"
            )
    return problems


def _hf_problems(folder: str) -> list[str]:
    try:
        with open(os.path.join(folder, HF_INDEX)) as f:
            files = set(json.load(f)["weight_map"].values())
    except (OSError, ValueError, KeyError, AttributeError) as e:
        return [f"{HF_INDEX} is unreadable ({e})"]
    return [
        f"{name} (listed in {HF_INDEX}) is missing"
        for name in sorted(files)
        if not os.path.isfile(os.path.join(folder, name))
    ]


def checkpoint_problems(folder: str) -> list[str]:
    """Why the checkpoint in ``folder`` cannot be loaded; empty if it looks complete.

    Only sizes and references are checked (no file is read in full), so this
    is cheap enough to run on every start and before every prune.
    """
    if not os.path.isdir(folder):
        return ["the folder does not exist"]
    problems = _manifest_problems(folder)
    if os.path.exists(os.path.join(folder, DCP_METADATA)):
        problems += _dcp_problems(folder)
    elif os.path.exists(os.path.join(folder, HF_INDEX)):
        problems += _hf_problems(folder)
    else:
        problems.append(f"it has neither {DCP_METADATA} nor {HF_INDEX}")
    return problems


def checkpoints_to_prune(
    complete: dict[int, bool], keep_latest_k: int, protected: set[int]
) -> list[int]:
    """Which published checkpoints ``keep_latest_k`` pruning deletes.

    ``complete`` maps each published step to whether it passed
    ``checkpoint_problems``. The ``keep_latest_k`` newest complete checkpoints
    and the ``protected`` steps (the one this run resumed from) are kept, and
    nothing newer than the newest complete checkpoint is touched. Incomplete
    checkpoints older than it are deleted: they can never be loaded.
    """
    if keep_latest_k <= 0:
        return []
    good = sorted(step for step, ok in complete.items() if ok)
    if not good:
        return []
    keep = set(good[-keep_latest_k:]) | protected
    newest_good = good[-1]
    return sorted(s for s in complete if s < newest_good and s not in keep)
