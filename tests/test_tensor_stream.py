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
