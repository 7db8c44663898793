"""MoPE on a MoE model: attention projections and the shared expert are adapted; fused routed experts are not."""

import pytest
import torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

import mope

PREFIX = "base_model.model.model.layers.0"


def tiny_qwen2_moe() -> torch.nn.Module:
    config = AutoConfig.for_model(
        "qwen2_moe",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(("routing", "shared_cls"), [("linear", mope.Linear), ("block", mope.GatedFFNBlock)])
def test_moe_model_gets_experts_on_attention_and_shared_expert_but_keeps_fused_experts_frozen(routing, shared_cls):
    model = get_peft_model(
        tiny_qwen2_moe(),
        mope.MoPEConfig(target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"], routing=routing, r=2),
    )
    assert isinstance(model.get_submodule(f"{PREFIX}.self_attn.q_proj"), mope.Linear)
    shared = f"{PREFIX}.mlp.shared_expert" + (".gate_proj" if routing == "linear" else "")
    assert isinstance(model.get_submodule(shared), shared_cls)
    experts = model.get_submodule(f"{PREFIX}.mlp.experts")
    assert not any(isinstance(module, mope.MoPELayer) for module in experts.modules())
    assert not any(parameter.requires_grad for parameter in experts.parameters())
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    model.train()
    (model(input_ids=ids, labels=ids).loss + mope.aux_loss(model)).backward()
    assert model.get_submodule(f"{PREFIX}.self_attn.q_proj").mope_router["default"].weight.grad is not None


def test_naming_the_fused_experts_is_refused_with_the_lora_alternative():
    with pytest.raises(mope.MoPEConfigError, match=r"mlp.experts is a Qwen2MoeExperts.*target_parameters"):
        get_peft_model(tiny_qwen2_moe(), mope.MoPEConfig(target_modules=["experts"]))
