"""Reading checkpoints lazily: a local directory or a Hub model id becomes a `SourceCheckpoint`.

Its config.json as a dict and a `LazyTensors` mapping that opens tensors one at a time through
safetensors' `safe_open` (mmap). Legacy `pytorch_model*.bin` files are read with
`torch.load(weights_only=True)` only. Shard names from an index must be plain file names in the
checkpoint directory; the files themselves may be symlinks (the Hub cache links each snapshot
file into its blobs folder).
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from upcycle.checkpoint.download import resolve_source
from upcycle.checkpoint.formats import (
    BIN_INDEX,
    CONFIG_FILE,
    DTYPES_BY_SAFETENSORS_NAME,
    SAFETENSORS_INDEX,
    SIDE_FILES,
)
from upcycle.checkpoint.prefetch import TensorStream
from upcycle.errors import UpcycleError


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

    def stream(self, budget: int) -> TensorStream:
        """Return a `TensorStream` over these tensors: reads requested ahead of use on a background
        thread, at most `budget` bytes ahead (`upcycle.checkpoint.prefetch`)."""
        return TensorStream(self._shard_of, self.get, budget)

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
        return DTYPES_BY_SAFETENSORS_NAME[dtype_name]


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

    The rule applies to the name the index gives, not to where the file's symlink points: the Hub
    cache stores `snapshots/<commit>/<file>` as relative links into `../../blobs/`.

    Raises:
        UpcycleError: the name is absolute, has a path separator or is `..`, or the file does not exist.
    """
    if os.path.isabs(shard_name) or "/" in shard_name or "\\" in shard_name or shard_name in ("", ".", ".."):
        raise UpcycleError(
            f"{directory / index_file} names shard {shard_name!r} outside the checkpoint directory; "
            "refusing to follow it (fix the index so every shard is a plain file name in that directory)"
        )
    path = directory / shard_name
    if not path.is_file():
        raise UpcycleError(f"{directory / index_file} names shard {shard_name!r}, which does not exist")
    return path


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
    extra = [directory / f for f in SIDE_FILES if (directory / f).is_file()]
    return SourceCheckpoint(path=directory, name=name, config=config, tensors=tensors, extra_files=extra)
