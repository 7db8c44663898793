"""Grouping the experts of one layer into K clusters before merging each cluster (HC-SMoE).

HC-SMoE (Chen et al. 2024, arXiv 2410.08589) describes each expert by its output averaged over
calibration tokens (every token through every expert, independent of routing) and clusters
those vectors hierarchically with average linkage. Without calibration data we describe each
expert by its weights (gate, up and down flattened), a documented fallback.

Average linkage on E <= a few hundred points is a few lines and instant, so it is written here
instead of adding scipy as a dependency for `scipy.cluster.hierarchy`.
"""

from __future__ import annotations

import torch


def output_distances(mean_outputs: torch.Tensor) -> torch.Tensor:
    """Return the (E, E) Euclidean distances between experts' mean outputs (E, H)."""
    features = mean_outputs.double()
    return torch.cdist(features, features)


def weight_distances(stacks: list[torch.Tensor]) -> torch.Tensor:
    """Return the (E, E) Euclidean distances between experts' flattened weights, from per-projection stacks.

    Accumulates a Gram matrix one projection at a time, so no (E, 3*I*H) matrix is ever built.
    """
    experts = stacks[0].shape[0]
    gram = torch.zeros(experts, experts, dtype=torch.float64)
    for stack in stacks:
        flat = stack.reshape(experts, -1).double()
        gram += flat @ flat.T
    squared = gram.diag().unsqueeze(0) + gram.diag().unsqueeze(1) - 2 * gram
    return squared.clamp_min(0).sqrt()


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
