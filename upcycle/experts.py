"""Building expert weights from one dense FFN.

An `ExpertBuilder` decides, for one MoE layer, how many routed experts there are, how wide each
is, and computes each expert projection from the dense FFN on demand, one tensor at a time, so
the converter can stream. The family modules know nothing about it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Which dense projection an expert projection comes from, and the axis that indexes neurons.
PROJECTIONS = ("gate", "up", "down")
NEURON_AXIS = {"gate": 0, "up": 0, "down": 1}

DenseGetter = Callable[[str], torch.Tensor]  # "gate" | "up" | "down" -> the layer's dense weight


@dataclass(frozen=True)
class CopyExperts:
    """Sparse Upcycling (Komatsuzaki et al. 2022): every expert is an exact copy of the dense FFN."""

    num_experts: int
    method: str = "copy"

    def expert_size(self, dense_size: int) -> int:
        """Return the intermediate width of each routed expert for a dense FFN of `dense_size`."""
        return dense_size

    def projection(self, name: str, layer: int, expert: int, dense: DenseGetter) -> torch.Tensor:
        """Return the `name` weight of routed expert `expert` in `layer` (a fresh tensor)."""
        return dense(name).clone()

    def settings(self) -> dict:
        """Return the settings to record in the checkpoint's provenance."""
        return {"method": self.method}
