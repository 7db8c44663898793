"""The chunked, threaded merge arithmetic gives the bits of a straightforward whole-tensor version of
the same semantics (the code before it was chunked), on random inputs of awkward sizes; and the
chunked Gram matrix gives the distances and the clusters of the whole-matrix one."""

from __future__ import annotations

import pytest
import torch

from upcycle.merging import grouping, methods


def reference_weighted_mean(experts: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    coefficients = coefficients.double()
    if coefficients.sum() <= 0:
        coefficients = torch.ones_like(coefficients)
    total = torch.zeros(experts.shape[1:], dtype=torch.float64)
    for expert, coefficient in zip(experts, coefficients.tolist(), strict=True):
        if coefficient:
            total += expert.double() * coefficient
    return total / coefficients.sum()


def reference_task_arithmetic(
    experts: torch.Tensor, base: torch.Tensor, coefficients: torch.Tensor, scale: float
) -> torch.Tensor:
    base = base.double()
    total = torch.zeros_like(base)
    for expert, weight in zip(experts, methods.normalized(coefficients).tolist(), strict=True):
        if weight:
            total += (expert.double() - base) * weight
    return total * scale + base


def reference_ties(
    experts: torch.Tensor, base: torch.Tensor, coefficients: torch.Tensor, density: float, scale: float
) -> torch.Tensor:
    """Whole-tensor trim; elect and merge per block of 2^14 elements laid out as (E, 2^14)[:, :n], as the code
    before did: torch.sum over the experts is in expert order except in a partial vector block, which only the
    last, shorter block has, so its size and layout are part of the result."""
    base = base.float().reshape(-1)
    deltas = experts.float().reshape(len(experts), -1) - base
    keep = max(1, round(density * base.numel()))
    if keep < base.numel():
        thresholds = deltas.abs().kthvalue(base.numel() - keep + 1, dim=1).values.unsqueeze(1)
        deltas = deltas * (deltas.abs() >= thresholds)
    weights = methods.normalized(coefficients).float().unsqueeze(1)
    merged, block = torch.empty_like(base), torch.empty(len(experts), 1 << 14)
    for start in range(0, base.numel(), 1 << 14):
        end = min(start + (1 << 14), base.numel())
        part = block[:, : end - start]
        part.copy_(deltas[:, start:end])
        weighted = weights * part
        agrees = (torch.sign(part) * torch.sign(weighted.sum(0)) > 0).float()
        numerator, denominator = (weighted * agrees).sum(0), (agrees * weights).sum(0)
        zeros = torch.zeros_like(numerator)
        merged[start:end] = base[start:end] + scale * torch.where(
            denominator > 0, numerator / denominator.clamp_min(1e-30), zeros
        )
    return merged.view(experts.shape[1:])


def reference_dare(
    experts: torch.Tensor,
    base: torch.Tensor,
    coefficients: torch.Tensor,
    density: float,
    generator: torch.Generator,
    scale: float,
) -> torch.Tensor:
    base = base.float()
    merged = torch.zeros_like(base)
    for expert, weight in enumerate(methods.normalized(coefficients).tolist()):
        kept = torch.rand(base.shape, generator=generator) < density
        if weight:
            merged += (experts[expert].float() - base) * kept * (weight / density)
    return base + scale * merged


def reference_weight_distances(stacks: list[torch.Tensor]) -> torch.Tensor:
    flat = torch.cat([stack.reshape(len(stack), -1) for stack in stacks], dim=1).double()
    gram = flat @ flat.T
    return (gram.diag().unsqueeze(0) + gram.diag().unsqueeze(1) - 2 * gram).clamp_min(0).sqrt()


def bits(tensor: torch.Tensor) -> tuple[torch.dtype, torch.Size, bytes]:
    return tensor.dtype, tensor.shape, tensor.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.fixture
def small_chunks(monkeypatch):
    """Threshold and Gram chunks of awkward, small sizes, so that small inputs span many, and two threads.
    (CHUNK stays: ties' bits depend on it, see reference_ties.)"""
    monkeypatch.setattr(methods, "THRESHOLD_CHUNK", 1537)
    monkeypatch.setattr(grouping, "GRAM_CHUNK", 999)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def random_case(seed: int) -> dict:
    """A random merge input: E in 1..8, odd shapes, bfloat16/float32/float64 experts and base, some experts
    equal to the base in part or in whole, some zero coefficients, densities including 1, scales 1 and not."""
    generator = torch.Generator().manual_seed(seed)

    def pick(options: list) -> object:
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    experts_count = 1 + seed % 8
    largest = 6 if seed % 6 == 0 else 400  # a few elements, or up to ~10 chunks
    rows, columns = (int(n) for n in torch.randint(1, largest, (2,), generator=generator))
    dtype, base_dtype = pick([torch.bfloat16, torch.float32]), pick([torch.bfloat16, torch.float32, torch.float64])
    experts = (0.02 * torch.randn(experts_count, rows, columns, generator=generator)).to(dtype)
    base = (0.02 * torch.randn(rows, columns, generator=generator)).to(base_dtype)
    if seed % 3 == 0:
        experts[0] = base.to(dtype)  # a task vector of zeros
    if seed % 4 == 1:
        experts[:, : rows // 2] = base[: rows // 2].to(dtype)  # many ties at magnitude 0
    coefficients = pick([torch.ones(experts_count), torch.rand(experts_count, generator=generator)]).double()
    if seed % 5 == 2 and experts_count > 1:
        coefficients[1] = 0.0
    return dict(
        experts=experts,
        stack=experts if seed % 2 else list(experts),  # a stack, or the per-expert list plan.py passes
        base=base,
        coefficients=coefficients,
        density=pick([0.5, 0.1, 0.9, 1.0, 0.33, 1e-6]),
        scale=pick([1.0, 0.7]),
        seed=seed,
    )


@pytest.mark.parametrize("seed", range(40))
def test_methods_give_the_bits_of_the_whole_tensor_reference(seed, small_chunks):
    case = random_case(seed)
    experts, stack, base, coefficients = case["experts"], case["stack"], case["base"], case["coefficients"]
    density, scale = case["density"], case["scale"]
    assert bits(methods.weighted_mean(stack, coefficients)) == bits(reference_weighted_mean(experts, coefficients))
    assert bits(methods.task_arithmetic(stack, base, coefficients, scale)) == bits(
        reference_task_arithmetic(experts, base, coefficients, scale)
    )
    assert bits(methods.ties(stack, base, coefficients, density, scale)) == bits(
        reference_ties(experts, base, coefficients, density, scale)
    )
    new, old = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    assert bits(methods.dare(stack, base, coefficients, density, new, scale)) == bits(
        reference_dare(experts, base, coefficients, density, old, scale)
    )
    assert torch.equal(new.get_state(), old.get_state())  # the generator advanced as far


def test_ties_at_the_default_chunk_sizes_over_several_chunks_and_threads():
    generator = torch.Generator().manual_seed(11)
    experts = (0.02 * torch.randn(5, 301, 1103, generator=generator)).bfloat16()  # > CHUNK and THRESHOLD_CHUNK
    base = (0.02 * torch.randn(301, 1103, generator=generator)).bfloat16()
    coefficients = torch.tensor([3.0, 1.0, 0.0, 7.0, 2.0], dtype=torch.float64)
    assert experts[0].numel() > 2 * max(methods.CHUNK, methods.THRESHOLD_CHUNK)
    assert bits(methods.ties(list(experts), base, coefficients, 0.3)) == bits(
        reference_ties(experts, base, coefficients, 0.3, 1.0)
    )


@pytest.mark.parametrize("zero_share, density", [(1.0, 0.3), (0.9, 0.5), (0.9, 0.05), (0.5, 0.5)])
def test_ties_when_most_task_vector_entries_are_zero(zero_share, density):
    """Experts equal to the base in most entries (all: copy-upcycled, untrained): the threshold's sampled
    bracket is one value, 0, which may or may not be the answer; the bits are the reference's either way."""
    generator = torch.Generator().manual_seed(5)
    base = (0.02 * torch.randn(257, 1031, generator=generator)).bfloat16()  # > 4 x the threshold's sample
    experts = (base + 0.002 * torch.randn(4, 257, 1031, generator=generator)).bfloat16()
    same = torch.rand(4, 257, 1031, generator=generator) < zero_share
    experts[same] = base.expand_as(experts)[same]
    coefficients = torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64)
    assert bits(methods.ties(list(experts), base, coefficients, density)) == bits(
        reference_ties(experts, base, coefficients, density, 1.0)
    )


def test_ties_refuses_negative_coefficients():
    with pytest.raises(ValueError, match="non-negative"):
        methods.ties(torch.zeros(2, 3, 3), torch.zeros(3, 3), torch.tensor([1.0, -0.5]), 0.5)


@pytest.mark.parametrize("seed", range(20))
def test_weight_distances_match_the_whole_matrix_and_give_the_same_clusters(seed, small_chunks):
    generator = torch.Generator().manual_seed(seed)
    experts = 2 + seed % 7
    shapes = [(int(torch.randint(1, 60, (1,), generator=generator)), 37), (41, 13), (29, 53)]
    centres = torch.randn(3, sum(rows * columns for rows, columns in shapes), generator=generator)
    # Planted clusters with spread, so that the average-linkage steps are not near ties.
    flat = centres[torch.randint(3, (experts,), generator=generator)]
    flat = (flat + 0.3 * torch.randn(flat.shape, generator=generator)).bfloat16()
    stacks = list(torch.split(flat, [rows * columns for rows, columns in shapes], dim=1))
    stacks = [stack.reshape(experts, rows, columns) for stack, (rows, columns) in zip(stacks, shapes, strict=True)]
    expected = reference_weight_distances(stacks)
    for given in (stacks, [list(stack) for stack in stacks]):
        distances = grouping.weight_distances(given)
        assert torch.allclose(distances, expected, rtol=1e-12, atol=1e-9)
        for groups in range(1, experts + 1):
            assert grouping.average_linkage(distances, groups) == grouping.average_linkage(expected, groups)


@pytest.mark.parametrize("sampled", ["larger", "smaller"])
def test_ties_thresholds_are_exact_when_the_sample_misleads(sampled, small_chunks, monkeypatch):
    """The threshold search brackets the answer from an evenly spaced sample; here the sampled entries are
    larger (or smaller) than all the others, so the bracket misses and the second pass must find it."""
    monkeypatch.setattr(methods, "_SAMPLE", 100)
    generator = torch.Generator().manual_seed(5)
    experts, base = 0.01 * torch.randn(3, 300, 7, generator=generator), torch.zeros(300, 7)
    sampled_entries = experts.view(3, -1)[:, :: 300 * 7 // 100]
    sampled_entries.mul_(1000.0 if sampled == "larger" else 0.001)
    coefficients = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    for density in (0.2, 0.5, 0.9):
        assert bits(methods.ties(experts, base, coefficients, density)) == bits(
            reference_ties(experts, base, coefficients, density, 1.0)
        )


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ties_and_dare_into_an_output_dtype_give_the_bits_of_casting_the_float32_result(base_dtype, out_dtype):
    """The merge hands ties and dare an output tensor of the checkpoint's dtype: each chunk is cast into it as it
    is done, and a bfloat16 base is used without a float32 copy; the bits are the reference's, cast."""
    generator = torch.Generator().manual_seed(6)
    base = (0.02 * torch.randn(129, 1031, generator=generator)).to(base_dtype)  # several chunks, an odd tail
    experts = (base + 0.002 * torch.randn(3, 129, 1031, generator=generator)).bfloat16()
    coefficients = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    out = torch.empty(129, 1031, dtype=out_dtype)
    got = methods.ties(list(experts), base, coefficients, 0.3, 0.7, out=out)
    assert got.data_ptr() == out.data_ptr() and got.dtype == out_dtype
    assert bits(got) == bits(reference_ties(experts, base, coefficients, 0.3, 0.7).to(out_dtype))
    new, old = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    got = methods.dare(list(experts), base, coefficients, 0.4, new, 0.7, out=torch.empty(129, 1031, dtype=out_dtype))
    assert got.dtype == out_dtype
    assert bits(got) == bits(reference_dare(experts, base, coefficients, 0.4, old, 0.7).to(out_dtype))
