"""GLM-4-MoE outputs are named and configured as GLM-4.5's own checkpoints, which engines read.

No engine runs here (see tests/test_engine_names.py): every tensor name of the per-expert layout
goes through llama.cpp's Glm4MoeModel rename (per-expert tensors stacked into one) and gguf's own
table for GGUF_ARCH GLM4_MOE, and the config fields its converter reads are present.
"""

from __future__ import annotations

import json
import re

import gguf
from safetensors import safe_open

from upcycle.convert import convert

# llama.cpp's convert_hf_to_gguf.py Glm4MoeModel: per-expert tensors become one stacked tensor.
PER_EXPERT = (r"^(model\.layers\.\d+\.mlp\.experts)\.\d+\.(\w+_proj)\.weight$", r"\1.\2.weight")
# What GLM-4.5 itself calls the selection bias (transformers' Glm4MoeTopkRouter buffer).
BIAS = re.compile(r"^model\.layers\.\d+\.mlp\.gate\.e_score_correction_bias$")


def test_glm4moe_tensors_map_to_gguf_glm4_moe_and_the_converter_fields_are_set(dense_models, tmp_path, capsys):
    out = tmp_path / "moe"
    convert(
        dense_models["qwen3-head-dim"], out, target="glm4_moe", experts=4, top_k=2, shared_experts=1,
        expert_groups=2, routed_scaling=2.5, moe_layers="1-",
    )  # fmt: skip
    assert "llama.cpp's GGUF converter for GLM-4-MoE looks up GLM's special tokens" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    with safe_open(out / "model.safetensors", "pt") as reader:
        names = list(reader.keys())
    table = gguf.TensorNameMap(gguf.MODEL_ARCH.GLM4_MOE, config["num_hidden_layers"])
    types, unmapped = set(), []
    for name in names:
        if BIAS.match(name):
            continue
        found = table.get_type(re.sub(*PER_EXPERT, name), try_suffixes=(".weight", ".bias"))
        if found is None:
            unmapped.append(name)
        types.add(found)
    assert not unmapped
    expected = {"FFN_GATE_INP", "FFN_GATE_EXP", "FFN_DOWN_EXP", "FFN_GATE_SHEXP", "FFN_GATE", "ATTN_Q_NORM"}
    assert expected <= {t.name for t in types if t is not None}
    assert sum(bool(BIAS.match(name)) for name in names) == 1
    # The fields llama.cpp's Glm4MoeModel.set_gguf_parameters reads (partial_rotary_factor at the top level).
    for field, value in {
        "n_routed_experts": 4,
        "moe_intermediate_size": 20,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "num_nextn_predict_layers": 0,
        "partial_rotary_factor": 1.0,
        "head_dim": 16,
    }.items():
        assert config[field] == value, field
