"""Bad input: one line on stderr naming the problem, exit code 2, and nothing written."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tiny_models import make_dense

from upcycle.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop what building the fixture printed
    code = main(["convert", *args, "--quiet"])
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, output: Path, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("upcycle: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not output.exists()
    leftovers = [p.name for p in output.parent.iterdir() if p.name.startswith(f"{output.name}.tmp-")]
    assert leftovers == []


@pytest.fixture
def llama(dense_models, tmp_path) -> Path:
    copy = tmp_path / "llama"
    shutil.copytree(dense_models["llama-gqa"], copy)
    return copy


def test_missing_path(tmp_path, capsys):
    code, err = run_cli([str(tmp_path / "nope"), str(tmp_path / "out")], capsys)
    assert_refused(code, err, tmp_path / "out", "does not exist")


def test_directory_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = run_cli([str(tmp_path / "empty"), str(tmp_path / "out")], capsys)
    assert_refused(code, err, tmp_path / "out", "no config.json")


def test_stock_target_for_unsupported_model_type_lists_supported_pairs(tmp_path, capsys):
    # `--target auto` falls back to the generic format for such a model; a stock target is refused.
    source = make_dense(tmp_path / "gpt2", "gpt2", vocab_size=50, n_embd=16, n_layer=1, n_head=2)
    code, err = run_cli([str(source), str(tmp_path / "out"), "--target", "mixtral"], capsys)
    assert_refused(code, err, tmp_path / "out", "'gpt2'", "llama->mixtral", "olmo2->flex_olmo")


def test_llama_with_attention_bias_cannot_be_mixtral(tmp_path, capsys):
    source = make_dense(
        tmp_path / "biased",
        "llama",
        hidden_size=16,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=20,
        attention_bias=True,
    )
    code, err = run_cli([str(source), str(tmp_path / "out"), "--target", "mixtral"], capsys)
    assert_refused(code, err, tmp_path / "out", "attention_bias=True", "mixtral")


@pytest.mark.parametrize(
    ("options", "fragment"),
    [(["--experts", "2", "--top-k", "3"], "--top-k"), (["--experts", "0"], "--experts")],
)
def test_bad_expert_counts(llama, tmp_path, capsys, options, fragment):
    code, err = run_cli([str(llama), str(tmp_path / "out"), *options], capsys)
    assert_refused(code, err, tmp_path / "out", fragment)


def test_existing_output_needs_force(llama, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["convert", str(llama), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["convert", str(llama), str(out), "--quiet", "--force"]) == 0
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()


def test_truncated_safetensors(llama, tmp_path, capsys):
    weights = llama / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    code, err = run_cli([str(llama), str(tmp_path / "out")], capsys)
    assert_refused(code, err, tmp_path / "out", "truncated or corrupt")


def test_shard_index_pointing_outside_the_checkpoint(llama, tmp_path, capsys):
    (tmp_path / "x.safetensors").write_bytes((llama / "model.safetensors").read_bytes())
    (llama / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../x.safetensors"}}
    (llama / "model.safetensors.index.json").write_text(json.dumps(index))
    code, err = run_cli([str(llama), str(tmp_path / "out")], capsys)
    assert_refused(code, err, tmp_path / "out", "outside the checkpoint directory", "../x.safetensors")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_that_would_run_code_is_refused(llama, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (llama / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "payload": _RunsCode()}, llama / "pytorch_model.bin")
    code, err = run_cli([str(llama), str(tmp_path / "out")], capsys)
    assert_refused(code, err, tmp_path / "out", "refusing to load", "weights-only")
    assert not (tmp_path / "PWNED").exists()


def test_plain_pytorch_bin_checkpoint_converts(llama, tmp_path, input_ids):
    from safetensors.torch import load_file
    from tiny_models import logits

    state = load_file(llama / "model.safetensors")
    (llama / "model.safetensors").unlink()
    torch.save(state, llama / "pytorch_model.bin")
    assert main(["convert", str(llama), str(tmp_path / "out"), "--quiet", "--experts", "2", "--top-k", "1"]) == 0
    reference = tmp_path / "reference"
    shutil.copytree(llama, reference)
    assert (logits(tmp_path / "out", input_ids) - logits(reference, input_ids)).abs().max() <= 1e-5


SLOW_CONVERT = textwrap.dedent(
    """
    import signal, sys, time
    import upcycle.checkpoint as checkpoint
    from upcycle.cli import main
    # Ctrl-C's KeyboardInterrupt even when started with SIGINT ignored (inherited from a shell's background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    write = checkpoint.StreamingWriter.write
    def slow_write(self, name, tensor):
        write(self, name, tensor)
        time.sleep(0.2)
    checkpoint.StreamingWriter.write = slow_write
    # every tensor straight to its file: the writer otherwise gathers bytes in memory (16 MiB direct stages,
    # or 8 MiB of small tensors), so this tiny model's shard showed data only as it closed, 0.8 s before the
    # end (and the signal could come late)
    checkpoint.shards.BufferedShard.BUFFER = 1
    checkpoint.shards.DirectShard.STAGE = checkpoint.shards.ALIGNMENT
    sys.exit(main(sys.argv[1:]))
    """
)


def test_sigint_half_way_leaves_nothing_behind(llama, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_CONVERT, "convert", str(llama), str(out), "--quiet"],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        temporary = [p for p in tmp_path.iterdir() if p.name.startswith("out.tmp-")]
        if temporary and any(f.stat().st_size > 0 for f in temporary[0].glob("*.safetensors")):
            break
        time.sleep(0.05)
    else:
        process.kill()
        pytest.fail("conversion never started writing")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert err.strip().splitlines() == ["upcycle: error: interrupted; no output was written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]
