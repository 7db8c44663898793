"""The training objective: token cross-entropy summed (so it can be divided by the target-token count
of the whole global batch), plus the router auxiliary terms of MoE and MoPE models.

Why a sum: with padding or SFT masks, micro-batches hold different numbers of target tokens, and
averaging per micro-batch or per process would weight tokens unequally. Dividing each sum by the
global count makes one optimizer step identical for any split of the global batch over gradient
accumulation steps and processes (the DDP test checks this).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.moe.losses import router_z_loss
from upcycle.training.data import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Return the summed next-token cross-entropy (float32) of `logits` (B, S, V) against `labels`
    (B, S), shifted by one, ignoring -100."""
    shifted_logits = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])
    shifted_labels = labels[:, 1:].reshape(-1).to(shifted_logits.device)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")


@dataclass
class AuxTerms:
    """The router terms added to the loss: ``total`` (differentiable) and each weighted part, detached."""

    total: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


def router_aux_terms(
    model: nn.Module, outputs, attention_mask: torch.Tensor | None, z_loss_coef: float, is_mope: bool
) -> AuxTerms:
    """Return the weighted router losses of the forward that produced `outputs`.

    - transformers MoE models: ``router_aux_loss_coef * outputs.aux_loss``, the model's own
      load-balancing loss with the coefficient read from the model's config (where the recipe wrote
      it), and ``z_loss_coef * router_z_loss`` over all layers' router logits (transformers' causal
      MoE models have no z-loss field);
    - MoPE models: `mope.aux_loss` (its coefficients are in the adapter config).

    `model` is the unwrapped model (PEFT-wrapped or not).
    """
    parameter = next(model.parameters())
    total = torch.zeros((), device=parameter.device)
    parts: dict[str, float] = {}
    if is_mope:
        import mope

        term = mope.aux_loss(model, attention_mask)
        total = total + term
        parts["mope_aux"] = float(term.detach())
        return AuxTerms(total, parts)
    coef = getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0
    aux_loss = getattr(outputs, "aux_loss", None)
    if coef and aux_loss is not None:
        term = coef * aux_loss.to(total.device)
        total = total + term
        parts["router_aux"] = float(term.detach())
    router_logits = getattr(outputs, "router_logits", None)
    if z_loss_coef and router_logits:
        logits = torch.cat([layer for layer in router_logits if layer is not None])
        mask = None
        if attention_mask is not None:
            mask = attention_mask.reshape(-1).bool().repeat(logits.shape[0] // attention_mask.numel())
        term = z_loss_coef * router_z_loss(logits, mask)
        total = total + term
        parts["router_z"] = float(term.detach())
    return AuxTerms(total, parts)
