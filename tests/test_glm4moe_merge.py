"""`upcycle merge` of GLM-4-MoE (DeepSeek-V3-style) checkpoints: folded back into the dense family exactly,
reduced to fewer experts with the selection bias and groups following, and calibrated with the sigmoid,
group-limited routing the model really uses."""

from __future__ import annotations

import json

import pytest
import torch
from test_glm4moe_convert import DENSE_SIZE, SETTINGS, SOURCES, _logits, _tensors
from tiny_models import make_dense
from transformers import AutoConfig
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

from upcycle.calibration import MoELayerProbe
from upcycle.convert import convert
from upcycle.merge import merge

COPY_SETTINGS = ("copy", "copy-shared-groups")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm4moe-merge-sources")
    return {
        name: make_dense(root / name, model_type, intermediate_size=DENSE_SIZE, **fields)
        for name, (model_type, fields) in SOURCES.items()
    }


@pytest.mark.parametrize("setting", COPY_SETTINGS)
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_average_of_copies_folds_back_into_the_dense_model(sources, tmp_path, input_ids, source, setting):
    options = SETTINGS[setting]
    convert(sources[source], tmp_path / "moe", target="glm4_moe", quiet=True, **options)
    summary = merge(tmp_path / "moe", tmp_path / "dense", quiet=True)

    assert summary.target_model_type == SOURCES[source][0]
    torch.testing.assert_close(_logits(tmp_path / "dense", input_ids), _logits(sources[source], input_ids),
                               rtol=0, atol=1e-5)  # fmt: skip
    merged, original = _tensors(tmp_path / "dense"), _tensors(sources[source])
    assert merged.keys() == original.keys()
    for name, tensor in original.items():
        if "down_proj" in name and "routed_scaling" in options:  # divided, then multiplied back: rounding
            torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6)
        else:  # shared neurons first, then the routed ones: the dense FFN as it was
            assert torch.equal(merged[name], tensor), name
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    source_config = json.loads((sources[source] / "config.json").read_text())
    assert config["intermediate_size"] == DENSE_SIZE
    if source == "mistral":  # glm4_moe has no sliding_window field; the dense model must not get 4096
        assert config["sliding_window"] is None == source_config["sliding_window"]


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_fewer_experts_keep_the_bias_and_reset_the_groups(sources, tmp_path, input_ids, setting):
    options = SETTINGS[setting]
    convert(sources["qwen3"], tmp_path / "moe", target="glm4_moe", quiet=True, **options)
    moe_config = json.loads((tmp_path / "moe" / "config.json").read_text())
    experts_in = moe_config["n_routed_experts"]
    experts_out = experts_in // 2
    merge(tmp_path / "moe", tmp_path / "fewer", experts=experts_out, quiet=True)

    config = json.loads((tmp_path / "fewer" / "config.json").read_text())
    assert config["n_routed_experts"] == experts_out
    assert (config["n_group"], config["topk_group"]) == (1, 1)
    assert config["routed_scaling_factor"] == moe_config["routed_scaling_factor"]
    assert config["first_k_dense_replace"] == moe_config["first_k_dense_replace"]
    tensors = _tensors(tmp_path / "fewer")
    biases = [name for name in tensors if name.endswith("e_score_correction_bias")]
    assert biases and all(tensors[name].shape == (experts_out,) for name in biases)
    assert all(tensors[name].dtype == torch.float32 for name in biases)
    reduced = _logits(tmp_path / "fewer", input_ids)  # every tensor used, none missing
    if setting in COPY_SETTINGS:  # merged copies are the copy: the model is unchanged
        torch.testing.assert_close(reduced, _logits(tmp_path / "moe", input_ids), rtol=0, atol=1e-5)


def test_calibration_routes_as_the_sigmoid_group_limited_router():
    config = AutoConfig.for_model(
        "glm4_moe", hidden_size=16, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True,
    )  # fmt: skip
    router = Glm4MoeTopkRouter(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(8, 16, generator=generator))
        router.e_score_correction_bias.copy_(torch.randn(8, generator=generator) * 0.5)
    hidden = torch.randn(64, 16, generator=generator)
    probe = MoELayerProbe("mlp", router.weight.detach(), selection_bias=router.e_score_correction_bias, groups=4,
                          top_groups=2)  # fmt: skip

    scores, weights, top_index = probe.route(hidden, top_k=3, normalize_top_k=True)

    logits, their_weights, their_index = router(hidden)
    assert torch.equal(scores, logits.sigmoid())
    assert torch.equal(top_index.sort(dim=-1).values, their_index.sort(dim=-1).values)
    expected = torch.zeros(64, 8).scatter_(1, their_index, their_weights / config.routed_scaling_factor)
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)
