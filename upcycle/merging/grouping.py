"""Grouping the experts of one layer into K clusters before merging each cluster (HC-SMoE).

HC-SMoE (Chen et al. 2024, arXiv 2410.08589) describes each expert by its output averaged over
calibration tokens (every token through every expert, independent of routing) and clusters
those vectors hierarchically with average linkage. Without calibration data we describe each
expert by its weights (gate, up and down flattened), a documented fallback.

Average linkage on E <= a few hundred points is a few lines and instant, so it is written here
instead of adding scipy as a dependency for `scipy.cluster.hierarchy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from upcycle.merging.methods import single_threaded


def output_distances(mean_outputs: torch.Tensor) -> torch.Tensor:
    """Return the (E, E) Euclidean distances between experts' mean outputs (E, H)."""
    features = mean_outputs.double()
    return torch.cdist(features, features)


# Columns of the experts' weights per Gram-matrix chunk: an (E, GRAM_CHUNK) float64 block (4 MiB at E=8)
# instead of a float64 copy of a whole projection of every expert (1 GiB at Llama-3.2-1B's shape).
GRAM_CHUNK = 1 << 16


def weight_distances(stacks: Sequence[torch.Tensor | Sequence[torch.Tensor]]) -> torch.Tensor:
    """Return the (E, E) Euclidean distances between experts' flattened weights, from per-projection stacks.

    Each element of `stacks` is one projection: a tensor (E, ...) or a sequence of E equal-shaped
    tensors. The Gram matrix is accumulated in float64 over blocks of GRAM_CHUNK columns (X X^T per
    block, the blocks spread over torch's threads, their sum in a fixed order, so the result does not
    depend on the thread count); neither an (E, 3*I*H) matrix nor a whole float64 projection is built.
    The sums are not added in the order of one whole-matrix product (MKL's), so the last bits differ
    from that: ~1e-13 relative at Llama-3.2-1B's shape, with the same groups (tests/test_merge_arithmetic.py).
    """
    grams = []
    for projection in range(len(stacks)):  # one at a time: a sequence may build each stack when indexed
        grams.append(_block_grams([expert.reshape(-1) for expert in stacks[projection]]))
    experts = grams[0].shape[1]
    gram = torch.zeros(experts, experts, dtype=torch.float64)
    for block_gram in torch.cat(grams):  # in block order, whatever thread computed each
        gram += block_gram
    squared = gram.diag().unsqueeze(0) + gram.diag().unsqueeze(1) - 2 * gram
    return squared.clamp_min(0).sqrt()


def _block_grams(flats: list[torch.Tensor]) -> torch.Tensor:
    """Return X X^T in float64 for each block of GRAM_CHUNK columns of X = the flat experts `flats` stacked,
    (blocks, E, E), the blocks dealt round-robin to torch's threads."""
    experts, numel = len(flats), flats[0].numel()
    blocks = [(start, min(start + GRAM_CHUNK, numel)) for start in range(0, numel, GRAM_CHUNK)]
    grams = torch.empty(len(blocks), experts, experts, dtype=torch.float64)

    def some_blocks(part: int, parts: int) -> None:
        buffer = torch.empty(experts * GRAM_CHUNK, dtype=torch.float64)
        for index in range(part, len(blocks), parts):
            start, end = blocks[index]
            block = buffer[: experts * (end - start)].view(experts, end - start)
            for expert, flat in enumerate(flats):
                block[expert].copy_(flat[start:end])
            torch.matmul(block, block.T, out=grams[index])

    parts = max(1, min(torch.get_num_threads(), len(blocks)))
    with ThreadPoolExecutor(parts) as pool:
        for done in [pool.submit(single_threaded(some_blocks), part, parts) for part in range(parts)]:
            done.result()
    return grams


def average_linkage(distances: torch.Tensor, groups: int) -> list[list[int]]:
    """Return `groups` clusters of the points behind `distances` (E, E), by agglomerative average linkage.

    Repeatedly joins the two clusters with the smallest mean pairwise distance; ties go to the
    lowest indices, so the result is deterministic. Clusters are returned sorted by their first
    member, each with its members in ascending order.
    """
    matrix = distances.double().tolist()
    clusters = [[expert] for expert in range(len(matrix))]
    while len(clusters) > groups:
        best = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                pairs = [matrix[i][j] for i in clusters[a] for j in clusters[b]]
                mean = sum(pairs) / len(pairs)
                if best is None or mean < best[0]:
                    best = (mean, a, b)
        _, a, b = best
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return sorted(clusters, key=lambda members: members[0])
