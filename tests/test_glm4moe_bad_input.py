"""Bad GLM-4-MoE settings: one line `upcycle: error: ...`, exit code 2, and the folder tree untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import make_dense
from tree_state import tree_state

from upcycle.cli import main

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder holding the tiny sources; every refused run must leave it byte-identical."""
    root = tmp_path_factory.mktemp("glm4moe-bad")
    make_dense(root / "llama", "llama", **TINY)
    make_dense(root / "mistral-sliding", "mistral", sliding_window=4, **TINY)
    make_dense(root / "mistral-default", "mistral", **TINY)  # transformers' default window 4096
    make_dense(root / "qwen2-sliding", "qwen2", use_sliding_window=True, sliding_window=4, **TINY)
    make_dense(root / "llama-bias", "llama", attention_bias=True, **TINY)
    return root


def refused(capsys, work: Path, source: str, options: list[str], *fragments: str) -> str:
    """Run `convert` with `options`; assert one error line with `fragments`, exit 2 and nothing written."""
    before = tree_state(work)
    capsys.readouterr()
    code = main(["convert", str(work / source), str(work / "out"), *options, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("upcycle: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert tree_state(work) == before
    return lines[0]


GLM = ["--target", "glm4_moe"]


@pytest.mark.parametrize(
    ("source", "fragments"),
    [
        ("mistral-sliding", ("sliding_window=4", "glm4_moe has no sliding window", "--target mixtral")),
        ("mistral-default", ("sliding_window=4096", "glm4_moe has no sliding window")),
        ("qwen2-sliding", ("use_sliding_window=True", "glm4_moe has no sliding window")),
        ("llama-bias", ("attention_bias=True", "o_proj")),
    ],
)
def test_sources_glm4moe_cannot_express_are_refused(capsys, work, source, fragments):
    refused(capsys, work, source, GLM, *fragments)


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (["--expert-groups", "4", "--top-groups", "5"], ("--top-groups must be between 1 and 4", "got 5")),
        (["--expert-groups", "0"], ("--expert-groups must be at least 1",)),
        (["--top-groups", "0"], ("--top-groups must be at least 1",)),
        (["--experts", "6", "--expert-groups", "4"], ("--experts 6 do not split into --expert-groups 4",)),
        (["--experts", "4", "--expert-groups", "4"], ("1 expert per group", "at most 2 groups")),
        (
            ["--experts", "8", "--top-k", "3", "--expert-groups", "4", "--top-groups", "1"],
            ("--top-groups 1 of 2 experts each cannot hold the 3 experts",),
        ),
        # 2 copies of 3 routed shards: 3 groups of 2 experts would split copies (top-k would pick halves).
        (
            ["--method", "granular", "--granularity", "3", "--experts", "2", "--top-k", "1", "--expert-groups", "3"],
            ("--experts 2 do not split into --expert-groups 3 equal groups of whole FFN copies",),
        ),
        (["--routed-scaling", "0"], ("--routed-scaling must be above 0", "got 0.0")),
        (["--routed-scaling", "-2.5"], ("--routed-scaling must be above 0",)),
        (["--routed-scaling", "nan"], ("--routed-scaling must be a finite number",)),
        (["--routed-scaling", "inf"], ("--routed-scaling must be a finite number",)),
        (["--moe-layers", "0"], ("keeps only its first layers dense", "[1]", "--moe-layers N-")),
        (["--moe-layers", "every:2", "--experts", "2"], ()),  # layers [1] are MoE, layer 0 dense: accepted
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_bad_grouped_router_settings_are_refused(capsys, work, options, fragments, tmp_path):
    if not fragments:  # the accepted control case
        assert main(["convert", str(work / "llama"), str(tmp_path / "ok"), *GLM, *options, "--quiet"]) == 0
        return
    refused(capsys, work, "llama", [*GLM, *options], *fragments)


@pytest.mark.parametrize(
    ("target", "options", "fragments"),
    [
        ("auto", ["--expert-groups", "2"], ("mixtral has no grouped sigmoid router", "--expert-groups")),
        ("mixtral", ["--top-groups", "1"], ("mixtral has no grouped sigmoid router", "--target glm4_moe")),
        ("qwen2_moe", ["--routed-scaling", "2.5"], ("qwen2_moe has no grouped sigmoid router", "--routed-scaling")),
        ("mixtral", ["--shared-experts", "1"], ("mixtral has no shared expert",)),
        ("generic", ["--expert-groups", "2"], ("--expert-groups",)),
    ],
)
def test_grouped_router_options_for_a_target_without_those_fields_are_refused(capsys, work, target, options, fragments):
    refused(capsys, work, "llama", ["--target", target, *options], *fragments)
