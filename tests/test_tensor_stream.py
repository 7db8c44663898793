"""`TensorStream`: tensors read ahead with O_DIRECT on a background thread, and their memory reused."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from upcycle.checkpoint import open_checkpoint


def _checkpoint(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(33, 17, generator=generator).bfloat16(),  # sizes off the 4 KiB blocks
        "b": torch.randn(33, 17, generator=generator).bfloat16(),
        "c": torch.randn(1000, 5, generator=generator),
        "d": torch.randn(33, 17, generator=generator).bfloat16(),
        "e": torch.arange(7, dtype=torch.int64),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    return tensors, open_checkpoint(tmp_path).tensors


def test_reads_equal_the_safetensors_reader_in_any_order_and_with_reused_memory(tmp_path):
    tensors, lazy = _checkpoint(tmp_path)
    stream = lazy.stream(budget=1 << 15)  # a tensor or two ahead, and as much memory kept for reuse
    stream.request(["a", "b", "c", "d", "e"])
    a = stream.take("a")
    assert torch.equal(a, tensors["a"]) and stream.issued(a) and stream.issued(a[3:])
    address = a.untyped_storage().data_ptr()
    stream.release([a[1:], a])  # views of one buffer: released once
    assert not stream.issued(a)
    del a
    b = stream.take("b")
    assert torch.equal(b, tensors["b"])
    stream.release([b])
    for name in ("c", "d", "e"):
        assert torch.equal(stream.take(name), tensors[name]), name
    # "d" has "a"'s size: it was read into a released buffer, whose old contents are gone.
    stream.request(["a"])
    again = stream.take("a")
    assert torch.equal(again, tensors["a"])
    assert address in {again.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()}


def test_a_name_taken_without_a_request_is_read_on_the_spot_and_not_recycled(tmp_path):
    tensors, lazy = _checkpoint(tmp_path)
    stream = lazy.stream(budget=1 << 20)
    c = stream.take("c")
    assert torch.equal(c, tensors["c"]) and not stream.issued(c)
    stream.release([c])  # not the stream's memory: ignored
    assert torch.equal(c, tensors["c"])


def test_memory_kept_for_reuse_and_read_ahead_stay_within_the_budget(tmp_path):
    """Buffers handed back are kept for reuse only while they and the tensors read ahead fit in the budget:
    the stream never holds more than its budget (it held up to twice that)."""
    generator = torch.Generator().manual_seed(1)
    tensors = {name: torch.randn(64, 64, generator=generator) for name in "abcdef"}  # 16 KiB each
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    lazy = open_checkpoint(tmp_path).tensors
    probe = lazy.stream(budget=1 << 30)
    probe.request(["a"])
    buffer_bytes = probe.take("a").untyped_storage().nbytes()  # 16 KiB and the alignment slack
    stream = lazy.stream(budget=2 * buffer_bytes)

    def kept() -> int:
        return sum(size * len(buffers) for size, buffers in stream._free.items())

    stream.request(list("abcdef"))
    taken = [stream.take("a"), stream.take("b")]
    for name in "cd":  # the stream reads two ahead, its whole budget
        assert torch.equal(stream._futures[name].result(), tensors[name])
    stream.release(taken)
    assert kept() == 0  # read-ahead and kept buffers together would exceed the budget
    for name in "cdef":
        tensor = stream.take(name)
        assert torch.equal(tensor, tensors[name])
        stream.release([tensor])
        assert kept() + stream._held <= 2 * buffer_bytes
    assert 0 < kept() <= 2 * buffer_bytes  # nothing left to read: what is handed back is kept
