"""Pushing a finished local checkpoint or adapter folder to the Hugging Face Hub.

`push_folder` is `create_repo(exist_ok=True)` + `create_branch` (for a revision other than main) +
`upload_folder`, with the token taken from `HF_TOKEN` or huggingface_hub's stored login, checked
before any request (`require_token`, also used by the recipes). Every failure becomes one
`UpcycleError` line from which the token is scrubbed; the local folder is only read. The CLI's
`--push-to-hub` options live in `upcycle.commands.output_options`; pulling lives in `upcycle.checkpoint`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from upcycle.errors import UpcycleError

DEFAULT_BRANCH = "main"
MODEL_FILES = ("config.json", "adapter_config.json")


@dataclass(frozen=True)
class PushResult:
    """Where a push landed: the repo URL, the branch and the commit."""

    repo_id: str
    revision: str
    repo_url: str
    commit_url: str
    commit_oid: str


def describe_operation(folder: Path) -> tuple[str, str]:
    """Return (commit title, commit description) stating what produced `folder`.

    Read from the `upcycle` provenance section of config.json (convert, merge, MoPE export) or from
    adapter_config.json (a MoPE/PEFT adapter); a folder without either gets a generic title.
    """
    config_path = folder / "config.json"
    provenance: dict = {}
    if config_path.is_file():
        try:
            provenance = json.loads(config_path.read_text()).get("upcycle") or {}
        except (json.JSONDecodeError, AttributeError):
            provenance = {}
    if provenance:
        operation = provenance.get("operation", "upcycle")
        source = provenance.get("source", "an unnamed source")
        shape = ""
        if "num_experts" in provenance and "top_k" in provenance:
            shape = f" ({provenance['num_experts']} experts, top-{provenance['top_k']})"
        title = f"upcycle {operation}: {provenance.get('family', '')} from {source}{shape}".replace("  ", " ")
        details = "\n".join(f"{key}: {value}" for key, value in sorted(provenance.items()))
        return title, f"Written by upcycle {provenance.get('version', '')}.\n\n{details}".strip()
    adapter_path = folder / "adapter_config.json"
    if adapter_path.is_file():
        try:
            adapter = json.loads(adapter_path.read_text())
        except json.JSONDecodeError:
            adapter = {}
        base = adapter.get("base_model_name_or_path") or "its base model"
        return f"upcycle: {adapter.get('peft_type', 'PEFT')} adapter for {base}", ""
    return f"upcycle: upload {folder.name}", ""


def require_token(token: str | None) -> str:
    """Return the token to push with: `token`, else HF_TOKEN, else the stored login.

    Raises:
        UpcycleError: no token is available (nothing has been sent).
    """
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise UpcycleError(
            "pushing to the Hub needs a token with write access: set HF_TOKEN or run `hf auth login` "
            "(nothing was uploaded)"
        )
    return token


def _check_folder(folder: Path) -> None:
    """Refuse folders that are not a finished upcycle/transformers/PEFT output.

    Raises:
        UpcycleError: missing, not a directory, an unfinished temporary output, or no config file.
    """
    if not folder.is_dir():
        raise UpcycleError(f"{folder} is not a directory; give the output folder to push")
    if ".tmp-" in folder.name or ".old-" in folder.name:
        raise UpcycleError(f"{folder} is an unfinished temporary output; push the final folder instead")
    if not any((folder / name).is_file() for name in MODEL_FILES):
        raise UpcycleError(
            f"{folder} has neither config.json nor adapter_config.json; is it a finished model or adapter folder?"
        )


def _one_line(err: BaseException, token: str) -> str:
    """Return the first informative line of a huggingface_hub error, with the token removed."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    server_lines = [line for line in lines[1:] if not line.startswith("For more information")]
    text = lines[0] if lines else type(err).__name__
    if server_lines:
        text = f"{text}: {server_lines[-1]}"
    return text.replace(token, "<token>") if token else text


def push_folder(
    output: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    branch: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Upload every file of the finished `output` folder to the model repo `repo_id` in one commit.

    The repo is created if needed (`private` applies only then), the `branch` too (from main).
    The commit title states the operation that produced the folder unless `commit_message` is given.
    The folder is only read; a failed push changes nothing locally.

    Returns:
        A `PushResult` with the repo URL, branch and commit.

    Raises:
        UpcycleError: not a finished output folder, no token (checked before any request), offline
            mode, or any Hub/network error, as one line that never contains the token.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    folder = Path(output)
    _check_folder(folder)
    token = require_token(token)
    title, description = describe_operation(folder)
    branch = branch or DEFAULT_BRANCH
    api = HfApi(endpoint=endpoint, token=token)
    step = "create the repo"
    try:
        # private=None (not False) keeps the namespace's default visibility for a new repo.
        repo_url = api.create_repo(repo_id, private=private or None, exist_ok=True, repo_type="model")
        if branch != DEFAULT_BRANCH:
            step = f"create branch {branch!r}"
            api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type="model")
        step = "upload the files"
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=branch,
            commit_message=commit_message or title,
            commit_description=description,
            repo_type="model",
        )
    except OfflineModeIsEnabled:
        raise UpcycleError(f"cannot push {folder} to {repo_id}: HF_HUB_OFFLINE is set; unset it to upload") from None
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        hint = {
            401: "the token was rejected; check HF_TOKEN or run `hf auth login` again",
            403: f"the token may not write to {repo_id}; use a token with write access to that namespace",
        }.get(status, "nothing was changed locally; retry the push")
        raise UpcycleError(f"could not {step} for {repo_id}: {_one_line(err, token)} ({hint})") from None
    except (OSError, ValueError) as err:
        raise UpcycleError(f"could not {step} for {repo_id}: {_one_line(err, token)}") from None
    return PushResult(
        repo_id=repo_id,
        revision=branch,
        repo_url=str(repo_url),
        commit_url=commit.commit_url,
        commit_oid=commit.oid,
    )
