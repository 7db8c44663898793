"""Pull from and push to a fake Hub on 127.0.0.1 through the real huggingface_hub client.

Each case runs the `upcycle` CLI in a subprocess: huggingface_hub reads HF_ENDPOINT, HF_HOME and
HF_HUB_OFFLINE when it is imported, so the environment must be set before the process starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fake_hub import FakeHub

EXAMPLE = Path(__file__).parents[1] / "examples" / "tiny-llama"
TOKEN = "hf_fake_write_token"
SOURCE_ID = "org/tiny-llama"
# Files a Hub repo often carries that a conversion must not download.
UNNEEDED_FILES = {
    "consolidated.safetensors": b"a second full copy of the weights",
    "original/model.safetensors": b"weights in a subfolder",
    "pytorch_model.bin": b"pickle",
    "flax_model.msgpack": b"flax",
}


@pytest.fixture
def hub():
    with FakeHub(tokens=(TOKEN,)) as server:
        server.add_model(SOURCE_ID, EXAMPLE)
        server.repos[SOURCE_ID].branches["main"].update(UNNEEDED_FILES)
        yield server


def hub_env(hub: FakeHub, home: Path, token: str | None = TOKEN, **extra: str) -> dict[str, str]:
    """The environment of a user pointed at the fake Hub, with a fresh HF_HOME (cache, stored token)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HOME=str(home),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error",
        **extra,
    )
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def upcycle(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "upcycle.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def folder_state(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under `folder` with its sha256 and modification time."""
    return {
        str(path.relative_to(folder)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A finished local conversion of the shipped example (no Hub involved)."""
    from upcycle import convert

    out = tmp_path_factory.mktemp("converted") / "tiny-moe"
    convert(EXAMPLE, out, experts=4, top_k=2, quiet=True, command="upcycle convert tiny-llama tiny-moe")
    return out


def test_convert_from_hub_id_then_push_uploads_every_file_in_one_commit(hub, tmp_path):
    out = tmp_path / "tiny-moe"
    result = upcycle(
        "convert", SOURCE_ID, str(out), "--experts", "4", "--top-k", "2", "--push-to-hub", "me/tiny-moe",
        env=hub_env(hub, tmp_path / "hf"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stdout + result.stderr

    downloaded = {path.split("/resolve/", 1)[1].split("/", 1)[1] for name, path in hub.requests if name == "resolve"}
    assert downloaded == {p.name for p in EXAMPLE.iterdir()}
    assert not downloaded & set(UNNEEDED_FILES)

    assert [c.repo_id for c in hub.commits] == ["me/tiny-moe"]
    commit = hub.commits[0]
    local_files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert commit.files == local_files
    assert commit.revision == "main" and commit.authorization == f"Bearer {TOKEN}"
    assert "upcycle" in commit.summary and SOURCE_ID in commit.summary and "4 experts, top-2" in commit.summary
    assert hub.created == [{"name": "tiny-moe", "organization": "me", "type": "model"}]

    card = commit.files["README.md"].decode()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == SOURCE_ID
    assert front["base_model_relation"] == "finetune"
    assert {"moe", "upcycled", "mixtral"} <= set(front["tags"])
    assert 'from_pretrained("me/tiny-moe")' in card
    assert "--push-to-hub me/tiny-moe" in card and TOKEN not in card
    assert json.loads(local_files["config.json"])["upcycle"]["source"] == SOURCE_ID
    assert f"pushed {out} to {hub.endpoint}/me/tiny-moe" in result.stdout


def test_push_creates_a_private_repo_and_the_branch_it_pushes_to(hub, tmp_path, converted):
    result = upcycle(
        "push", str(converted), "me/private-moe", "--private", "--branch", "dev",
        "--commit-message", "first experts",
        env=hub_env(hub, tmp_path / "hf"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert hub.created == [{"name": "private-moe", "organization": "me", "visibility": "private", "type": "model"}]
    assert hub.repos["me/private-moe"].private
    assert "dev" in hub.repos["me/private-moe"].branches
    assert [(c.revision, c.summary) for c in hub.commits] == [("dev", "first experts")]
    assert set(hub.commits[0].files) == {p.name for p in converted.iterdir()}
    assert hub.repos["me/private-moe"].branches["main"] == {}


def test_failed_commit_is_one_clear_line_and_leaves_the_output_untouched(hub, tmp_path, converted):
    before = folder_state(converted)
    hub.fail_on["commit"] = 500
    result = upcycle("push", str(converted), "me/tiny-moe", env=hub_env(hub, tmp_path / "hf"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("upcycle: error: could not upload the files for me/tiny-moe")
    assert "500" in lines[0] and "retry the push" in lines[0]
    assert hub.commits == [] and "commit" in hub.endpoints_called()
    assert folder_state(converted) == before
    assert sorted(p.name for p in converted.parent.iterdir()) == [converted.name]


def test_rejected_token_gives_a_clear_error_that_never_shows_the_token(hub, tmp_path, converted):
    secret = "hf_wrongSecretToken1234567890"
    result = upcycle("push", str(converted), "me/tiny-moe", env=hub_env(hub, tmp_path / "hf", token=secret))
    assert result.returncode == 2
    assert "401" in result.stderr and "token was rejected" in result.stderr
    assert secret not in result.stdout + result.stderr
    assert "preupload" not in hub.endpoints_called() and hub.commits == []


def test_missing_token_fails_before_converting_or_contacting_the_hub(hub, tmp_path):
    out = tmp_path / "tiny-moe"
    result = upcycle(
        "convert", str(EXAMPLE), str(out), "--push-to-hub", "me/tiny-moe", env=hub_env(hub, tmp_path / "hf", token=None)
    )
    assert result.returncode == 2
    assert "needs a token" in result.stderr and "HF_TOKEN" in result.stderr
    assert hub.requests == [] and not out.exists()


def test_inspect_hub_id_then_offline_uses_the_cache_and_fails_clearly_without_it(hub, tmp_path):
    home = tmp_path / "hf"
    online = upcycle("inspect", SOURCE_ID, "--json", env=hub_env(hub, home))
    assert online.returncode == 0, online.stderr
    assert json.loads(online.stdout)["kind"] == "dense"
    calls = len(hub.requests)

    offline = upcycle("inspect", SOURCE_ID, "--json", env=hub_env(hub, home, HF_HUB_OFFLINE="1"))
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout) == json.loads(online.stdout)
    assert len(hub.requests) == calls

    shutil.rmtree(home)
    missing = upcycle("inspect", SOURCE_ID, env=hub_env(hub, home, HF_HUB_OFFLINE="1"))
    assert missing.returncode == 2
    assert "HF_HUB_OFFLINE is set and org/tiny-llama is not in the Hub cache" in missing.stderr
    assert len(hub.requests) == calls


def test_unknown_revision_is_named_in_the_error(hub, tmp_path):
    result = upcycle("inspect", SOURCE_ID, "--revision", "v9", env=hub_env(hub, tmp_path / "hf"))
    assert result.returncode == 2
    assert result.stderr.strip() == "upcycle: error: org/tiny-llama has no revision 'v9'; check --revision"
