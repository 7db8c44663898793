"""Token dispatch: capacity limits, sorting (token, expert) pairs by expert, grouped matmuls.

The expert computation never loops over tokens: pairs are sorted by expert so that each
expert's tokens form one contiguous segment, and one grouped matmul multiplies every segment by
its expert's weight: `torch.nn.functional.grouped_mm` on accelerators, where it is one grouped
GEMM kernel, and `SegmentedLinear` (one `torch.mm` per expert segment, in place) on the CPU and
wherever grouped_mm cannot run.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from upcycle.errors import UpcycleError

__all__ = [
    "DispatchPlan",
    "SegmentedLinear",
    "apply_capacity",
    "combine_pairs",
    "dispatch_rows",
    "expert_capacity",
    "grouped_linear",
    "plan_dispatch",
]

# (device type, dtype) -> whether F.grouped_mm ran there; probed once, then reused.
_GROUPED_MM_WORKS: dict[tuple[str, torch.dtype], bool] = {}


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    grouped_mm's backward rejects non-contiguous gradients (e.g. the zero-stride gradient of
    ``out.sum()``: "Invalid strides/sizes" in torch 2.13).
    """

    @staticmethod
    def forward(ctx: object, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class SegmentedLinear(torch.autograd.Function):
    """``output[segment e] = inputs[segment e] @ weight[e].T`` with one `torch.mm` per expert, every
    product written in place (no `cat`, no per-expert autograd nodes).

    Why not grouped_mm on the CPU: there it is a loop of `mm` too, and measured in
    `scripts/bench/moe_block.py` (fwd+bwd, float32, H 1024, I 2816, 8 experts, top-2, 2 threads,
    glibc's default allocator, medians of 7 interleaved rounds) the block took 2434 ms with this
    function and 2624 ms with grouped_mm at 4096 tokens (408 vs 419 ms at 512). With a
    memory-reusing allocator the two are within 2%. It also takes any dtype, alignment and
    group size, which grouped_mm does not.

    ``apply(inputs, weight, group_sizes)``: inputs (S, in) sorted by expert, weight (E, out, in),
    group_sizes a list of E ints summing to S; returns (S, out).
    """

    @staticmethod
    def forward(ctx: object, inputs: torch.Tensor, weight: torch.Tensor, group_sizes: list[int]) -> torch.Tensor:
        output = inputs.new_empty(inputs.shape[0], weight.shape[1])
        with _autocast_off(inputs):
            for expert, (start, end) in enumerate(_segments(group_sizes)):
                if end > start:
                    torch.mm(inputs[start:end], weight[expert].t(), out=output[start:end])
        ctx.save_for_backward(inputs, weight)
        ctx.group_sizes = group_sizes
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx: object, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        inputs, weight = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        need_inputs, need_weight = ctx.needs_input_grad[:2]
        grad_inputs = inputs.new_empty(inputs.shape) if need_inputs else None
        grad_weight = weight.new_empty(weight.shape) if need_weight else None
        for expert, (start, end) in enumerate(_segments(ctx.group_sizes)):
            if need_inputs and end > start:
                torch.mm(grad_output[start:end], weight[expert], out=grad_inputs[start:end])
            if need_weight:
                if end > start:
                    torch.mm(grad_output[start:end].t(), inputs[start:end], out=grad_weight[expert])
                else:
                    grad_weight[expert].zero_()
        return grad_inputs, grad_weight, None


def _autocast_off(tensor: torch.Tensor) -> torch.autocast:
    """Inside our autograd functions every operand already has the dtype it should compute in
    (`grouped_linear` and `combine_pairs` cast under autocast first); autocast must not recast
    some of them in forward, or backward, which runs without autocast, would mix dtypes."""
    return torch.autocast(tensor.device.type, enabled=False)


def _segments(group_sizes: list[int]) -> list[tuple[int, int]]:
    return list(itertools.pairwise(itertools.accumulate(group_sizes, initial=0)))


def _aligned(tensor: torch.Tensor) -> bool:
    size = tensor.element_size()
    return tensor.data_ptr() % 16 == 0 and all((s * size) % 16 == 0 for s in tensor.stride() if s != 1)


def _grouped_mm_usable(inputs: torch.Tensor, weight_t: torch.Tensor) -> bool:
    # CPU: grouped_mm is a loop of mm there too, and slower than SegmentedLinear (see its docstring).
    if inputs.device.type == "cpu" or not hasattr(F, "grouped_mm") or inputs.dtype != weight_t.dtype:
        return False
    # The kernels want 16-byte aligned pointers and strides; tiny or odd hidden sizes take the
    # segmented path.
    if not (_aligned(inputs) and _aligned(weight_t)):
        return False
    return _GROUPED_MM_WORKS.get((inputs.device.type, inputs.dtype), True)


# What torch says when grouped_mm has no kernel for a dtype or device (matched in lower case): the
# dtype check ("Expected mat_a to be Float32, BFloat16 or Float16 matrix, got Double"), the
# architecture and build checks ("... only supported on CUDA devices with compute capability ...",
# "grouped gemm is not supported without USE_FBGEMM_GENAI on ROCM", "... currently supports only
# BFloat16 inputs") and missing kernels ("... not implemented for 'Float8_e4m3fn'").
_UNSUPPORTED_MESSAGES = (
    "expected mat_a to be",
    "expected mat_b to be",
    "compute capability",
    "not supported",
    "unsupported",
    "supports only",
    "not implemented",
)


def _grouped_mm_unsupported(error: Exception) -> bool:
    """Whether an error from `F.grouped_mm` means it cannot run for this dtype and device (so the
    segmented path is used from then on), rather than a failure of this call: out of memory, bad
    shapes, a device fault, which must reach the caller and must not switch grouped_mm off."""
    if isinstance(error, torch.OutOfMemoryError):
        return False
    if isinstance(error, NotImplementedError):
        return True
    message = str(error).lower()
    return any(marker in message for marker in _UNSUPPORTED_MESSAGES)


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

    Under autocast, inputs, weight and bias are cast to the autocast dtype first (as autocast does
    for `torch.mm`); the weight gradient flows back in the weight's own dtype.

    If grouped_mm reports that it does not support the dtype or device, the segmented path is
    used, and remembered for that (device type, dtype); any other error from it (out of memory
    included) propagates and changes nothing.

    Raises:
        RuntimeError: from torch when inputs and weight differ in dtype or device, and from
            grouped_mm for a failure other than an unsupported dtype or device
            (`torch.OutOfMemoryError` among them).
    """
    device_type = inputs.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        inputs, weight = inputs.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    weight_t = weight.transpose(1, 2)
    key = (inputs.device.type, inputs.dtype)
    output = None
    if _grouped_mm_usable(inputs, weight_t):
        offsets = torch.cumsum(group_sizes, 0, dtype=torch.int32)
        try:
            output = _ContiguousGrad.apply(F.grouped_mm(inputs, weight_t, offs=offsets))
            _GROUPED_MM_WORKS[key] = True
        except (RuntimeError, NotImplementedError) as error:
            if not _grouped_mm_unsupported(error):
                raise
            _GROUPED_MM_WORKS[key] = False
    if output is None:
        output = SegmentedLinear.apply(inputs, weight, group_sizes.tolist())
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
        inverse: when no pair was masked out (then P == T * k), (T * k,) the sorted position of
            each flat pair (the inverse permutation of ``pair_ids``); None otherwise.
    """

    pair_ids: torch.Tensor
    token_ids: torch.Tensor
    group_sizes: torch.Tensor
    inverse: torch.Tensor | None

    @property
    def all_pairs(self) -> bool:
        """True when every (token, expert) pair is computed."""
        return self.inverse is not None


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
    else:
        candidate_ids = kept.reshape(-1).nonzero().squeeze(1)
        pair_ids = candidate_ids[flat_experts[candidate_ids].argsort(stable=True)]
    group_sizes = torch.bincount(flat_experts[pair_ids], minlength=num_experts)
    inverse = None
    if pair_ids.numel() == flat_experts.numel():
        inverse = torch.empty_like(pair_ids)
        inverse[pair_ids] = torch.arange(pair_ids.numel(), device=pair_ids.device)
    return DispatchPlan(pair_ids, pair_ids // top_k, group_sizes, inverse)


class _DispatchRows(torch.autograd.Function):
    """``hidden[token_ids]`` whose backward sums each token's k gradient rows with a gather and a
    reshape-sum instead of an accumulating scatter (measured at 4096 tokens, k = 2, H = 1024 on
    CPU: the zero fill plus ``index_put_(accumulate=True)`` of plain indexing took 67 ms)."""

    @staticmethod
    def forward(ctx: object, hidden: torch.Tensor, token_ids: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.num_tokens = hidden.shape[0]
        return hidden.index_select(0, token_ids)

    @staticmethod
    @once_differentiable
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        rows = grad.index_select(0, inverse)
        return rows.view(ctx.num_tokens, -1, grad.shape[-1]).sum(1), None, None


class _CombinePairs(torch.autograd.Function):
    """``out[t] = sum_j weights[t, j] * expert_out[inverse[t * k + j]]`` as one gather and one
    batched (1 x k) @ (k x H) product; backward gathers back through the permutation (no
    scatter, deterministic on every device) into one fresh tensor."""

    @staticmethod
    def forward(
        ctx: object,
        expert_out: torch.Tensor,
        weights: torch.Tensor,
        pair_ids: torch.Tensor,
        token_ids: torch.Tensor,
        inverse: torch.Tensor,
    ) -> torch.Tensor:
        num_tokens, top_k = weights.shape
        gathered = expert_out.index_select(0, inverse).view(num_tokens, top_k, -1)
        ctx.save_for_backward(gathered, weights, pair_ids, token_ids)
        with _autocast_off(expert_out):
            return torch.bmm(weights.unsqueeze(1), gathered).squeeze(1)

    @staticmethod
    @once_differentiable
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        gathered, weights, pair_ids, token_ids = ctx.saved_tensors
        grad = grad.contiguous()
        grad_expert_out = grad_weights = None
        if ctx.needs_input_grad[0]:
            sorted_weights = weights.reshape(-1).index_select(0, pair_ids)
            grad_expert_out = grad.index_select(0, token_ids).mul_(sorted_weights[:, None])
        if ctx.needs_input_grad[1]:
            grad_weights = torch.bmm(gathered, grad.unsqueeze(2)).squeeze(2)
        return grad_expert_out, grad_weights, None, None, None


def dispatch_rows(hidden_states: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Return the (P, H) input rows of the sorted pairs: ``hidden_states[plan.token_ids]``."""
    if plan.inverse is None:
        return hidden_states[plan.token_ids]
    return _DispatchRows.apply(hidden_states, plan.token_ids, plan.inverse)


def combine_pairs(expert_out: torch.Tensor, expert_weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Weight each sorted pair's expert output and sum it into its token.

    Args:
        expert_out: (P, H) expert outputs in the plan's sorted order.
        expert_weights: (T, k) routing weights.
        plan: the `DispatchPlan` that sorted the pairs.

    Returns:
        (T, H) in ``expert_out``'s dtype; tokens whose pairs were all dropped get zeros.
    """
    weights = expert_weights.to(expert_out.dtype)
    if plan.inverse is not None:
        return _CombinePairs.apply(expert_out, weights, plan.pair_ids, plan.token_ids, plan.inverse)
    # Some pairs dropped (capacity, masks): weight the computed ones and scatter-add them.
    weighted = expert_out * weights.reshape(-1)[plan.pair_ids][:, None]
    output = expert_out.new_zeros(expert_weights.shape[0], expert_out.shape[-1])
    return output.index_add(0, plan.token_ids, weighted)
