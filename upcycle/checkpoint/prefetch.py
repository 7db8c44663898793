"""Reading tensors ahead of use, at the disk's speed, on a background thread (`TensorStream`).

A merge reads every expert once, in an order known in advance, and computes on each layer while
the disk could already be reading the next. Reading through the safetensors memory map serialises
the two: pages are read when first touched, in the middle of the arithmetic, and each 4 KiB page
costs a fault and a page-cache copy. On the 2-core benchmark VM (scripts/bench/scale.py) a cached
layer of experts (805 MB) took 1.3-1.5 s of system time to read that way, or through `pread` into
reused buffers, against 4-6 GB/s for a user-space copy; `posix_fadvise(WILLNEED)` on the next
layer did not change the merge's speed. So `TensorStream` reads each tensor with `O_DIRECT` (the
disk's DMA writes straight into the tensor's memory: no page cache, no copy, almost no CPU) on one
thread that sleeps in the kernel without the GIL, in the order the tensors were asked for, and at
most `budget` bytes ahead of the caller. Files or filesystems that refuse `O_DIRECT` (tmpfs, some
network filesystems), and `.bin` checkpoints, are read the ordinary way on the same thread.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path

import torch

from upcycle.checkpoint.formats import DTYPES_BY_SAFETENSORS_NAME

# O_DIRECT transfers must start and end on the device's logical block; 4 KiB covers every common disk.
ALIGNMENT = 4096


def safetensors_header(path: Path) -> tuple[int, dict]:
    """Return (byte offset of the data section, header dict) of the safetensors file `path`.

    Raises:
        OSError: the file cannot be read.
        ValueError: the header is not JSON.
    """
    with open(path, "rb") as file:
        (header_size,) = struct.unpack("<Q", file.read(8))
        return 8 + header_size, json.loads(file.read(header_size))


def direct_buffer_size(offset: int, length: int) -> int:
    """Return the bytes of the buffer `read_direct` needs for `length` bytes at `offset`."""
    start = offset - offset % ALIGNMENT
    return -(-(offset + length) // ALIGNMENT) * ALIGNMENT - start + ALIGNMENT


def read_direct(path: Path, offset: int, length: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Return the `length` bytes at `offset` of `path` as a uint8 tensor, read with O_DIRECT into `buffer`
    (a uint8 tensor of `direct_buffer_size` bytes, reused; None: a new one). The result is a view of it.

    Raises:
        OSError: the file or its filesystem refuses O_DIRECT (EINVAL), or the read fails or is short.
    """
    start = offset - offset % ALIGNMENT
    end = -(-(offset + length) // ALIGNMENT) * ALIGNMENT
    if buffer is None:
        buffer = torch.empty(end - start + ALIGNMENT, dtype=torch.uint8)
    shift = -buffer.data_ptr() % ALIGNMENT
    window = buffer[shift : shift + end - start].numpy()
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        done = 0
        while done < end - start:
            got = os.preadv(descriptor, [memoryview(window)[done:]], start + done)
            if got <= 0:
                break
            done += got
    finally:
        os.close(descriptor)
    if done < offset + length - start:
        raise OSError(f"short read of {path}: {done} of {offset + length - start} bytes")
    first = shift + offset - start
    return buffer[first : first + length]


class TensorStream:
    """Reads named tensors of one checkpoint on a background thread, in the order they are requested.

    `request(names)` queues reads; `take(name)` returns the tensor (waiting for it if needed) and
    forgets it. At most `budget` bytes of tensors read but not yet taken are held; the thread
    waits for room before reading more. A name taken without a request is read on the spot.

    `release(tensors)` hands taken tensors' memory back for the next reads, when the caller holds
    no view of them any more: a fresh buffer for every tensor cost a page fault per 4 KiB as the
    disk filled it, and an munmap when dropped (on the 1B-shaped merge, about 2 s of the reading
    thread's CPU and 1 s of the merging thread's, measured in-process).
    """

    def __init__(self, shard_of: dict[str, Path], fallback: Callable[[str], torch.Tensor], budget: int):
        self._shard_of = shard_of
        self._fallback = fallback
        self._budget = budget
        self._headers: dict[Path, tuple[int, dict]] = {}
        self._queue: deque[str] = deque()
        self._futures: dict[str, Future] = {}
        self._held = 0
        self._direct = True
        # (storage address, bytes) of the buffers read into and not released: no reference is kept, so a
        # tensor never released frees its memory as usual when the caller drops it
        self._issued: set[tuple[int, int]] = set()
        self._free: dict[int, list[torch.Tensor]] = {}  # buffer size -> buffers released for reuse
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None

    def request(self, names: Iterable[str]) -> None:
        """Queue `names` to be read in this order after those already queued; returns at once."""
        with self._condition:
            for name in names:
                if name not in self._futures:
                    self._futures[name] = Future()
                    self._queue.append(name)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="upcycle-tensor-stream", daemon=True)
                self._thread.start()
            self._condition.notify_all()

    def take(self, name: str) -> torch.Tensor:
        """Return the tensor `name` (read ahead if it was requested, else now), freeing its place in the
        read-ahead budget (its memory stays the caller's until `release`).

        Raises:
            whatever reading the tensor raised (e.g. UpcycleError for a corrupt file, KeyError for
            an unknown name).
        """
        with self._condition:
            future = self._futures.get(name)
        if future is None:
            return self._fallback(name)
        tensor = future.result()
        with self._condition:
            del self._futures[name]
            self._held -= tensor.numel() * tensor.element_size()
            self._condition.notify_all()
        return tensor

    def release(self, tensors: list[torch.Tensor]) -> None:
        """Take back the memory of `tensors` (taken from this stream; views of them included) for later reads,
        as long as the buffers kept and the tensors read ahead come to at most `budget` bytes (so the stream
        never holds more).

        The caller must hold no other view of them: their bytes will be overwritten. Tensors the
        stream did not read (the ordinary reader's) are ignored.
        """
        with self._condition:
            for tensor in tensors:
                storage = tensor.untyped_storage()
                key = (storage.data_ptr(), storage.nbytes())
                if key in self._issued:
                    self._issued.discard(key)
                    kept = sum(size * len(buffers) for size, buffers in self._free.items())
                    if kept + self._held + key[1] > self._budget:
                        continue  # goes back to the system
                    buffer = torch.empty(0, dtype=torch.uint8).set_(storage)  # the whole buffer again
                    self._free.setdefault(buffer.numel(), []).append(buffer)

    def issued(self, tensor: torch.Tensor) -> bool:
        """Return whether `tensor` shares the memory of a tensor this stream read and has not taken back."""
        storage = tensor.untyped_storage()
        return (storage.data_ptr(), storage.nbytes()) in self._issued

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._queue or (self._held >= self._budget and self._held > 0):
                    self._condition.wait()
                name = self._queue.popleft()
                future = self._futures[name]
            try:
                tensor = self._read(name)
            except BaseException as err:  # handed to the taker, who raises it
                future.set_exception(err)
                continue
            with self._condition:
                self._held += tensor.numel() * tensor.element_size()
            future.set_result(tensor)

    def _read(self, name: str) -> torch.Tensor:
        path = self._shard_of[name]
        if not self._direct or path.suffix != ".safetensors" or not hasattr(os, "O_DIRECT"):
            return self._fallback(name)
        if path not in self._headers:
            self._headers[path] = safetensors_header(path)
        data_start, header = self._headers[path]
        entry = header[name]
        dtype = DTYPES_BY_SAFETENSORS_NAME[entry["dtype"]]
        begin, end = entry["data_offsets"]
        if (data_start + begin) % dtype.itemsize:
            return self._fallback(name)  # a view needs element alignment; such files are not written by anyone
        size = direct_buffer_size(data_start + begin, end - begin)
        with self._condition:
            reusable = self._free.get(size)
            buffer = reusable.pop() if reusable else torch.empty(size, dtype=torch.uint8)
        try:
            raw = read_direct(path, data_start + begin, end - begin, buffer)
        except OSError:
            self._direct = False  # e.g. tmpfs: EINVAL; the ordinary reader reports real errors itself
            return self._fallback(name)
        with self._condition:
            self._issued.add((buffer.untyped_storage().data_ptr(), buffer.untyped_storage().nbytes()))
        return raw.view(dtype).view(entry["shape"])
