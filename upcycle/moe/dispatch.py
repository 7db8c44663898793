"""Token dispatch: capacity limits, sorting (token, expert) pairs by expert, grouped matmuls.

The expert computation never loops over tokens: pairs are sorted by expert so that each
expert's tokens form one contiguous segment, and one grouped matmul multiplies every segment by
its expert's weight (`torch.nn.functional.grouped_mm` where it works, a per-expert loop of
`torch.mm` otherwise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from upcycle.errors import UpcycleError

__all__ = ["DispatchPlan", "apply_capacity", "expert_capacity", "grouped_linear", "plan_dispatch"]

# (device type, dtype) -> whether F.grouped_mm ran there; probed once, then reused.
_GROUPED_MM_WORKS: dict[tuple[str, torch.dtype], bool] = {}


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    grouped_mm's CPU backward rejects non-contiguous gradients (e.g. the zero-stride gradient of
    ``out.sum()``: "Invalid strides/sizes" in torch 2.13).
    """

    @staticmethod
    def forward(ctx: object, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _aligned(tensor: torch.Tensor) -> bool:
    size = tensor.element_size()
    return tensor.data_ptr() % 16 == 0 and all((s * size) % 16 == 0 for s in tensor.stride() if s != 1)


def _grouped_mm_usable(inputs: torch.Tensor, weight_t: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm") or inputs.dtype != weight_t.dtype:
        return False
    # The kernels want 16-byte aligned pointers and strides (CPU: "strides should be multiple of
    # 16 bytes"); tiny or odd hidden sizes take the fallback.
    if not (_aligned(inputs) and _aligned(weight_t)):
        return False
    return _GROUPED_MM_WORKS.get((inputs.device.type, inputs.dtype), True)


def _looped_mm(inputs: torch.Tensor, weight_t: torch.Tensor, group_sizes: list[int]) -> torch.Tensor:
    # Measured on CPU (float32, H=1024, I=2816, 8 experts, 1024 pairs, fwd+bwd): one torch.mm per
    # expert over `unbind`-ed weights is as fast as padding every group to the largest and calling
    # torch.bmm when groups are even, and faster when they are uneven (no padded FLOPs). Indexing
    # `weight[e]` instead of `unbind` was 3x slower in backward (a full-size zero gradient per
    # expert).
    segments = inputs.split(group_sizes)
    outputs = [segment @ weight for segment, weight in zip(segments, weight_t.unbind(0), strict=True)]
    return torch.cat(outputs)


def grouped_linear(
    inputs: torch.Tensor,
    weight: torch.Tensor,
    group_sizes: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multiply each expert's contiguous segment of rows by that expert's weight.

    Args:
        inputs: (S, in) rows sorted by expert.
        weight: (E, out, in), in the `nn.Linear` orientation.
        group_sizes: (E,) long, rows per expert (sum == S).
        bias: optional (E, out).

    Returns:
        (S, out): row r of expert e's segment is ``inputs[r] @ weight[e].T (+ bias[e])``.
    """
    weight_t = weight.transpose(1, 2)
    key = (inputs.device.type, inputs.dtype)
    output = None
    if _grouped_mm_usable(inputs, weight_t):
        offsets = torch.cumsum(group_sizes, 0, dtype=torch.int32)
        try:
            output = _ContiguousGrad.apply(F.grouped_mm(inputs, weight_t, offs=offsets))
            _GROUPED_MM_WORKS[key] = True
        except (RuntimeError, NotImplementedError):
            _GROUPED_MM_WORKS[key] = False
    if output is None:
        output = _looped_mm(inputs, weight_t, group_sizes.tolist())
    if bias is not None:
        output = output + bias.repeat_interleave(group_sizes, dim=0, output_size=inputs.shape[0])
    return output


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """Pairs each expert may take: ``ceil(capacity_factor * num_tokens * top_k / num_experts)``."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def apply_capacity(
    expert_indices: torch.Tensor,
    expert_weights: torch.Tensor,
    dispatch_mask: torch.Tensor | None,
    capacity: int,
    num_experts: int,
    priority: str = "order",
) -> torch.Tensor:
    """Drop (token, expert) pairs beyond each expert's capacity.

    All first choices are served before any second choice (GShard). Within a choice rank,
    ``priority="order"`` serves tokens in sequence order (so late tokens drop first, OpenMoE's
    "drop towards the end"); ``priority="score"`` serves the tokens with the highest top routing
    weight first (V-MoE's batch-prioritised routing).

    Args:
        expert_indices, expert_weights: (T, k).
        dispatch_mask: optional (T, k) bool of pairs that are candidates at all.
        capacity: pairs per expert.
        num_experts: E.
        priority: ``"order"`` or ``"score"``.

    Returns:
        (T, k) bool: the pairs that are computed.

    Raises:
        UpcycleError: for an unknown priority.
    """
    if priority not in ("order", "score"):
        raise UpcycleError(f"capacity priority must be 'order' or 'score', got {priority!r}.")
    num_tokens, top_k = expert_indices.shape
    valid = torch.ones_like(expert_indices, dtype=torch.bool) if dispatch_mask is None else dispatch_mask
    if priority == "score":
        token_order = expert_weights.detach().amax(-1).argsort(descending=True, stable=True)
    else:
        token_order = torch.arange(num_tokens, device=expert_indices.device)
    ranks = torch.arange(top_k, device=expert_indices.device)
    pair_ids = (token_order[None, :] * top_k + ranks[:, None]).reshape(-1)  # choice-rank major
    experts = expert_indices.reshape(-1)[pair_ids]
    candidates = valid.reshape(-1)[pair_ids]
    # Rank each pair within its expert, in priority order: a stable sort by expert keeps the
    # priority order inside each group (O(P) memory, unlike a (P, E) one-hot cumsum); pairs that
    # are not candidates get the sentinel expert E and never take a place.
    keys = torch.where(candidates, experts, num_experts)
    by_expert = keys.argsort(stable=True)
    sorted_keys = keys[by_expert]
    group_sizes = torch.bincount(sorted_keys, minlength=num_experts + 1)
    group_starts = torch.cumsum(group_sizes, 0) - group_sizes
    position = torch.empty_like(by_expert)
    position[by_expert] = torch.arange(by_expert.numel(), device=by_expert.device) - group_starts[sorted_keys]
    kept = torch.zeros(num_tokens * top_k, dtype=torch.bool, device=expert_indices.device)
    kept[pair_ids] = candidates & (position < capacity)
    return kept.view(num_tokens, top_k)


@dataclass
class DispatchPlan:
    """Pairs sorted by expert.

    Attributes:
        pair_ids: (P,) flat indices into the (T, k) routing tensors, sorted by expert.
        token_ids: (P,) the token of each sorted pair.
        group_sizes: (E,) pairs per expert.
        all_pairs: True when no pair was masked out (then P == T * k).
    """

    pair_ids: torch.Tensor
    token_ids: torch.Tensor
    group_sizes: torch.Tensor
    all_pairs: bool


def plan_dispatch(expert_indices: torch.Tensor, kept: torch.Tensor | None, num_experts: int) -> DispatchPlan:
    """Sort the kept (token, expert) pairs by expert.

    Args:
        expert_indices: (T, k).
        kept: optional (T, k) bool of pairs to compute (None: all).
        num_experts: E.

    Returns:
        The `DispatchPlan`.
    """
    top_k = expert_indices.shape[1]
    flat_experts = expert_indices.reshape(-1)
    if kept is None:
        pair_ids = flat_experts.argsort(stable=True)
        all_pairs = True
    else:
        candidate_ids = kept.reshape(-1).nonzero().squeeze(1)
        pair_ids = candidate_ids[flat_experts[candidate_ids].argsort(stable=True)]
        all_pairs = candidate_ids.numel() == flat_experts.numel()
    group_sizes = torch.bincount(flat_experts[pair_ids], minlength=num_experts)
    return DispatchPlan(pair_ids, pair_ids // top_k, group_sizes, all_pairs)
