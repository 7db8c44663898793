"""The merge arithmetic and the expert clustering, on hand-made tensors."""

import torch

from upcycle.merging import methods
from upcycle.merging.grouping import average_linkage, output_distances, weight_distances
from upcycle.merging.plan import dare_generator


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

    def masks() -> torch.Generator:
        return torch.Generator().manual_seed(7)

    full = methods.dare(experts, base, weights, density=1.0, generator=masks())
    assert torch.allclose(full.double(), methods.task_arithmetic(experts, base, weights), atol=1e-5)
    dropped = methods.dare(experts, base, weights, density=0.25, generator=masks())
    assert torch.equal(dropped, methods.dare(experts, base, weights, density=0.25, generator=masks()))
    single = methods.dare(experts[:1], base, torch.ones(1), density=0.25, generator=masks()) - base
    kept = single != 0
    assert 0.2 < kept.float().mean().item() < 0.3  # about a quarter of the entries survive ...
    assert torch.allclose(single[kept], 4 * (experts[0] - base)[kept], atol=1e-5)  # ... rescaled by 1/density


def _old_dare_seed(seed: int, layer: int, projection: str, members: list[int]) -> int:
    """The scheme `dare_generator` replaced: only the first member counted, and the terms overlapped."""
    return (seed * 1_000_003 + layer * 10_007 + ("gate", "up", "down").index(projection) * 101 + members[0]) % (2**63)


def _mask(generator: torch.Generator) -> torch.Tensor:
    return torch.rand(64, generator=generator) < 0.5


def test_dare_masks_differ_for_groups_the_old_seed_scheme_confused():
    confused = [
        ((0, "gate", [101, 102]), (0, "up", [0, 1])),  # member 101 of gate = member 0 of up
        ((0, "gate", [3, 101]), (0, "gate", [3, 102])),  # same first member, differing beyond 101
        ((1, "gate", [0, 1]), (0, "gate", [10_007, 10_008])),  # member 10007 of layer 0 = member 0 of layer 1
    ]
    for a, b in confused:
        assert _old_dare_seed(5, *a) == _old_dare_seed(5, *b)
        assert not torch.equal(_mask(dare_generator(5, *a)), _mask(dare_generator(5, *b))), (a, b)
    # ... and a group's masks depend only on (seed, layer, projection, members).
    assert torch.equal(_mask(dare_generator(5, 0, "up", [3, 101])), _mask(dare_generator(5, 0, "up", [3, 101])))
    assert not torch.equal(_mask(dare_generator(5, 0, "up", [3, 101])), _mask(dare_generator(6, 0, "up", [3, 101])))


def test_dare_merges_of_groups_that_differ_beyond_member_101_use_different_masks():
    generator = torch.Generator().manual_seed(0)
    experts, base = torch.randn(2, 16, 16, generator=generator), torch.zeros(16, 16)
    weights = torch.ones(2)
    first = methods.dare(experts, base, weights, 0.5, dare_generator(0, 0, "gate", [3, 101]))
    second = methods.dare(experts, base, weights, 0.5, dare_generator(0, 0, "gate", [3, 102]))
    assert not torch.equal(first, second)


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


def test_dare_masks_drawn_ahead_give_the_bits_of_drawing_in_place():
    """The merge draws each projection's masks on another thread, packed, in chunks; the result is the one
    drawing them inside `dare` from the same generator gives, over several chunks and a short last one."""
    from upcycle.merging.masks import DareMasksAhead

    generator = torch.Generator().manual_seed(4)
    experts = (0.02 * torch.randn(3, 301, 1743, generator=generator)).bfloat16()  # > 2 DARE_CHUNKs, odd tail
    base = (0.02 * torch.randn(301, 1743, generator=generator)).bfloat16()
    assert base.numel() > 2 * methods.DARE_CHUNK and base.numel() % methods.DARE_CHUNK % 8
    weights = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    expected = methods.dare(list(experts), base, weights, 0.4, dare_generator(7, 2, "up", [0, 1, 2]), 0.8)
    ahead = DareMasksAhead(seed=7, experts=3, numel=base.numel(), density=0.4)
    ahead.request(2)
    requested = ahead.take(2, "up")
    drawn_on_the_spot = ahead.take(2, "up")  # taken already: drawn now, from a fresh generator
    for masks in (requested, drawn_on_the_spot):
        got = methods.dare(list(experts), base, weights, 0.4, None, 0.8, masks=masks)
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
