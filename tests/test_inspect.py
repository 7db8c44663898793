"""`upcycle inspect`: every reported count equals one computed independently from the tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from upcycle import convert
from upcycle.errors import UpcycleError
from upcycle.inspection import inspect_source

CASES = {
    "llama-per-expert": ("llama-gqa", dict(experts=4, top_k=2)),
    "qwen2-fused-shared-partial": (
        "qwen2",
        dict(experts=4, top_k=2, layout="fused", shared_experts=1, moe_layers="0"),
    ),
    "granite-fused": ("granite", dict(experts=3, top_k=1)),
}


def routed_expert_parameters(layer: torch.nn.Module) -> int:
    """Parameters of the routed experts of one decoder layer, from the loaded transformers modules."""
    return sum(
        parameter.numel()
        for name, module in layer.named_modules()
        if name.endswith(("experts", "input_linear", "output_linear"))
        for parameter in module.parameters(recurse=False)
    )


@pytest.fixture(scope="module")
def converted(dense_models, tmp_path_factory) -> dict[str, tuple[Path, object]]:
    root = tmp_path_factory.mktemp("inspect")
    return {
        case: (root / case, convert(dense_models[dense], root / case, quiet=True, **settings))
        for case, (dense, settings) in CASES.items()
    }


@pytest.mark.parametrize("case", CASES)
def test_inspect_counts_equal_counts_from_the_loaded_model(case, converted):
    directory, summary = converted[case]
    info = inspect_source(directory)

    weights = load_file(directory / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    config = model.config
    num_experts = getattr(config, "num_local_experts", None) or config.num_experts
    top_k = config.num_experts_per_tok
    moe_layers = [i for i, layer in enumerate(model.model.layers) if routed_expert_parameters(layer)]
    total = sum(tensor.numel() for tensor in weights.values())
    inactive = sum(
        routed_expert_parameters(model.model.layers[i]) // num_experts * (num_experts - top_k) for i in moe_layers
    )

    assert total == sum(parameter.numel() for parameter in model.parameters())
    assert info["kind"] == "moe" and info["model_type"] == config.model_type
    assert info["total_parameters"] == total == summary.total_parameters
    assert info["active_parameters"] == total - inactive == summary.active_parameters
    assert info["num_experts"] == num_experts and info["top_k"] == top_k
    assert info["moe_layers"] == moe_layers == summary.moe_layers
    assert info["dense_layers"] == [i for i in range(config.num_hidden_layers) if i not in moe_layers]
    assert info["layout"] == summary.layout
    assert info["family"] == summary.family
    assert info["provenance"] == json.loads((directory / "config.json").read_text())["upcycle"]


def test_inspect_reports_shared_expert_and_router_of_qwen2_moe(converted):
    directory, _ = converted["qwen2-fused-shared-partial"]
    info = inspect_source(directory)
    shared = load_file(directory / "model.safetensors")["model.layers.0.mlp.shared_expert.gate_proj.weight"]
    assert info["shared_experts"] == 1 and info["shared_expert_size"] == shared.shape[0] > 0
    assert info["router"] == {"kind": "softmax_topk", "renormalize": True}
    assert info["expert_size"] == json.loads((directory / "config.json").read_text())["moe_intermediate_size"]


def test_inspect_dense_model_counts_every_parameter(dense_models):
    info = inspect_source(dense_models["llama-gqa"])
    weights = load_file(dense_models["llama-gqa"] / "model.safetensors")
    assert info["kind"] == "dense" and info["moe_layers"] == [] and info["num_experts"] is None
    assert info["total_parameters"] == info["active_parameters"] == sum(t.numel() for t in weights.values())


def mope_adapter(directory: Path, **settings) -> torch.nn.Module:
    """Save a MoPE adapter on a tiny Llama and return the adapted model."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import mope

    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2,
        )
    )  # fmt: skip
    model = get_peft_model(base, mope.MoPEConfig(**settings))
    model.save_pretrained(directory)
    return model


def test_inspect_mope_adapter_structure_and_counts(tmp_path):
    model = mope_adapter(
        tmp_path / "adapter",
        num_experts=4, top_k=2, r=2, routing="block", shared_expert=True,
        target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"],
    )  # fmt: skip
    info = inspect_source(tmp_path / "adapter")

    adapter_parameters = {name: p for name, p in model.named_parameters() if ".mope_" in name}
    routed = sum(
        p.numel() for name, p in adapter_parameters.items() if (".mope_A" in name or ".mope_B" in name) and p.dim() == 3
    )
    total = sum(p.numel() for p in adapter_parameters.values())
    assert info["kind"] == "mope_adapter" and info["peft_type"] == "MOPE" and info["routing"] == "block"
    assert info["total_parameters"] == total
    assert info["active_parameters"] == total - routed // 4 * 2
    assert info["layers"] == [0, 1]
    blocks = [m for m in info["modules"] if m["kind"] == "block"]
    linears = [m for m in info["modules"] if m["kind"] == "linear"]
    assert [m["name"] for m in blocks] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(m["projections"] == ["down_proj", "gate_proj", "up_proj"] for m in blocks)
    assert [m["name"] for m in linears] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert all(m["experts"] == 4 and m["rank"] == 2 and m["router"] and m["shared_expert"] for m in info["modules"])


def test_inspect_refuses_non_mope_adapters_and_empty_folders(tmp_path):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(UpcycleError, match="LORA adapter; upcycle inspect reads model folders and MoPE adapters"):
        inspect_source(tmp_path / "lora")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UpcycleError, match="neither config.json nor adapter_config.json"):
        inspect_source(tmp_path / "empty")


def test_inspect_cli_json_is_the_library_dict_and_text_names_the_counts(converted, capsys):
    from upcycle.cli import main
    from upcycle.inspection import format_report

    directory, summary = converted["llama-per-expert"]
    assert main(["inspect", str(directory), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == inspect_source(directory)

    text = format_report(inspect_source(directory))
    assert f"({summary.total_parameters:,})" in text and f"({summary.active_parameters:,})" in text
    assert "4 (top-2)" in text and "per-expert" in text
