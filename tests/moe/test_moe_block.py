"""The MoE block: exact upcycling from dense FFNs, dispatch against a per-token reference, capacity."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, Phi3Config
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.phi3.modeling_phi3 import Phi3MLP

import upcycle.moe.experts as experts_module
from upcycle.errors import UpcycleError
from upcycle.moe import MoE, apply_capacity, expert_capacity

HIDDEN, INTER, EXPERTS = 16, 24, 4


def inputs(tokens: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))


def reference_output(block: MoE, hidden: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
    """Token by token, expert by expert: the definition the block's sorted dispatch must match."""
    routing = block.last_router_output
    experts = block.experts
    output = torch.zeros_like(hidden)
    for token in range(hidden.shape[0]):
        for slot in range(routing.expert_indices.shape[1]):
            if kept is not None and not kept[token, slot]:
                continue
            expert = int(routing.expert_indices[token, slot])
            projected = hidden[token] @ experts.in_proj[expert].T
            if experts.in_proj_bias is not None:
                projected = projected + experts.in_proj_bias[expert]
            if experts.gated:
                gate, up = projected.chunk(2)
                activated = experts.act_fn(gate) * up
            else:
                activated = experts.act_fn(projected)
            out = activated @ experts.down_proj[expert].T
            if experts.down_proj_bias is not None:
                out = out + experts.down_proj_bias[expert]
            output[token] += routing.expert_weights[token, slot] * out
    return output


DENSE_FFNS = {
    "llama": lambda: LlamaMLP(LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=4)),
    "gpt2-conv1d-bias": lambda: GPT2MLP(4 * HIDDEN, GPT2Config(n_embd=HIDDEN, n_head=4)),
    "phi3-fused-gate-up": lambda: Phi3MLP(
        Phi3Config(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=4)
    ),
}


@pytest.mark.parametrize("name", sorted(DENSE_FFNS))
def test_from_dense_with_identical_experts_reproduces_the_dense_ffn(name):
    torch.manual_seed(0)
    ffn = DENSE_FFNS[name]().eval()
    for parameter in ffn.parameters():  # non-zero biases, so that bias handling is checked too
        torch.nn.init.normal_(parameter, std=0.2)
    block = MoE.from_dense(ffn, num_experts=EXPERTS, top_k=2, router_options={"init_std": 1.0})
    hidden = inputs()
    torch.testing.assert_close(block(hidden), ffn(hidden), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["topk", "switch", "dense", "expert_choice", "sbase", "cosine", "hash"])
def test_sorted_grouped_dispatch_matches_a_per_token_reference(kind):
    torch.manual_seed(0)
    top_k = 1 if kind == "switch" else 2
    block = MoE(HIDDEN, INTER, EXPERTS, top_k, router=kind, bias=True, activation="gelu")
    with torch.no_grad():
        for parameter in block.experts.parameters():
            torch.nn.init.normal_(parameter, std=0.3)
    hidden = inputs()
    output = block(hidden)
    torch.testing.assert_close(output, reference_output(block, hidden, block.last_router_output.dispatch_mask))


def test_expert_computation_is_two_grouped_matmuls_whatever_the_token_count(monkeypatch):
    calls = []
    original = experts_module.grouped_linear

    def counting(inputs, *args, **kwargs):
        calls.append(inputs.shape[0])
        return original(inputs, *args, **kwargs)

    monkeypatch.setattr(experts_module, "grouped_linear", counting)
    block = MoE(HIDDEN, INTER, EXPERTS, 2)
    for tokens in (3, 300):
        calls.clear()
        block(inputs(tokens))
        assert calls == [2 * tokens, 2 * tokens]


def test_capacity_limits_every_expert_and_dropped_pairs_add_nothing():
    torch.manual_seed(0)
    block = MoE(HIDDEN, INTER, EXPERTS, 2, capacity_factor=0.5, router_options={"init_std": 1.0})
    hidden = inputs(40)
    output = block(hidden)
    capacity = expert_capacity(0.5, 40, 2, EXPERTS)
    assert capacity == 10
    assert int(block.last_stats.tokens_per_expert.max()) <= capacity
    assert block.last_stats.num_dropped > 0
    assert block.last_stats.num_dropped == 80 - int(block.last_stats.tokens_per_expert.sum())
    routing = block.last_router_output
    kept = apply_capacity(routing.expert_indices, routing.expert_weights, None, capacity, EXPERTS)
    torch.testing.assert_close(output, reference_output(block, hidden, kept))


def test_order_priority_drops_the_latest_tokens_and_first_choices_come_first():
    indices = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    weights = torch.full((4, 2), 0.5)
    kept = apply_capacity(indices, weights, None, capacity=2, num_experts=2, priority="order")
    # Expert 0: first choices of tokens 0, 1 fill it; token 2's first choice drops. Expert 1: token
    # 3's first choice is served before the second choices of tokens 0 and 1; token 0's fills it.
    assert kept.tolist() == [[True, True], [True, False], [False, False], [True, False]]


def test_score_priority_drops_the_lowest_scoring_tokens_first():
    indices = torch.tensor([[0], [0], [0], [0]])
    weights = torch.tensor([[0.3], [0.9], [0.1], [0.6]])
    kept = apply_capacity(indices, weights, None, capacity=2, num_experts=1, priority="score")
    assert kept[:, 0].tolist() == [False, True, False, True]


def test_padding_is_not_dispatched_and_does_not_count_against_capacity():
    torch.manual_seed(0)
    block = MoE(HIDDEN, INTER, EXPERTS, 2, capacity_factor=1.0)
    hidden = inputs(12).view(2, 6, HIDDEN)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    output = block(hidden, mask)
    assert torch.equal(output[1, 3:], torch.zeros(3, HIDDEN))
    assert block.last_stats.num_pairs == 9 * 2


def test_soft_moe_forward_matches_slot_reference():
    torch.manual_seed(0)
    block = MoE(HIDDEN, INTER, EXPERTS, router="soft", router_options={"slots_per_expert": 2})
    hidden = inputs(12).view(2, 6, HIDDEN)
    output = block(hidden)
    routing = block.last_router_output
    slots = torch.einsum("bsn,bsh->bnh", routing.dispatch_weights, hidden)  # (B, E * 2, H)
    expected = torch.zeros_like(hidden)
    for b in range(2):
        slot_out = torch.stack(
            [
                block.experts.forward_batched(slots[b, j][None, None].expand(EXPERTS, 1, HIDDEN))[j // 2, 0]
                for j in range(EXPERTS * 2)
            ]
        )
        expected[b] = routing.combine_weights[b] @ slot_out
    torch.testing.assert_close(output, expected)


def test_smear_runs_one_merged_expert_per_sequence():
    torch.manual_seed(0)
    block = MoE(HIDDEN, INTER, EXPERTS, router="smear", router_options={"init_std": 1.0})
    hidden = inputs(12).view(2, 6, HIDDEN)
    output = block(hidden)
    coefficients = block.last_router_output.sequence_probs
    for b in range(2):
        merged = MoE(HIDDEN, INTER, 1, 1)
        with torch.no_grad():
            merged.experts.gate_up_proj[0] = torch.einsum("e,eoh->oh", coefficients[b], block.experts.gate_up_proj)
            merged.experts.down_proj[0] = torch.einsum("e,eho->ho", coefficients[b], block.experts.down_proj)
        torch.testing.assert_close(output[b], merged(hidden[b]))


def test_shared_experts_are_added_to_the_routed_output():
    torch.manual_seed(0)
    block = MoE(HIDDEN, INTER, EXPERTS, 2, num_shared_experts=2)
    assert block.shared_experts.ffn.intermediate_size == 2 * INTER
    hidden = inputs()
    with_shared = block(hidden)
    routed = reference_output(block, hidden)
    torch.testing.assert_close(with_shared - routed, block.shared_experts(hidden), atol=1e-6, rtol=1e-5)


def test_bad_block_options_are_rejected_with_a_fix():
    with pytest.raises(UpcycleError, match="capacity_priority"):
        MoE(HIDDEN, INTER, EXPERTS, 2, capacity_priority="late")
    with pytest.raises(UpcycleError, match="selection bias"):
        MoE(HIDDEN, INTER, EXPERTS, 2, router="dense", bias_update_rate=0.1)
    with pytest.raises(UpcycleError, match="top_k"):
        MoE(HIDDEN, INTER, EXPERTS, 5)
