"""An upcycled model with identical experts must compute what its dense source computes."""

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import DENSE_CASES, logits

from upcycle.convert import convert
from upcycle.errors import UpcycleError
from upcycle.families import FAMILIES, find_family
from upcycle.families.base import FamilyPair


def _pairs(model_type: str, fields: dict) -> list[FamilyPair]:
    """Every pair that takes this source (not only the default one), e.g. llama -> mixtral and qwen2_moe."""
    pairs = []
    for family in FAMILIES:
        if model_type in family.source_model_types:
            try:
                pairs.append(find_family({"model_type": model_type, **fields}, family.target_model_type))
            except UpcycleError:
                continue
    return pairs


# Every dense case x every pair that takes it x both layouts x with and without a shared expert
# (for targets that have one).
CASES = [
    (name, family.target_model_type, layout, shared)
    for name, (model_type, fields) in DENSE_CASES.items()
    for family in _pairs(model_type, fields)
    for layout in family.layouts
    for shared in ((0, 1) if family.shared_expert is not None else (0,))
]


@pytest.mark.parametrize(
    ("case", "target", "layout", "shared"), CASES, ids=[f"{c}-{t}-{layout}-shared{s}" for c, t, layout, s in CASES]
)
def test_upcycled_model_matches_dense_logits_after_stock_reload(
    dense_models, tmp_path, input_ids, case, target, layout, shared
):
    source = dense_models[case]
    summary = convert(
        source, tmp_path / "moe", experts=4, top_k=2, target=target, layout=layout, shared_experts=shared, quiet=True
    )
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert "auto_map" not in config
    assert config["model_type"] == summary.target_model_type == target
    diff = (logits(tmp_path / "moe", input_ids) - logits(source, input_ids)).abs().max().item()
    assert diff <= 1e-5, f"{case} -> {target} {layout}, {shared} shared: max |logit diff| {diff}"


def _family(case: str) -> FamilyPair:
    return find_family({"model_type": DENSE_CASES[case][0]})


@pytest.mark.parametrize("case", ["llama-gqa", "qwen2", "granite"])
def test_every_expert_is_a_bitwise_copy_of_the_dense_ffn(dense_models, tmp_path, case):
    family = _family(case)
    convert(dense_models[case], tmp_path / "moe", experts=3, top_k=1, quiet=True)
    layout = family.layouts[family.default_layout]
    with (
        safe_open(dense_models[case] / "model.safetensors", "pt") as dense,
        safe_open(tmp_path / "moe" / "model.safetensors", "pt") as moe,
    ):
        for layer in range(2):
            gate = dense.get_tensor(family.dense_mlp.gate.format(layer=layer))
            up = dense.get_tensor(family.dense_mlp.up.format(layer=layer))
            down = dense.get_tensor(family.dense_mlp.down.format(layer=layer))
            if layout.fused:
                gate_up = moe.get_tensor(layout.gate_up.format(layer=layer))
                assert torch.equal(gate_up, torch.cat([gate, up]).expand(3, -1, -1))
                assert torch.equal(moe.get_tensor(layout.down.format(layer=layer)), down.expand(3, -1, -1))
                continue
            for expert in range(3):
                assert torch.equal(moe.get_tensor(layout.gate.format(layer=layer, expert=expert)), gate)
                assert torch.equal(moe.get_tensor(layout.up.format(layer=layer, expert=expert)), up)
                assert torch.equal(moe.get_tensor(layout.down.format(layer=layer, expert=expert)), down)


def test_config_carries_every_attention_norm_and_rope_field(dense_models, tmp_path):
    source = json.loads((dense_models["llama-rope-llama3"] / "config.json").read_text())
    convert(dense_models["llama-rope-llama3"], tmp_path / "moe", experts=2, top_k=1, quiet=True)
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    for key in (
        "rope_parameters",
        "rms_norm_eps",
        "tie_word_embeddings",
        "max_position_embeddings",
        "hidden_act",
    ):
        assert config[key] == source[key], key
    assert config["num_local_experts"] == 2 and config["num_experts_per_tok"] == 1
    assert config["upcycle"]["source_model_type"] == "llama"
    assert config["upcycle"]["method"] == "copy"


def test_legacy_rope_scaling_fields_are_not_lost(dense_models, tmp_path, input_ids):
    """Hub configs written before transformers 5 keep rope in `rope_scaling`/`rope_theta`."""
    source = tmp_path / "legacy"
    source.mkdir()
    original = dense_models["llama-rope-llama3"]
    for path in original.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    config = json.loads((original / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    (source / "config.json").write_text(json.dumps(config))
    convert(source, tmp_path / "moe", experts=2, top_k=1, quiet=True)
    written = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert written["rope_parameters"]["rope_type"] == "llama3"
    assert written["rope_parameters"]["rope_theta"] == 500000.0
    diff = (logits(tmp_path / "moe", input_ids) - logits(original, input_ids)).abs().max().item()
    assert diff <= 1e-5


def test_summary_counts_total_and_active_parameters(dense_models, tmp_path):
    summary = convert(dense_models["llama-gqa"], tmp_path / "moe", experts=4, top_k=2, quiet=True)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    total = sum(p.numel() for p in model.parameters())
    expert = 3 * 40 * 32
    assert summary.total_parameters == total
    assert summary.active_parameters == total - 2 * (4 - 2) * expert
    assert summary.family == "llama->mixtral"


def test_dtype_option_casts_floating_tensors(dense_models, tmp_path):
    convert(dense_models["qwen2"], tmp_path / "moe", experts=2, top_k=1, dtype="bfloat16", quiet=True)
    with safe_open(tmp_path / "moe" / "model.safetensors", "pt") as moe:
        dtypes = {moe.get_slice(name).get_dtype() for name in moe.keys()}
    assert dtypes == {"BF16"}
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["dtype"] == "bfloat16"


def test_sharded_output_has_index_and_loads(dense_models, tmp_path, input_ids):
    convert(dense_models["llama-gqa"], tmp_path / "moe", experts=4, top_k=2, max_shard_size="20KB", quiet=True)
    index = json.loads((tmp_path / "moe" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    diff = (logits(tmp_path / "moe", input_ids) - logits(dense_models["llama-gqa"], input_ids)).abs().max()
    assert diff <= 1e-5


def test_same_seed_gives_same_router_and_other_seed_differs(dense_models, tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        convert(dense_models["olmo2"], tmp_path / name, experts=4, top_k=2, seed=seed, quiet=True)
    router = "model.layers.1.mlp.gate.weight"
    tensors = {}
    for name in "abc":
        with safe_open(tmp_path / name / "model.safetensors", "pt") as f:
            tensors[name] = f.get_tensor(router)
    assert torch.equal(tensors["a"], tensors["b"])
    assert not torch.equal(tensors["a"], tensors["c"])
