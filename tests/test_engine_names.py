"""What we write is named and configured the way llama.cpp's GGUF converter reads it.

No engine is built here: every tensor name a conversion writes goes through the renames llama.cpp's
`convert_hf_to_gguf.py` applies before naming (merging per-expert tensors into one, splitting fused
gate_up), then through gguf's own tables (`gguf.TensorNameMap` for the target's GGUF architecture,
which only knows that architecture's `gguf.MODEL_TENSORS`). The config fields the converter and
llama.cpp read must be present and usable, and tensors vLLM's model classes always build must exist.
Known gaps are pinned as strict xfails (they start passing, and fail, once fixed).
Not checkable here: llama.cpp's qwen2moe graph never renormalises the top-k weights (it ignores
norm_topk_prob), so our Qwen2-MoE outputs (norm_topk_prob=True) differ there unless top_k equals
the expert count. `scripts/compat/engines.py` runs the engines themselves.
"""

from __future__ import annotations

import json
import re

import gguf
import pytest
import torch
from safetensors import safe_open

from upcycle.convert import convert

ARCH = gguf.MODEL_ARCH
# The GGUF architecture llama.cpp's converter picks for each model_type we write (None: it has none).
GGUF_ARCH: dict[str, gguf.MODEL_ARCH | None] = {
    "mixtral": ARCH.LLAMA,  # MixtralForCausalLM converts as a LLAMA with experts
    "qwen2_moe": ARCH.QWEN2MOE,
    "qwen3_moe": ARCH.QWEN3MOE,
    "granitemoe": ARCH.GRANITE_MOE,
    "flex_olmo": None,
    # dense outputs of `upcycle merge`
    "llama": ARCH.LLAMA,
    "mistral": ARCH.LLAMA,
    "qwen2": ARCH.QWEN2,
    "qwen3": ARCH.QWEN3,
    "granite": ARCH.GRANITE,
    "olmo2": ARCH.OLMO2,
}

# The renames llama.cpp's converter applies before gguf's tables (conversion/llama.py LlamaModel,
# conversion/qwen.py Qwen2MoeModel, conversion/granite.py GraniteMoeModel). A name maps to the
# names it becomes, or to gguf tensor types the converter names directly.
CONVERTER_RENAMES: dict[gguf.MODEL_ARCH, list[tuple[str, list[str | gguf.MODEL_TENSOR]]]] = {
    ARCH.LLAMA: [
        # per-expert w1/w2/w3 are stacked; no rename exists for fused gate_up_proj/down_proj
        (
            r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.\d+\.(w[123])\.weight$",
            [r"layers.\1.feed_forward.experts.\2.weight"],
        ),
    ],
    ARCH.QWEN2MOE: [
        (r"^(model\.layers\.\d+\.mlp\.experts)\.\d+\.(\w+_proj)\.weight$", [r"\1.\2.weight"]),
        (r"^(model\.layers\.\d+\.mlp\.experts)\.gate_up_proj$", [r"\1.gate_proj.weight", r"\1.up_proj.weight"]),
        (r"^(model\.layers\.\d+\.mlp\.experts)\.down_proj$", [r"\1.down_proj.weight"]),
    ],
    ARCH.GRANITE_MOE: [
        (
            r"^model\.layers\.\d+\.block_sparse_moe\.input_linear\.weight$",
            [gguf.MODEL_TENSOR.FFN_GATE_EXP, gguf.MODEL_TENSOR.FFN_UP_EXP],
        ),
    ],
}
CONVERTER_RENAMES[ARCH.QWEN3MOE] = CONVERTER_RENAMES[ARCH.QWEN2MOE]

# Config fields llama.cpp's converter reads for each MoE we write (it tries each tuple's names in
# turn, as its find_hparam does, and fails without one).
EXPERTS = ("num_local_experts", "num_experts")
MOE_FIELDS = {
    "mixtral": (EXPERTS, ("num_experts_per_tok",), ("intermediate_size",)),
    "qwen2_moe": (
        EXPERTS,
        ("num_experts_per_tok",),
        ("moe_intermediate_size",),
        ("shared_expert_intermediate_size",),
    ),
    "qwen3_moe": (EXPERTS, ("num_experts_per_tok",), ("moe_intermediate_size",)),
    "granitemoe": (EXPERTS, ("num_experts_per_tok",), ("intermediate_size",)),
}

# (name, dense case, convert options, readable by llama.cpp's converter and loader)
CASES = [
    ("mixtral", "llama-gqa", {}, True),
    ("mixtral-from-mistral", "mistral-sliding", {}, True),
    ("mixtral-fused", "llama-gqa", {"layout": "fused"}, False),  # no converter rename for fused Mixtral
    ("qwen2_moe-shared", "qwen2", {"shared_experts": 1}, True),
    ("qwen2_moe-shared-fused", "qwen2", {"shared_experts": 1, "layout": "fused"}, True),
    ("qwen2_moe-llama-shared", "llama-gqa", {"target": "qwen2_moe", "shared_experts": 1}, True),
    ("qwen3_moe", "qwen3-head-dim", {}, True),
    ("qwen3_moe-fused", "qwen3-head-dim", {"layout": "fused"}, True),
    ("granitemoe", "granite", {}, True),
    ("flex_olmo", "olmo2", {}, False),  # llama.cpp has no FlexOlmo architecture
    ("flex_olmo-fused", "olmo2", {"layout": "fused"}, False),
]
# A zero-width shared expert (Qwen2-MoE without --shared-experts) converts, but llama.cpp's qwen2moe
# loader wants n_ff_shexp > 0 (0 falls back to intermediate_size) and refuses the zero-width tensors.
ZERO_WIDTH_SHARED = [
    ("qwen2_moe", "qwen2", {}),
    ("qwen2_moe-fused", "qwen2", {"layout": "fused"}),
    ("qwen2_moe-llama", "llama-gqa", {"target": "qwen2_moe"}),
]


def written(directory) -> tuple[dict, dict[str, tuple[int, ...]]]:
    config = json.loads((directory / "config.json").read_text())
    with safe_open(directory / "model.safetensors", "pt") as reader:
        shapes = {name: tuple(reader.get_slice(name).get_shape()) for name in reader.keys()}
    return config, shapes


def gguf_types(arch: gguf.MODEL_ARCH, names, num_layers: int) -> tuple[set, list[str]]:
    """Return (the gguf tensor types the names become, the names gguf's tables cannot map)."""
    table = gguf.TensorNameMap(arch, num_layers)
    types, unmapped = set(), []
    for name in names:
        targets: list[str | gguf.MODEL_TENSOR] = [name]
        for pattern, replacements in CONVERTER_RENAMES.get(arch, []):
            if re.match(pattern, name):
                targets = [r if isinstance(r, gguf.MODEL_TENSOR) else re.sub(pattern, r, name) for r in replacements]
                break
        for target in targets:
            if isinstance(target, gguf.MODEL_TENSOR):
                found = target if target in gguf.MODEL_TENSORS[arch] else None
            else:
                found = table.get_type(target, try_suffixes=(".weight", ".bias"))
            if found is None:
                unmapped.append(f"{name} -> {target}")
            else:
                types.add(found)
    return types, unmapped


@pytest.fixture(scope="module")
def outputs(dense_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-names")
    cases = [(name, dense, options) for name, dense, options, _ in CASES] + ZERO_WIDTH_SHARED
    for name, dense, options in cases:
        convert(dense_models[dense], root / name, experts=2, top_k=1, quiet=True, **options)
    return {name: root / name for name, _, _ in cases}


@pytest.mark.parametrize(("name", "readable"), [(name, readable) for name, _, _, readable in CASES])
def test_every_written_tensor_maps_to_the_targets_gguf_tensors(outputs, name, readable):
    config, shapes = written(outputs[name])
    arch = GGUF_ARCH[config["model_type"]]
    if not readable:
        # The documented gaps stay gaps: if gguf learns them, the README pair table must change.
        if arch is None:
            assert not any("flex" in arch_name for arch_name in gguf.MODEL_ARCH_NAMES.values())
        else:
            assert gguf_types(arch, shapes, config["num_hidden_layers"])[1]
        return
    types, unmapped = gguf_types(arch, shapes, config["num_hidden_layers"])
    assert not unmapped
    assert {gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_DOWN_EXP} <= types
    for names in MOE_FIELDS[config["model_type"]]:
        value = next((config[name] for name in names if name in config), None)
        assert isinstance(value, int) and value > 0, names


@pytest.mark.parametrize("dense", ["llama-gqa", "mistral-sliding", "qwen2", "qwen3-head-dim", "granite", "olmo2"])
def test_dense_merge_outputs_map_to_their_gguf_architecture(dense_models, dense):
    """`upcycle merge` writes a dense model under the source family's own tensor names."""
    config, shapes = written(dense_models[dense])
    types, unmapped = gguf_types(GGUF_ARCH[config["model_type"]], shapes, config["num_hidden_layers"])
    assert not unmapped and gguf.MODEL_TENSOR.FFN_GATE in types


@pytest.mark.parametrize("name", ["qwen2_moe-shared", "qwen2_moe-shared-fused", "qwen2_moe-llama-shared"])
def test_qwen2_moe_shared_expert_is_sized_and_its_gate_is_not_zero(outputs, name):
    """llama.cpp computes the shared gate's sigmoid as silu(z)/z: an all-zero gate gives NaN logits."""
    config, shapes = written(outputs[name])
    width = config["shared_expert_intermediate_size"]
    layers = [layer for layer in range(config["num_hidden_layers"]) if layer not in config["mlp_only_layers"]]
    with safe_open(outputs[name] / "model.safetensors", "pt") as reader:
        for layer in layers:
            prefix = f"model.layers.{layer}.mlp"
            assert shapes[f"{prefix}.shared_expert.gate_proj.weight"] == (width, config["hidden_size"])
            gate = reader.get_tensor(f"{prefix}.shared_expert_gate.weight")
            assert bool((gate != 0).all()) and torch.sigmoid(gate.float() @ torch.ones(gate.shape[1])).item() == 0.5


@pytest.mark.parametrize("name", [name for name, _, _ in ZERO_WIDTH_SHARED])
def test_qwen2_moe_without_shared_experts_has_a_loadable_shared_expert(outputs, name):
    config, shapes = written(outputs[name])
    assert not gguf_types(ARCH.QWEN2MOE, shapes, config["num_hidden_layers"])[1]
    assert config["shared_expert_intermediate_size"] > 0


@pytest.mark.parametrize(
    "name",
    [
        "qwen2_moe-shared",
        "qwen2_moe-shared-fused",
        "qwen2_moe-llama-shared",
    ],
)
def test_qwen2_moe_has_the_qkv_biases_vllm_always_builds(outputs, name):
    config, shapes = written(outputs[name])
    for layer in range(config["num_hidden_layers"]):
        for projection in ("q_proj", "k_proj", "v_proj"):
            assert f"model.layers.{layer}.self_attn.{projection}.bias" in shapes


def test_convert_names_what_serves_a_target_an_engine_cannot_run(dense_models, tmp_path, capsys):
    convert(dense_models["olmo2"], tmp_path / "flex", experts=2, top_k=1)
    assert "upcycle: notice: llama.cpp has no FlexOlmo architecture" in capsys.readouterr().err
    convert(dense_models["llama-gqa"], tmp_path / "mixtral", experts=2, top_k=1)
    assert "notice" not in capsys.readouterr().err
    convert(dense_models["mistral-sliding"], tmp_path / "sliding", experts=2, top_k=1)
    assert "llama.cpp runs Mixtral without a sliding window" in capsys.readouterr().err


def test_llama_to_qwen2_moe_zero_qkv_biases_are_exact_and_fold_back_away(dense_models, tmp_path, input_ids):
    from safetensors.torch import load_file
    from tiny_models import logits

    import upcycle

    convert(dense_models["llama-gqa"], tmp_path / "moe", experts=2, top_k=1, target="qwen2_moe", quiet=True)
    moe = load_file(tmp_path / "moe" / "model.safetensors")
    assert not moe["model.layers.0.self_attn.q_proj.bias"].any()
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["qkv_bias"] is True
    assert (logits(tmp_path / "moe", input_ids) - logits(dense_models["llama-gqa"], input_ids)).abs().max() <= 1e-5
    upcycle.merge(tmp_path / "moe", tmp_path / "dense", quiet=True)
    dense = load_file(tmp_path / "dense" / "model.safetensors")
    assert not any(name.endswith("_proj.bias") for name in dense)
    assert torch.equal(logits(tmp_path / "dense", input_ids), logits(dense_models["llama-gqa"], input_ids))
