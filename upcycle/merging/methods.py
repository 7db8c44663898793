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


def weighted_mean(stack: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Return sum_e c_e * stack[e] / sum_e c_e in float64 (all-zero coefficients: the plain mean)."""
    coefficients = coefficients.double()
    if coefficients.sum() <= 0:
        coefficients = torch.ones_like(coefficients)
    total = torch.zeros(stack.shape[1:], dtype=torch.float64)
    for expert, coefficient in enumerate(coefficients.tolist()):
        if coefficient:
            total += stack[expert].double() * coefficient
    return total / coefficients.sum()


def task_arithmetic(
    stack: torch.Tensor, base: torch.Tensor, coefficients: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """Return base + scale * sum_e w_e (stack[e] - base), w the normalised coefficients (float64)."""
    weights = normalized(coefficients)
    base = base.double()
    merged = torch.zeros_like(base)
    for expert, weight in enumerate(weights.tolist()):
        if weight:
            merged += (stack[expert].double() - base) * weight
    return base + scale * merged


def ties(
    stack: torch.Tensor, base: torch.Tensor, coefficients: torch.Tensor, density: float, scale: float = 1.0
) -> torch.Tensor:
    """Return the TIES merge (trim to `density`, elect sign, disjoint weighted mean) added to `base` (float32).

    Holds every expert's task vector of this projection at once: the sign election needs them all.
    """
    experts = stack.shape[0]
    base = base.float()
    deltas = (stack.float() - base).reshape(experts, -1)
    keep = max(1, round(density * deltas.shape[1]))
    if keep < deltas.shape[1]:
        magnitudes = deltas.abs()
        # The keep-th largest magnitude per expert; entries at least that large survive the trim.
        threshold = magnitudes.kthvalue(deltas.shape[1] - keep + 1, dim=1, keepdim=True).values
        deltas = deltas * (magnitudes >= threshold)
    weights = normalized(coefficients).float().unsqueeze(1)
    elected = torch.sign((weights * deltas).sum(0))
    agrees = (torch.sign(deltas) == elected) & (deltas != 0)
    numerator = (weights * deltas * agrees).sum(0)
    denominator = (weights * agrees).sum(0)
    merged = torch.where(denominator > 0, numerator / denominator.clamp_min(1e-30), torch.zeros_like(numerator))
    return base + scale * merged.reshape(base.shape)


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


def concat(stack: torch.Tensor, weights: torch.Tensor, projection: str) -> torch.Tensor:
    """Return the experts side by side as one wider FFN projection computing sum_e w_e expert_e(x).

    gate/up (E, I, H) become (E*I, H); down (E, H, I) becomes (H, E*I) with expert e's columns
    scaled by w_e. The activation acts per neuron, so the wider FFN is the mixture exactly.
    """
    if projection == "down":
        scaled = stack.double() * weights.double().view(-1, 1, 1)
        return torch.cat(list(scaled), dim=1)
    return torch.cat(list(stack), dim=0)
