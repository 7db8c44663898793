"""Small k-means variants for initialising experts and routers (float32, CPU, seeded).

- `spherical_kmeans` clusters directions (cosine similarity): its unit centroids used as router
  rows make the router's argmax exactly the cluster assignment, since a router has no bias.
- `balanced_kmeans` clusters points into groups of exactly equal size (MoEfication / LLaMA-MoE
  split one FFN's neurons into equal experts).
"""

from __future__ import annotations

import torch


def _normalized(points: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(points.float(), dim=1)


def _plus_plus_init(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on unit vectors (distance = 1 - cosine)."""
    first = int(torch.randint(len(points), (1,), generator=generator))
    centroids = [points[first]]
    distance = (1 - points @ points[first]).clamp_min(0)
    for _ in range(1, k):
        weights = distance if distance.sum() > 0 else torch.ones_like(distance)
        chosen = int(torch.multinomial(weights, 1, generator=generator))
        centroids.append(points[chosen])
        distance = torch.minimum(distance, (1 - points @ points[chosen]).clamp_min(0))
    return torch.stack(centroids)


def spherical_kmeans(
    points: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (unit centroids (k, D), labels (N,)) of spherical k-means on the rows of `points`.

    An empty cluster is re-seeded with the point farthest from its centroid.

    Raises:
        ValueError: fewer points than clusters.
    """
    if len(points) < k:
        raise ValueError(f"need at least {k} points to find {k} clusters, got {len(points)}")
    units = _normalized(points)
    centroids = _plus_plus_init(units, k, generator)
    labels = torch.full((len(units),), -1, dtype=torch.long)
    for _ in range(iterations):
        similarity = units @ centroids.T
        new_labels = similarity.argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, new_labels, units)
        counts = torch.bincount(new_labels, minlength=k)
        for empty in torch.nonzero(counts == 0).flatten().tolist():
            farthest = int(similarity.max(dim=1).values.argmin())
            sums[empty] = units[farthest]
            new_labels[farthest] = empty
        centroids = _normalized(sums)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return centroids, labels


def balanced_assignment(similarity: torch.Tensor, capacity: int) -> torch.Tensor:
    """Return labels (N,) assigning each row of `similarity` (N, k) to one column, at most
    `capacity` rows per column.

    Rounds of proposals: every unplaced row proposes to its most similar column that still has
    room, and each column accepts its most similar proposers up to its room. Vectorised per
    round; at most k rounds, since each round fills at least one column or places every row.
    """
    n, k = similarity.shape
    labels = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((k,), capacity, dtype=torch.long)
    while (labels < 0).any():
        unplaced = torch.nonzero(labels < 0).flatten()
        scores = similarity[unplaced].masked_fill(room == 0, float("-inf"))
        best = scores.argmax(dim=1)
        for column in torch.unique(best).tolist():
            proposers = unplaced[best == column]
            strength = similarity[proposers, column]
            accepted = proposers[torch.argsort(strength, descending=True, stable=True)[: int(room[column])]]
            labels[accepted] = column
            room[column] -= len(accepted)
    return labels


def balanced_kmeans(points: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 20) -> torch.Tensor:
    """Return labels (N,) splitting the rows of `points` into `k` clusters of exactly N/k rows,
    by spherical k-means with a capacity-constrained assignment step.

    Raises:
        ValueError: N is not divisible by k.
    """
    n = len(points)
    if n % k:
        raise ValueError(f"cannot split {n} points into {k} equal clusters")
    units = _normalized(points)
    centroids = _plus_plus_init(units, k, generator)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iterations):
        new_labels = balanced_assignment(units @ centroids.T, n // k)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
        centroids = _normalized(torch.zeros_like(centroids).index_add_(0, labels, units))
    return labels
