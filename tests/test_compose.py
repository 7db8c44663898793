"""`upcycle compose`: several dense sources of one base -> one stock MoE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_compose_support import ForcedRouter, perturbed, read_all, recipe_file
from test_convert_exactness import _pairs
from tiny_models import DENSE_CASES, logits
from transformers import AutoModelForCausalLM

import upcycle
from upcycle.card import front_matter
from upcycle.cli import main
from upcycle.compose import ComposeSummary, compose
from upcycle.compose.report import compose_facts
from upcycle.convert import convert
from upcycle.families import find_family

CASES = [
    (name, family.target_model_type, layout)
    for name, (model_type, fields) in DENSE_CASES.items()
    for family in _pairs(model_type, fields)
    for layout in family.layouts
]


@pytest.mark.parametrize(("case", "target", "layout"), CASES, ids=[f"{c}-{t}-{lo}" for c, t, lo in CASES])
def test_four_identical_sources_are_convert_bit_for_bit_and_compute_the_dense_model(
    dense_models, tmp_path, input_ids, case, target, layout
):
    source = str(dense_models[case])
    recipe = {"base": source, "target": target, "router_init": "random", "experts": [source] * 4}
    compose(recipe, tmp_path / "composed", layout=layout, seed=3, quiet=True)
    convert(source, tmp_path / "converted", experts=4, top_k=2, target=target, layout=layout, seed=3, quiet=True)
    ours, theirs = tmp_path / "composed", tmp_path / "converted"
    assert (ours / "model.safetensors").read_bytes() == (theirs / "model.safetensors").read_bytes()
    config, reference = (json.loads((d / "config.json").read_text()) for d in (ours, theirs))
    assert config.pop("upcycle")["sources"] == [source] * 4
    reference.pop("upcycle")
    assert config == reference
    diff = (logits(ours, input_ids) - logits(Path(source), input_ids)).abs().max().item()
    assert diff <= 1e-5


@pytest.fixture(scope="module")
def sources(dense_models, tmp_path_factory) -> dict[str, Path]:
    """A llama base and three fine-tunes of it differing only in their FFNs (seeds 1-3), and one
    whose every tensor differs (seed 4)."""
    root = tmp_path_factory.mktemp("compose-sources")
    base = dense_models["llama-gqa"]
    made = {f"ft{seed}": perturbed(base, root / f"ft{seed}", seed) for seed in (1, 2, 3)}
    made["all4"] = perturbed(base, root / "all4", 4, ffn_only=False)
    return {"base": base, **made}


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_expert_i_is_source_i_ffn_and_the_rest_is_the_base(sources, tmp_path, layout):
    names = ["ft1", "ft2", "ft3", "ft1"]
    recipe = {"base": str(sources["base"]), "router_init": "random", "top_k": 2}
    recipe["experts"] = [{"source": str(sources[name])} for name in names]
    compose(recipe, tmp_path / "moe", layout=layout, quiet=True)
    moe, base = read_all(tmp_path / "moe"), read_all(sources["base"])
    family = find_family({"model_type": "llama"})
    expert_layout = family.layouts[layout]
    for index, name in enumerate(names):
        dense = read_all(sources[name])
        for layer in range(2):
            gate, up, down = (dense[getattr(family.dense_mlp, p).format(layer=layer)] for p in ("gate", "up", "down"))
            if expert_layout.fused:
                assert torch.equal(moe[expert_layout.gate_up.format(layer=layer)][index], torch.cat([gate, up]))
                assert torch.equal(moe[expert_layout.down.format(layer=layer)][index], down)
            else:
                for projection, weight in (("gate", gate), ("up", up), ("down", down)):
                    name_out = getattr(expert_layout, projection).format(layer=layer, expert=index)
                    assert torch.equal(moe[name_out], weight)
    copied = [name for name in base if ".mlp." not in name]
    assert copied and all(torch.equal(moe[name], base[name]) for name in copied)
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["upcycle"]["operation"] == "compose"
    assert config["upcycle"]["sources"] == [str(sources[name]) for name in names]


def test_non_expert_average_is_the_elementwise_mean_of_the_distinct_sources(sources, tmp_path):
    names = ["ft1", "all4", "ft1"]  # ft1 twice: each distinct source counts once
    recipe = {"base": str(sources["base"]), "router_init": "random", "non_expert": "average", "top_k": 1}
    recipe["experts"] = [str(sources[name]) for name in names]
    compose(recipe, tmp_path / "moe", quiet=True)
    moe, ft1, all4 = read_all(tmp_path / "moe"), read_all(sources["ft1"]), read_all(sources["all4"])
    checked = 0
    for name in ft1:
        if ".mlp." in name:
            continue
        mean = ((ft1[name].double() + all4[name].double()) / 2).float()
        assert torch.equal(moe[name], mean), name
        assert not torch.equal(moe[name], ft1[name]), name
        checked += 1
    assert checked > 5


@pytest.mark.parametrize("case", ["llama-gqa", "qwen2", "granite"])
def test_a_router_forced_to_expert_i_gives_source_i_logits(dense_models, tmp_path, input_ids, case):
    base = dense_models[case]
    made = [perturbed(base, tmp_path / f"ft{seed}", seed, scale=0.2) for seed in (1, 2, 3)]
    recipe = {"base": str(base), "router_init": "random", "top_k": 1, "experts": [str(path) for path in made]}
    compose(recipe, tmp_path / "moe", quiet=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    for index, source in enumerate(made):
        with ForcedRouter(model, index), torch.no_grad():
            moe_logits = model(input_ids).logits
        expected = logits(source, input_ids)
        assert (moe_logits - expected).abs().max().item() <= 1e-5
        assert (expected - logits(made[(index + 1) % 3], input_ids)).abs().max().item() > 1e-3


def test_shared_expert_base_is_the_base_ffn(dense_models, tmp_path, input_ids):
    base = dense_models["qwen2"]
    made = [perturbed(base, tmp_path / f"ft{seed}", seed) for seed in (1, 2)]
    recipe = {"base": str(base), "router_init": "random", "top_k": 1, "shared_expert": "base"}
    recipe["experts"] = [str(path) for path in made]
    compose(recipe, tmp_path / "moe", quiet=True)
    moe, dense = read_all(tmp_path / "moe"), read_all(base)
    shared = find_family({"model_type": "qwen2"}).shared_expert
    for layer in range(2):
        for projection in ("gate", "up"):
            assert torch.equal(
                moe[getattr(shared, projection).format(layer=layer)],
                dense[f"model.layers.{layer}.mlp.{projection}_proj.weight"],
            )
        down = dense[f"model.layers.{layer}.mlp.down_proj.weight"]
        assert torch.equal(moe[shared.down.format(layer=layer)], down * 2)
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["shared_expert_intermediate_size"] == config["moe_intermediate_size"] == 40
    # shared (the base FFN) + the forced expert: each layer adds both FFNs to the residual stream.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    with ForcedRouter(model, 0), torch.no_grad():
        assert torch.isfinite(model(input_ids).logits).all()


def test_merge_of_a_composed_moe_and_the_cli(sources, tmp_path, capsys):
    recipe = {"base": str(sources["base"]), "router_init": "random", "top_k": 2}
    recipe["experts"] = [str(sources[name]) for name in ("ft1", "ft2")]
    path = recipe_file(tmp_path, recipe)
    assert main(["compose", str(path), str(tmp_path / "moe"), "--quiet", "--layout", "fused"]) == 0
    assert capsys.readouterr().err == ""
    merged = upcycle.merge(tmp_path / "moe", tmp_path / "dense", method="average", quiet=True)
    assert merged.target_model_type == "llama"
    dense, ft1, ft2 = read_all(tmp_path / "dense"), read_all(sources["ft1"]), read_all(sources["ft2"])
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.allclose(dense[name], (ft1[name] + ft2[name]) / 2, atol=1e-6)


def test_card_names_every_hub_source_as_a_merge(tmp_path):
    summary = ComposeSummary(
        output=tmp_path / "moe", family="llama->mixtral", base="org/base", sources=["org/code", "org/math", "org/base"],
        source_model_type="llama", target_model_type="mixtral", layout="per-expert", num_experts=3, top_k=2,
        moe_layers=[0, 1], non_expert="base", router_init="hidden", shared_expert="none",
        total_parameters=10, active_parameters=8,
    )  # fmt: skip
    front = front_matter(compose_facts(summary))
    assert front["base_model"] == ["org/base", "org/code", "org/math"]
    assert front["base_model_relation"] == "merge"
    assert "merge" in front["tags"]


def test_task_vector_merge_of_a_composed_moe_finds_the_base_by_itself(sources, tmp_path):
    recipe = {"base": str(sources["base"]), "router_init": "random", "top_k": 1}
    recipe["experts"] = [str(sources[name]) for name in ("ft1", "ft2")]
    assert main(["compose", str(recipe_file(tmp_path, recipe)), str(tmp_path / "moe"), "--quiet"]) == 0
    merged = upcycle.merge(tmp_path / "moe", tmp_path / "dense", method="task-arithmetic", quiet=True)
    assert merged.base == str(sources["base"])  # read from the compose provenance, no --base needed
    dense, base = read_all(tmp_path / "dense"), read_all(sources["base"])
    ft1, ft2 = read_all(sources["ft1"]), read_all(sources["ft2"])
    name = "model.layers.0.mlp.gate_proj.weight"
    expected = base[name] + ((ft1[name] - base[name]) + (ft2[name] - base[name])) / 2
    assert torch.allclose(dense[name], expected, atol=1e-6)


def test_shared_expert_base_into_glm4_moe_is_one_ungated_expert_wide(dense_models, tmp_path):
    base = dense_models["qwen2"]
    made = [perturbed(base, tmp_path / f"ft{seed}", seed) for seed in (1, 2)]
    recipe = {"base": str(base), "target": "glm4_moe", "router_init": "random", "top_k": 1, "shared_expert": "base"}
    recipe["experts"] = [str(path) for path in made]
    compose(recipe, tmp_path / "moe", quiet=True)
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert (config["n_shared_experts"], config["moe_intermediate_size"]) == (1, 40)
    moe, dense = read_all(tmp_path / "moe"), read_all(base)
    for projection in ("gate", "up", "down"):  # no gate to halve it: the base FFN as it is
        assert torch.equal(
            moe[f"model.layers.0.mlp.shared_experts.{projection}_proj.weight"],
            dense[f"model.layers.0.mlp.{projection}_proj.weight"],
        )
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
