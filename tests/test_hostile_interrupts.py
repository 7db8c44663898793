"""Runs stopped or raced while they write: SIGTERM, SIGHUP and SIGKILL mid-write, two runs into one
output, and a stranger's folder appearing at the output during a run.

The source is big enough that a conversion is still writing when the test acts (16 experts of a
512-wide, 4-layer llama: about 0.5 GB); each test waits until `OUT.tmp-*` holds a safetensors file.
Big outputs are deleted at the end of each test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import make_dense
from tree_state import tree_state

from upcycle.cli import main

EXPERTS = "16"


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hostile-big") / "llama"
    make_dense(directory, "llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=4, vocab_size=1000)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def work(tmp_path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "stranger.txt").write_text("not upcycle's")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def start(*argv: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return subprocess.Popen(
        [sys.executable, "-m", "upcycle.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def wait_mid_write(out: Path, process: subprocess.Popen | None = None, timeout: float = 60) -> Path:
    """Return the run's temporary directory once it holds a safetensors file with data in it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for temporary in out.parent.glob(f"{out.name}.tmp-*"):
            try:
                if any(f.stat().st_size > 0 for f in temporary.glob("*.safetensors")):
                    return temporary
            except FileNotFoundError:
                pass
        if process is not None and process.poll() is not None:
            pytest.fail(f"the run ended before writing: {process.communicate()}")
        time.sleep(0.02)
    if process is not None:
        process.kill()
    pytest.fail("the run never started writing")


def assert_loads_as_the_upcycled_source(out: Path, source: Path, experts: int) -> None:
    """config.json says `experts` experts, the weights are complete, and an expert (w1) is the dense FFN's gate_proj."""
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_local_experts"]) == ("mixtral", experts)
    shards = sorted(out.glob("*.safetensors"))
    names: set[str] = set()
    for shard in shards:
        with safe_open(str(shard), framework="pt") as reader:
            names |= set(reader.keys())
            if "model.layers.3.block_sparse_moe.experts.0.w1.weight" in reader.keys():
                expert = reader.get_tensor("model.layers.3.block_sparse_moe.experts.0.w1.weight")
    per_layer = 4 + 2 + 1 + 3 * experts  # attention, norms, router, experts
    assert len(names) == 4 * per_layer + 3  # + embeddings, final norm, lm_head
    with safe_open(str(source / "model.safetensors"), framework="pt") as reader:
        assert torch.equal(expert, reader.get_tensor("model.layers.3.mlp.gate_proj.weight"))


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_termination_signal_mid_write_leaves_nothing(signal_number, big, work):
    out = work / "out"
    force = []
    if signal_number == signal.SIGHUP:  # a pre-existing output, replaced only on success
        out.mkdir()
        (out / "config.json").write_text('{"model_type": "mine"}\n')
        (out / "model.safetensors").write_bytes(os.urandom(4096))
        force = ["--force"]
    before = tree_state(work)
    process = start("convert", str(big), str(out), "--experts", EXPERTS, "--quiet", *force)
    wait_mid_write(out, process)
    process.send_signal(signal_number)
    _, err = process.communicate(timeout=30)
    name = signal.Signals(signal_number).name
    assert process.returncode == 2
    assert err.splitlines() == [f"upcycle: error: interrupted by {name}; no output was written"]
    assert tree_state(work) == before  # no out.tmp-*, no lock file, the old output byte-identical


def test_sigkill_leaves_an_owned_temporary_that_the_next_run_removes(big, work, capsys):
    out = work / "out"
    process = start("convert", str(big), str(out), "--experts", EXPERTS, "--quiet")
    temporary = wait_mid_write(out, process)
    process.kill()
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert temporary.is_dir() and not out.exists()
    owner = (temporary / ".upcycle-owner").read_text()
    assert owner.startswith(f"pid {process.pid} on "), owner

    capsys.readouterr()
    code = main(["convert", str(big), str(out), "--experts", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.splitlines() == [
        f"upcycle: notice: removed {temporary}, left by a run that was killed ({owner.strip()})"
    ]
    assert sorted(p.name for p in work.iterdir()) == ["out", "stranger.txt"]
    assert not (out / ".upcycle-owner").exists()
    assert_loads_as_the_upcycled_source(out, big, 2)


def test_two_runs_into_one_output_one_wins_and_the_other_stops_at_once(big, work):
    # The first run is held (SIGSTOP) mid-write, so the second surely starts while the first owns
    # the output: started together, a fast first run could finish before the second one's Python
    # had even imported torch, and the second would then meet a finished output instead.
    out = work / "out"
    winner = start("convert", str(big), str(out), "--experts", EXPERTS, "--quiet")
    wait_mid_write(out, winner)
    winner.send_signal(signal.SIGSTOP)
    try:
        loser = start("convert", str(big), str(out), "--experts", EXPERTS, "--quiet")
        _, err = loser.communicate(timeout=60)
        running_temporaries = list(work.glob("out.tmp-*"))
    finally:
        winner.send_signal(signal.SIGCONT)
    _, winner_err = winner.communicate(timeout=60)
    assert (winner.returncode, loser.returncode) == (0, 2), (winner_err, err)
    assert err.splitlines() == [
        f"upcycle: error: another upcycle run (pid {winner.pid}) is writing {out}; "
        "wait for it to finish or choose another output"
    ]
    assert len(running_temporaries) == 1  # the loser made none of its own and left the winner's alone
    assert sorted(p.name for p in work.iterdir()) == ["out", "stranger.txt"]  # no temporary, no lock file
    assert_loads_as_the_upcycled_source(out, big, int(EXPERTS))


def test_a_folder_that_appears_at_the_output_mid_write_is_kept(big, work, capsys):
    out = work / "out"
    appeared = threading.Event()

    def stranger() -> None:
        wait_mid_write(out, timeout=60)
        out.mkdir()
        (out / "theirs.txt").write_text("a stranger's file")
        appeared.set()

    thread = threading.Thread(target=stranger, daemon=True)
    thread.start()
    capsys.readouterr()
    code = main(["convert", str(big), str(out), "--experts", EXPERTS, "--quiet"])
    err = capsys.readouterr().err
    thread.join(timeout=5)
    assert appeared.is_set()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"upcycle: error: {out} appeared while this run was writing"), err
    assert "it was left as it is and nothing was written" in lines[0]
    assert sorted(p.name for p in work.iterdir()) == ["out", "stranger.txt"]
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert (out / "theirs.txt").read_text() == "a stranger's file"
