"""Training-compute accounting for the upcycling study: active parameters and FLOPs per token.

Convention (Kaplan et al. 2020, extended to sparse and frozen weights): a token costs 2 FLOPs per
active weight in the forward pass, 2 more in the backward pass to propagate activation gradients
through it, and 2 more to form the weight's gradient when the weight is trained. A fully trained
model therefore costs 6 x N_active per token; a MoPE run, whose base weights are frozen, costs
4 x N_active + 2 x N_trainable_active.

Which parameters count as active: every matrix a token is multiplied with. The input embedding
is a table lookup and is left out; the LM head is a matmul and is counted (once, also when tied
to the embedding). Of a routed expert stack (a leading experts dimension: transformers' fused
`mlp.experts.*` or MoPE's `mope_A`/`mope_B`) only top_k / num_experts is active. Routers and norms
are counted in full. Attention-score FLOPs (2 x layers x context x width per token) are left out:
every method has the same attention, so they add the same amount to every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

EXPERT_STACK_MARKERS = (".experts.", "mope_A", "mope_B")


@dataclass(frozen=True)
class ParameterCount:
    """Parameter counts of a model as the study's FLOPs use them."""

    total: int  # every parameter, the input embedding included
    active: float  # weights a token is multiplied with (see the module docstring)
    trainable_active: float  # the active weights that receive gradients

    def training_flops_per_token(self) -> float:
        """Return the forward + backward FLOPs one training token costs."""
        return 4.0 * self.active + 2.0 * self.trainable_active

    def training_flops(self, tokens: int) -> float:
        """Return the FLOPs of training on `tokens` tokens."""
        return self.training_flops_per_token() * tokens


def count_parameters(model: nn.Module, top_k: int) -> ParameterCount:
    """Return the total, active and trainable-active parameter counts of `model` (built on any
    device, the meta device included) routing each token to `top_k` experts of every expert stack."""
    total = active = trainable = 0.0
    embedding = model.get_input_embeddings().weight
    for name, parameter in model.named_parameters():
        total += parameter.numel()
        if parameter is embedding:
            continue
        share = 1.0
        if any(marker in name for marker in EXPERT_STACK_MARKERS):
            # top_k <= 0 is a dense soft mixture (MoPE's top_k=0): every expert is active.
            share = min(top_k, parameter.shape[0]) / parameter.shape[0] if top_k > 0 else 1.0
        active += parameter.numel() * share
        trainable += parameter.numel() * share if parameter.requires_grad else 0.0
    head = model.get_output_embeddings()
    if head is not None and head.weight is embedding:  # tied: the head matmul still happens
        active += embedding.numel()
        trainable += embedding.numel() if embedding.requires_grad else 0.0
    return ParameterCount(int(total), active, trainable)


def checkpoint_parameters(path: str, mope_options: dict | None = None) -> ParameterCount:
    """Return the parameter counts of the causal LM whose config is at `path` (built on the meta
    device, no weights read), wrapped in a MoPE adapter with `mope_options` when given (base frozen).

    Raises:
        OSError / ValueError: from transformers when `path` holds no readable config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    top_k = int(getattr(config, "num_experts_per_tok", 1) or 1)
    if mope_options is None:
        return count_parameters(model, top_k)
    from peft import get_peft_model

    import mope  # registers the MOPE PEFT type

    options = {"task_type": "CAUSAL_LM", **mope_options}
    with torch.device("meta"):
        adapted = get_peft_model(model, mope.MoPEConfig(**options))
    return count_parameters(adapted, int(adapted.peft_config["default"].top_k))
