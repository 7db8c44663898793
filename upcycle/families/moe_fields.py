"""Facts about stock MoE configs beyond the pairs we write: which fields hold the expert count and
top-k, and how each stock class turns router logits into expert weights. `upcycle inspect` and
`upcycle routes` read any MoE, including ones upcycle does not produce (OLMoE, PhiMoE, DeepSeek-V3).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

# Config fields that hold the routed expert count / experts per token, across stock MoE classes,
# in the order they are tried.
EXPERTS_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K_FIELDS = ("num_experts_per_tok", "moe_top_k", "top_k", "num_selected_experts")
# Config fields that count shared experts (each one routed expert wide), where a class counts them.
SHARED_EXPERTS_FIELDS = ("n_shared_experts",)

# How each stock MoE class turns router logits into expert weights ("softmax_topk": softmax over
# all experts, keep the k largest; "topk_softmax": keep the k largest logits, softmax over them,
# which equals softmax_topk renormalised; "sigmoid_grouped_topk": DeepSeek-V3's sigmoid scores plus a
# selection bias, top-k among the best groups, times a routed scaling factor). The renormalise
# flag: True, False, or a config field.
ROUTER_KINDS: dict[str, tuple[str, bool | str]] = {
    "mixtral": ("softmax_topk", True),
    "qwen2_moe": ("softmax_topk", "norm_topk_prob"),
    "qwen3_moe": ("softmax_topk", "norm_topk_prob"),
    "olmoe": ("softmax_topk", "norm_topk_prob"),
    "flex_olmo": ("softmax_topk", "norm_topk_prob"),
    "granitemoe": ("topk_softmax", True),
    "phimoe": ("sparsemixer", False),
    "deepseek_v3": ("sigmoid_grouped_topk", "norm_topk_prob"),
    "glm4_moe": ("sigmoid_grouped_topk", "norm_topk_prob"),
    "dots1": ("sigmoid_grouped_topk", "norm_topk_prob"),
}
# The per-expert selection bias of DeepSeek-V3-style routers (a buffer on the router module).
BIAS_BUFFER = "e_score_correction_bias"
# The grouped router's config fields, reported by `router_kind` under these keys.
GROUPED_ROUTER_FIELDS = {"groups": "n_group", "top_groups": "topk_group", "routed_scaling": "routed_scaling_factor"}


def first_positive_field(config: Mapping[str, Any] | object, fields: tuple[str, ...]) -> int | None:
    """Return the first of `fields` that `config` (a config.json dict or a config object) holds as a
    positive int, or None."""
    for name in fields:
        value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def router_kind(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return {"kind": how the router weighs experts, "renormalize": True/False/None} for a MoE config,
    plus "groups", "top_groups" and "routed_scaling" for a "sigmoid_grouped_topk" router."""
    kind, renormalise = ROUTER_KINDS.get(config.get("model_type", ""), ("unknown", None))
    if isinstance(renormalise, str):
        renormalise = config.get(renormalise)
    info = {"kind": kind, "renormalize": renormalise}
    if kind == "sigmoid_grouped_topk":
        info |= {key: config.get(name) for key, name in GROUPED_ROUTER_FIELDS.items()}
    return info


def biased_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return ``(module_name, module)`` for every DeepSeek-V3-style router of `model`, in module
    order: a module owning both its projection ``weight`` (a parameter) and an
    ``e_score_correction_bias`` buffer. MiniMax-M2 keeps the bias on the MoE block and passes it to
    its gate, Ernie-4.5-MoE makes it a parameter: neither is a router of this kind."""
    import torch

    routers = []
    for name, module in model.named_modules():
        buffers, parameters = dict(module.named_buffers(recurse=False)), dict(module.named_parameters(recurse=False))
        if isinstance(buffers.get(BIAS_BUFFER), torch.Tensor) and "weight" in parameters:
            routers.append((name, module))
    return routers
