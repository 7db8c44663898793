"""Initial router weights for an upcycled MoE layer."""

from __future__ import annotations

import torch


def layer_generator(seed: int, layer: int, stream: int = 0) -> torch.Generator:
    """Return a CPU generator for `layer` that does not depend on the order tensors are built in."""
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + layer * 9_176 + stream) % (2**63))
    return generator


def random_router(num_experts: int, hidden_size: int, std: float, seed: int, layer: int) -> torch.Tensor:
    """Return a (num_experts, hidden_size) float32 router drawn from N(0, std^2), reproducible per layer."""
    generator = layer_generator(seed, layer)
    return torch.randn(num_experts, hidden_size, generator=generator) * std
