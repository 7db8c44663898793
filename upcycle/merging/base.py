"""The base FFN that task-vector merges (task-arithmetic, ties, dare) measure each expert from.

A task vector is an expert minus a dense FFN of the same width. That FFN is, in order of
preference: the `--base` checkpoint's MLP, the dense checkpoint the MoE records it was upcycled
from (when it is on disk and as wide as one expert), or else the mean of each layer's experts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from upcycle.checkpoint import SourceCheckpoint, open_checkpoint
from upcycle.errors import UpcycleError, flag
from upcycle.merging import methods
from upcycle.merging.source import MoESource


def upcycled_dense_source(config: dict) -> str | None:
    """Return the dense checkpoint a MoE was upcycled (or composed) from, following merge provenance
    back, or None. A composed MoE's experts come from fine-tunes of its `base`, the task vectors' origin."""
    provenance = config.get("upcycle")
    while isinstance(provenance, dict):
        if provenance.get("operation", "upcycle") == "upcycle":
            return provenance.get("source")
        if provenance.get("operation") == "compose":
            return provenance.get("base")
        provenance = provenance.get("input_provenance")
    return None


class BaseFFN:
    """The dense FFN that task vectors are measured from: a checkpoint's MLP, or each layer's expert mean.

    `description` names it (the checkpoint's name, or "expert-mean") for the summary and provenance.
    """

    def __init__(self, moe: MoESource, base: str | None, method: str):
        """Open `base` (or the dense source `moe` records) as the base FFN of `method`.

        Raises:
            UpcycleError: `base` does not have one expert's width in every MoE layer, or `method`
                is ties (which needs a real base) and no base checkpoint is available.
        """
        self.description = "expert-mean"
        self.checkpoint: SourceCheckpoint | None = None
        if base is not None:
            self.checkpoint = open_checkpoint(base)
            problem = self._mismatch(moe)
            if problem:
                raise UpcycleError(f"{flag('base')} {base}: {problem}; give the dense model the MoE was upcycled from")
        else:
            recorded = upcycled_dense_source(moe.config)
            if recorded is not None and Path(recorded).is_dir():
                self.checkpoint = open_checkpoint(recorded)
                if self._mismatch(moe):  # e.g. granular experts narrower than the dense FFN they came from
                    self.checkpoint = None
        if self.checkpoint is None and method == "ties":
            raise UpcycleError(
                f"{flag('method')} ties needs a base FFN to measure task vectors from and {moe.name} records no local "
                f"dense source of the experts' width; pass {flag('base')} DENSE (the dense model the MoE came from)"
            )
        if self.checkpoint is not None:
            self.description = self.checkpoint.name

    def _mismatch(self, moe: MoESource) -> str | None:
        """Return why the base checkpoint cannot serve as the experts' base FFN, or None if it can."""
        names = moe.family.dense_mlp
        for layer in moe.moe_layers:
            for template, shape in (
                (names.gate, (moe.expert_size, moe.hidden_size)),
                (names.up, (moe.expert_size, moe.hidden_size)),
                (names.down, (moe.hidden_size, moe.expert_size)),
            ):
                name = template.format(layer=layer)
                if name not in self.checkpoint.tensors:
                    return f"no tensor {name}"
                if self.checkpoint.tensors.shape(name) != shape:
                    return (
                        f"{name} has shape {self.checkpoint.tensors.shape(name)} but the experts {shape}; "
                        "task vectors need a base FFN as wide as one expert"
                    )
        return None

    def projection(self, moe: MoESource, layer: int, projection: str, experts: list[torch.Tensor]) -> torch.Tensor:
        """Return the base FFN's `projection` (gate, up or down) of `layer`; `experts` holds that projection
        of every routed expert of the layer (for the expert mean)."""
        if self.checkpoint is None:
            return methods.weighted_mean(experts, torch.ones(moe.num_experts))
        names = moe.family.dense_mlp
        template = {"gate": names.gate, "up": names.up, "down": names.down}[projection]
        return self.checkpoint.tensors.get(template.format(layer=layer))
