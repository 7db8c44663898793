"""Every router of the zoo: output shapes, what its weights sum to, gradients, balance guarantees."""

from __future__ import annotations

import math

import pytest
import torch

from upcycle.errors import UpcycleError
from upcycle.moe import MoE, build_router
from upcycle.moe.routing import (
    ROUTERS,
    balanced_assignment,
    balanced_capacity,
    select_top_k,
    sinkhorn,
)

HIDDEN, EXPERTS, TOP_K = 16, 4, 2
BATCH, SEQ = 2, 12


def hidden_states(seed: int = 0) -> torch.Tensor:
    return torch.randn(BATCH, SEQ, HIDDEN, generator=torch.Generator().manual_seed(seed))


def router(kind: str, top_k: int = TOP_K, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    # Larger init than the default so that scores differ clearly between experts.
    if kind not in ("hash", "soft"):
        options.setdefault("init_std", 0.5)
    return build_router(kind, HIDDEN, EXPERTS, top_k, **options)


# kind -> k of its output (routers that fix k say so).
OUTPUT_K = {
    "topk": TOP_K,
    "switch": 1,
    "noisy_topk": TOP_K,
    "dense": EXPERTS,
    "expert_choice": EXPERTS,
    "soft": EXPERTS,
    "smear": EXPERTS,
    "base": 1,
    "sbase": TOP_K,
    "dselect_k": TOP_K,
    "sentence": TOP_K,
    "cosine": TOP_K,
    "hash": TOP_K,
}
BUILD_K = {"switch": 1, "base": 1}


def test_every_registered_router_is_covered():
    assert set(OUTPUT_K) == set(ROUTERS)


@pytest.mark.parametrize("kind", sorted(ROUTERS))
def test_router_output_shapes(kind):
    output = router(kind, BUILD_K.get(kind, TOP_K))(hidden_states())
    tokens, k = BATCH * SEQ, OUTPUT_K[kind]
    assert output.expert_indices.shape == (tokens, k)
    assert output.expert_indices.dtype == torch.long
    assert output.expert_weights.shape == (tokens, k)
    assert output.router_logits.shape == (tokens, EXPERTS)
    assert output.router_probs.shape == (tokens, EXPERTS)
    assert int(output.expert_indices.min()) >= 0 and int(output.expert_indices.max()) < EXPERTS


@pytest.mark.parametrize(
    "kind,options",
    [
        ("topk", {}),
        ("topk", {"softmax_order": "after"}),
        ("topk", {"score_fn": "sigmoid"}),
        ("noisy_topk", {}),
        ("dense", {}),
        ("soft", {}),
        ("smear", {}),
        ("dselect_k", {}),
        ("sentence", {}),
        ("cosine", {}),
        ("hash", {}),
        ("sbase", {"normalize": True}),
    ],
)
def test_router_weights_sum_to_one_per_token(kind, options):
    module = router(kind, **options).train()
    output = module(hidden_states())
    torch.testing.assert_close(output.expert_weights.sum(-1), torch.ones(BATCH * SEQ))


def test_topk_without_renormalisation_weights_are_the_softmax_probabilities():
    output = router("topk", normalize=False)(hidden_states())
    expected = torch.softmax(output.router_logits, -1).gather(-1, output.expert_indices)
    torch.testing.assert_close(output.expert_weights, expected)
    assert bool((output.expert_weights.sum(-1) < 1).all())


def test_topk_picks_the_highest_scoring_experts():
    output = router("topk")(hidden_states())
    expected = output.router_logits.topk(TOP_K, -1).indices
    assert torch.equal(output.expert_indices.sort(-1).values, expected.sort(-1).values)


def test_softmax_after_topk_is_a_softmax_over_the_kept_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    indices, weights, _ = select_top_k(logits, 2, softmax_order="after")
    assert indices.tolist() == [[1, 2]]
    torch.testing.assert_close(weights, torch.softmax(torch.tensor([[3.0, 2.0]]), -1))


def test_switch_weight_is_the_top_probability_and_below_one():
    output = router("switch", 1)(hidden_states())
    torch.testing.assert_close(output.expert_weights[:, 0], output.router_probs.max(-1).values)
    assert bool((output.expert_weights < 1).all())
    with pytest.raises(UpcycleError, match="one expert"):
        build_router("switch", HIDDEN, EXPERTS, 2)


def test_noisy_topk_is_deterministic_in_eval_and_noisy_in_training():
    module = router("noisy_topk")
    inputs = hidden_states()
    module.eval()
    assert torch.equal(module(inputs).expert_weights, module(inputs).expert_weights)
    module.train()
    torch.manual_seed(1)
    first = module(inputs).expert_weights
    torch.manual_seed(2)
    assert not torch.equal(first, module(inputs).expert_weights)


def test_selection_bias_changes_the_choice_but_not_the_weights():
    module = router("topk", normalize=False, selection_bias=True)
    inputs = hidden_states()
    module.selection_bias[0] = 100.0
    output = module(inputs)
    assert bool((output.expert_indices == 0).any(-1).all()), "expert 0 is chosen by every token"
    expected = output.router_probs.gather(-1, output.expert_indices)
    torch.testing.assert_close(output.expert_weights, expected)


@pytest.mark.parametrize("kind", sorted(set(ROUTERS) - {"hash"}))
def test_gradients_reach_every_router_parameter(kind):
    torch.manual_seed(0)
    k = BUILD_K.get(kind, TOP_K)
    options = {} if kind == "soft" else {"init_std": 0.5}
    block = MoE(HIDDEN, 24, EXPERTS, k, router=kind, router_options=options).train()
    torch.manual_seed(3)
    block(hidden_states()).square().sum().backward()
    for name, parameter in block.router.named_parameters():
        assert parameter.grad is not None, name
        assert float(parameter.grad.abs().sum()) > 0, name


def test_hash_router_sends_the_same_token_id_to_the_same_experts():
    module = router("hash")
    ids = torch.tensor([5, 9, 5, 7, 9, 5])
    output = module(torch.randn(6, HIDDEN), input_ids=ids)
    assert torch.equal(output.expert_indices[0], output.expert_indices[2])
    assert torch.equal(output.expert_indices[1], output.expert_indices[4])
    assert torch.equal(output.expert_indices[:, 1], (output.expert_indices[:, 0] + 1) % EXPERTS)
    without_ids = module(torch.randn(6, HIDDEN))
    assert without_ids.expert_indices.shape == (6, TOP_K)


def test_expert_choice_gives_every_expert_the_same_number_of_tokens():
    module = router("expert_choice", capacity_factor=1.0)
    output = module(hidden_states())
    per_expert = output.dispatch_mask.sum(0)
    capacity = math.ceil(BATCH * SEQ * TOP_K / EXPERTS)
    assert per_expert.tolist() == [capacity] * EXPERTS
    # Each expert picked its highest-scoring tokens; weights are the scores of the picks, else 0.
    for expert in range(EXPERTS):
        picked = output.dispatch_mask[:, expert].nonzero().squeeze(1)
        top = output.router_probs[:, expert].topk(capacity).indices
        assert set(picked.tolist()) == set(top.tolist())
    torch.testing.assert_close(output.expert_weights, output.router_probs * output.dispatch_mask)


def test_expert_choice_never_picks_padding():
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, 8:] = 0
    output = router("expert_choice")(hidden_states(), mask)
    assert not bool(output.dispatch_mask.view(BATCH, SEQ, EXPERTS)[1, 8:].any())
    assert output.dispatch_mask.sum(0).tolist() == [math.ceil(20 * TOP_K / EXPERTS)] * EXPERTS


@pytest.mark.parametrize("num_tokens", [24, 22])
def test_base_gives_every_expert_the_same_number_of_tokens(num_tokens):
    module = router("base", 1).train()
    output = module(torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(4)))
    counts = torch.bincount(output.expert_indices[:, 0], minlength=EXPERTS)
    assert int(counts.max() - counts.min()) <= 1 and int(counts.sum()) == num_tokens
    torch.testing.assert_close(
        output.expert_weights, torch.sigmoid(output.router_logits.gather(-1, output.expert_indices))
    )


def test_base_in_eval_takes_each_tokens_best_expert():
    output = router("base", 1).eval()(hidden_states())
    assert torch.equal(output.expert_indices[:, 0], output.router_logits.argmax(-1))


def test_balanced_assignment_prefers_high_scores_and_respects_capacity():
    scores = torch.tensor([[9.0, 0.0], [8.0, 0.0], [7.0, 0.0], [0.0, 1.0]])
    assigned = balanced_assignment(scores, balanced_capacity(4, 2))
    # Expert 0 takes its two best tokens; the third overflows to expert 1.
    assert assigned.tolist() == [0, 0, 1, 1]


def test_sinkhorn_plan_has_uniform_marginals():
    logits = torch.randn(12, EXPERTS, generator=torch.Generator().manual_seed(5)) * 3
    plan = sinkhorn(logits, num_iters=50)
    torch.testing.assert_close(plan.sum(1), torch.full((12,), 1 / 12))
    torch.testing.assert_close(plan.sum(0), torch.full((EXPERTS,), 1 / EXPERTS), atol=1e-4, rtol=0)


def test_sbase_balances_better_than_raw_scores_while_training():
    torch.manual_seed(0)
    module = build_router("sbase", HIDDEN, EXPERTS, 1, init_std=0.5, num_iters=30)
    # A skewed router: every token prefers expert 0.
    with torch.no_grad():
        module.weight[0] += 1.0
    inputs = torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(6)).abs()
    raw = torch.bincount(module.eval()(inputs).expert_indices[:, 0], minlength=EXPERTS)
    balanced = torch.bincount(module.train()(inputs).expert_indices[:, 0], minlength=EXPERTS)
    assert int(balanced.max()) < int(raw.max())


def test_soft_moe_dispatch_and_combine_are_convex():
    output = router("soft")(hidden_states())
    torch.testing.assert_close(output.dispatch_weights.sum(1), torch.ones(BATCH, EXPERTS))
    torch.testing.assert_close(output.combine_weights.sum(-1), torch.ones(BATCH, SEQ))


def test_sentence_router_routes_a_whole_sequence_alike_ignoring_padding():
    module = router("sentence")
    inputs = hidden_states()
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, 6:] = 0
    output = module(inputs, mask)
    per_sequence = output.expert_indices.view(BATCH, SEQ, TOP_K)
    assert bool((per_sequence == per_sequence[:, :1]).all())
    # Padding does not change the choice: the first sequence routes as its 6 real tokens alone.
    alone = module(inputs[:1, :6])
    assert torch.equal(alone.expert_indices[0], per_sequence[0, 0])
    assert not bool(output.dispatch_mask.view(BATCH, SEQ, TOP_K)[0, 6:].any())


def test_smear_sequence_probs_are_a_distribution_per_sequence():
    output = router("smear")(hidden_states())
    assert output.sequence_probs.shape == (BATCH, EXPERTS)
    torch.testing.assert_close(output.sequence_probs.sum(-1), torch.ones(BATCH))


def test_cosine_router_logits_are_bounded_by_the_inverse_temperature():
    module = router("cosine", temperature=0.5)
    output = module(hidden_states() * 1000)
    assert float(output.router_logits.detach().abs().max()) <= 1 / 0.5 + 1e-4


def test_dselect_k_mixture_becomes_one_hot_when_codes_saturate():
    module = router("dselect_k", top_k=1)
    with torch.no_grad():
        module.code.weight.zero_()
        module.code.bias.copy_(torch.tensor([10.0, -10.0]))  # bits (1, 0) -> expert 1
    output = module(hidden_states())
    assert bool((output.expert_indices[:, 0] == 1).all())
    torch.testing.assert_close(output.router_probs[:, 1], torch.ones(BATCH * SEQ))


def test_build_router_rejects_unknown_kind_and_options():
    with pytest.raises(UpcycleError, match="unknown router kind 'nope'"):
        build_router("nope", HIDDEN, EXPERTS, 2)
    with pytest.raises(UpcycleError, match="does not take option"):
        build_router("topk", HIDDEN, EXPERTS, 2, slots_per_expert=2)
