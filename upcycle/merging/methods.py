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

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

from upcycle.merging.method_names import DEFAULT_DENSITY, METHODS, NEEDS_CALIBRATION, TASK_VECTOR_METHODS

__all__ = ["DEFAULT_DENSITY", "METHODS", "NEEDS_CALIBRATION", "TASK_VECTOR_METHODS"]

T = TypeVar("T")


def normalized(coefficients: torch.Tensor) -> torch.Tensor:
    """Return `coefficients` (float64) scaled to sum to 1; all-zero coefficients become uniform."""
    coefficients = coefficients.double()
    total = coefficients.sum()
    if total <= 0:
        return torch.full_like(coefficients, 1.0 / len(coefficients))
    return coefficients / total


# Elements of one expert handled at a time: a chunk's buffers (for ties three (E, CHUNK) float32 ones, 1.5 MiB
# at E=8) stay in a core's 2 MiB L2. Measured per chunk of 2^13..2^17 elements, ties' loop takes the same time
# within noise (~5 us of dispatch per torch call against ~0.13 ns per element). The size is also part of ties'
# result: torch.sum over the experts adds them in order except in the columns of a partial vector block, which
# only the last, shorter chunk has, laid out as (E, CHUNK)[:, :n]: same size and layout, same bits.
CHUNK = 1 << 14
# Elements per chunk of the element-wise methods (weighted_mean, task_arithmetic), whose bits do not depend on it:
# two float64 chunks (1 MiB) stay in a core's 4 MiB L2, and 4x fewer torch calls than CHUNK. Each call releases and
# retakes the GIL, which the other span thread, the reader and the writer wait on: at CHUNK, merge `average` made
# 214k context switches (15% of its samples in the scheduler, perf). Measured per projection (8 x (8192, 2048)
# bfloat16, a script beside scripts/bench/merge_methods.py): weighted_mean 0.18 -> 0.08 s wall, 0.23 -> 0.14 s CPU.
ELEMENTWISE_CHUNK = 1 << 16
# Elements per chunk of DARE's mask drawing and merge: fewer, larger torch and numpy calls (a float32 chunk is 1 MiB,
# in L2), as the thread drawing masks and the two merging spans all take the GIL for each call.
DARE_CHUNK = 1 << 18
# Elements per chunk of ties' main pass where a whole one fits: the same bits as chunks of CHUNK (full chunks of
# either size sum the experts in order), 4x fewer torch calls. Measured on merge ties in scripts/bench/scale.py:
# 41 -> 35 s, 56 -> 50 CPU s.
TIES_CHUNK = 1 << 16


def _flat_experts(stack: torch.Tensor | Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Size]:
    """Return each expert of `stack` (a tensor (E, ...) or a sequence of E equal-shaped tensors) as a
    flat tensor (a view where the expert is contiguous), and the shape of one expert."""
    experts = [stack[expert] for expert in range(len(stack))]
    return [expert.reshape(-1) for expert in experts], experts[0].shape


def _chunks(start: int, end: int, size: int) -> Iterator[tuple[int, int]]:
    for chunk in range(start, end, size):
        yield chunk, min(chunk + size, end)


def single_threaded(work: Callable[..., T]) -> Callable[..., T]:
    """Return `work` wrapped to run with one torch thread in the (worker) thread that calls it.

    torch's thread count is per thread under OpenMP; a worker left at the process's count would
    fork its own thread team for every large operation and oversubscribe the cores. Setting it also
    sets the count that threads started later begin with, so the wrapper puts back the count of the
    thread that wrapped `work` (a worker's own count may already read 1 when another worker set it).
    """
    threads = torch.get_num_threads()

    def run(*args: object) -> T:
        torch.set_num_threads(1)
        try:
            return work(*args)
        finally:
            torch.set_num_threads(threads)

    return run


def _in_parallel(work: Callable[[int, int], None], numel: int, chunk: int = CHUNK) -> None:
    """Run `work(start, end)` over range(numel) split into one contiguous span per torch thread, each span in its
    own Python thread with one torch thread (torch releases the GIL inside its operations). Span bounds are
    multiples of `chunk`, the chunk size `work` uses.

    The operations on cache-resident chunks take a few us each, too small for torch's own intra-op threads to
    pay off. Measured on a real-shaped projection (scripts/bench/merge_methods.py), ties used 1.27 s of CPU in
    0.91 s of wall time on two cores that other processes were also using.
    """
    workers = min(torch.get_num_threads(), -(-numel // chunk))
    if workers <= 1:
        work(0, numel)
        return
    bounds = [numel * part // workers // chunk * chunk for part in range(workers)] + [numel]
    with ThreadPoolExecutor(workers) as pool:
        spans = [pool.submit(single_threaded(work), bounds[part], bounds[part + 1]) for part in range(workers)]
        for span in spans:
            span.result()


def weighted_mean(
    stack: torch.Tensor | Sequence[torch.Tensor], coefficients: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Return sum_e c_e * stack[e] / sum_e c_e (all-zero coefficients: the plain mean), in float64 or in
    the dtype of `out`.

    `stack` is a tensor (E, ...) or a sequence of E tensors. Accumulated in float64 one expert at a
    time, chunk by chunk in preallocated buffers: the same operations on every element as summing
    whole float64 copies of the experts, so the same bits, without the copies. `out`, a tensor with
    one expert's number of elements, receives the result: a float64 one is accumulated into (a caller
    merging many projections reuses one: a fresh 128 MiB result per projection cost a page fault per
    4 KiB); one of another dtype gets each chunk cast as it is done, the bits of casting the float64
    result afterwards, without a float64 result in memory or a pass over it.
    """
    coefficients = coefficients.double()
    if coefficients.sum() <= 0:
        coefficients = torch.ones_like(coefficients)
    divisor = coefficients.sum()
    flats, shape = _flat_experts(stack)
    used = [(flat, coefficient) for flat, coefficient in zip(flats, coefficients.tolist(), strict=True) if coefficient]
    total = torch.empty(flats[0].numel(), dtype=torch.float64) if out is None else out.view(-1)

    def span(start: int, end: int) -> None:
        buffer = torch.empty(ELEMENTWISE_CHUNK, dtype=torch.float64)
        staging = None if total.dtype == torch.float64 else torch.empty(ELEMENTWISE_CHUNK, dtype=torch.float64)
        for first, last in _chunks(start, end, ELEMENTWISE_CHUNK):
            accumulator = total[first:last] if staging is None else staging[: last - first]
            term = buffer[: last - first]
            accumulator.zero_()
            for flat, coefficient in used:
                term.copy_(flat[first:last])
                accumulator.add_(term if coefficient == 1.0 else term.mul_(coefficient))  # x * 1.0 is x
            accumulator.div_(divisor)
            if staging is not None:
                total[first:last].copy_(accumulator)

    _in_parallel(span, total.numel(), ELEMENTWISE_CHUNK)
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

    def span(start: int, end: int) -> None:
        base_buffer = torch.empty(ELEMENTWISE_CHUNK, dtype=torch.float64)
        term_buffer = torch.empty(ELEMENTWISE_CHUNK, dtype=torch.float64)
        for first, last in _chunks(start, end, ELEMENTWISE_CHUNK):
            accumulator = merged[first:last]
            base_chunk, term = base_buffer[: last - first], term_buffer[: last - first]
            base_chunk.copy_(base[first:last])
            accumulator.zero_()
            for flat, weight in used:
                term.copy_(flat[first:last])
                accumulator.add_(term.sub_(base_chunk).mul_(weight))
            accumulator.mul_(scale).add_(base_chunk)

    _in_parallel(span, merged.numel(), ELEMENTWISE_CHUNK)
    return merged.view(shape)


# Elements per chunk of the threshold pass: a float32 chunk and numpy's temporaries stay in the L2 cache.
THRESHOLD_CHUNK = 1 << 16
# Magnitudes sampled (evenly spaced) to bracket the threshold, and the bracket's half-width in standard deviations
# of the sample's rank: a miss (about 1e-4 per expert at 4) costs one more pass, never a wrong answer.
_SAMPLE = 1 << 16
_MARGIN = 4.0


def _magnitudes(expert: torch.Tensor, base: torch.Tensor) -> Iterator[np.ndarray]:
    """Yield |float32(expert) - base| chunk by chunk, as numpy views of one reused float32 buffer."""
    buffer = torch.empty(THRESHOLD_CHUNK, dtype=torch.float32)
    for start, end in _chunks(0, base.numel(), THRESHOLD_CHUNK):
        yield buffer[: end - start].copy_(expert[start:end]).sub_(base[start:end]).abs_().numpy()


def _between(expert: torch.Tensor, base: torch.Tensor, low: float, high: float) -> tuple[int, np.ndarray]:
    """Return (how many magnitudes are below `low`, the magnitudes in [low, high]) in one chunked pass."""
    below, inside = 0, []
    for magnitude in _magnitudes(expert, base):
        below += int(np.count_nonzero(magnitude < low))
        inside.append(magnitude[(magnitude >= low) & (magnitude <= high)])
    return below, np.concatenate(inside)


def _counts_around(expert: torch.Tensor, base: torch.Tensor, value: float) -> tuple[int, int]:
    """Return (how many magnitudes are < `value`, how many are <= it) in one chunked pass."""
    below = at_most = 0
    for magnitude in _magnitudes(expert, base):
        below += int(np.count_nonzero(magnitude < value))
        at_most += int(np.count_nonzero(magnitude <= value))
    return below, at_most


def _kth_smallest_magnitude(expert: torch.Tensor, base: torch.Tensor, k: int) -> float:
    """Return the k-th smallest (1-based) of |float32(expert) - float32(base)|: the value `kthvalue(k)` of the
    magnitudes gives. `expert` and `base` (float32, or a narrower float that widens exactly) are flat and of
    equal length.

    The magnitudes are never materialised: an evenly spaced sample brackets the answer, one chunked pass
    counts the magnitudes below the bracket and keeps those inside (about 1.6%), and np.partition picks
    among them; if the answer lies outside, a second pass over that side finds it. Measured per element:
    0.35 ns for the magnitude, ~0.5 ns for numpy's comparisons; the radix select it replaced (bincount of
    the upper 16 bits, then the bin's members) took ~2.5 ns, torch.kthvalue 44 ns.

    When the bracket is one value (experts equal to the base: every magnitude 0), a counting pass finds
    whether it is the answer without gathering the magnitudes equal to it (all of them, for untrained
    copies: gathering and partitioning them took 43% of merge ties' samples on scripts/bench/scale.py).
    """
    numel = base.numel()
    stride = max(1, numel // _SAMPLE)
    sample = (expert[::stride].float() - base[::stride]).abs_().numpy()
    rank, spread = k / numel * len(sample), _MARGIN * (len(sample) * k / numel * (1 - k / numel)) ** 0.5 + 8
    first, last = int(rank - spread), int(rank + spread) + 1  # 0-based positions in the sorted sample
    positions = [position for position in (first, last) if 0 <= position < len(sample)]
    ordered = np.partition(sample, positions) if positions else sample
    low = float(ordered[first]) if first >= 0 else 0.0
    high = float(ordered[last]) if last < len(sample) else float("inf")
    if low == high:  # most magnitudes may be this one value (all 0: experts that are copies of the base)
        below, at_most = _counts_around(expert, base, low)
        if below < k <= at_most:
            return low
    below, inside = _between(expert, base, low, high)
    if k <= below:  # below the bracket: among the magnitudes < low
        below, inside = _between(expert, base, 0.0, float(np.nextafter(np.float32(low), np.float32(0))))
    elif k > below + len(inside):  # above it
        below, inside = _between(expert, base, float(np.nextafter(np.float32(high), np.float32(np.inf))), np.inf)
    return float(np.partition(inside, k - below - 1)[k - below - 1])


def _trim_bounds(flats: list[torch.Tensor], base: torch.Tensor, keep: int) -> list[float | None]:
    """Return per expert the largest float32 below its keep-th largest magnitude |float32(expert) - base|, so that
    |x| > bound (hardshrink's test) is |x| >= that magnitude; None where it is 0 (everything survives)."""
    k = base.numel() - keep + 1
    parts = min(torch.get_num_threads(), len(flats))
    with ThreadPoolExecutor(parts) as pool:
        thresholds = list(
            pool.map(single_threaded(_kth_smallest_magnitude), flats, [base] * len(flats), [k] * len(flats))
        )
    return [
        float(np.nextafter(np.float32(threshold), np.float32(0))) if threshold > 0 else None for threshold in thresholds
    ]


def ties(
    stack: torch.Tensor | Sequence[torch.Tensor],
    base: torch.Tensor,
    coefficients: torch.Tensor,
    density: float,
    scale: float = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the TIES merge (trim to `density`, elect sign, disjoint weighted mean) added to `base`, in float32 or
    in `out` (a tensor of one expert's number of elements, e.g. bfloat16: each float32 chunk is cast into it as it
    is done, the bits of casting the float32 result afterwards).

    The trim threshold of each expert needs all its task vector (one expert per thread at a time); the
    sign election and the merge are then done chunk by chunk across the experts, with the operations per
    element, and the chunks, of the whole-matrix code this replaced (the same bits: see CHUNK). A bfloat16 or
    float16 `base` is used as it is: each operation widens it to float32 exactly, so no float32 copy is made
    (with the float32 result, 128 MiB of fresh memory per projection at the 1B shape that `out` avoids: page
    faults and the kernel zeroing them were ~8% of merge ties' samples on scripts/bench/scale.py).

    Raises:
        ValueError: a coefficient is negative.
    """
    if bool((coefficients < 0).any()):
        # Non-negative weights let the disjoint mean skip torch.where: see below.
        raise ValueError(f"ties: coefficients must be non-negative, got {coefficients.tolist()}")
    flats, shape = _flat_experts(stack)
    experts = len(flats)
    base = _widening_base(base)
    numel = base.numel()
    keep = max(1, round(density * numel))
    bounds = _trim_bounds(flats, base, keep) if keep < numel else [None] * experts
    trims = [(expert, bound) for expert, bound in enumerate(bounds) if bound is not None]
    weights = normalized(coefficients).float().unsqueeze(1)
    merged = torch.empty(numel, dtype=torch.float32) if out is None else out.view(-1)

    def span(start: int, end: int) -> None:
        buffers = [torch.empty(experts * TIES_CHUNK, dtype=torch.float32) for _ in range(3)]
        rows = [torch.empty(TIES_CHUNK, dtype=torch.float32) for _ in range(3)]
        for first, last in _ties_chunks(start, end, numel):
            length = last - first
            deltas, weighted, agrees = (_expert_rows(buffer, experts, length) for buffer in buffers)
            elected, numerator, denominator = (row[:length] for row in rows)
            base_chunk = base[first:last]
            for expert, flat in enumerate(flats):
                deltas[expert].copy_(flat[first:last])
            deltas.sub_(base_chunk)
            for expert, bound in trims:  # x * (|x| >= threshold), a kept x or a +-0 that no sum or sign sees
                torch.hardshrink(deltas[expert], bound, out=deltas[expert])
            torch.mul(deltas, weights, out=weighted)
            torch.sign(torch.sum(weighted, 0, out=elected), out=elected)
            # 1.0 where an entry is non-zero with the elected sign, else 0.0, as floats: the products below
            # are then float * float, with the values float * bool gives. x * elected > 0 is sign(x) * elected > 0.
            torch.mul(deltas, elected, out=agrees).gt_(0)
            torch.sum(weighted.mul_(agrees), 0, out=numerator)
            torch.sum(agrees.mul_(weights), 0, out=denominator)
            # Where the denominator (a sum of non-negative weights) is 0, every agreeing weight is 0, so the
            # numerator is +0 and so is +0 / 1e-30: the 0 that torch.where(denominator > 0, ..., 0) put there
            # (which cost ~9% of this loop: torch builds a bool mask at ~1 ns per element, 8x a float op).
            chunk = numerator.div_(denominator.clamp_min_(1e-30))
            chunk = chunk if scale == 1.0 else chunk.mul_(scale)  # 1.0 * x is x
            if merged.dtype == torch.float32:
                torch.add(base_chunk, chunk, out=merged[first:last])
            else:
                merged[first:last].copy_(torch.add(base_chunk, chunk, out=chunk))

    _in_parallel(span, numel, TIES_CHUNK)
    return merged.view(shape)


def _widening_base(base: torch.Tensor) -> torch.Tensor:
    """Return `base` flat, as it is where each float32 operation widens it exactly (bfloat16, float16, float32),
    else as float32: no float32 copy of a low-precision base."""
    return (base if base.dtype in (torch.bfloat16, torch.float16, torch.float32) else base.float()).reshape(-1)


def _ties_chunks(start: int, end: int, numel: int) -> Iterator[tuple[int, int]]:
    """Yield the chunks of ties' main pass over [start, end) (multiples of CHUNK): TIES_CHUNK elements at a time
    up to the last CHUNK boundary of `numel`, then CHUNK ones, so the short last chunk is the one the chunks of
    CHUNK give (see CHUNK)."""
    tail = numel // CHUNK * CHUNK
    position = start
    while position < end:
        size = TIES_CHUNK if position + TIES_CHUNK <= min(end, tail) else CHUNK
        yield position, min(position + size, end)
        position += size


def _expert_rows(buffer: torch.Tensor, experts: int, length: int) -> torch.Tensor:
    """Return an (experts, length) view of the flat `buffer`: contiguous for a full chunk, and for a short one
    the first columns of (experts, CHUNK), the layout (and so the sums' bits) of the chunks of CHUNK."""
    if length in (CHUNK, TIES_CHUNK):
        return buffer[: experts * length].view(experts, length)
    return buffer[: experts * CHUNK].view(experts, CHUNK)[:, :length]


def dare_masks(generator: torch.Generator, experts: int, numel: int, density: float) -> list[np.ndarray]:
    """Return DARE's keep masks of `experts` experts of `numel` entries, drawn from `generator` in expert order
    (which advances it as whole-tensor torch.rand calls would: drawn chunk by chunk, the stream is the same),
    packed 8 entries a byte (np.packbits of rand < density): 2 MiB per expert at the 1B shape, not 64.

    Drawing is serial (one generator, ~3.5 ns per entry), so a merge draws the next projections' masks on
    other threads while this one is merged (`upcycle.merging.masks`): each projection has its own generator.
    """
    draws = torch.empty(DARE_CHUNK, dtype=torch.float32)
    masks = []
    for _ in range(experts):
        packed = np.empty(-(-numel // 8), dtype=np.uint8)
        for first, last in _chunks(0, numel, DARE_CHUNK):  # chunks of a multiple of 8: whole bytes
            chunk = torch.rand(last - first, generator=generator, out=draws[: last - first])
            packed[first // 8 : -(-last // 8)] = np.packbits(chunk.numpy() < density)
        masks.append(packed)
    return masks


def dare(
    stack: torch.Tensor | Sequence[torch.Tensor],
    base: torch.Tensor,
    coefficients: torch.Tensor,
    density: float,
    generator: torch.Generator | None,
    scale: float = 1.0,
    masks: list[np.ndarray] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return base + scale * sum_e w_e * drop_rescale(stack[e] - base) (DARE), in float32 or in `out` (a tensor
    of one expert's number of elements: each float32 chunk is cast into it as it is done, as `ties` does).

    The masks are `dare_masks(generator, ...)`, one per expert in order, or `masks` when drawn already
    (then `generator` is not used). The experts are added in order, chunk by chunk, in parallel spans.
    """
    weights = normalized(coefficients).tolist()
    flats, _ = _flat_experts(stack)
    shape = base.shape
    base = _widening_base(base)
    numel = base.numel()
    if masks is None:
        masks = dare_masks(generator, len(flats), numel, density)
    used = [(flat, mask, weight / density) for flat, mask, weight in zip(flats, masks, weights, strict=True) if weight]
    merged = torch.empty(numel, dtype=torch.float32) if out is None else out.view(-1)

    def span(start: int, end: int) -> None:
        buffer = torch.empty(DARE_CHUNK, dtype=torch.float32)
        staging = None if merged.dtype == torch.float32 else torch.empty(DARE_CHUNK, dtype=torch.float32)
        for first, last in _chunks(start, end, DARE_CHUNK):
            accumulator = merged[first:last] if staging is None else staging[: last - first]
            accumulator, delta = accumulator.zero_(), buffer[: last - first]
            for flat, mask, factor in used:
                # 1 or 0 as uint8: x * kept is the value x * bool (and x * 1.0 / 0.0) gives
                kept = torch.from_numpy(np.unpackbits(mask[first // 8 : -(-last // 8)], count=last - first))
                accumulator.add_(delta.copy_(flat[first:last]).sub_(base[first:last]).mul_(kept).mul_(factor))
            (accumulator if scale == 1.0 else accumulator.mul_(scale)).add_(base[first:last])  # 1.0 * x is x
            if staging is not None:
                merged[first:last].copy_(accumulator)

    _in_parallel(span, numel, DARE_CHUNK)
    return merged.view(shape)


def concat(stack: torch.Tensor | Sequence[torch.Tensor], weights: torch.Tensor, projection: str) -> torch.Tensor:
    """Return the experts side by side as one wider FFN projection computing sum_e w_e expert_e(x).

    gate/up (E, I, H) become (E*I, H); down (E, H, I) becomes (H, E*I) with expert e's columns
    scaled by w_e. The activation acts per neuron, so the wider FFN is the mixture exactly.
    """
    if projection == "down":
        scaled = [expert.double() * weight for expert, weight in zip(stack, weights.double(), strict=True)]
        return torch.cat(scaled, dim=1)
    return torch.cat(list(stack), dim=0)
