"""merge_and_unload is exact where routing cannot depend on the token, and refuses everywhere else."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from mope_testlib import FFN, input_ids, logits, mope_model  # noqa: E402

import mope  # noqa: E402


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if ".mope_" not in name}


@pytest.mark.parametrize("routing", ["linear", "block"])
def test_one_expert_adapters_merge_exactly_into_a_plain_model(routing):
    model = mope_model(routing=routing, num_experts=1, top_k=1, shared_expert=True, target_modules=[*FFN, "q_proj"])
    ids = input_ids()
    adapted = logits(model, ids)
    merged = model.merge_and_unload()
    assert not any(isinstance(module, mope.MoPELayer) for module in merged.modules())
    assert type(merged.model.layers[0].mlp).__name__ == "LlamaMLP"
    torch.testing.assert_close(logits(merged, ids), adapted, rtol=0, atol=1e-5)


def test_a_dense_mixture_with_a_constant_router_merges_as_the_mean_of_its_experts():
    model = mope_model(top_k=0, num_experts=3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, mope.Linear):
                module.mope_router["default"].weight.copy_(torch.randn(1, module.in_features).expand(3, -1))
    ids = input_ids()
    adapted = logits(model, ids)
    torch.testing.assert_close(logits(model.merge_and_unload(), ids), adapted, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_experts": 4, "top_k": 2}, r"routes each token to 2 of 4 experts with a TopKRouter"),
        ({"num_experts": 3, "top_k": 0}, r"routes each token to 3 of 3 experts with a DenseRouter"),
        ({"num_experts": 3, "top_k": 0, "routing": "block"}, r"mixes 3 FFN experts in this block"),
    ],
)
def test_token_routed_adapters_refuse_to_merge_and_leave_every_weight_untouched(options, message):
    model = mope_model(**options)
    before = _base_weights(model)
    ids = input_ids()
    adapted = logits(model, ids)
    with pytest.raises(mope.MoPEMergeError, match=message):
        model.merge_and_unload()
    with pytest.raises(mope.MoPEMergeError, match=message):
        model.merge_adapter()
    after = _base_weights(model)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert torch.equal(logits(model, ids), adapted)


def test_unload_without_merging_gives_back_the_base_model():
    model = mope_model(routing="block", target_modules=[*FFN, "v_proj"])
    ids = input_ids()
    with model.disable_adapter():
        base = logits(model, ids)
    plain = model.unload()
    assert not any(isinstance(module, mope.MoPELayer) for module in plain.modules())
    assert torch.equal(logits(plain, ids), base)
