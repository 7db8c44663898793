"""`MoPEModel`: the PEFT tuner that decides which module gets which MoPE layer."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from peft.utils.other import get_pattern_key
from torch import nn

from mope.config import MoPEConfig
from mope.errors import MoPEConfigError, MoPEMergeError
from mope.layer import FFN_PROJECTIONS, GatedFFNBlock, Linear, MoPELayer, is_gated_ffn
from mope.loading import check_loaded_weights

_GATED_FFN_TARGETS = ["gate_proj", "up_proj", "down_proj"]
TARGET_MODULE_MAPPING: dict[str, list[str]] = {
    model_type: _GATED_FFN_TARGETS
    for model_type in (
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "olmo",
        "olmo2",
        "granite",
        "phi3",
        "smollm3",
    )
}


class MoPEModel(BaseTuner):
    """Mixtures of LoRA experts on a transformers model; see `MoPEConfig` for the method.

    Use it through PEFT: ``get_peft_model(model, MoPEConfig(...))``. With ``routing="block"`` the
    gated FFN blocks whose projections match ``target_modules`` are wrapped as a whole
    (`GatedFFNBlock`, its experts keyed by projection, checkpoint keys ``...mlp.mope_A.gate_proj``);
    every other match is wrapped as a `Linear`.

    ``merge_and_unload()`` is exact or refuses: it folds layers whose routing does not depend on
    the token (one expert per module, plus the shared expert) and raises `MoPEMergeError` before
    touching any weight when some layer routes per token.
    """

    prefix: str = "mope_"
    tuner_layer_cls = MoPELayer
    target_module_mapping = TARGET_MODULE_MAPPING

    def _check_target_module_exists(self, peft_config: MoPEConfig, key: str):
        if peft_config.routing != "block":
            return check_target_module_exists(peft_config, key)
        parent_key, _, name = key.rpartition(".")
        if name in FFN_PROJECTIONS and parent_key and is_gated_ffn(_submodule_or_none(self.model, parent_key)):
            return False  # adapted through its block, see below
        module = _submodule_or_none(self.model, key)
        if module is None:
            return False  # inside a block wrapped earlier in this injection
        if is_gated_ffn(module):
            return bool(self._block_projections(peft_config, key))
        return check_target_module_exists(peft_config, key)

    @staticmethod
    def _block_projections(peft_config: MoPEConfig, block_key: str) -> tuple[str, ...]:
        matched = []
        for name in FFN_PROJECTIONS:
            result = check_target_module_exists(peft_config, f"{block_key}.{name}")
            if result and type(result).__name__ != "_ExcludedModule":
                matched.append(name)
        return tuple(matched)

    def _create_and_replace(
        self,
        peft_config: MoPEConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        num_experts = peft_config.num_experts
        if peft_config.num_experts_pattern:
            pattern = get_pattern_key(peft_config.num_experts_pattern.keys(), current_key)
            num_experts = peft_config.num_experts_pattern.get(pattern, num_experts)

        if peft_config.routing == "block" and is_gated_ffn(target):
            projections = self._block_projections(peft_config, current_key)
            if isinstance(target, GatedFFNBlock):
                target.update_layer(adapter_name, peft_config, num_experts, projections)
                return
            _check_gated_ffn_forward(target, current_key)
            new_module = GatedFFNBlock(target, adapter_name, peft_config, num_experts, projections)
        elif isinstance(target, Linear):
            target.update_layer(adapter_name, peft_config, num_experts)
            return
        elif isinstance(target, GatedFFNBlock):
            raise MoPEConfigError(
                f"{current_key} already carries a routing='block' "
                "adapter; adapters on one model must use the "
                "same routing mode for the same FFN block."
            )
        elif isinstance(target, nn.Linear):
            new_module = Linear(target, adapter_name, peft_config, num_experts)
        else:
            fused = any(parameter.dim() == 3 for parameter in target.parameters(recurse=False))
            hint = (
                " It holds fused expert tensors (parameters, not linear layers): adapt them with "
                "peft.LoraConfig(target_parameters=[...])."
                if fused
                else ""
            )
            raise MoPEConfigError(
                f"target module {current_key} is a {type(target).__name__}; MoPE adapts nn.Linear layers (and, "
                f"with routing='block', gated FFN blocks).{hint} Narrow target_modules to linear layers."
            )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if isinstance(child, GatedFFNBlock) and new_module is child.get_base_layer():
            # unloading a block: the FFN module goes back as it is (it has no single .weight to re-attach)
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ):
        if merge:
            self._check_all_mergeable(adapter_names)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._check_all_mergeable(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _check_all_mergeable(self, adapter_names: list[str] | None) -> None:
        """Raise before any weight changes when some layer cannot be merged exactly."""
        names = adapter_names or self.active_adapters
        for key, module in self.model.named_modules():
            if not isinstance(module, MoPELayer):
                continue
            for adapter_name in names:
                if adapter_name in module.mope_router:
                    try:
                        module.check_mergeable(adapter_name)
                    except MoPEMergeError as exc:
                        raise MoPEMergeError(f"cannot merge {key}: {exc}") from None

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: MoPEConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """PEFT's key remapping of a saved adapter, then `mope.loading.check_loaded_weights`: the one
        hook every load path goes through (``PeftModel.from_pretrained``, ``load_adapter``,
        ``set_peft_model_state_dict``) before weights are copied.

        Raises:
            MoPELoadError: when the file's MoPE weights are not exactly those the config builds
                (PEFT itself would only warn and keep randomly initialised experts).
        """
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_loaded_weights(model, config, adapter_name, remapped, cls._remove_adapter_name_from_key)
        return remapped

    def routed_layers(self) -> dict[str, MoPELayer]:
        """Return the MoPE layers by module name."""
        return {key: module for key, module in self.model.named_modules() if isinstance(module, MoPELayer)}


def _submodule_or_none(model: nn.Module, key: str) -> nn.Module | None:
    try:
        return model.get_submodule(key)
    except AttributeError:
        return None


def _check_gated_ffn_forward(block: nn.Module, key: str) -> None:
    """Check on two random tokens that the block really computes ``down(act(gate(x)) * up(x))``:
    the mixture bypasses the block's own forward, so a block with the same attribute names and a
    different forward (clamping, extra gates) must be refused, not silently changed."""
    weight = block.gate_proj.weight
    if weight.device.type == "meta":
        return
    probe = torch.randn(2, block.gate_proj.in_features, generator=torch.Generator().manual_seed(0))
    probe = probe.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        expected = block(probe)
        recomputed = block.down_proj(block.act_fn(block.gate_proj(probe)) * block.up_proj(probe))
    if not torch.allclose(expected, recomputed, rtol=1e-3, atol=1e-4):
        raise MoPEConfigError(
            f"{key} ({type(block).__name__}) has gate_proj/up_proj/down_proj/act_fn but does not compute "
            "down_proj(act_fn(gate_proj(x)) * up_proj(x)), so routing='block' cannot run it as a mixture of "
            "FFN experts; use routing='linear'."
        )
