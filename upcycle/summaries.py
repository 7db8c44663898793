"""What a writer reports back: the summary of a conversion (dense -> MoE, or a MoPE export)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class ConvertSummary:
    """What a conversion produced."""

    output: Path
    family: str
    source: str
    source_model_type: str
    target_model_type: str
    layout: str
    num_experts: int
    top_k: int
    moe_layers: list[int]
    total_parameters: int
    active_parameters: int
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Return the summary as JSON-ready data."""
        data = asdict(self)
        data["output"] = str(self.output)
        return data


def active_parameters(total: int, moe_layers: int, num_experts: int, top_k: int, expert_parameters: int) -> int:
    """Return the parameters a token uses: `total` less the (num_experts - top_k) unchosen experts
    of `expert_parameters` each, in every one of `moe_layers` MoE layers."""
    return total - moe_layers * (num_experts - top_k) * expert_parameters
