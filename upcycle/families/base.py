"""The data a dense -> MoE family pair declares; the converter reads it and branches on nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# Keys of a source config.json that describe the file or the source class rather than the model.
NEVER_COPIED = frozenset(
    {"architectures", "model_type", "transformers_version", "auto_map", "_name_or_path", "upcycle"}
)


@dataclass(frozen=True)
class DenseMLPNames:
    """Tensor-name templates of a dense gated FFN, with `{layer}`."""

    gate: str = "model.layers.{layer}.mlp.gate_proj.weight"
    up: str = "model.layers.{layer}.mlp.up_proj.weight"
    down: str = "model.layers.{layer}.mlp.down_proj.weight"


@dataclass(frozen=True)
class ExpertLayout:
    """Tensor-name templates of one on-disk expert layout, with `{layer}` and `{expert}`.

    `fused` layouts hold all experts of a layer in two tensors: `gate_up` of shape (E, 2I, H),
    gate rows first, and `down` of shape (E, H, I). Per-expert layouts hold (I, H), (I, H), (H, I)
    tensors per expert.
    """

    fused: bool
    router: str
    gate: str = ""
    up: str = ""
    down: str = ""
    gate_up: str = ""


@dataclass(frozen=True)
class SharedExpertNames:
    """Tensor-name templates of an always-on shared expert and its sigmoid gate, with `{layer}`.

    `down_scale` multiplies the shared expert's down_proj: the gate is written as `gate_value`
    (2^-64 in every entry: sigmoid of it is 0.5 exactly in float32/bfloat16, and it is not zero,
    which llama.cpp's sigmoid = silu(z)/z turns into NaN), so the target scales the shared output
    by 0.5, and doubling down_proj cancels it. Targets whose shared experts are not gated
    (DeepSeek-V3 style) leave `expert_gate` empty and `down_scale` 1.
    """

    gate: str
    up: str
    down: str
    expert_gate: str = ""
    down_scale: float = 2.0
    # Width written, all zeros, when no shared expert is requested (0: width 0). llama.cpp's qwen2moe
    # always runs a shared expert and refuses width 0; vLLM then expects no shared tensors at all.
    placeholder_width: int = 0
    # The same in routed-expert widths, for targets that count shared experts (glm4_moe's
    # n_shared_experts): llama.cpp's glm4moe graph always runs a shared expert and refuses width 0, and
    # vLLM's CPU build crashes on a width-0 matrix multiply (scripts/compat/engines.py).
    placeholder_experts: int = 0

    @staticmethod
    def gate_value(dtype: torch.dtype) -> float:
        """Return the value written into every entry of the shared-expert gate for `dtype`: 2^-64, or
        the smallest subnormal-free step where the dtype cannot hold it (float16: 2^-24)."""
        info = torch.finfo(dtype)
        return 2.0**-64 if info.tiny <= 2.0**-64 else info.tiny * info.eps


@dataclass(frozen=True)
class GroupedRouterFields:
    """A DeepSeek-V3-style router: sigmoid scores, a per-expert selection bias, group-limited top-k
    and a routed scaling factor. Config field names, and the bias tensor's template with `{layer}`.

    The target picks experts by sigmoid(logit) + bias among the `top_groups` best of `groups`
    equal groups of consecutive experts (a group scores the sum of its two best experts), weighs
    them by their sigmoid scores renormalised to sum to 1, and multiplies the routed output by
    the routed scaling factor.
    """

    groups: str
    top_groups: str
    routed_scaling: str
    bias: str


@dataclass(frozen=True)
class Requirement:
    """A source config field that must hold `value` for the pair to be exact, and why."""

    field: str
    value: Any
    reason: str


@dataclass(frozen=True)
class FamilyPair:
    """One dense -> MoE pair, as data: what to copy, translate, rename and refuse.

    Config: every source field the target config class knows is copied, except `NEVER_COPIED`
    and `dropped_fields`; `extra_copied_fields` are copied even if the target class does not list
    them (it still reads them); `overrides` are set on top; the expert count, top-k and expert
    width go to the target's own field names.
    Tensors: every source tensor is copied under its own name, except the dense MLP, which becomes
    the router and experts in one of `layouts`.
    """

    name: str
    source_model_types: tuple[str, ...]
    target_model_type: str
    target_architecture: str
    experts_field: str
    top_k_field: str
    expert_size_field: str
    layouts: dict[str, ExpertLayout]
    default_layout: str
    dense_mlp: DenseMLPNames = DenseMLPNames()
    shared_expert: SharedExpertNames | None = None
    shared_expert_size_field: str = ""
    # Config field holding the number of shared experts, each one routed expert wide (DeepSeek-V3's
    # `n_shared_experts`), for targets that count shared experts instead of giving their width.
    shared_experts_field: str = ""
    # Config field listing layers that keep a dense MLP (e.g. Qwen's `mlp_only_layers`); empty:
    # the target makes every layer MoE, so `--moe-layers` must select all of them.
    dense_layers_field: str = ""
    # True: `dense_layers_field` counts leading dense layers (`first_k_dense_replace`), so only the
    # first layers can stay dense.
    dense_layers_leading: bool = False
    grouped_router: GroupedRouterFields | None = None
    # Entries of `rope_parameters` the target defaults differently from the source (GLM-4-MoE's
    # partial_rotary_factor 0.5); the source's own value wins where it has one.
    rope_defaults: dict[str, Any] = field(default_factory=dict)
    # `rope_parameters` entries also written at the top level of config.json, for engines that read
    # them there (llama.cpp's GLM-4-MoE converter reads `partial_rotary_factor`, default 0.5).
    top_level_rope_fields: tuple[str, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    dropped_fields: frozenset[str] = frozenset()
    extra_copied_fields: frozenset[str] = frozenset()
    requirements: tuple[Requirement, ...] = ()
    ignored_source_tensors: tuple[str, ...] = ("rotary_emb.inv_freq",)
    notes: str = ""
    # One line `convert` prints when a serving engine cannot run the target as written (measured with
    # scripts/compat/engines.py); empty when llama.cpp and vLLM both run it exactly.
    engine_notice: str = ""
    # When set, the notice applies only to sources whose config sets this field (e.g. sliding_window).
    engine_notice_field: str = ""
    # Weights (templates with `{layer}`) whose bias the target's engines always build but the source
    # lacks: a zero bias (one entry per output row) is written for each, which adds exactly nothing.
    zero_biases: tuple[str, ...] = ()
