"""One shard file being written, at the disk's speed: `open_shard` returns a `DirectShard` (O_DIRECT from reused
aligned buffers) where the file system takes it, else a `BufferedShard` (the page cache, drained in windows).

Why O_DIRECT: the buffered path copies every byte into page-cache pages inside `write()`. On the 2-core benchmark VM
(scripts/bench/scale.py) those pages are fresh memory the VM's host backs on first touch, so the first gigabytes of
a run were written at 200-600 MB/s, and convert (13.75 GB written) spent 12.6-13.3 s of system time in that copy:
22.3-23.9 s per run. Through `DirectShard` the same runs took 14.3-15.8 s with 1.1-1.5 s of system time
(alternating runs; 16 MiB buffers beat 4 and 8 MiB ones by 0.5-1.5 s). The copy into the aligned buffers is done in
user space (numpy, without the GIL) into memory that is reused, and the kernel only does the DMA.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np

from upcycle.checkpoint.background import SerialWorker
from upcycle.checkpoint.prefetch import ALIGNMENT


class BufferedShard:
    """One shard file written through the page cache: positioned writes, small tensors gathered into large
    writes, and the written data sent to disk and dropped from the page cache as it goes.

    Written data leaves the page cache in windows of `WINDOW` bytes: the writeback of a window
    is started when it is full (sync_file_range) and waited for one window later, then the
    window is dropped from the cache (posix_fadvise DONTNEED). The disk writes while the next
    window is computed, and the page cache never fills: when it does, the kernel reclaims it
    inside write(), which made a 13.75 GB conversion 3.6x slower than the disk
    (scripts/bench/scale.py). Where sync_file_range is missing, each window is fdatasync'ed
    instead. The file is fsynced when closed.
    """

    WINDOW = 256 * 2**20
    BUFFER = 8 * 2**20
    WAIT_BEFORE, WRITE, WAIT_AFTER = 1, 2, 4  # SYNC_FILE_RANGE_* flags
    _sync_file_range: Callable | None = None
    _loaded = False

    def __init__(self, path: Path, header: bytes | None):
        """Create (or truncate) `path` and write `header` at its start; with `header` None, open the file as it is
        to go on writing it (a `DirectShard` handing over)."""
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if header is not None else 0)
        self.fd = os.open(path, flags, 0o666)
        self._buffer = bytearray()
        self._buffer_offset = 0
        self._window: tuple[int, int] | None = None  # [start, end) written since the last window was sent
        self._window_bytes = 0
        self._in_flight: tuple[int, int] | None = None  # the window whose writeback was started
        if header is not None:
            self.write_at(0, memoryview(header))

    @classmethod
    def sync_file_range(cls) -> Callable | None:
        """Return Linux's sync_file_range(fd, offset, nbytes, flags) through ctypes, or None elsewhere."""
        if not cls._loaded:
            import ctypes
            import ctypes.util
            import sys

            cls._loaded = True
            if sys.platform.startswith("linux"):
                try:
                    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                    function = libc.sync_file_range
                    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
                    function.restype = ctypes.c_int
                    cls._sync_file_range = function
                except (OSError, AttributeError):
                    pass
        return cls._sync_file_range

    def write_at(self, offset: int, data: memoryview) -> None:
        """Write `data` at `offset` (small writes are gathered while they follow each other)."""
        if len(data) < self.BUFFER:
            if self._buffer and self._buffer_offset + len(self._buffer) == offset:
                self._buffer += data
            else:
                self._flush_buffer()
                self._buffer_offset, self._buffer = offset, bytearray(data)
            if len(self._buffer) >= self.BUFFER:
                self._flush_buffer()
            return
        self._flush_buffer()
        self._pwrite(offset, data)

    def _flush_buffer(self) -> None:
        if self._buffer:
            buffer, self._buffer = self._buffer, bytearray()
            self._pwrite(self._buffer_offset, memoryview(buffer))

    def _pwrite(self, offset: int, data: memoryview) -> None:
        start, end = offset, offset + len(data)
        while offset < end:
            offset += os.pwrite(self.fd, data[offset - start :], offset)
        window = self._window
        self._window = (start, end) if window is None else (min(window[0], start), max(window[1], end))
        self._window_bytes += end - start
        if self._window_bytes >= self.WINDOW:
            self._send_window()

    def _send_window(self) -> None:
        start, end = self._window
        self._window, self._window_bytes = None, 0
        if self.sync_file_range() is None:
            os.fdatasync(self.fd)
            self._drop(start, end)
            return
        if self._in_flight is not None:
            self._sync_range(*self._in_flight, self.WAIT_BEFORE | self.WRITE | self.WAIT_AFTER)
            self._drop(*self._in_flight)
        self._sync_range(start, end, self.WRITE)
        self._in_flight = (start, end)

    def _sync_range(self, start: int, end: int, flags: int) -> None:
        if self.sync_file_range()(self.fd, start, end - start, flags) != 0:
            import ctypes

            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))

    def _drop(self, start: int, end: int) -> None:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, start, end - start, os.POSIX_FADV_DONTNEED)

    def close(self, size: int | None = None) -> None:
        """Write what is buffered, cut the file at `size` bytes if given, fsync it, drop it from the page cache and
        close it."""
        try:
            self._flush_buffer()
            if size is not None:
                os.ftruncate(self.fd, size)
            os.fsync(self.fd)
            self._drop(0, 0)  # length 0: to the end of the file
        finally:
            os.close(self.fd)

    def abort(self) -> None:
        """Close the file as it is (the caller discards it)."""
        os.close(self.fd)


def aligned_buffer(nbytes: int) -> np.ndarray:
    """Return an uninitialised uint8 array of `nbytes` whose first byte is `ALIGNMENT`-aligned."""
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    shift = -raw.ctypes.data % ALIGNMENT
    return raw[shift : shift + nbytes]


def open_direct(path: Path) -> int | None:
    """Create (or truncate) `path` for O_DIRECT writes and return the descriptor, or None where the platform or the
    file system refuses them (EINVAL at the open or at a first aligned write: tmpfs before Linux 6.6, some network
    file systems).

    Raises:
        OSError: the file cannot be created or written for another reason (a read-only folder, a full disk).
    """
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o666)
    except OSError as err:
        if err.errno == errno.EINVAL:
            return None
        raise
    probe = aligned_buffer(ALIGNMENT)
    probe[:] = 0
    try:
        os.pwrite(descriptor, probe, 0)  # the header's bytes replace these zeros
    except OSError as err:
        os.close(descriptor)
        if err.errno == errno.EINVAL:
            return None
        raise
    return descriptor


class DirectShard:
    """One shard file written with O_DIRECT: its bytes are copied, in file order, into `DEPTH` reused aligned
    buffers of `STAGE` bytes; a full buffer is written by a thread of its own while the next one fills. On close
    the last partial block is padded with zeros, written, and the file cut to its size, then fsynced.

    A write that does not follow the previous one (the streaming writer allows any order; convert, merge and export
    write in file order) hands the file over to a `BufferedShard` for the rest: what was written stays.
    """

    STAGE = 16 * 2**20
    DEPTH = 2  # one written while one fills: a third did not change convert's time (alternating runs), and costs 16 MiB

    def __init__(self, path: Path, descriptor: int, header: bytes):
        """Take over `descriptor` (from `open_direct(path)`) and write `header` at the start of the file."""
        self.path = path
        self.fd = descriptor
        self._free: deque[np.ndarray] = deque()
        self._stage: np.ndarray | None = aligned_buffer(self.STAGE)
        self._stage_start = 0  # file offset of the stage's first byte
        self._fill = 0  # bytes in the stage
        self._end = 0  # file offset the next write must start at to stay direct
        self._size = 0  # the file's length once all is written
        self._writer = SerialWorker((self.DEPTH - 1) * self.STAGE, name="upcycle-direct-writer")
        self._buffered: BufferedShard | None = None
        self.write_at(0, memoryview(header))

    def write_at(self, offset: int, data: memoryview) -> None:
        """Write `data` at `offset`: copied into the stage if it follows the previous write, else through a
        `BufferedShard` from now on.

        Raises:
            OSError: an earlier stage's write failed (a full disk).
        """
        self._size = max(self._size, offset + len(data))
        if self._buffered is None and offset != self._end:
            self._hand_over()
        if self._buffered is not None:
            self._buffered.write_at(offset, data)
            return
        source = np.frombuffer(data, dtype=np.uint8)
        position = 0
        while position < len(source):
            take = min(len(source) - position, self.STAGE - self._fill)
            self._stage[self._fill : self._fill + take] = source[position : position + take]
            self._fill += take
            position += take
            if self._fill == self.STAGE:
                self._send(self.STAGE)
                self._stage = self._free.popleft() if self._free else aligned_buffer(self.STAGE)
        self._end += len(source)

    def _send(self, nbytes: int) -> None:
        """Queue the stage's first `nbytes` (a multiple of ALIGNMENT) for writing; the stage is then the writer's."""
        stage, start = self._stage, self._stage_start
        self._stage, self._stage_start, self._fill = None, start + self.STAGE, 0
        self._writer.submit(lambda: self._write_stage(stage, start, nbytes), self.STAGE)

    def _write_stage(self, stage: np.ndarray, start: int, nbytes: int) -> None:
        """On the writer's thread: write `stage[:nbytes]` at `start`, then give the stage back."""
        try:
            view, done = memoryview(stage)[:nbytes], 0
            while done < nbytes:
                done += os.pwrite(self.fd, view[done:], start + done)
        finally:
            self._free.append(stage)

    def _hand_over(self) -> None:
        """Write the queued stages, then go on through a `BufferedShard`, starting with the stage's bytes."""
        self._writer.drain()
        self._buffered = BufferedShard(self.path, None)
        if self._fill:
            self._buffered.write_at(self._stage_start, memoryview(self._stage[: self._fill]))
        self._stage, self._fill = None, 0
        self._free.clear()

    def close(self) -> None:
        """Write what is staged, cut the file to its size, fsync and close it.

        Raises:
            OSError: a write failed.
        """
        try:
            if self._buffered is None and self._fill:
                padded = -(-self._fill // ALIGNMENT) * ALIGNMENT
                self._stage[self._fill : padded] = 0
                self._send(padded)
            self._writer.drain()
            if self._buffered is not None:
                self._buffered.close(self._size)
            else:
                os.ftruncate(self.fd, self._size)
                os.fsync(self.fd)
        finally:
            self._writer.stop()
            os.close(self.fd)

    def abort(self) -> None:
        """Stop writing and close the file as it is (the caller discards it)."""
        self._writer.stop()
        if self._buffered is not None:
            self._buffered.abort()
        os.close(self.fd)


def open_shard(path: Path, header: bytes) -> DirectShard | BufferedShard:
    """Create (or truncate) the shard file `path`, write its `header`, and return the shard to write the rest with:
    a `DirectShard` where the file system takes O_DIRECT, else a `BufferedShard`.

    Raises:
        OSError: the file cannot be created or written.
    """
    descriptor = open_direct(path)
    if descriptor is None:
        return BufferedShard(path, header)
    return DirectShard(path, descriptor, header)
