"""Initial router weights for an upcycled MoE layer: random, k-means on calibration FFN inputs,
neuron-cluster centroids (partition), and virtual groups (granular)."""

from __future__ import annotations

import math

import torch

from upcycle.kmeans import spherical_kmeans
from upcycle.rng import derived_generator

ROUTER_INITS = ("random", "kmeans", "centroids")


def layer_generator(seed: int, layer: int, stream: int = 0) -> torch.Generator:
    """Return a CPU generator for `layer` that does not depend on the order tensors are built in."""
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + layer * 9_176 + stream) % (2**63))
    return generator


def random_router(num_experts: int, hidden_size: int, std: float, seed: int, layer: int) -> torch.Tensor:
    """Return a (num_experts, hidden_size) float32 router drawn from N(0, std^2), reproducible per layer."""
    generator = layer_generator(seed, layer)
    return torch.randn(num_experts, hidden_size, generator=generator) * std


def kmeans_router(states: torch.Tensor, num_experts: int, std: float, seed: int, layer: int) -> torch.Tensor:
    """Return a (num_experts, hidden) float32 router whose rows are spherical k-means centroids of
    `states` (one layer's FFN inputs, (tokens, hidden)).

    Unit centroids make the router's argmax on a calibration token its cluster, so routing starts
    input-dependent and as balanced as the clusters. Rows are scaled to the norm a random row
    N(0, std^2) would have (std * sqrt(hidden)), so logits start as soft as with random init.

    Raises:
        ValueError: fewer calibration tokens than experts.
    """
    generator = derived_generator(seed, "kmeans-router", layer)
    centroids, _ = spherical_kmeans(states, num_experts, generator)
    return centroids * (std * math.sqrt(states.shape[1]))


def centroid_router(centroids: torch.Tensor) -> torch.Tensor:
    """Return the router (E, hidden) float32 whose row e is the centroid of expert e's neurons
    (a partition's mean gate rows): an expert's logit is then its neurons' mean gate pre-activation."""
    return centroids.float().clone()


def virtual_group_router(rows: torch.Tensor, group_size: int) -> torch.Tensor:
    """Return `rows` (C, hidden) with each row repeated `group_size` times in a row: (C * group_size, hidden).

    Granular upcycling's virtual groups (He et al. 2024): the G shards of one FFN copy share a
    router row, so they tie and top-k (a multiple of G) selects whole copies at init.
    """
    return rows.repeat_interleave(group_size, dim=0)
