"""DeepSeek-V3 auxiliary-loss-free balancing of stock transformers MoE routers (``moe.bias_update_rate``).

Routers such as glm4_moe's ``Glm4MoeTopkRouter`` (DeepSeek-V3's and dots1's are the same code) keep
a per-expert buffer ``e_score_correction_bias`` that is added to the sigmoid scores for choosing the
experts only (the mixing weights are the unbiased scores). Their forward returns ``(router_logits,
topk_weights, topk_indices)``, so a forward hook sees the experts each token was sent to, and
nothing of transformers is patched.

`RoutingCapture` hooks every such router. Inside `RoutingCapture.recording` (the training forwards
of a step; evaluation and the recomputation of gradient checkpointing run outside it) each hook
keeps the router's last logits and chosen experts (for the router metrics) and adds the tokens each
expert received to the step's load, padding excluded through the micro-batch's attention mask.
After the optimizer step `balance_selection_biases` sums that load over the processes and moves
every bias by ``rate * sign(mean load - expert load)``: every process applies the same update, so
DDP's broadcast of rank 0's buffers before each forward changes nothing. The bias is a buffer: no
gradient, no weight decay, untouched by the optimizer, and saved with the model's state dict (in
``save_state`` checkpoints and the final ``save_pretrained``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from upcycle.errors import UpcycleError
from upcycle.families.moe_fields import BIAS_BUFFER
from upcycle.moe import loss_free_bias_delta

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_name(module_name: str) -> str:
    """Return ``layer_<i>`` for a module under ``layers.<i>.`` (the name the router metrics use),
    else the module name itself."""
    match = _LAYER.search(module_name)
    return f"layer_{match.group(1)}" if match else module_name


class RoutingCapture:
    """Forward hooks on a model's biased routers recording the experts each training token chose.

    With `keep_routing`, ``last`` holds each router's ``(router_logits (T, E), expert_indices (T, k))``
    of the latest recorded forward; with `count_load`, the per-expert load accumulates until `take_load`.
    """

    def __init__(self, routers: list[tuple[str, nn.Module]], keep_routing: bool, count_load: bool) -> None:
        self.names = [layer_name(name) for name, _ in routers]
        self.routers = [module for _, module in routers]
        self.keep_routing = keep_routing
        self.count_load = count_load
        self.last: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._load: list[torch.Tensor | None] = [None] * len(self.routers)
        self._mask: torch.Tensor | None = None
        self._active = False
        for index, module in enumerate(self.routers):
            module.register_forward_hook(self._hook(index))

    def _hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._active:
                self._record(index, module, output)

        return hook

    def _record(self, index: int, module: nn.Module, output: Any) -> None:
        indices = output[-1] if isinstance(output, tuple) else None
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point():
            raise UpcycleError(
                f"moe: {type(module).__name__} owns {BIAS_BUFFER} but its forward does not return the chosen "
                "experts last ((router_logits, weights, indices) as glm4_moe and DeepSeek-V3 routers do)"
            )
        logits = output[0].detach()
        indices = indices.detach().reshape(logits.shape[0], -1)
        if self.keep_routing:
            self.last[self.names[index]] = (logits.float(), indices)
        if not self.count_load:
            return
        chosen = indices
        if self._mask is not None:
            if self._mask.numel() != indices.shape[0]:
                raise UpcycleError(
                    f"moe: {type(module).__name__} routed {indices.shape[0]} tokens but the batch has "
                    f"{self._mask.numel()} positions; cannot exclude padding from the expert load"
                )
            chosen = indices[self._mask.reshape(-1).to(device=indices.device, dtype=torch.bool)]
        num_experts = getattr(module, BIAS_BUFFER).numel()
        counts = torch.bincount(chosen.reshape(-1), minlength=num_experts)
        previous = self._load[index]
        self._load[index] = counts if previous is None else previous + counts

    @contextmanager
    def recording(self, attention_mask: torch.Tensor | None) -> Iterator[None]:
        """Record the routers' choices during the forward run inside the block; positions where
        `attention_mask` is 0 do not count towards the load."""
        self._active, self._mask = True, attention_mask
        try:
            yield
        finally:
            self._active, self._mask = False, None

    def routed_layers(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """Return ``(layer_name, router_logits, expert_indices)`` of each router's last recorded forward."""
        return [(name, *self.last[name]) for name in self.names if name in self.last]

    def take_load(self, device: torch.device) -> torch.Tensor:
        """Return the tokens each expert received since the last call, every router's counts
        concatenated (int64, on `device`), and start counting afresh."""
        counts = [
            torch.zeros(getattr(module, BIAS_BUFFER).numel(), dtype=torch.long) if load is None else load
            for module, load in zip(self.routers, self._load, strict=True)
        ]
        self._load = [None] * len(self.routers)
        return torch.cat([count.to(device=device, dtype=torch.long) for count in counts])


def load_cv(load: torch.Tensor) -> float:
    """Return the coefficient of variation (population std / mean) of a per-expert load; 0 when empty."""
    load = load.double()
    mean = load.mean()
    return float(load.std(unbiased=False) / mean) if mean > 0 else 0.0


@torch.no_grad()
def balance_selection_biases(
    accelerator: Any, capture: RoutingCapture, rate: float, device: torch.device
) -> dict[str, float]:
    """Sum the step's per-expert load over all processes and move each router's
    ``e_score_correction_bias`` by ``rate * sign(mean load - expert load)``; every process must call it.

    Returns:
        ``moe/step_load_cv``: the step's load CV averaged over the routers (before the update),
        ``moe/bias_range``: the spread (max - min) of the biases after it, averaged over the routers.
    """
    load = accelerator.reduce(capture.take_load(device), "sum")
    cvs, ranges = [], []
    offset = 0
    for module in capture.routers:
        bias = getattr(module, BIAS_BUFFER)
        layer_load = load[offset : offset + bias.numel()]
        offset += bias.numel()
        bias.add_(loss_free_bias_delta(layer_load, rate).to(device=bias.device, dtype=bias.dtype))
        cvs.append(load_cv(layer_load))
        ranges.append(float(bias.max() - bias.min()))
    return {"moe/step_load_cv": sum(cvs) / len(cvs), "moe/bias_range": sum(ranges) / len(ranges)}
