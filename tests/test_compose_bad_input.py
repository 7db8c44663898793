"""`upcycle compose` bad input: one line on stderr naming the problem, exit code 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_compose_support import recipe_file
from tiny_models import make_dense

from upcycle.cli import main
from upcycle.compose import compose
from upcycle.errors import UpcycleError


@pytest.fixture(scope="module")
def models(dense_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compose-bad")
    return {
        "llama": dense_models["llama-gqa"],
        "qwen2": dense_models["qwen2"],
        "wide": make_dense(root / "wide", "llama", hidden_size=64),
    }


def refused(tmp_path: Path, capsys, recipe: dict, *fragments: str, args: tuple[str, ...] = ()) -> None:
    path = recipe_file(tmp_path, recipe)
    output = tmp_path / "out"
    capsys.readouterr()
    code = main(["compose", str(path), str(output), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("upcycle: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not output.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out.tmp-")] == []


def test_source_of_another_shape_names_the_source_and_field(models, tmp_path, capsys):
    recipe = {
        "base": str(models["llama"]),
        "router_init": "random",
        "experts": [str(models["llama"]), str(models["wide"])],
    }
    refused(tmp_path, capsys, recipe, "experts[1]", str(models["wide"]), "hidden_size is 64", "has 32")


def test_source_of_another_model_type(models, tmp_path, capsys):
    recipe = {"base": str(models["llama"]), "router_init": "random", "experts": [str(models["qwen2"])] * 2}
    refused(tmp_path, capsys, recipe, "experts[0]", "model_type is 'qwen2'", "'llama'")


def test_fewer_experts_than_top_k(models, tmp_path, capsys):
    recipe = {"base": str(models["llama"]), "router_init": "random", "top_k": 3, "experts": [str(models["llama"])] * 2}
    refused(tmp_path, capsys, recipe, "top_k is 3", "only 2 experts")


def test_missing_source(models, tmp_path, capsys):
    recipe = {"base": str(models["llama"]), "router_init": "random", "experts": [str(models["llama"]), "./nope/ft"]}
    refused(tmp_path, capsys, recipe, "experts[1]", "nope")


def test_prompts_with_a_random_router(models, tmp_path, capsys):
    experts = [{"source": str(models["llama"]), "positive_prompts": ["def "]}, str(models["llama"])]
    refused(tmp_path, capsys, {"base": str(models["llama"]), "router_init": "random", "experts": experts},
            "experts[0]", "prompts", "router_init random")  # fmt: skip


def test_unknown_key_is_named(models, tmp_path, capsys):
    recipe = {"base": str(models["llama"]), "router_init": "random", "experts": [str(models["llama"])] * 2}
    refused(tmp_path, capsys, recipe | {"gate_mode": "hidden"}, "unknown key 'gate_mode'")
    recipe["experts"] = [{"source": str(models["llama"]), "positive_prompt": ["x"]}] * 2
    refused(tmp_path, capsys, recipe, "experts[0]", "unknown key 'positive_prompt'")


def test_shared_expert_for_a_target_without_one(models, tmp_path, capsys):
    recipe = {"base": str(models["llama"]), "router_init": "random", "shared_expert": "base"}
    refused(tmp_path, capsys, recipe | {"experts": [str(models["llama"])] * 2}, "shared_expert base", "mixtral")


def test_hidden_without_prompts_and_a_base_without_tokenizer(models, tmp_path, capsys):
    recipe = {"base": str(models["llama"]), "experts": [str(models["llama"])] * 2}  # router_init hidden by default
    refused(tmp_path, capsys, recipe, "experts[0]", "no positive_prompts")
    recipe["experts"] = [{"source": str(models["llama"]), "positive_prompts": ["x"]}] * 2
    refused(tmp_path, capsys, recipe, "needs the base's tokenizer")


def test_bad_yaml_and_missing_recipe(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text("base: [unclosed\n")
    capsys.readouterr()
    assert main(["compose", str(path), str(tmp_path / "out"), "--quiet"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["compose", str(tmp_path / "none.yaml"), str(tmp_path / "out"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_python_spelling_of_options(models, tmp_path):
    recipe = {"base": str(models["llama"]), "router_init": "random", "experts": [str(models["llama"])] * 2}
    with pytest.raises(UpcycleError, match="moe_layers"):
        compose(recipe, tmp_path / "out", moe_layers="0", quiet=True)
    assert not (tmp_path / "out").exists()
