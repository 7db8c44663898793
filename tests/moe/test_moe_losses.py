"""The router losses against hand computations on small examples."""

from __future__ import annotations

import math

import torch

from upcycle.moe import MoE, collect_aux_loss, load_balancing_loss, router_z_loss, tokens_per_expert


def test_load_balancing_loss_top1_matches_hand_computation():
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8]])
    indices = torch.tensor([[0], [0], [1]])
    # f = (2/3, 1/3); P = (0.5, 0.5); loss = 2 * (2/3 * 0.5 + 1/3 * 0.5) = 1.0
    torch.testing.assert_close(load_balancing_loss(probs, indices, 2), torch.tensor(1.0))
    skewed = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    # f = (1, 0); P = (0.8, 0.2); loss = 2 * 0.8 = 1.6
    torch.testing.assert_close(load_balancing_loss(skewed, torch.zeros(3, 1, dtype=torch.long), 2), torch.tensor(1.6))


def test_load_balancing_loss_top2_counts_each_choice_and_skips_padding():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]])
    indices = torch.tensor([[0, 1], [1, 2], [2, 0]])
    mask = torch.tensor([True, True, False])
    # Real tokens 0 and 1: assignments {0, 1, 1, 2} -> f = (1/4, 2/4, 1/4); P = (0.3, 0.45, 0.25)
    expected = 3 * (0.25 * 0.3 + 0.5 * 0.45 + 0.25 * 0.25)
    torch.testing.assert_close(load_balancing_loss(probs, indices, 3, mask), torch.tensor(expected))


def test_router_z_loss_matches_hand_computation():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 5.0]])
    mask = torch.tensor([True, True, False])
    # logsumexp: log 2 and log 4; mean of squares over the two real tokens.
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    torch.testing.assert_close(router_z_loss(logits, mask), torch.tensor(expected))


def test_tokens_per_expert_counts_only_dispatched_real_pairs():
    indices = torch.tensor([[0, 1], [1, 2], [2, 0]])
    dispatched = torch.tensor([[True, False], [True, True], [True, True]])
    mask = torch.tensor([True, True, False])
    assert tokens_per_expert(indices, 3, dispatched, mask).tolist() == [1.0, 1.0, 1.0]


def test_block_aux_loss_is_the_weighted_sum_of_its_losses_and_collected_over_a_model():
    torch.manual_seed(0)
    block = MoE(8, 16, 4, 2, load_balancing_coef=0.1, z_loss_coef=0.01)
    inputs = torch.randn(2, 5, 8)
    block(inputs)
    routing = block.last_router_output
    balance = load_balancing_loss(routing.router_probs, routing.expert_indices, 4)
    z_loss = router_z_loss(routing.router_logits)
    torch.testing.assert_close(block.aux_loss, 0.1 * balance + 0.01 * z_loss)
    model = torch.nn.Sequential(block, MoE(8, 16, 4, 2))
    model(inputs)
    torch.testing.assert_close(collect_aux_loss(model), model[0].aux_loss + model[1].aux_loss)


def test_loss_free_balancing_moves_bias_against_the_measured_load():
    torch.manual_seed(0)
    block = MoE(8, 16, 4, 1, bias_update_rate=0.5).train()
    with torch.no_grad():
        block.router.weight.zero_()
        block.router.weight[0, 0] = 10.0
    inputs = torch.randn(16, 8).abs()  # every token prefers expert 0
    block(inputs)
    load = block.last_stats.tokens_per_expert
    assert load.tolist() == [16.0, 0.0, 0.0, 0.0]
    assert block.router.selection_bias.tolist() == [-0.5, 0.5, 0.5, 0.5]
