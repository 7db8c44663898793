"""Hostile input and hostile file systems, run in-process through `upcycle.cli.main`.

Every refusal is checked the same way: exit code 2, exactly one stderr line starting
`upcycle: error:` with the expected words, and the output's folder exactly as it was before the
run (no `OUT`, no `OUT.tmp-*`, no lock file; a pre-existing `OUT` given with `--force`, and a
stranger's file next to it, byte-identical). Covers: config.json against the tensors, model_type
against architectures, option ranges, free disk space, a full disk, an unwritable output folder,
a lock path that is not a file, the final move failing, a signal during the final move, the
output's permissions against the umask, a mistyped local path, and a tokenizer larger than the
model's vocabulary.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from tiny_models import make_dense
from tree_state import tree_state

from upcycle.cli import main

EXAMPLE = Path(__file__).parents[1] / "examples" / "tiny-llama"


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def assert_one_error_line(code: int, err: str, *fragments: str) -> str:
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("upcycle: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_refused_and_untouched(
    capsys, work: Path, argv: Callable[[Path], list[str]], *fragments: str, force_flag: bool = True
) -> None:
    """Run `argv(OUT)` twice: without an OUT, and with a pre-existing OUT plus --force. Both times
    it must be refused in one line and leave `work` (OUT, a stranger's file, hidden files) as it was."""
    out = work / "out"
    (work / "stranger.txt").write_text("not upcycle's")
    before = tree_state(work)
    code, err = run_cli(capsys, *argv(out))
    assert_one_error_line(code, err, *fragments)
    assert tree_state(work) == before
    if not force_flag:
        return
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "mine"}\n')
    (out / "model.safetensors").write_bytes(os.urandom(256))
    before = tree_state(work)
    code, err = run_cli(capsys, *argv(out), "--force")
    assert_one_error_line(code, err, *fragments)
    assert tree_state(work) == before
    shutil.rmtree(out)


@pytest.fixture
def work(tmp_path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


@pytest.fixture
def llama(dense_models, tmp_path) -> Path:
    copy = tmp_path / "llama"
    shutil.copytree(dense_models["llama-gqa"], copy)
    return copy


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> Path:
    """A 2-expert MoE of a tiny llama (vocabulary 97, no tokenizer), converted once for this module."""
    root = tmp_path_factory.mktemp("hostile-moe")
    source = make_dense(root / "dense", "llama")
    assert main(["convert", str(source), str(root / "moe"), "--experts", "2", "--top-k", "1", "--quiet"]) == 0
    return root / "moe"


@pytest.fixture(scope="module")
def calibration_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hostile-text") / "calibration.txt"
    path.write_text("The quick brown fox jumps over the lazy dog.\n\nAnother paragraph of plain words to route.\n")
    return path


# --- config.json against the tensors ------------------------------------------------------------------------------


def edit_config(directory: Path, **fields) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(fields)
    (directory / "config.json").write_text(json.dumps(config))


SHAPE_CASES = {
    # field edited (tiny llama: hidden 32, 4 heads of 8, 2 KV heads, FFN 40, vocabulary 97, 2 layers)
    "hidden_size": (48, "model.embed_tokens.weight", "(97, 48)", "(97, 32)"),
    "num_attention_heads": (8, "model.layers.0.self_attn.q_proj.weight", "(64, 32)", "(32, 32)"),
    "num_key_value_heads": (4, "model.layers.0.self_attn.k_proj.weight", "(32, 32)", "(16, 32)"),
    "head_dim": (16, "model.layers.0.self_attn.q_proj.weight", "(64, 32)", "(32, 32)"),
    "vocab_size": (100, "model.embed_tokens.weight", "(100, 32)", "(97, 32)"),
    "intermediate_size": (48, "model.layers.0.mlp.gate_proj.weight", "(48, 32)", "(40, 32)"),
}


@pytest.mark.parametrize("field", list(SHAPE_CASES))
def test_config_field_that_disagrees_with_the_tensors_is_named_with_both_shapes(field, llama, work, capsys):
    value, tensor, declared, stored = SHAPE_CASES[field]
    edit_config(llama, **{field: value})
    assert_refused_and_untouched(
        capsys,
        work,
        lambda out: ["convert", str(llama), str(out), "--experts", "2", "--quiet"],
        field,
        tensor,
        f"the shape {declared}",
        f"the weights hold {stored}",
    )


@pytest.mark.parametrize(
    ("layers", "detail"), [(1, "tensors for layers [1] beyond them"), (3, "no tensors for layers [2]")]
)
def test_num_hidden_layers_fewer_or_more_than_the_weights_is_refused(layers, detail, llama, work, capsys):
    edit_config(llama, num_hidden_layers=layers)
    assert_refused_and_untouched(
        capsys,
        work,
        lambda out: ["convert", str(llama), str(out), "--experts", "2", "--quiet"],
        f"num_hidden_layers={layers}",
        detail,
    )


def test_model_type_and_architectures_that_disagree_are_refused(llama, work, capsys):
    edit_config(llama, architectures=["Qwen2ForCausalLM"])
    assert_refused_and_untouched(
        capsys,
        work,
        lambda out: ["convert", str(llama), str(out), "--experts", "2", "--quiet"],
        "model_type 'llama'",
        "Qwen2ForCausalLM",
    )


def test_a_model_type_whose_class_has_another_prefix_is_not_refused(tmp_path, work, capsys):
    # Gemma 3's text-only checkpoints (gemma-3-1b, gemma-3-270m) say model_type "gemma3_text" and
    # architectures ["Gemma3ForCausalLM"], as save_pretrained writes them: that is no disagreement.
    source = make_dense(
        tmp_path / "gemma3", "gemma3_text", head_dim=8, layer_types=["sliding_attention", "full_attention"]
    )
    config = json.loads((source / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("gemma3_text", ["Gemma3ForCausalLM"])
    out = work / "out"
    options = ["--experts", "2", "--top-k", "1", "--ffn-pattern", r"\.mlp$", "--quiet"]
    code, err = run_cli(capsys, "convert", str(source), str(out), *options)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["upcycle"]["num_experts"] == 2


# --- options --------------------------------------------------------------------------------------------------------

CONVERT_OPTIONS = [
    (["--router-std", "nan"], "--router-std must be a finite number, got nan"),
    (["--router-std", "-1"], "--router-std must be at least 0, got -1"),
    (["--noise", "inf"], "--noise must be a finite number, got inf"),
    (["--experts", "0"], "--experts must be at least 1, got 0"),
    (["--top-k", "3", "--experts", "2"], "--top-k must be between 1 and 2, got 3"),
    (["--max-shard-size", "0"], "the shard size must be at least 1 byte, got '0'"),
    (["--max-shard-size", "abc"], "cannot read size 'abc'"),
    (["--method", "drop", "--drop-ratio", "0"], "--drop-ratio must be above 0 and at most 1, got 0"),
    (["--calibration-samples", "0"], "--calibration-samples must be at least 1, got 0"),
]


@pytest.mark.parametrize(("options", "message"), CONVERT_OPTIONS, ids=[" ".join(o) for o, _ in CONVERT_OPTIONS])
def test_convert_option_out_of_range(options, message, work, capsys):
    assert_refused_and_untouched(
        capsys, work, lambda out: ["convert", str(EXAMPLE), str(out), *options, "--quiet"], message
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--density", "2"], "--density must be above 0 and at most 1, got 2"),
        (["--max-length", "0"], "--max-length must be at least 1, got 0"),
    ],
)
def test_merge_option_out_of_range(options, message, tiny_moe, work, capsys):
    assert_refused_and_untouched(
        capsys, work, lambda out: ["merge", str(tiny_moe), str(out), *options, "--quiet"], message
    )


def test_routes_capacity_factor_zero(tiny_moe, calibration_text, work, capsys):
    assert_refused_and_untouched(
        capsys,
        work,
        lambda out: (
            ["routes", str(tiny_moe), str(out), "--calibration", str(calibration_text)]
            + ["--capacity-factor", "0", "--quiet"]
        ),
        "--capacity-factor must be above 0, got 0",
    )


def test_more_experts_than_the_disk_holds_is_refused_before_writing(work, capsys, monkeypatch):
    # 100000 experts of the example (3 x 128 x 352 float32 per layer, 4 layers) are about 216 GB.
    # The fused layout keeps the plan at a few tensors; the per-expert one plans 1.2M tensors first.
    experts_bytes = 100_000 * 4 * 3 * 128 * 352 * 4
    real_free = shutil.disk_usage(work).free
    free = real_free
    if real_free > experts_bytes:  # a disk that really has room: pretend it has 50 GB
        free = 50 * 10**9
        usage = shutil.disk_usage(work)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=free))

    def argv(out: Path) -> list[str]:
        return ["convert", str(EXAMPLE), str(out), "--experts", "100000", "--layout", "fused", "--quiet"]

    assert_refused_and_untouched(capsys, work, argv, "needs about", "GB free", "nothing was written")
    code, err = run_cli(capsys, *argv(work / "out"))
    match = re.search(r"needs about ([\d.]+) GB but (\S+) has ([\d.]+) GB free", err)
    assert match, err
    assert experts_bytes / 1e9 <= float(match.group(1)) <= experts_bytes / 1e9 + 0.5
    assert Path(match.group(2)) == work
    assert abs(float(match.group(3)) - free / 1e9) < 1.0


# --- the file system refuses ------------------------------------------------------------------------------------------


def test_full_disk_mid_write_is_one_line_and_leaves_nothing(llama, work, capsys, monkeypatch):
    from upcycle.checkpoint.write import StreamingWriter

    write = StreamingWriter.write
    calls = []

    def full_after_one_tensor(self, name, tensor):
        if calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(self.directory) / "model.safetensors"))
        calls.append(name)
        write(self, name, tensor)

    monkeypatch.setattr(StreamingWriter, "write", full_after_one_tensor)

    def argv(out: Path) -> list[str]:
        calls.clear()
        return ["convert", str(llama), str(out), "--experts", "2", "--quiet"]

    assert_refused_and_untouched(
        capsys, work, argv, "no space left on the device while writing", "model.safetensors", "nothing was written at"
    )
    assert calls  # the write really started before the disk filled


def test_unwritable_output_folder_is_one_line(llama, work, capsys, monkeypatch):
    if os.geteuid() == 0:  # root ignores permissions: the folder refuses the temporary directory instead
        mkdtemp = tempfile.mkdtemp

        def refusing(*args, **kwargs):
            if Path(kwargs.get("dir") or "") == work:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(work))
            return mkdtemp(*args, **kwargs)

        monkeypatch.setattr(tempfile, "mkdtemp", refusing)
        assert_refused_and_untouched(
            capsys,
            work,
            lambda out: ["convert", str(llama), str(out), "--experts", "2", "--quiet"],
            "cannot write",
            "Permission denied",
            "nothing was written at",
        )
        return
    (work / "stranger.txt").write_text("not upcycle's")
    for pre_existing in (False, True):
        if pre_existing:
            (work / "out").mkdir()
            (work / "out" / "config.json").write_text("{}")
        before = tree_state(work)
        work.chmod(0o555)
        try:
            force = ["--force"] if pre_existing else []
            code, err = run_cli(capsys, "convert", str(llama), str(work / "out"), "--experts", "2", "--quiet", *force)
        finally:
            work.chmod(0o755)
        assert_one_error_line(code, err, "cannot write", "Permission denied", "nothing was written at")
        assert tree_state(work) == before


def test_lock_path_taken_by_a_folder_is_one_line(llama, work, capsys):
    (work / ".out.upcycle-lock").mkdir()
    assert_refused_and_untouched(
        capsys,
        work,
        lambda out: ["convert", str(llama), str(out), "--experts", "2", "--quiet"],
        "cannot write",
        ".out.upcycle-lock",
        "nothing was written at",
    )


def test_output_under_a_file_is_one_line(llama, work, capsys):
    (work / "a-file").write_text("mine")
    before = tree_state(work)
    code, err = run_cli(capsys, "convert", str(llama), str(work / "a-file" / "out"), "--experts", "2", "--quiet")
    assert_one_error_line(code, err, "cannot write", "a-file", "nothing was written at")
    assert tree_state(work) == before


def test_failed_final_move_with_force_puts_the_old_output_back(llama, work, capsys, monkeypatch):
    replace = os.replace

    def refuse_the_new_output(source, target):
        if ".tmp-" in Path(source).name and Path(target).name == "out":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(target))
        return replace(source, target)

    monkeypatch.setattr(os, "replace", refuse_the_new_output)
    out = work / "out"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "mine"}\n')
    before = tree_state(work)
    code, err = run_cli(capsys, "convert", str(llama), str(out), "--experts", "2", "--quiet", "--force")
    assert_one_error_line(code, err, "cannot write", "Input/output error", "nothing was written at")
    assert tree_state(work) == before  # no out.old-*, no out.tmp-*, the old output in place


def test_sigterm_before_the_final_move_writes_nothing(llama, work, capsys, monkeypatch):
    from upcycle.checkpoint import output as output_module

    fsync_directory = output_module._fsync_directory

    def signalled(directory):
        if ".tmp-" in Path(directory).name:
            signal.raise_signal(signal.SIGTERM)  # arrives while the complete temporary is synced
        fsync_directory(directory)

    monkeypatch.setattr(output_module, "_fsync_directory", signalled)
    assert_refused_and_untouched(
        capsys,
        work,
        lambda out: ["convert", str(llama), str(out), "--experts", "2", "--quiet"],
        "interrupted by SIGTERM; no output was written",
    )


def test_sigterm_during_the_rename_is_delivered_after_it(llama, work, capsys, monkeypatch):
    from upcycle.checkpoint import output as output_module

    move = output_module._move_into_place
    received = []

    def signalled(*args):
        move(*args)
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(output_module, "_move_into_place", signalled)
    previous = signal.signal(signal.SIGTERM, lambda number, frame: received.append(number))
    try:
        code, err = run_cli(capsys, "convert", str(llama), str(work / "out"), "--experts", "2", "--quiet")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 0, err
    assert received == [signal.SIGTERM]  # handed on to the handler in place after the run
    assert sorted(p.name for p in work.iterdir()) == ["out"]
    assert (work / "out" / "config.json").is_file() and not (work / "out" / ".upcycle-owner").exists()


def test_sigterm_between_the_two_renames_of_force_never_loses_the_old_output(llama, work, capsys, monkeypatch):
    replace = os.replace
    received = []

    def signalled(source, target):
        replace(source, target)
        if Path(source).name == "out":  # the old output was just moved aside; the new one is not in place yet
            signal.raise_signal(signal.SIGTERM)

    out = work / "out"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "mine"}\n')
    monkeypatch.setattr(os, "replace", signalled)
    previous = signal.signal(signal.SIGTERM, lambda number, frame: received.append(number))
    try:
        code, err = run_cli(capsys, "convert", str(llama), str(out), "--experts", "2", "--quiet", "--force")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 0, err
    assert received == [signal.SIGTERM]
    assert sorted(p.name for p in work.iterdir()) == ["out"]  # no out.old-*, no out.tmp-*
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"


# --- small ones -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "folder_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_output_permissions_follow_the_umask(umask, folder_mode, file_mode, llama, work, capsys):
    previous = os.umask(umask)
    try:
        code, err = run_cli(capsys, "convert", str(llama), str(work / "out"), "--experts", "2", "--quiet")
    finally:
        os.umask(previous)
    assert code == 0, err
    assert (work / "out").stat().st_mode & 0o777 == folder_mode
    files = sorted((work / "out").iterdir())
    assert {p.name for p in files} >= {"config.json", "model.safetensors", "README.md"}
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: file_mode for p in files}


def test_mistyped_local_path_offline_names_the_local_folder(work, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(EXAMPLE.parents[1])
    for argv in (["convert", "examples/tiny-lama", str(work / "out"), "--quiet"], ["inspect", "examples/tiny-lama"]):
        code, err = run_cli(capsys, *argv)
        line = assert_one_error_line(code, err, "examples/tiny-lama does not exist", "'tiny-lama'", "local folder")
        assert "could not reach the Hub" not in line and "HF_HUB_OFFLINE" not in line
    assert list(work.iterdir()) == []


def test_tokenizer_larger_than_the_vocabulary_for_routes(tiny_moe, calibration_text, work, capsys):
    assert_refused_and_untouched(
        capsys,
        work,
        lambda out: (
            ["routes", str(tiny_moe), str(out), "--calibration", str(calibration_text)]
            + ["--tokenizer", str(EXAMPLE), "--quiet"]
        ),
        "the tokenizer gives token id",
        "the model's vocabulary has 97 entries",
    )


def test_tokenizer_larger_than_the_vocabulary_for_kmeans_router_init(llama, calibration_text, work, capsys):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EXAMPLE / name, llama / name)  # a 2048-entry tokenizer on a 97-entry model
    assert_refused_and_untouched(
        capsys,
        work,
        lambda out: (
            ["convert", str(llama), str(out), "--experts", "2", "--router-init", "kmeans"]
            + ["--calibration", str(calibration_text), "--quiet"]
        ),
        "the tokenizer gives token id",
        "the model's vocabulary has 97 entries",
    )
