"""Sharded checkpoints through the real Hub cache layout, and shard indexes that point outside.

`snapshot_download` stores each file once under `blobs/` and links it from `snapshots/<commit>/`,
so a sharded model pulled from the (fake) Hub is read through relative symlinks, which the shard
name check must allow; an index whose shard names leave the folder (`..`, a `/`, an absolute path)
is still refused, in one line, with nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub
from test_hub import TOKEN, hub_env, upcycle
from tiny_models import COMMON, logits
from transformers import AutoConfig, AutoModelForCausalLM
from tree_state import tree_state

from upcycle.cli import main

DENSE_ID = "org/sharded-llama"
MOE_ID = "org/sharded-moe"
SMALL_FILES = {"config.json", "generation_config.json", "model.safetensors.index.json"}


def shard_names(directory: Path) -> set[str]:
    return set(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"].values())


@pytest.fixture(scope="module")
def sharded_dense(tmp_path_factory) -> Path:
    """A tiny llama saved by transformers in 20 KB shards (five files and an index)."""
    directory = tmp_path_factory.mktemp("hostile-hub") / "sharded-llama"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **COMMON))
    model.save_pretrained(directory, max_shard_size="20KB")
    assert len(shard_names(directory)) > 1
    return directory


@pytest.fixture
def hub(sharded_dense):
    with FakeHub(tokens=(TOKEN,)) as server:
        server.add_model(DENSE_ID, sharded_dense)
        yield server


def test_sharded_model_from_the_hub_converts_through_the_cache_symlinks(hub, sharded_dense, tmp_path, input_ids):
    home, out = tmp_path / "hf", tmp_path / "moe"
    result = upcycle("convert", DENSE_ID, str(out), "--experts", "4", "--top-k", "2", "--quiet", env=hub_env(hub, home))
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr

    downloaded = {path.split("/resolve/", 1)[1].split("/", 1)[1] for name, path in hub.requests if name == "resolve"}
    assert downloaded == SMALL_FILES | shard_names(sharded_dense)
    (snapshot,) = (home / "hub" / "models--org--sharded-llama" / "snapshots").iterdir()
    for name in downloaded:  # read through snapshots/<commit>/<file> -> ../../blobs/<hash>
        link = snapshot / name
        assert link.is_symlink() and os.readlink(link).startswith("../../blobs/"), name
        assert link.resolve().parent == home / "hub" / "models--org--sharded-llama" / "blobs"

    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_local_experts"], config["upcycle"]["source"]) == ("mixtral", 4, DENSE_ID)
    assert (logits(out, input_ids) - logits(sharded_dense, input_ids)).abs().max() <= 1e-5


def test_sharded_moe_from_the_hub_inspects_and_merges(hub, sharded_dense, tmp_path, input_ids, capsys):
    moe = tmp_path / "moe"
    assert main(["convert", str(sharded_dense), str(moe), "--experts", "4", "--max-shard-size", "20KB", "--quiet"]) == 0
    assert len(shard_names(moe)) > 1
    hub.add_model(MOE_ID, moe)
    capsys.readouterr()
    assert main(["inspect", str(moe), "--json"]) == 0
    local = json.loads(capsys.readouterr().out)
    env = hub_env(hub, tmp_path / "hf")

    inspected = upcycle("inspect", MOE_ID, "--json", env=env)
    assert inspected.returncode == 0, inspected.stderr
    remote = json.loads(inspected.stdout)
    assert remote["source"] == MOE_ID and Path(remote["path"]).parent.name == "snapshots"
    assert {k: v for k, v in remote.items() if k not in ("source", "path")} == {
        k: v for k, v in local.items() if k not in ("source", "path")
    }
    assert (remote["kind"], remote["num_experts"], remote["top_k"]) == ("moe", 4, 2)

    merged = tmp_path / "dense"
    result = upcycle("merge", MOE_ID, str(merged), "--quiet", env=env)
    assert result.returncode == 0, result.stderr
    config = json.loads((merged / "config.json").read_text())
    assert config["model_type"] == "llama" and config["intermediate_size"] == COMMON["intermediate_size"]
    # the experts are copies of one FFN, so their average is that FFN: the dense model comes back
    assert (logits(merged, input_ids) - logits(sharded_dense, input_ids)).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "bad_name", ["..", "sub/model-00001-of-00005.safetensors", "ABSOLUTE"], ids=["dotdot", "slash", "absolute"]
)
def test_index_naming_a_shard_outside_the_folder_is_refused(bad_name, sharded_dense, tmp_path, capsys):
    source = tmp_path / "source"
    shutil.copytree(sharded_dense, source)
    first = sorted(shard_names(source))[0]
    (source / "sub").mkdir()  # every name the index gives exists: only its form is wrong
    shutil.copy(source / first, source / "sub" / first)
    if bad_name == "ABSOLUTE":
        bad_name = str((source / first).absolute())
    index = json.loads((source / "model.safetensors.index.json").read_text())
    index["weight_map"] = {tensor: bad_name if file == first else file for tensor, file in index["weight_map"].items()}
    (source / "model.safetensors.index.json").write_text(json.dumps(index))

    work = tmp_path / "work"
    work.mkdir()
    (work / "stranger.txt").write_text("not upcycle's")
    for pre_existing in (False, True):
        if pre_existing:
            (work / "out").mkdir()
            (work / "out" / "config.json").write_text('{"model_type": "mine"}\n')
        before = tree_state(work)
        capsys.readouterr()
        code = main(["convert", str(source), str(work / "out"), "--quiet", *(["--force"] if pre_existing else [])])
        err = capsys.readouterr().err
        assert code == 2
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("upcycle: error: "), err
        assert f"names shard {bad_name!r} outside the checkpoint directory" in lines[0]
        assert tree_state(work) == before
