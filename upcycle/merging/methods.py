"""Merging one projection of several experts into one tensor: the arithmetic behind `upcycle merge`,
and the names of the methods (`METHODS`) with what each needs.

Every function takes a stack of expert weights of shape (E, out, in) for one projection (gate,
up or down) of one layer and per-expert coefficients (E,), and returns one merged tensor in
float64 or float32; the caller casts it to the output dtype.

- `weighted_mean`: sum_e c_e W_e / sum_e c_e, accumulated in float64 one expert at a time, so
  identical experts with integer coefficients (uniform, usage counts) give the input back bit
  for bit.
- Task vectors (Ilharco et al. 2023; TIES, Yadav et al. 2023; DARE, Yu et al. 2024): each expert
  minus a base FFN is a task vector tau_e; the merge is base + scale * merged(tau).
  `task_arithmetic` merges by the weighted mean; `ties` keeps each vector's `density` largest
  magnitudes (trim), elects per entry the sign of the weighted sum (elect), and averages only the
  kept entries that agree with it (disjoint merge); `dare` drops each entry with probability
  1 - density and rescales the survivors by 1 / density, then takes the weighted mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from upcycle.merging.method_names import DEFAULT_DENSITY, METHODS, NEEDS_CALIBRATION, TASK_VECTOR_METHODS

__all__ = ["DEFAULT_DENSITY", "METHODS", "NEEDS_CALIBRATION", "TASK_VECTOR_METHODS"]


def normalized(coefficients: torch.Tensor) -> torch.Tensor:
    """Return `coefficients` (float64) scaled to sum to 1; all-zero coefficients become uniform."""
    coefficients = coefficients.double()
    total = coefficients.sum()
    if total <= 0:
        return torch.full_like(coefficients, 1.0 / len(coefficients))
    return coefficients / total


# Elements of one expert handled at a time: a chunk's float64 buffers stay in the CPU cache, and torch runs
# each operation on it in one thread (under its parallel grain), with no thread hand-offs.
CHUNK = 1 << 14


def _flat_experts(stack: torch.Tensor | Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Size]:
    """Return each expert of `stack` (a tensor (E, ...) or a sequence of E equal-shaped tensors) as a
    flat tensor (a view where the expert is contiguous), and the shape of one expert."""
    experts = [stack[expert] for expert in range(len(stack))]
    return [expert.reshape(-1) for expert in experts], experts[0].shape


def _chunks(numel: int) -> range:
    return range(0, numel, CHUNK)


def weighted_mean(stack: torch.Tensor | Sequence[torch.Tensor], coefficients: torch.Tensor) -> torch.Tensor:
    """Return sum_e c_e * stack[e] / sum_e c_e in float64 (all-zero coefficients: the plain mean).

    `stack` is a tensor (E, ...) or a sequence of E tensors. Accumulated in float64 one expert at a
    time, chunk by chunk in preallocated buffers: the same operations on every element as summing
    whole float64 copies of the experts, so the same bits, without the copies.
    """
    coefficients = coefficients.double()
    if coefficients.sum() <= 0:
        coefficients = torch.ones_like(coefficients)
    divisor = coefficients.sum()
    flats, shape = _flat_experts(stack)
    used = [(flat, coefficient) for flat, coefficient in zip(flats, coefficients.tolist(), strict=True) if coefficient]
    total = torch.empty(flats[0].numel(), dtype=torch.float64)
    buffer = torch.empty(CHUNK, dtype=torch.float64)
    for start in _chunks(total.numel()):
        accumulator = total[start : start + CHUNK]
        term = buffer[: len(accumulator)]
        accumulator.zero_()
        for flat, coefficient in used:
            term.copy_(flat[start : start + CHUNK])
            accumulator.add_(term if coefficient == 1.0 else term.mul_(coefficient))  # x * 1.0 is x
        accumulator.div_(divisor)
    return total.view(shape)


def task_arithmetic(
    stack: torch.Tensor | Sequence[torch.Tensor], base: torch.Tensor, coefficients: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """Return base + scale * sum_e w_e (stack[e] - base), w the normalised coefficients (float64).

    Computed chunk by chunk in preallocated float64 buffers, with the same operations per element
    as on whole float64 tensors (the same bits).
    """
    weights = normalized(coefficients)
    flats, shape = _flat_experts(stack)
    used = [(flat, weight) for flat, weight in zip(flats, weights.tolist(), strict=True) if weight]
    base = base.reshape(-1)
    merged = torch.empty(base.numel(), dtype=torch.float64)
    base_chunk, term = torch.empty(CHUNK, dtype=torch.float64), torch.empty(CHUNK, dtype=torch.float64)
    for start in _chunks(merged.numel()):
        accumulator = merged[start : start + CHUNK]
        length = len(accumulator)
        base_chunk[:length].copy_(base[start : start + CHUNK])
        accumulator.zero_()
        for flat, weight in used:
            term[:length].copy_(flat[start : start + CHUNK])
            accumulator.add_(term[:length].sub_(base_chunk[:length]).mul_(weight))
        accumulator.mul_(scale).add_(base_chunk[:length])
    return merged.view(shape)


def kth_smallest_magnitude(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Return the k-th smallest (1-based) of the non-negative float32 `magnitudes` (1-D), as a 0-d float32
    tensor: the value `magnitudes.kthvalue(k)` gives, found by a two-pass radix select on the bits.

    Non-negative IEEE floats order as their bit patterns do, so counting the upper and then the
    lower 16 bits finds the exact element in two histograms (kthvalue sorts partially: ~10x slower).
    """
    bits = magnitudes.view(torch.int32)
    high = (bits >> 16) & 0x7FFF
    cumulative = torch.bincount(high, minlength=1 << 15).cumsum(0)
    bin_high = int(torch.searchsorted(cumulative, k))
    below = int(cumulative[bin_high - 1]) if bin_high else 0
    low = bits[high == bin_high] & 0xFFFF
    bin_low = int(torch.searchsorted(torch.bincount(low, minlength=1 << 16).cumsum(0), k - below))
    return torch.tensor((bin_high << 16) | bin_low, dtype=torch.int32).view(torch.float32)


def ties(
    stack: torch.Tensor | Sequence[torch.Tensor],
    base: torch.Tensor,
    coefficients: torch.Tensor,
    density: float,
    scale: float = 1.0,
) -> torch.Tensor:
    """Return the TIES merge (trim to `density`, elect sign, disjoint weighted mean) added to `base` (float32).

    The trim threshold of each expert needs all its task vector at once (one expert at a time); the
    sign election and the merge are then done chunk by chunk across the experts, with the same
    operations per element as on the whole (E, N) task-vector matrix (the same bits).
    """
    flats, shape = _flat_experts(stack)
    experts = len(flats)
    base = base.float().reshape(-1)
    numel = base.numel()
    keep = max(1, round(density * numel))
    thresholds = None
    if keep < numel:
        # The keep-th largest magnitude per expert; entries at least that large survive the trim.
        thresholds = torch.stack(
            [kth_smallest_magnitude((flat.float() - base).abs_(), numel - keep + 1) for flat in flats]
        ).unsqueeze(1)
    weights = normalized(coefficients).float().unsqueeze(1)
    merged = torch.empty(numel, dtype=torch.float32)
    deltas_buffer = torch.empty(experts, CHUNK, dtype=torch.float32)
    for start in _chunks(numel):
        end = min(start + CHUNK, numel)
        deltas = deltas_buffer[:, : end - start]
        base_chunk = base[start:end]
        for expert, flat in enumerate(flats):
            torch.sub(flat[start:end].float(), base_chunk, out=deltas[expert])
        if thresholds is not None:
            deltas.mul_(torch.ge(deltas.abs(), thresholds))
        weighted = weights * deltas
        elected = torch.sign(weighted.sum(0))
        # 1.0 where an entry is non-zero with the elected sign, else 0.0 (NaN: 0.0), as floats: the
        # products below are then float * float, with the values float * bool gives.
        agrees = torch.sign(deltas).mul_(elected).gt_(0)
        numerator = weighted.mul_(agrees).sum(0)
        denominator = agrees.mul_(weights).sum(0)
        chunk = torch.where(denominator > 0, numerator / denominator.clamp_min(1e-30), torch.zeros_like(numerator))
        torch.add(base_chunk, scale * chunk, out=merged[start:end])
    return merged.view(shape)


def dare(
    stack: torch.Tensor,
    base: torch.Tensor,
    coefficients: torch.Tensor,
    density: float,
    generator: torch.Generator,
    scale: float = 1.0,
) -> torch.Tensor:
    """Return base + scale * sum_e w_e * drop_rescale(stack[e] - base) (DARE, float32).

    The masks are drawn from `generator`, one per expert in order, which advances it.
    """
    weights = normalized(coefficients)
    base = base.float()
    merged = torch.zeros_like(base)
    for expert, weight in enumerate(weights.tolist()):
        # Draw every expert's mask, used or not, so a mask depends only on (generator state, expert).
        kept = torch.rand(base.shape, generator=generator) < density
        if weight:
            merged += (stack[expert].float() - base) * kept * (weight / density)
    return base + scale * merged


def concat(stack: torch.Tensor | Sequence[torch.Tensor], weights: torch.Tensor, projection: str) -> torch.Tensor:
    """Return the experts side by side as one wider FFN projection computing sum_e w_e expert_e(x).

    gate/up (E, I, H) become (E*I, H); down (E, H, I) becomes (H, E*I) with expert e's columns
    scaled by w_e. The activation acts per neuron, so the wider FFN is the mixture exactly.
    """
    if projection == "down":
        scaled = [expert.double() * weight for expert, weight in zip(stack, weights.double(), strict=True)]
        return torch.cat(scaled, dim=1)
    return torch.cat(list(stack), dim=0)
