"""The shard files the streaming writer writes: with O_DIRECT through aligned buffers (`DirectShard`), or through the
page cache (`BufferedShard`) where the file system refuses O_DIRECT or the writes leave file order; the same bytes
either way, the file cut to its exact size, a failed write raised."""

from __future__ import annotations

import errno
import os
import random
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from upcycle.checkpoint import shards
from upcycle.checkpoint.shards import ALIGNMENT, BufferedShard, DirectShard, open_direct, open_shard
from upcycle.checkpoint.write import StreamingWriter, TensorSpec


def pieces(total: int, seed: int) -> list[tuple[int, bytes]]:
    """Return (offset, bytes) pieces of odd sizes covering [0, total) in file order."""
    generator = random.Random(seed)
    out, offset = [], 0
    while offset < total:
        size = min(total - offset, generator.choice([1, 7, 4095, 4096, 4097, 3 * ALIGNMENT + 5, 20000]))
        out.append((offset, generator.randbytes(size)))
        offset += size
    return out


def plain_direct_shard(path, header: bytes) -> DirectShard:
    """A DirectShard on an ordinary descriptor: the same staging and ordering logic on any file system."""
    return DirectShard(path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), header)


@pytest.fixture
def small_stages(monkeypatch):
    monkeypatch.setattr(DirectShard, "STAGE", 2 * ALIGNMENT)


@pytest.mark.parametrize("total", [100, ALIGNMENT, 2 * ALIGNMENT, 50_000, 200_003])
def test_direct_shard_writes_the_bytes_in_order_and_cuts_the_file_to_size(small_stages, tmp_path, total):
    header, body = pieces(total, seed=total)[0][1], pieces(total, seed=total)[1:]
    path = tmp_path / "shard.safetensors"
    shard = plain_direct_shard(path, header)
    for offset, data in body:
        shard.write_at(offset, memoryview(data))
    shard.close()
    assert path.read_bytes() == header + b"".join(data for _, data in body)


def test_writes_out_of_file_order_hand_over_to_the_page_cache_with_the_same_bytes(small_stages, tmp_path):
    chunks = pieces(60_000, seed=1)
    header, body = chunks[0][1], chunks[1:]
    in_order, tail = body[: len(body) // 2], body[len(body) // 2 :]
    random.Random(2).shuffle(tail)  # the first half streams through the stages, the rest comes in any order
    path = tmp_path / "shard.safetensors"
    shard = plain_direct_shard(path, header)
    for offset, data in in_order + tail:
        shard.write_at(offset, memoryview(data))
    assert shard._buffered is not None
    shard.close()
    assert path.read_bytes() == header + b"".join(data for _, data in body)


def test_direct_writes_are_aligned_and_stages_are_reused(small_stages, tmp_path, monkeypatch):
    writes, allocated = [], []
    pwrite, allocate = os.pwrite, shards.aligned_buffer

    def recording_pwrite(fd, data, offset):
        writes.append((np.frombuffer(data, np.uint8).ctypes.data, len(data), offset))
        time.sleep(0.001)  # a slow disk: the writer must wait for a free stage, not allocate one
        return pwrite(fd, data, offset)

    def counting_allocate(nbytes):
        allocated.append(nbytes)
        return allocate(nbytes)

    monkeypatch.setattr(shards.os, "pwrite", recording_pwrite)
    monkeypatch.setattr(shards, "aligned_buffer", counting_allocate)
    chunks = pieces(300_000, seed=3)
    path = tmp_path / "shard.safetensors"
    shard = plain_direct_shard(path, chunks[0][1])
    for offset, data in chunks[1:]:
        shard.write_at(offset, memoryview(data))
    shard.close()
    assert path.read_bytes() == b"".join(data for _, data in chunks)
    assert len(writes) >= 300_000 // DirectShard.STAGE
    assert all(value % ALIGNMENT == 0 for write in writes for value in write)  # address, length, offset
    assert len(allocated) <= DirectShard.DEPTH


def test_a_failed_stage_write_is_raised_and_the_file_can_be_aborted(small_stages, tmp_path, monkeypatch):
    pwrite = os.pwrite

    def full_disk(fd, data, offset):
        if offset >= 4 * ALIGNMENT:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return pwrite(fd, data, offset)

    monkeypatch.setattr(shards.os, "pwrite", full_disk)
    chunks = pieces(200_000, seed=4)
    shard = plain_direct_shard(tmp_path / "shard.safetensors", chunks[0][1])
    with pytest.raises(OSError, match="No space left") as raised:
        for offset, data in chunks[1:]:
            shard.write_at(offset, memoryview(data))
    assert raised.value.errno == errno.ENOSPC
    shard.abort()
    assert not _is_open(shard.fd)
    assert not [thread for thread in threading.enumerate() if thread.name == "upcycle-direct-writer"]


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.mark.parametrize("refused_at", ["open", "first write"])
def test_a_file_system_refusing_o_direct_gets_the_buffered_shard(tmp_path, monkeypatch, refused_at):
    if not hasattr(os, "O_DIRECT"):
        assert isinstance(open_shard(tmp_path / "shard.safetensors", b"header!!"), BufferedShard)
        return
    real_open, real_pwrite, real_close = os.open, os.pwrite, os.close
    direct_descriptors, closed = set(), []

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            if refused_at == "open":
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            descriptor = real_open(path, flags & ~os.O_DIRECT, *args)  # opens, then refuses the writes
            direct_descriptors.add(descriptor)
            return descriptor
        return real_open(path, flags, *args)

    def refusing_pwrite(fd, data, offset):
        if fd in direct_descriptors:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_pwrite(fd, data, offset)

    def closing(fd):
        if fd in direct_descriptors:
            direct_descriptors.discard(fd)
            closed.append(fd)
        real_close(fd)

    monkeypatch.setattr(shards.os, "open", refusing_open)
    monkeypatch.setattr(shards.os, "pwrite", refusing_pwrite)
    monkeypatch.setattr(shards.os, "close", closing)
    shard = open_shard(tmp_path / "shard.safetensors", b"header!!")
    assert isinstance(shard, BufferedShard)
    shard.write_at(8, memoryview(b"data"))
    shard.close()
    assert (tmp_path / "shard.safetensors").read_bytes() == b"header!!data"
    assert not direct_descriptors  # the refused descriptor was closed
    assert len(closed) == (refused_at == "first write")


def test_streaming_writer_output_loads_whatever_the_order_of_the_tensors(tmp_path, monkeypatch):
    monkeypatch.setattr(DirectShard, "STAGE", 4 * ALIGNMENT)
    generator = torch.Generator().manual_seed(0)
    tensors = {
        f"t{index}": torch.randn(shape, generator=generator).to(dtype)
        for index, (shape, dtype) in enumerate(
            [((3, 5), torch.float32), ((1000,), torch.bfloat16), ((7, 300), torch.float16), ((4097,), torch.float32)]
        )
    }
    for order in (list(tensors), list(reversed(tensors))):
        directory = tmp_path / "-".join(order)
        directory.mkdir()
        writer = StreamingWriter(directory, [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()])
        for name in order:
            writer.write(name, tensors[name])
        writer.close()
        loaded = load_file(directory / "model.safetensors")
        assert loaded.keys() == tensors.keys()
        assert all(torch.equal(loaded[name], tensors[name]) for name in tensors)


def test_shards_on_this_file_system_are_written_direct_where_it_takes_o_direct(tmp_path):
    descriptor = open_direct(tmp_path / "probe")
    expected = BufferedShard if descriptor is None else DirectShard
    if descriptor is not None:
        os.close(descriptor)
    shard = open_shard(tmp_path / "shard.safetensors", b"12345678")
    shard.write_at(8, memoryview(b"abc"))
    shard.close()
    assert isinstance(shard, expected)
    assert (tmp_path / "shard.safetensors").read_bytes() == b"12345678abc"
