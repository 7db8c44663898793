"""The hand-written autograd functions behind the MoE block: segmented expert matmuls, the fused
GLU, and the dispatch / combine permutations. Each is checked against plain autograd (and with
`torch.autograd.gradcheck` in float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_moe_block import reference_output
from torch import nn
from transformers.activations import ACT2FN

from upcycle.moe import MoE, dispatch, saved_activation_bytes
from upcycle.moe.experts import Experts, _fused_glu_kind, _FusedGlu


def per_row_linear(inputs: torch.Tensor, weight: torch.Tensor, group_sizes: list[int]) -> torch.Tensor:
    """Row r times the weight of its expert, one row at a time."""
    experts = torch.repeat_interleave(torch.arange(len(group_sizes)), torch.tensor(group_sizes))
    return torch.stack([inputs[row] @ weight[int(expert)].T for row, expert in enumerate(experts)])


def test_segmented_linear_matches_a_per_row_reference_with_empty_experts():
    torch.manual_seed(0)
    group_sizes = [3, 0, 5, 0, 2]  # two experts get no rows: their weight gradient must be zero
    inputs = torch.randn(sum(group_sizes), 6, requires_grad=True)
    weight = torch.randn(len(group_sizes), 4, 6, requires_grad=True)
    upstream = torch.randn(sum(group_sizes), 4)

    output = dispatch.SegmentedLinear.apply(inputs, weight, group_sizes)
    grad_inputs, grad_weight = torch.autograd.grad(output, [inputs, weight], upstream)
    expected = per_row_linear(inputs, weight, group_sizes)
    expected_inputs, expected_weight = torch.autograd.grad(expected, [inputs, weight], upstream)

    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(grad_inputs, expected_inputs)
    torch.testing.assert_close(grad_weight, expected_weight)
    assert grad_weight[1].abs().sum() == 0 and grad_weight[3].abs().sum() == 0
    assert grad_weight.is_contiguous()  # the parameter's own layout: no copy when accumulated


def test_segmented_linear_gradcheck_float64():
    inputs = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: dispatch.SegmentedLinear.apply(x, w, [2, 0, 5]), (inputs, weight))


def test_grouped_linear_on_cpu_equals_torch_grouped_mm():
    """The CPU path (SegmentedLinear) and torch's grouped_mm give the same outputs and gradients."""
    if not hasattr(F, "grouped_mm"):
        pytest.skip("this torch has no grouped_mm to compare against")
    torch.manual_seed(0)
    group_sizes = torch.tensor([8, 0, 12, 4])
    inputs = torch.randn(24, 32, requires_grad=True)
    weight = torch.randn(4, 16, 32, requires_grad=True)
    bias = torch.randn(4, 16, requires_grad=True)

    def run(fn) -> list[torch.Tensor]:
        output = fn()
        return [output, *torch.autograd.grad(output.square().sum(), [inputs, weight, bias])]

    ours = run(lambda: dispatch.grouped_linear(inputs, weight, group_sizes, bias))
    offsets = torch.cumsum(group_sizes, 0, dtype=torch.int32)
    bias_rows = bias.repeat_interleave(group_sizes, dim=0)
    torchs = run(lambda: F.grouped_mm(inputs, weight.transpose(1, 2), offs=offsets) + bias_rows)
    for a, b in zip(ours, torchs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "kind"),
    [("silu", "silu"), ("swish", "silu"), ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu_new", None), ("relu", None)],
)
def test_fused_glu_is_used_only_for_activations_it_computes_exactly(name, kind):
    assert _fused_glu_kind(ACT2FN[name]) == kind
    assert Experts(2, 4, 6, activation=name).fused_glu == kind
    assert Experts(2, 4, 6, activation=name, gated=False).fused_glu is None


@pytest.mark.parametrize(("kind", "activation"), [("silu", nn.SiLU()), ("gelu_tanh", ACT2FN["gelu_pytorch_tanh"])])
def test_fused_glu_matches_autograd_and_passes_gradcheck(kind, activation):
    torch.manual_seed(0)
    projected = torch.randn(9, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: _FusedGlu.apply(p, kind), (projected,))

    upstream = torch.randn(9, 5, dtype=torch.float64)
    fused = _FusedGlu.apply(projected, kind)
    (grad_fused,) = torch.autograd.grad(fused, projected, upstream)
    gate, up = projected.chunk(2, dim=-1)
    plain = activation(gate) * up
    (grad_plain,) = torch.autograd.grad(plain, projected, upstream)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(grad_fused, grad_plain)
    assert fused.is_contiguous()


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_block_gradients_match_the_per_token_reference(capacity_factor):
    """Gradients reach the input, the router and every expert weight exactly as through the
    token-by-token definition, with all pairs computed (permutation path) and with drops
    (scatter path)."""
    torch.manual_seed(0)
    block = MoE(16, 24, 4, 2, capacity_factor=capacity_factor, bias=True, router_options={"init_std": 1.0})
    hidden = torch.randn(20, 16, requires_grad=True)
    parameters = [hidden, block.router.weight, *block.experts.parameters()]

    output = block(hidden)
    kept = None
    if capacity_factor is not None:
        assert block.last_stats.num_dropped > 0
        kept = _kept_pairs(block)
    upstream = torch.randn_like(output)
    ours = torch.autograd.grad(output, parameters, upstream, retain_graph=True)
    reference = reference_output(block, hidden, kept)
    expected = torch.autograd.grad(reference, parameters, upstream)

    torch.testing.assert_close(output, reference)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _kept_pairs(block: MoE) -> torch.Tensor:
    routing = block.last_router_output
    capacity = dispatch.expert_capacity(block.capacity_factor, routing.expert_indices.shape[0], 2, block.num_experts)
    return dispatch.apply_capacity(
        routing.expert_indices, routing.expert_weights, routing.dispatch_mask, capacity, block.num_experts
    )


@pytest.mark.parametrize("drop_some", [False, True])
def test_dispatch_experts_combine_gradcheck_float64(drop_some):
    """With the routing fixed (routers compute in float32 by design), the rest of the sparse
    path is checked against finite differences in float64: the permutation path when every pair
    is computed, the scatter path when some are dropped."""
    generator = torch.Generator().manual_seed(0)
    experts = Experts(3, 4, 5, bias=True, dtype=torch.float64)
    expert_indices = torch.tensor([[0, 2], [2, 1], [0, 1], [2, 0], [1, 2]])
    some_kept = torch.tensor([[True, False], [True, True], [False, True], [True, True], [True, False]])
    kept = some_kept if drop_some else None
    plan = dispatch.plan_dispatch(expert_indices, kept, 3)
    assert plan.all_pairs is not drop_some
    hidden = torch.randn(5, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    weights = torch.rand(5, 2, dtype=torch.float64, generator=generator, requires_grad=True)

    def sparse_path(hidden, weights, gate_up, down):
        rows = dispatch.dispatch_rows(hidden, plan)
        parameters = {"gate_up_proj": gate_up, "down_proj": down}
        expert_out = torch.func.functional_call(experts, parameters, (rows, plan.group_sizes))
        return dispatch.combine_pairs(expert_out, weights, plan)

    gate_up = experts.gate_up_proj.detach().clone().requires_grad_()
    down = experts.down_proj.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(sparse_path, (hidden, weights, gate_up, down))


def test_block_keeps_only_rows_projection_hidden_and_outputs_for_backward():
    """Per computed pair the block saves its input row, the (2I) gate/up projection, the (I)
    activated hidden and its (H) output: act(gate) is recomputed in backward, not kept."""
    tokens, hidden_size, inter, experts, top_k = 40, 32, 48, 4, 2
    block = MoE(hidden_size, inter, experts, top_k)
    pairs = tokens * top_k
    expected_floats = pairs * (hidden_size + 2 * inter + inter + hidden_size)
    routing_bytes = 4 * tokens * experts * 4 + 8 * pairs * 4  # logits/probabilities, index vectors
    saved = saved_activation_bytes(block, torch.randn(tokens, hidden_size))
    assert 4 * expected_floats <= saved <= 4 * expected_floats + routing_bytes
    assert routing_bytes < 4 * pairs * inter  # keeping act(gate) as well would fail the bound


def test_saved_activation_bytes_counts_distinct_storages_once():
    linear = nn.Linear(8, 8)
    inputs = torch.randn(5, 8, requires_grad=True)
    # relu keeps its (5, 8) float output; linear keeps only its input and weight (both excluded)
    assert saved_activation_bytes(nn.Sequential(linear, nn.ReLU()), inputs) == 5 * 8 * 4


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_block_trains_under_autocast_like_an_autocast_linear(capacity_factor):
    """Under bf16 autocast the experts compute in bf16 (as `nn.Linear` would), the output is bf16,
    and gradients reach the float32 parameters close to the float32 ones."""
    torch.manual_seed(0)
    block = MoE(32, 48, 4, 2, capacity_factor=capacity_factor, router_options={"init_std": 1.0})
    with torch.no_grad():
        for parameter in block.experts.parameters():
            parameter.normal_(std=0.2)
    hidden = torch.randn(24, 32, requires_grad=True)
    parameters = [hidden, *block.experts.parameters()]

    full = block(hidden)
    expected = torch.autograd.grad(full.square().sum(), parameters)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = block(hidden)
    grads = torch.autograd.grad(mixed.float().square().sum(), parameters)

    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.float(), full, atol=0.05, rtol=0.05)
    for grad, reference in zip(grads, expected, strict=True):
        assert grad.dtype == torch.float32
        assert torch.linalg.norm(grad - reference) <= 0.05 * torch.linalg.norm(reference)


def test_block_through_the_grouped_mm_branch_matches_the_segmented_path(monkeypatch):
    """The accelerator branch of `grouped_linear` (torch grouped_mm, which also runs on the CPU)
    gives the block the same outputs and gradients as the CPU path, including a zero-stride
    upstream gradient (``.sum()``), which grouped_mm's backward rejects unless made contiguous."""
    if not hasattr(F, "grouped_mm"):
        pytest.skip("this torch has no grouped_mm")
    torch.manual_seed(0)
    block = MoE(32, 48, 4, 2, bias=True, router_options={"init_std": 1.0})
    hidden = torch.randn(30, 32, requires_grad=True)
    parameters = [hidden, block.router.weight, *block.experts.parameters()]

    def run() -> list[torch.Tensor]:
        output = block(hidden)
        return [output, *torch.autograd.grad(output.sum(), parameters)]

    segmented = run()
    calls = []
    original = F.grouped_mm
    monkeypatch.setattr(dispatch, "_grouped_mm_usable", lambda *args: True)
    monkeypatch.setattr(F, "grouped_mm", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    grouped = run()
    assert len(calls) == 2  # both projections went through grouped_mm
    for a, b in zip(segmented, grouped, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


KEY = ("cpu", torch.float32)  # the failure-cache entry of the float32 CPU tensors below


def _grouped_mm_reference(inputs: torch.Tensor, weight_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """What grouped_mm computes (2-D inputs, 3-D weights): each segment times its group's matrix."""
    ends = offs.tolist()
    starts = [0, *ends[:-1]]
    return torch.cat(
        [inputs[start:end] @ weight_t[group] for group, (start, end) in enumerate(zip(starts, ends, strict=True))]
    )


def _grouped_mm_branch(monkeypatch, grouped_mm) -> dict:
    """Take grouped_linear's grouped_mm branch on the CPU with a stand-in ``grouped_mm``, deciding
    usability from a fresh failure cache the way `_grouped_mm_usable` does; return that cache."""
    cache = {}
    monkeypatch.setattr(dispatch, "_GROUPED_MM_WORKS", cache)
    monkeypatch.setattr(dispatch, "_grouped_mm_usable", lambda inputs, weight_t: cache.get(KEY, True))
    monkeypatch.setattr(F, "grouped_mm", grouped_mm, raising=False)
    return cache


def _linear_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(10, 8), torch.randn(3, 4, 8), torch.tensor([4, 0, 6])


def test_grouped_linear_lets_out_of_memory_through_and_keeps_using_grouped_mm(monkeypatch):
    """An out-of-memory error inside grouped_mm is the caller's to handle: it propagates, and
    grouped_mm is not switched off for the rest of the process."""
    inputs, weight, group_sizes = _linear_case()
    calls = []

    def out_of_memory(*args, **kwargs):
        calls.append("oom")
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    cache = _grouped_mm_branch(monkeypatch, out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        dispatch.grouped_linear(inputs, weight, group_sizes)
    assert calls == ["oom"]
    assert KEY not in cache  # not remembered as "grouped_mm does not work here"

    def works(inputs, weight_t, offs):
        calls.append("ok")
        return _grouped_mm_reference(inputs, weight_t, offs)

    monkeypatch.setattr(F, "grouped_mm", works, raising=False)
    output = dispatch.grouped_linear(inputs, weight, group_sizes)
    assert calls == ["oom", "ok"]  # the next call went through grouped_mm again
    assert cache[KEY] is True
    torch.testing.assert_close(output, per_row_linear(inputs, weight, group_sizes.tolist()))


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("Expected mat_a to be Float32, BFloat16 or Float16 matrix, got Double"),
        NotImplementedError("Could not run 'aten::_grouped_mm' with arguments from the 'MPS' backend."),
    ],
)
def test_grouped_linear_falls_back_for_good_when_grouped_mm_is_unsupported(monkeypatch, error):
    inputs, weight, group_sizes = _linear_case()
    calls = []

    def unsupported(*args, **kwargs):
        calls.append(1)
        raise error

    cache = _grouped_mm_branch(monkeypatch, unsupported)
    expected = per_row_linear(inputs, weight, group_sizes.tolist())
    torch.testing.assert_close(dispatch.grouped_linear(inputs, weight, group_sizes), expected)
    assert cache[KEY] is False
    torch.testing.assert_close(dispatch.grouped_linear(inputs, weight, group_sizes), expected)
    assert len(calls) == 1  # remembered: the second call took the segmented path directly


def test_grouped_linear_reraises_other_grouped_mm_errors(monkeypatch):
    inputs, weight, group_sizes = _linear_case()

    def device_fault(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    cache = _grouped_mm_branch(monkeypatch, device_fault)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        dispatch.grouped_linear(inputs, weight, group_sizes)
    assert KEY not in cache
