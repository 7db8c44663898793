"""Each MoPEConfig option changes the adapted model's structure as documented."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from mope_testlib import FFN, input_ids, logits, mope_model  # noqa: E402

import mope  # noqa: E402
from upcycle.moe.routing import CosineRouter, DenseRouter, TopKRouter  # noqa: E402

PREFIX = "base_model.model.model.layers"


def test_linear_routing_gives_every_adapted_layer_stacked_experts_and_its_own_router():
    model = mope_model(num_experts=5, r=3, top_k=2)
    gate = model.get_submodule(f"{PREFIX}.0.mlp.gate_proj")
    down = model.get_submodule(f"{PREFIX}.0.mlp.down_proj")
    assert isinstance(gate, mope.Linear) and isinstance(down, mope.Linear)
    assert gate.mope_A["default"].shape == (5, 3, 32) and gate.mope_B["default"].shape == (5, 48, 3)
    assert down.mope_A["default"].shape == (5, 3, 48) and down.mope_B["default"].shape == (5, 32, 3)
    assert isinstance(gate.mope_router["default"], TopKRouter)
    assert gate.mope_router["default"].weight.shape == (5, 32) and down.mope_router["default"].weight.shape == (5, 48)
    per_layer = 5 * 3 * (32 + 48) * 3 + 5 * (32 + 32 + 48)
    assert model.get_nb_trainable_parameters()[0] == 2 * per_layer


def test_block_routing_wraps_each_ffn_with_one_router_and_keeps_other_targets_linear():
    model = mope_model(routing="block", num_experts=4, target_modules=["gate_proj", "down_proj", "k_proj"])
    block = model.get_submodule(f"{PREFIX}.1.mlp")
    assert isinstance(block, mope.GatedFFNBlock)
    assert block.adapted_projections("default") == ("gate_proj", "down_proj")
    assert block.mope_router["default"].weight.shape == (4, 32)
    assert type(block.get_base_layer().up_proj) is torch.nn.Linear
    assert isinstance(model.get_submodule(f"{PREFIX}.1.self_attn.k_proj"), mope.Linear)
    keys = set(model.state_dict())
    assert f"{PREFIX}.1.mlp.mope_A.default.gate_proj" in keys
    assert f"{PREFIX}.1.mlp.mope_router.default.weight" in keys


def test_share_a_keeps_one_a_for_all_experts():
    model = mope_model(num_experts=4, r=2, share_a=True)
    layer = model.get_submodule(f"{PREFIX}.0.mlp.up_proj")
    assert layer.mope_A["default"].shape == (1, 2, 32) and layer.mope_B["default"].shape == (4, 48, 2)
    block = mope_model(routing="block", share_a=True).get_submodule(f"{PREFIX}.0.mlp")
    assert block.mope_A["default"]["gate_proj"].shape[0] == 1


def test_shared_expert_adds_an_always_on_lora():
    model = mope_model(shared_expert=True, r=2)
    layer = model.get_submodule(f"{PREFIX}.0.mlp.up_proj")
    assert layer.mope_shared_A["default"].shape == (2, 32) and layer.mope_shared_B["default"].shape == (48, 2)
    ids = input_ids()
    before = logits(model, ids)
    with torch.no_grad():
        layer.mope_B["default"].zero_()
        layer.mope_shared_B["default"].mul_(2)
    assert not torch.allclose(logits(model, ids), before)


def test_top_k_zero_is_a_dense_soft_mixture_over_all_experts():
    model = mope_model(top_k=0, num_experts=3)
    layer = model.get_submodule(f"{PREFIX}.0.mlp.gate_proj")
    assert isinstance(layer.mope_router["default"], DenseRouter)
    model(input_ids=input_ids())
    routing = layer.last_routing["default"]
    assert routing.expert_indices.shape[1] == 3 and (routing.expert_weights > 0).all()


def test_top_k_selects_k_experts_per_token():
    model = mope_model(top_k=1, num_experts=4)
    model(input_ids=input_ids())
    routing = model.get_submodule(f"{PREFIX}.0.mlp.gate_proj").last_routing["default"]
    assert routing.expert_indices.shape == (18, 1)
    torch.testing.assert_close(routing.expert_weights, torch.ones(18, 1))


def test_num_experts_pattern_sets_per_module_expert_counts():
    model = mope_model(num_experts=2, top_k=1, num_experts_pattern={r"layers\.1\.mlp\..*": 6})
    assert model.get_submodule(f"{PREFIX}.0.mlp.gate_proj").mope_A["default"].shape[0] == 2
    assert model.get_submodule(f"{PREFIX}.1.mlp.gate_proj").mope_A["default"].shape[0] == 6
    block_model = mope_model(routing="block", num_experts=2, top_k=1, num_experts_pattern={r"layers\.1\.mlp": 8})
    assert block_model.get_submodule(f"{PREFIX}.1.mlp").num_experts["default"] == 8


def test_router_kind_and_options_come_from_the_routing_zoo():
    model = mope_model(router="cosine", router_options={"routing_dim": 5})
    router = model.get_submodule(f"{PREFIX}.0.mlp.gate_proj").mope_router["default"]
    assert isinstance(router, CosineRouter) and router.projection.shape == (5, 32)


def test_router_noise_jitters_routing_only_while_training():
    model = mope_model(router_noise=0.5, num_experts=4, top_k=1)
    ids = input_ids()
    assert torch.equal(logits(model, ids), logits(model, ids))
    model.train()
    torch.manual_seed(0)
    first = logits(model, ids)
    torch.manual_seed(1)
    assert not torch.equal(first, logits(model, ids))


def test_lora_dropout_applies_to_the_experts_input():
    model = mope_model(lora_dropout=0.25)
    dropout = model.get_submodule(f"{PREFIX}.0.mlp.gate_proj").mope_dropout["default"]
    assert isinstance(dropout, torch.nn.Dropout) and dropout.p == 0.25
    no_dropout = mope_model().get_submodule(f"{PREFIX}.0.mlp.gate_proj").mope_dropout["default"]
    assert isinstance(no_dropout, torch.nn.Identity)


def test_layers_to_transform_limits_the_adapted_layers():
    model = mope_model(routing="block", layers_to_transform=[1], layers_pattern="layers")
    assert not isinstance(model.get_submodule(f"{PREFIX}.0.mlp"), mope.GatedFFNBlock)
    assert isinstance(model.get_submodule(f"{PREFIX}.1.mlp"), mope.GatedFFNBlock)


@pytest.mark.parametrize("routing", ["linear", "block"])
def test_a_second_adapter_can_be_added_and_switched_to(routing):
    model = mope_model(routing=routing)
    ids = input_ids()
    first = logits(model, ids)
    model.add_adapter("other", mope.MoPEConfig(num_experts=2, r=2, target_modules=FFN, routing=routing))
    model.set_adapter("other")
    torch.testing.assert_close(logits(model, ids), logits(mope_model(init_weights=True), ids), rtol=0, atol=1e-6)
    model.set_adapter("default")
    assert torch.equal(logits(model, ids), first)
