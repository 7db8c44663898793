"""Where a checkpoint comes from: a local directory, or a Hub model id fetched into the Hub cache.

Only the files a conversion needs are downloaded (config, safetensors shards the index names,
tokenizer and generation config). huggingface_hub honours HF_TOKEN (or the stored login), HF_HOME /
HF_HUB_CACHE, HF_ENDPOINT and HF_HUB_OFFLINE=1; errors are one line and never show the token.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from upcycle.checkpoint.formats import (
    CONFIG_FILE,
    GENERATION_CONFIG,
    SAFETENSORS_INDEX,
    SINGLE_SAFETENSORS,
    TOKENIZER_FILES,
)
from upcycle.errors import UpcycleError


def looks_like_hub_id(source: str) -> bool:
    """Return True if `source` is a valid Hub repo id (`name` or `owner/name`), by huggingface_hub's own rule."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def _hub_error(repo_id: str, revision: str | None, err: Exception) -> UpcycleError:
    """Return the one-line UpcycleError for a failed Hub download of `repo_id` (never the token)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    if isinstance(err, LocalEntryNotFoundError):
        if constants.is_offline_mode():
            return UpcycleError(
                f"HF_HUB_OFFLINE is set and {where} is not in the Hub cache ({constants.HF_HUB_CACHE}); "
                "unset HF_HUB_OFFLINE to download it, or give a local directory"
            )
        return UpcycleError(
            f"could not reach the Hub at {constants.ENDPOINT} for {where} and it is not in the cache "
            f"({constants.HF_HUB_CACHE}); check the connection or HF_ENDPOINT, or give a local directory"
        )
    if isinstance(err, GatedRepoError):
        return UpcycleError(f"{repo_id} is gated: accept its terms on the Hub, then set HF_TOKEN to a token that has")
    if isinstance(err, RevisionNotFoundError):
        return UpcycleError(f"{repo_id} has no revision {revision!r}; check --revision")
    if isinstance(err, RepositoryNotFoundError):
        return UpcycleError(
            f"{repo_id} is not a local directory and no such model is on the Hub at {constants.ENDPOINT} "
            "(check the id; set HF_TOKEN if it is private)"
        )
    status = err.response.status_code if isinstance(err, HfHubHTTPError) and err.response is not None else None
    if status in (401, 403):
        return UpcycleError(f"the Hub refused access to {repo_id} ({status}); check HF_TOKEN")
    first_line = (str(err).splitlines() or [type(err).__name__])[0]
    return UpcycleError(f"could not fetch {where} from the Hub: {first_line}")


def _download_from_hub(repo_id: str, revision: str | None, extra_patterns: tuple[str, ...]) -> Path:
    """Download the files a conversion needs from the Hub (or the cache) and return the snapshot folder.

    Two passes: config, generation config, tokenizer, shard index (and `extra_patterns`) first;
    then only the safetensors shards the index names, or without an index `model.safetensors`,
    else the top-level `*.safetensors`. One pattern pass would also fetch files the model does not
    use, such as Mistral's `consolidated.safetensors` (a second full copy) or weights in subfolders. The second pass is
    pinned to the commit of the first, so both come from one revision.

    Raises:
        UpcycleError: offline without a cached copy, unreachable Hub, unknown repo or revision,
            gated repo, refused token, or any other download error.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    small_files = [CONFIG_FILE, GENERATION_CONFIG, SAFETENSORS_INDEX, *TOKENIZER_FILES, *extra_patterns]
    try:
        local = Path(snapshot_download(repo_id, revision=revision, allow_patterns=small_files))
        index_path = local / SAFETENSORS_INDEX
        if index_path.is_file():
            try:
                shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise UpcycleError(f"{repo_id}: {SAFETENSORS_INDEX} is not a valid shard index") from None
            local = Path(snapshot_download(repo_id, revision=local.name, allow_patterns=shards))
        else:
            # No index: the single-file name transformers writes, else any top-level safetensors file.
            local = Path(snapshot_download(repo_id, revision=local.name, allow_patterns=[SINGLE_SAFETENSORS]))
            if not (local / SINGLE_SAFETENSORS).is_file():
                local = Path(
                    snapshot_download(
                        repo_id, revision=local.name, allow_patterns=["*.safetensors"], ignore_patterns=["*/*"]
                    )
                )
    except (LocalEntryNotFoundError, HfHubHTTPError) as err:
        raise _hub_error(repo_id, revision, err) from None
    except (OSError, ValueError) as err:
        raise UpcycleError(f"{repo_id} does not exist locally and could not be fetched from the Hub: {err}") from None
    return local


def resolve_source(
    source: str | os.PathLike, revision: str | None = None, extra_patterns: tuple[str, ...] = ()
) -> tuple[Path, str]:
    """Return (local directory, display name) for a local path or a Hub model id.

    Hub ids are fetched with `huggingface_hub.snapshot_download`, restricted to config,
    safetensors (only the shards the index names), tokenizer and generation-config files, plus
    `extra_patterns` (e.g. adapter_config.json). huggingface_hub honours HF_TOKEN (or the stored
    login), HF_HOME / HF_HUB_CACHE, HF_ENDPOINT and HF_HUB_OFFLINE=1 (cache only); `revision` is a
    branch, tag or commit.

    Raises:
        UpcycleError: the path does not exist and is not a Hub id, or the download failed (see
            `_download_from_hub`).
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UpcycleError(f"{text} is a file; give the checkpoint directory that holds config.json")
        return path, text
    if not looks_like_hub_id(text) or text.startswith((".", "~")):
        raise UpcycleError(f"{text} does not exist; give a checkpoint directory or a Hub model id")
    try:
        return _download_from_hub(text, revision, tuple(extra_patterns)), text
    except UpcycleError:
        if "/" in text and path.parent.is_dir():  # e.g. "models/tiny-lama" next to a real models/ folder
            raise UpcycleError(
                f"{text} does not exist: {path.parent} is a local folder, but it holds no {path.name!r} "
                "(check the path), and no Hub model has that id either"
            ) from None
        raise
