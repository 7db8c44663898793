"""Writing checkpoints: every writer (convert, merge, the generic format, the MoPE export) calls
`write_checkpoint`, which streams planned tensors into sharded safetensors, then writes config.json,
the side files and the model card, all inside a temporary directory that becomes the output only
when complete (`upcycle.checkpoint.output`).

The streaming writer is ours, not safetensors' `save_file`: that needs every tensor of a shard in
memory at once (a 7B model's shard is 5 GB), while writing each shard's header from the plan and
then each tensor's bytes as it is computed keeps peak memory at one tensor (README "Memory":
456 MiB peak RSS converting an 838 MiB model, against 2838 MiB for mergekit-moe, measured with
scripts/bench/convert.py). Which tensor goes to which shard, and the shard names, are
huggingface_hub's (`split_state_dict_into_shards_factory`), as in `save_pretrained`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from upcycle.checkpoint.background import SerialWorker
from upcycle.checkpoint.formats import CONFIG_FILE, SAFETENSORS_DTYPES, SAFETENSORS_INDEX, SHARD_PATTERN
from upcycle.checkpoint.output import atomic_output_dir, check_output_dir
from upcycle.checkpoint.shards import BufferedShard, DirectShard, open_shard
from upcycle.errors import UpcycleError
from upcycle.progress import progress


@dataclass(frozen=True)
class TensorSpec:
    """The name, dtype and shape of one output tensor, known before its data exists."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Return the number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Return the size of the tensor's data in bytes."""
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its spec, and how to compute it (called once, when it is written)."""

    spec: TensorSpec
    compute: Callable[[], torch.Tensor]


def count_parameters(specs: Iterable[TensorSpec]) -> int:
    """Return the number of parameters (elements) the specs hold."""
    return sum(spec.numel for spec in specs)


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
SIZE_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_shard_size(size: str | int) -> int:
    """Return the shard size limit in bytes from an int or a string such as "5GB", "500MB" or "2GiB".

    Decimal units, as huggingface_hub and `save_pretrained(max_shard_size=...)` read them ("5GB" is
    5 * 10^9 bytes), and binary ones (GiB). huggingface_hub's own parser is private
    (`serialization._base.parse_size_to_int`), hence these lines; a test holds them to it.

    Raises:
        UpcycleError: the text is not a size, or the size is not positive.
    """
    value: float | None = None
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        text = size.strip().upper()
        number = text.rstrip("KMGTIB ")
        unit = text[len(number) :].strip()
        if unit in SIZE_UNITS:
            try:
                value = float(number) * SIZE_UNITS[unit]
            except ValueError:
                value = None
    if value is None or not math.isfinite(value):
        raise UpcycleError(f"cannot read size {size!r}: use e.g. 5GB, 500MB, 2GiB or a byte count")
    if value < 1:
        raise UpcycleError(f"the shard size must be at least 1 byte, got {size!r}; use e.g. 5GB")
    return int(value)


def _header_bytes(specs: list[TensorSpec]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
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
    """Writes a sharded safetensors checkpoint one tensor at a time.

    The specs are known up front, so every shard's header is written before any data; each tensor
    is then written at its place when it arrives (each planned tensor exactly once, in any order),
    and a shard's file is flushed to disk (fsync) and closed as soon as its last tensor is in.
    Data goes to disk as it is written, with O_DIRECT where the file system takes it, else through a page cache
    that is drained as it goes (`upcycle.checkpoint.shards`).
    """

    def __init__(self, directory: Path, specs: Sequence[TensorSpec], max_shard_size: str | int = "5GB"):
        from huggingface_hub import split_state_dict_into_shards_factory

        self.directory = Path(directory)
        by_name = {spec.name: spec for spec in specs}
        if len(by_name) != len(specs):
            raise UpcycleError("the plan names a tensor twice; this is a bug in the writer's caller")
        split = split_state_dict_into_shards_factory(
            by_name,
            get_storage_size=lambda spec: spec.nbytes,
            filename_pattern=SHARD_PATTERN,
            max_shard_size=parse_shard_size(max_shard_size),
        )
        self.sharded = split.is_sharded
        self.total_size = split.metadata["total_size"]
        self.file_of = dict(split.tensor_to_filename)
        self._layout: dict[str, list[TensorSpec]] = {
            file: [by_name[name] for name in names] for file, names in split.filename_to_tensors.items()
        }
        self._position: dict[str, tuple[TensorSpec, int]] = {}
        self._headers: dict[str, bytes] = {}
        for file, shard_specs in self._layout.items():
            header = _header_bytes(shard_specs)
            self._headers[file] = header
            offset = len(header)
            for spec in shard_specs:
                self._position[spec.name] = (spec, offset)
                offset += spec.nbytes
        self._remaining = {file: len(shard_specs) for file, shard_specs in self._layout.items()}
        self._files: dict[str, DirectShard | BufferedShard] = {}  # touched by the worker thread only, until it stops
        self._worker: SerialWorker | None = None

    @property
    def file_names(self) -> list[str]:
        """Return the shard file names, in order."""
        return list(self._layout)

    # Bytes of tensors handed to the writing thread and not yet written; `write` waits beyond that.
    QUEUED_BYTES = 64 * 2**20

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Hand the planned tensor `name` to the writing thread (the tensor is only read, and must not be
        changed afterwards: the same one may be written under several names).

        The bytes are written in order on one background thread (`upcycle.checkpoint.background`);
        a write the file system refused is raised by a later `write` or by `close`.

        Raises:
            UpcycleError: the tensor is not in the plan (or was written already), or its dtype or
                shape differ from the plan's.
            OSError: the file system refused the write (a full disk, a read-only folder).
        """
        if name not in self._position:
            raise UpcycleError(f"writer got {name}, which the plan does not hold or which was written already")
        spec, offset = self._position.pop(name)
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise UpcycleError(
                f"writer expected {spec.name} {spec.dtype} {spec.shape}, got {tensor.dtype} {tuple(tensor.shape)}"
            )
        file = self.file_of[name]
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._remaining[file] -= 1
        last = not self._remaining[file]
        if self._worker is None:
            self._worker = SerialWorker(self.QUEUED_BYTES)
        self._worker.submit(lambda: self._write_data(file, offset, data, last), data.numel())

    def _write_data(self, file: str, offset: int, data: torch.Tensor, last: bool) -> None:
        """On the worker thread: write `data` at `offset` of `file`, and close the file after its last tensor."""
        shard = self._files.get(file)
        if shard is None:
            shard = self._files[file] = open_shard(self.directory / file, self._headers[file])
        shard.write_at(offset, memoryview(data.numpy()))
        if last:
            self._files.pop(file).close()

    def _stop_worker(self, drain: bool) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
        try:
            if drain:
                worker.drain()
        finally:
            worker.stop()

    def close(self) -> None:
        """Write the index when there are several shards.

        Raises:
            UpcycleError: some planned tensors were never written.
            OSError: the file system refused a write.
        """
        self._stop_worker(drain=True)
        for file in list(self._files):
            self._files.pop(file).abort()
        if self._position:
            first = next(iter(self._position))
            raise UpcycleError(f"{len(self._position)} planned tensors were not written, first {first}")
        if self.sharded:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.file_of}
            (self.directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        """Close every open file without checking that the plan is complete (the caller discards them)."""
        self._stop_worker(drain=False)
        for file in list(self._files):
            self._files.pop(file).abort()


def write_tensors(
    directory: Path, plan: Sequence[PlannedTensor], max_shard_size: str | int, *, quiet: bool, desc: str
) -> None:
    """Compute each planned tensor in turn, write it, and drop it; a progress bar unless `quiet`.

    Raises:
        UpcycleError: a computed tensor does not match its spec.
        OSError: the file system refused a write.
    """
    writer = StreamingWriter(directory, [planned.spec for planned in plan], max_shard_size)
    try:
        with torch.no_grad():
            for planned in progress(plan, desc=desc, unit="tensor", quiet=quiet):
                writer.write(planned.spec.name, planned.compute())
    except BaseException:
        writer.abort()
        raise
    writer.close()


def write_config(directory: Path, config: dict) -> None:
    """Write `config` as `directory`/config.json (indented, keys sorted)."""
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def check_free_space(output: Path, needed_bytes: int) -> None:
    """Refuse, before anything is written, an output larger than the free space of its disk.

    Raises:
        UpcycleError: naming both numbers.
    """
    import shutil

    existing = next((parent for parent in (output, *output.absolute().parents) if parent.exists()), Path("/"))
    free = shutil.disk_usage(existing).free
    if needed_bytes > free:
        raise UpcycleError(
            f"{output} needs about {needed_bytes / 1e9:.2f} GB but {existing} has {free / 1e9:.2f} GB free; "
            "free space or choose another output (nothing was written)"
        )


def write_checkpoint(
    output: str | os.PathLike,
    *,
    weights: Sequence[PlannedTensor] | Callable[[Path], None],
    config: dict | Callable[[Path], dict],
    card: Callable[[Path], object],
    side_files: Iterable[Path] = (),
    extras: Callable[[Path], None] | None = None,
    force: bool = False,
    max_shard_size: str | int = "5GB",
    quiet: bool = False,
    desc: str = "writing tensors",
    expected_bytes: int | None = None,
) -> Path:
    """Write a complete checkpoint at `output` and return its path.

    In a temporary directory next to `output`, in this order: the weights (`weights` is a plan,
    streamed one tensor at a time, or a function that saves them, e.g. `save_pretrained`), then
    config.json (`config`, or a function of the directory that returns it, e.g. to amend the one
    `save_pretrained` wrote), the `side_files` (tokenizer, generation config; one already written
    is kept), `extras` (e.g. a tokenizer's `save_pretrained`, a modeling file), and the model card
    (`card(directory)`). The directory becomes `output` only when all of that succeeded.

    Before anything is written, the weights' size (the plan's bytes, or `expected_bytes` for a
    saving function) is held against the free space of the output's disk.

    Raises:
        UpcycleError: `output` exists and `force` is False, another run writes it, the disk has
            too little free space, the plan and the tensors disagree, or the file system refused a
            write. Nothing is left at `output` (or next to it) when it raises.
        Interrupted: SIGTERM or SIGHUP arrived (see `upcycle.checkpoint.output`).
    """
    import shutil

    output = Path(output)
    check_output_dir(output, force)
    if expected_bytes is None and not callable(weights):
        expected_bytes = sum(planned.spec.nbytes for planned in weights)
    if expected_bytes is not None:
        check_free_space(output, expected_bytes)
    with atomic_output_dir(output, force) as directory:
        if callable(weights):
            weights(directory)
        else:
            write_tensors(directory, weights, max_shard_size, quiet=quiet, desc=desc)
        write_config(directory, config(directory) if callable(config) else config)
        for path in side_files:
            if not (directory / path.name).exists():
                shutil.copyfile(path, directory / path.name)
        if extras is not None:
            extras(directory)
        card(directory)
    return output
