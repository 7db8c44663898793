"""Reading checkpoints lazily and writing them as streamed, atomic, sharded safetensors.

Reading: a local directory or a Hub model id becomes a `SourceCheckpoint`: its config.json as a
dict and a `LazyTensors` mapping that opens tensors one at a time through safetensors' `safe_open`
(mmap). Legacy `pytorch_model*.bin` files are read with `torch.load(weights_only=True)` only.

Writing: `StreamingWriter` takes the list of output tensors (name, dtype, shape) up front, so
every shard's safetensors header is known before any data, then receives the tensors one by one
and writes each straight to its shard. `atomic_output_dir` gives a temporary directory next to
the final one and renames it only when everything succeeded.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from upcycle.errors import UpcycleError

CONFIG_FILE = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_SAFETENSORS = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"

# Files besides the weights that travel with a model: tokenizer, chat template, generation config.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
GENERATION_CONFIG = "generation_config.json"
HUB_ALLOW_PATTERNS = [
    CONFIG_FILE,
    GENERATION_CONFIG,
    "*.safetensors",
    SAFETENSORS_INDEX,
    *TOKENIZER_FILES,
]

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """Return the torch dtype named by `name` ("float32", "bf16", ...), or None for None/"auto".

    Raises:
        UpcycleError: the name is not a supported floating dtype.
    """
    if name is None or name == "auto":
        return None
    if name not in DTYPE_NAMES:
        raise UpcycleError(f"unknown dtype {name!r}: use one of auto, {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


class LazyTensors:
    """Read-only mapping from tensor name to tensor, loading each tensor only when asked.

    Safetensors shards are opened once with `safe_open` (memory-mapped); a tensor is materialised
    by `get` and dropped by the caller. Pickle-based `.bin` checkpoints are loaded with
    `torch.load(weights_only=True, mmap=True)`, which refuses pickles that would run code.
    """

    def __init__(self, shard_of: dict[str, Path]):
        self._shard_of = shard_of
        self._handles: dict[Path, object] = {}

    def keys(self) -> list[str]:
        """Return every tensor name in the checkpoint, in a stable (sorted) order."""
        return sorted(self._shard_of)

    def __contains__(self, name: object) -> bool:
        return name in self._shard_of

    def __len__(self) -> int:
        return len(self._shard_of)

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = _open_weights_file(path)
        return self._handles[path]

    def get(self, name: str) -> torch.Tensor:
        """Return the tensor `name`, read from its shard.

        Safetensors shards are mapped afresh for each read and unmapped right after: a mapping
        kept open keeps every page read so far resident, so peak RSS would grow to the size of
        the model instead of one tensor (measured in scripts/bench/convert.py).

        Raises:
            KeyError: no tensor has that name.
        """
        path = self._shard_of[name]
        handle = self._handle(path)
        if isinstance(handle, dict):
            return handle[name]
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            return reader.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """Return the shape of tensor `name` without reading its data."""
        handle = self._handle(self._shard_of[name])
        if isinstance(handle, dict):
            return tuple(handle[name].shape)
        return tuple(handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """Return the dtype of tensor `name` without reading its data."""
        handle = self._handle(self._shard_of[name])
        if isinstance(handle, dict):
            return handle[name].dtype
        dtype_name = handle.get_slice(name).get_dtype()
        return {v: k for k, v in SAFETENSORS_DTYPES.items()}[dtype_name]


def _open_weights_file(path: Path):
    """Open one weights file: a safe_open handle for safetensors, a dict for a `.bin` pickle.

    Raises:
        UpcycleError: the file is truncated/corrupt, or is a pickle that weights-only loading refuses.
    """
    if path.suffix == ".safetensors":
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError) as err:
            raise UpcycleError(
                f"cannot read {path}: {str(err).splitlines()[0]} (the file is truncated or corrupt; "
                "re-download or re-save the checkpoint)"
            ) from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise UpcycleError(
            f"refusing to load {path}: it is a pickle that holds more than tensors and could run code; "
            "only weights-only loading is allowed (convert it to safetensors from a trusted environment)"
        ) from None
    except (RuntimeError, OSError, EOFError) as err:
        raise UpcycleError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UpcycleError(f"{path} does not hold a flat dict of tensors; re-save it as safetensors")
    return state


@dataclass
class SourceCheckpoint:
    """A checkpoint opened for reading: where it lives, its config, and its lazy tensors."""

    path: Path
    name: str
    config: dict
    tensors: LazyTensors
    extra_files: list[Path] = field(default_factory=list)


def _safe_shard_path(directory: Path, shard_name: str, index_file: str) -> Path:
    """Return directory/shard_name, refusing names that leave the checkpoint directory.

    Raises:
        UpcycleError: the name is absolute, has a path separator or `..`, or resolves outside.
    """
    resolved = (directory / shard_name).resolve()
    if (
        os.path.isabs(shard_name)
        or "/" in shard_name
        or "\\" in shard_name
        or shard_name in ("", ".", "..")
        or resolved.parent != directory.resolve()
    ):
        raise UpcycleError(
            f"{directory / index_file} names shard {shard_name!r} outside the checkpoint directory; "
            "refusing to follow it (fix the index so every shard is a plain file name in that directory)"
        )
    if not resolved.is_file():
        raise UpcycleError(f"{directory / index_file} names shard {shard_name!r}, which does not exist")
    return resolved


def _shard_map(directory: Path) -> dict[str, Path]:
    """Return {tensor name: file} for the weights in `directory`, validating every shard.

    Raises:
        UpcycleError: no weights, a bad index, an unsafe shard name, or an unreadable file.
    """
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index_path = directory / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UpcycleError(f"{index_path} is not a valid shard index (no 'weight_map')") from None
            shard_files = {name: _safe_shard_path(directory, name, index_name) for name in set(weight_map.values())}
            return {tensor: shard_files[shard] for tensor, shard in weight_map.items()}
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise UpcycleError(f"{directory} has no *.safetensors or pytorch_model.bin weights")
    shard_of: dict[str, Path] = {}
    for path in files:
        handle = _open_weights_file(path)
        for name in handle.keys():
            shard_of[name] = path
    return shard_of


def looks_like_hub_id(source: str) -> bool:
    """Return True if `source` has the shape of a Hub repo id (`name` or `owner/name`)."""
    return re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?", source) is not None and ".." not in source


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
    return _download_from_hub(text, revision, tuple(extra_patterns)), text


def open_checkpoint(source: str | os.PathLike, revision: str | None = None) -> SourceCheckpoint:
    """Open a checkpoint for lazy reading and return it.

    Raises:
        UpcycleError: missing path, no config.json, unreadable config, or bad weights (see `_shard_map`).
    """
    directory, name = resolve_source(source, revision)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise UpcycleError(f"{directory} has no config.json; is it a Hugging Face model directory?")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise UpcycleError(f"{config_path} is not valid JSON ({err})") from None
    if "model_type" not in config:
        raise UpcycleError(f"{config_path} has no model_type; cannot tell which architecture it is")
    tensors = LazyTensors(_shard_map(directory))
    extra = [directory / f for f in (*TOKENIZER_FILES, GENERATION_CONFIG) if (directory / f).is_file()]
    return SourceCheckpoint(path=directory, name=name, config=config, tensors=tensors, extra_files=extra)


@dataclass(frozen=True)
class TensorSpec:
    """The name, dtype and shape of one output tensor, known before its data exists."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()


def assign_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Return the specs cut into shards of at most `max_shard_bytes` (a lone tensor may exceed it)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header_bytes(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data that follows starts 8-byte aligned, as safetensors pads
    return len(encoded).to_bytes(8, "little") + encoded


class StreamingWriter:
    """Writes a sharded safetensors checkpoint one tensor at a time, in the planned order.

    safetensors' own `save_file` needs every tensor of a shard in memory at once; a 7B model's
    shard is 5 GB. Writing the header from the plan and then each tensor's bytes as it is computed
    keeps peak memory at one tensor (measured in scripts/bench/convert.py).
    """

    def __init__(self, directory: Path, specs: list[TensorSpec], max_shard_bytes: int = 5 * 1024**3):
        self.directory = directory
        self.shards = assign_shards(specs, max_shard_bytes)
        count = len(self.shards)
        self.file_names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._queue: Iterator[tuple[int, TensorSpec]] = iter(
            [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        )
        self._open_shard = -1
        self._file = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor.

        Raises:
            ValueError: the tensor is not the next one in the plan, or its dtype/shape differ.
        """
        shard_index, spec = next(self._queue)
        if spec.name != name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"writer expected {spec.name} {spec.dtype} {spec.shape}, got {name} {tensor.dtype} "
                f"{tuple(tensor.shape)}"
            )
        if shard_index != self._open_shard:
            self._close_file()
            self._file = open(self.directory / self.file_names[shard_index], "wb")  # noqa: SIM115
            self._file.write(_header_bytes(self.shards[shard_index], {"format": "pt"}))
            self._open_shard = shard_index
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Close the last shard and write the index when there are several shards.

        Raises:
            ValueError: some planned tensors were never written.
        """
        self._close_file()
        remaining = list(self._queue)
        if remaining:
            raise ValueError(f"{len(remaining)} planned tensors were not written, first {remaining[0][1].name}")
        if len(self.shards) > 1:
            weight_map = {spec.name: self.file_names[i] for i, shard in enumerate(self.shards) for spec in shard}
            total = sum(spec.nbytes for shard in self.shards for spec in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def check_output_dir(output: Path, force: bool) -> None:
    """Refuse to overwrite an existing output unless `force`.

    Raises:
        UpcycleError: `output` exists and `force` is False.
    """
    if output.exists() and not force:
        raise UpcycleError(f"{output} already exists; choose another output or pass --force to replace it")


@contextlib.contextmanager
def atomic_output_dir(output: Path, force: bool) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `output`; on success move it to `output`.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and `output`
    is left as it was. With `force`, an existing `output` is replaced only after success.

    Raises:
        UpcycleError: `output` exists and `force` is False.
    """
    output = Path(output)
    check_output_dir(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f"{output.name}.tmp-", dir=output.parent))
    try:
        yield temporary
        if output.exists():
            backup = Path(tempfile.mkdtemp(prefix=f"{output.name}.old-", dir=output.parent))
            os.replace(output, backup / output.name)
            os.replace(temporary, output)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(temporary, output)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
