"""The merge arithmetic and the expert clustering, on hand-made tensors."""

import torch

from upcycle.merging import methods
from upcycle.merging.grouping import average_linkage, output_distances, weight_distances


def test_ties_trims_elects_the_sign_and_averages_only_agreeing_entries():
    experts = torch.tensor([[1.0, -2.0, 0.1, 3.0], [2.0, 1.0, -0.2, -1.5], [-3.0, 0.5, 0.3, 2.0]]).unsqueeze(
        1
    )  # (E=3, 1, 4); base zero, so the experts are the task vectors
    # Trim to 2 of 4: [0,-2,0,3], [2,0,0,-1.5], [-3,0,0,2]; sums -1,-2,0,3.5 elect -,-,none,+.
    merged = methods.ties(experts, torch.zeros(1, 4), torch.ones(3), density=0.5)
    assert torch.equal(merged, torch.tensor([[-3.0, -2.0, 0.0, 2.5]]))


def test_ties_weighs_the_sign_election_and_the_mean_by_the_coefficients():
    experts = torch.tensor([[1.0], [-1.0], [-1.0]]).view(3, 1, 1)
    assert methods.ties(experts, torch.zeros(1, 1), torch.tensor([5.0, 1.0, 1.0]), density=1.0).item() == 1.0


def test_task_arithmetic_is_base_plus_scaled_weighted_mean_of_task_vectors():
    base = torch.tensor([[1.0, 1.0]])
    experts = torch.tensor([[[3.0, 1.0]], [[1.0, 5.0]]])
    merged = methods.task_arithmetic(experts, base, torch.tensor([3.0, 1.0]), scale=0.5)
    assert torch.allclose(merged, torch.tensor([[1.75, 1.5]], dtype=torch.float64))


def test_dare_drops_and_rescales_reproducibly_and_is_task_arithmetic_at_density_one():
    generator = torch.Generator().manual_seed(0)
    experts, base = torch.randn(3, 64, 64, generator=generator), torch.randn(64, 64, generator=generator)
    weights = torch.tensor([1.0, 2.0, 1.0])
    full = methods.dare(experts, base, weights, density=1.0, seed=7)
    assert torch.allclose(full.double(), methods.task_arithmetic(experts, base, weights), atol=1e-5)
    dropped = methods.dare(experts, base, weights, density=0.25, seed=7)
    assert torch.equal(dropped, methods.dare(experts, base, weights, density=0.25, seed=7))
    single = methods.dare(experts[:1], base, torch.ones(1), density=0.25, seed=7) - base
    kept = single != 0
    assert 0.2 < kept.float().mean().item() < 0.3  # about a quarter of the entries survive ...
    assert torch.allclose(single[kept], 4 * (experts[0] - base)[kept], atol=1e-5)  # ... rescaled by 1/density


def test_weighted_mean_of_identical_experts_is_bitwise_the_expert():
    expert = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    stack = expert.expand(3, -1, -1)
    assert torch.equal(methods.weighted_mean(stack, torch.tensor([17.0, 4.0, 9.0])).float(), expert)


def test_average_linkage_recovers_planted_clusters_in_order():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = centres[[1, 0, 2, 0, 1, 2]] + 0.1 * torch.randn(6, 2, generator=torch.Generator().manual_seed(2))
    assert average_linkage(output_distances(points), 3) == [[0, 4], [1, 3], [2, 5]]
    assert average_linkage(output_distances(points), 6) == [[i] for i in range(6)]
    assert average_linkage(output_distances(points), 1) == [list(range(6))]


def test_weight_distances_equal_distances_between_flattened_experts():
    generator = torch.Generator().manual_seed(3)
    stacks = [torch.randn(4, 3, 5, generator=generator), torch.randn(4, 5, 3, generator=generator)]
    flat = torch.cat([s.reshape(4, -1) for s in stacks], dim=1).double()
    assert torch.allclose(weight_distances(stacks), torch.cdist(flat, flat), atol=1e-9)
