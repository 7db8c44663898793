"""Dense Llama / Mistral (no sliding window) / Qwen2 / Qwen3 -> GLM-4-MoE (DeepSeek-V3-style routing):
exact at init after a stock transformers reload, with the config, tensors, card and inspect saying so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import make_dense, write_stdlib_corpus
from transformers import AutoModelForCausalLM

from upcycle.cli import main
from upcycle.convert import convert
from upcycle.families import find_family
from upcycle.inspection import inspect_source

EXAMPLE = Path(__file__).parents[1] / "examples" / "tiny-llama"
DENSE_SIZE = 64  # divides into 4 shards of 16 float32 neurons (64-byte rows, as grouped_mm needs)
SOURCES = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {"sliding_window": None}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 16}),
}
# name -> convert options; each covers group settings, shared experts, routed scaling and dense layers.
SETTINGS = {
    "copy": dict(experts=4, top_k=2),
    "copy-shared-groups": dict(
        experts=8, top_k=3, shared_experts=1, expert_groups=4, top_groups=2, routed_scaling=2.5, layout="fused"
    ),
    "granular-shared-groups": dict(
        method="granular",
        granularity=4,
        granular_scaling="down",
        experts=4,
        top_k=2,
        shared_experts=1,
        expert_groups=2,
        top_groups=1,
        routed_scaling=2.5,
        moe_layers="1-",
    ),  # fmt: skip
    "granular-group-per-copy": dict(
        method="granular",
        granularity=2,
        granular_scaling="down",
        experts=4,
        top_k=1,
        expert_groups=4,
        top_groups=2,
        routed_scaling=1.5,
    ),  # fmt: skip
}
DENSE = "model.layers.{layer}.mlp.{name}_proj.weight"
EXPERT = "model.layers.{layer}.mlp.experts.{expert}.{name}_proj.weight"
SHARED = "model.layers.{layer}.mlp.shared_experts.{name}_proj.weight"
BIAS = "model.layers.{layer}.mlp.gate.e_score_correction_bias"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("glm4moe-sources")
    return {
        name: make_dense(root / name, model_type, intermediate_size=DENSE_SIZE, **fields)
        for name, (model_type, fields) in SOURCES.items()
    }


def _logits(directory: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits after a stock reload that used every tensor on disk and missed none."""
    model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model.eval()
    with torch.no_grad():
        return model(input_ids).logits


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(directory / "model.safetensors", "pt") as reader:
        return {name: reader.get_tensor(name) for name in reader.keys()}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_glm4moe_computes_the_dense_model_after_stock_reload(sources, tmp_path, input_ids, source, setting):
    options = SETTINGS[setting]
    summary = convert(sources[source], tmp_path / "moe", target="glm4_moe", quiet=True, **options)
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["model_type"] == summary.target_model_type == "glm4_moe"
    assert config["architectures"] == ["Glm4MoeForCausalLM"] and "auto_map" not in config
    diff = (_logits(tmp_path / "moe", input_ids) - _logits(sources[source], input_ids)).abs().max().item()
    print(f"{source} -> glm4_moe {setting}: max |logit diff| {diff:.2e}")
    assert diff <= 1e-5, f"{source} -> glm4_moe {setting}: max |logit diff| {diff}"
    assert summary.settings["exact_at_init"] is True


def test_config_states_the_router_and_carries_the_attention(sources, tmp_path):
    convert(sources["qwen3"], tmp_path / "q3", target="glm4_moe", quiet=True, **SETTINGS["granular-shared-groups"])
    config = json.loads((tmp_path / "q3" / "config.json").read_text())
    expected = {
        "n_routed_experts": 12,  # 4 copies x 3 routed shards (granularity 4, 1 shared)
        "num_experts_per_tok": 6,
        "moe_intermediate_size": DENSE_SIZE // 4,
        "n_shared_experts": 1,
        "intermediate_size": DENSE_SIZE,  # the dense layer 0
        "first_k_dense_replace": 1,
        "n_group": 2,
        "topk_group": 1,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "num_nextn_predict_layers": 0,
        "use_qk_norm": True,
        "attention_bias": False,
        "head_dim": 16,
        "partial_rotary_factor": 1.0,
    }
    assert {key: config[key] for key in expected} == expected
    assert config["rope_parameters"]["partial_rotary_factor"] == 1.0
    assert config["upcycle"]["family"] == "qwen3->glm4_moe"
    assert {k: config["upcycle"][k] for k in ("expert_groups", "top_groups", "routed_scaling")} == {
        "expert_groups": 2,
        "top_groups": 1,
        "routed_scaling": 2.5,
    }
    convert(sources["qwen2"], tmp_path / "q2", target="glm4_moe", experts=2, top_k=1, quiet=True)
    config = json.loads((tmp_path / "q2" / "config.json").read_text())
    assert config["attention_bias"] is True and config["use_qk_norm"] is False
    assert (config["n_group"], config["topk_group"], config["routed_scaling_factor"]) == (1, 1, 1.0)
    # No shared experts asked for: one all-zero placeholder expert (llama.cpp and vLLM need one), adding nothing.
    assert (config["n_shared_experts"], config["first_k_dense_replace"]) == (1, 0)
    placeholder = _tensors(tmp_path / "q2")
    for name in ("gate", "up", "down"):
        tensor = placeholder[SHARED.format(layer=0, name=name)]
        assert not tensor.any() and config["moe_intermediate_size"] in tensor.shape
    assert inspect_source(tmp_path / "q2")["shared_experts"] == 0


def test_shared_experts_take_the_first_neurons_and_routed_down_is_divided_by_the_scaling(sources, tmp_path):
    convert(sources["llama"], tmp_path / "moe", target="glm4_moe", quiet=True, **SETTINGS["copy-shared-groups"])
    dense, moe = _tensors(sources["llama"]), _tensors(tmp_path / "moe")
    width = DENSE_SIZE // 2  # 1 shared + 1 routed expert width
    for layer in range(2):
        weights = {name: dense[DENSE.format(layer=layer, name=name)] for name in ("gate", "up", "down")}
        assert torch.equal(moe[SHARED.format(layer=layer, name="gate")], weights["gate"][:width])
        assert torch.equal(moe[SHARED.format(layer=layer, name="down")], weights["down"][:, :width])
        gate_up = moe[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        assert torch.equal(gate_up[3], torch.cat([weights["gate"][width:], weights["up"][width:]]))
        down = moe[f"model.layers.{layer}.mlp.experts.down_proj"]
        assert torch.equal(down[5], weights["down"][:, width:] / 2.5)
        bias = moe[BIAS.format(layer=layer)]
        assert bias.dtype == torch.float32 and torch.equal(bias, torch.zeros(8))
        assert DENSE.format(layer=layer, name="gate") not in moe


def test_bfloat16_output_keeps_the_selection_bias_in_float32(sources, tmp_path):
    convert(sources["llama"], tmp_path / "moe", target="glm4_moe", experts=2, top_k=1, dtype="bfloat16", quiet=True)
    moe = _tensors(tmp_path / "moe")
    assert moe[BIAS.format(layer=0)].dtype == torch.float32
    assert moe[EXPERT.format(layer=0, expert=1, name="down")].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "settings",
    [
        dict(method="copy", experts=4, top_k=2, router_std=0.0, routed_scaling=3.0),
        dict(method="partition", experts=2, top_k=2, router_init="random", router_std=0.0, routed_scaling=2.5),
    ],
    ids=["copy-uniform-router", "partition-all-experts"],
)
def test_other_routers_and_methods_stay_exact_where_they_are_at_init(sources, tmp_path, input_ids, settings):
    """A zero router ties every expert; a partition with top-k = all experts then sums every neuron
    group with weight 1/E (its down_proj carries E / routed scaling)."""
    convert(sources["qwen2"], tmp_path / "moe", target="glm4_moe", quiet=True, **settings)
    diff = (_logits(tmp_path / "moe", input_ids) - _logits(sources["qwen2"], input_ids)).abs().max().item()
    assert diff <= 1e-5, diff


def test_drop_keeps_the_other_neurons_with_down_divided_by_the_scaling(sources, tmp_path, input_ids):
    summary = convert(
        sources["llama"], tmp_path / "moe", target="glm4_moe", method="drop", drop_ratio=0.25, experts=2,
        top_k=1, routed_scaling=2.0, quiet=True,
    )  # fmt: skip
    assert summary.settings["exact_at_init"] is False
    dense, moe = _tensors(sources["llama"]), _tensors(tmp_path / "moe")
    down, dense_down = moe[EXPERT.format(layer=0, expert=1, name="down")], dense[DENSE.format(layer=0, name="down")]
    kept = (down == dense_down / 2.0).all(dim=0)
    assert int(kept.sum()) == DENSE_SIZE - DENSE_SIZE // 4
    assert torch.isfinite(_logits(tmp_path / "moe", input_ids)).all()


def test_granular_paper_scaling_is_approximate_but_loads(sources, tmp_path, input_ids):
    summary = convert(
        sources["llama"], tmp_path / "moe", target="glm4_moe", method="granular", granularity=2, experts=2,
        top_k=1, routed_scaling=2.0, quiet=True,
    )  # fmt: skip
    assert summary.settings["exact_at_init"] is False
    assert torch.isfinite(_logits(tmp_path / "moe", input_ids)).all()


def test_kmeans_router_init_is_repeated_over_virtual_groups_and_stays_exact(tmp_path):
    corpus = write_stdlib_corpus(tmp_path / "stdlib.txt")
    summary = convert(
        EXAMPLE, tmp_path / "moe", target="glm4_moe", method="granular", granularity=4, granular_scaling="down",
        experts=4, top_k=2, shared_experts=1, expert_groups=2, top_groups=2, routed_scaling=2.5,
        router_init="kmeans", calibration=corpus, calibration_samples=8, quiet=True,
    )  # fmt: skip
    assert summary.settings["router_init"] == "kmeans"
    router = _tensors(tmp_path / "moe")["model.layers.0.mlp.gate.weight"]
    assert router.shape[0] == 12 and torch.equal(router[0], router[2]) and not torch.equal(router[0], router[3])
    input_ids = torch.randint(3, 2048, (1, 16), generator=torch.Generator().manual_seed(0))
    diff = (_logits(tmp_path / "moe", input_ids) - _logits(EXAMPLE, input_ids)).abs().max().item()
    assert diff <= 1e-5, diff


def test_cli_runs_the_issue_command_and_inspect_and_card_say_it(sources, tmp_path, input_ids, capsys):
    out = tmp_path / "moe"
    code = main(
        ["convert", str(sources["mistral"]), str(out), "--target", "glm4_moe", "--experts", "8", "--top-k", "2",
         "--shared-experts", "1", "--expert-groups", "4", "--top-groups", "2", "--routed-scaling", "2.5",
         "--method", "granular", "--granularity", "4", "--granular-scaling", "down", "--moe-layers", "1-", "--quiet"]
    )  # fmt: skip
    assert code == 0
    diff = (_logits(out, input_ids) - _logits(sources["mistral"], input_ids)).abs().max().item()
    assert diff <= 1e-5, diff
    info = inspect_source(out)
    assert info["router"] == {
        "kind": "sigmoid_grouped_topk",
        "renormalize": True,
        "groups": 4,
        "top_groups": 2,
        "routed_scaling": 2.5,
    }
    assert (info["num_experts"], info["top_k"], info["moe_layers"], info["dense_layers"]) == (24, 6, [1], [0])
    assert (info["shared_experts"], info["shared_expert_size"], info["expert_size"]) == (1, 16, 16)
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "sigmoid_grouped_topk, renormalised, top-2 of 4 groups, routed scaling 2.5" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "sigmoid top-6 router over the best 2 of 4 expert groups" in card
    assert "e_score_correction_bias" in card and "glm4_moe" in card


def test_target_auto_keeps_todays_choices():
    natural = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
    for model_type, target in natural.items():
        assert find_family({"model_type": model_type}).target_model_type == target
        assert find_family({"model_type": model_type, "sliding_window": None}, "glm4_moe").name == (
            f"{model_type}->glm4_moe"
        )
