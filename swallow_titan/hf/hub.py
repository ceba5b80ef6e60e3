"""Upload an export folder to the Hugging Face Hub.

The token comes from the usual places (``HF_TOKEN``, ``hf auth login``). The
upload runs after the local folder is complete, so a failure (no network, no
token, no permission) leaves a complete local export to upload later.
"""

from __future__ import annotations

from pathlib import Path


class HubPushError(RuntimeError):
    """The upload failed; the local export folder is complete."""


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Create (if needed) the model repository ``repo_id`` and upload ``folder``; returns its URL."""
    folder = Path(folder)
    retry = f"`hf upload {repo_id} {folder} .`"
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise HubPushError(
            f"huggingface_hub is not installed (pip install huggingface_hub); the export "
            f"in {folder} is complete: upload it later with {retry}"
        ) from None
    api = HfApi()
    try:
        repo = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=f"Upload {folder.name} (swallow-titan export)",
        )
    except Exception as e:  # noqa: BLE001  (network, auth and Hub errors alike)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise HubPushError(
            f"could not upload {folder} to the Hub repository {repo_id!r}: "
            f"{type(e).__name__}: {reason}. The local export is complete; upload it when "
            f"the Hub is reachable and a token is set (HF_TOKEN or `hf auth login`) with "
            f"{retry}"
        ) from e
    return str(getattr(repo, "url", f"https://huggingface.co/{repo_id}"))
