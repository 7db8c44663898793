"""Loading saved MoPE adapters: refusing weights that do not match the config, and recognising a
MoPE adapter before PEFT is asked to load it.

PEFT loads adapter weights with ``strict=False`` and only warns about the adapter parameters the
file lacks, so an ``adapter_config.json`` edited after saving (``routing``, ``num_experts``,
``r``, ``share_a``, ``shared_expert``, targets) used to give a model with randomly initialised
experts. `check_loaded_weights` runs inside the load (see `MoPEModel._remap_adapter_state_dict_for_load`)
and raises `MoPELoadError` instead, before any weight is copied.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mope.errors import MoPELoadError
from mope.layer import MoPELayer

MOPE_PEFT_TYPE = "MOPE"
_PEFT_PREFIX = "base_model.model."
_ADAPTER_CONFIG = "adapter_config.json"
_BLOCK_KEY = re.compile(r"\.mope_\w+\.(gate_proj|up_proj|down_proj)$")
_LINEAR_KEY_IN_BLOCK = re.compile(r"\.(gate_proj|up_proj|down_proj)\.mope_\w+$")
_EXAMPLES = 3


def is_mope_adapter(source: Mapping[str, Any] | str | os.PathLike) -> bool:
    """True when ``source`` is a MoPE adapter: its ``adapter_config.json`` has ``peft_type`` "MOPE".

    PEFT cannot load such an adapter unless `mope` was imported first (``KeyError: 'MOPE'``);
    callers that load adapters they did not create check this and either ``import mope`` or
    raise with `MOPE_IMPORT_HINT`. Importing this function imports `mope`, which already
    registers the method.

    Args:
        source: the parsed adapter config (a mapping), an adapter directory, or the path of its
            ``adapter_config.json``. Hub ids are not resolved (no network): a string that is not an
            existing local path gives False.

    Returns:
        False as well for a missing, unreadable or non-JSON config, which PEFT itself reports.
    """
    if isinstance(source, Mapping):
        return source.get("peft_type") == MOPE_PEFT_TYPE
    path = Path(source)
    if path.is_dir():
        path = path / _ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not UTF-8 or not JSON
        return False
    return isinstance(config, dict) and config.get("peft_type") == MOPE_PEFT_TYPE


def _strip(key: str) -> str:
    return key.removeprefix(_PEFT_PREFIX)


def _expected_weights(model: nn.Module, adapter_name: str) -> dict[str, torch.Size]:
    """The shapes of the adapter's MoPE parameters and buffers in ``model``, by unprefixed state_dict key."""
    expected = {}
    for name, module in model.named_modules():
        if not isinstance(module, MoPELayer):
            continue
        for attribute in module.adapter_layer_names:
            container = getattr(module, attribute, None)
            if container is None or adapter_name not in container:
                continue
            item = container[adapter_name]
            prefix = f"{name}.{attribute}.{adapter_name}"
            if isinstance(item, nn.Module):
                for key, tensor in item.state_dict().items():
                    expected[_strip(f"{prefix}.{key}")] = tensor.shape
            else:
                expected[_strip(prefix)] = item.shape
    return expected


def _is_mope_key(key: str) -> bool:
    return any(part.startswith("mope_") for part in key.split("."))


def _hint(routing: str, unexpected: list[str]) -> str:
    if routing == "linear" and any(_BLOCK_KEY.search(key) for key in unexpected):
        return (
            "The file holds routing='block' weights (one router per FFN block) but the config says routing='linear'. "
        )
    if routing == "block" and any(_LINEAR_KEY_IN_BLOCK.search(key) for key in unexpected):
        return "The file holds routing='linear' weights (a router per projection) but the config says routing='block'. "
    return ""


def check_loaded_weights(
    model: nn.Module,
    config: Any,
    adapter_name: str,
    state_dict: Mapping[str, torch.Tensor],
    checkpoint_key: Callable[[str, str], str],
) -> None:
    """Raise unless ``state_dict`` (an adapter file's weights, keys already mapped to the model's)
    holds exactly the MoPE weights that ``config`` gave ``model``, with the same shapes.

    Args:
        model: the model the adapter was just added to (a `PeftModel` or a model with injected layers).
        config: the adapter's `MoPEConfig` (read for ``routing``).
        adapter_name: the adapter being loaded.
        state_dict: the adapter file's tensors after PEFT's key remapping.
        checkpoint_key: maps a model key and the adapter name to the key the file uses (PEFT's
            ``_remove_adapter_name_from_key``), to name missing weights as the file would.

    Raises:
        MoPELoadError: naming the missing, unexpected or differently shaped weights and the fix.
    """
    expected = _expected_weights(model, adapter_name)
    loaded = {_strip(key): tensor for key, tensor in state_dict.items() if _is_mope_key(key)}
    missing = sorted(checkpoint_key(key, adapter_name) for key in expected.keys() - loaded.keys())
    unexpected = sorted(loaded.keys() - expected.keys())
    mismatched = sorted(
        f"{checkpoint_key(key, adapter_name)}: {tuple(loaded[key].shape)} in the file, "
        f"{tuple(expected[key])} from the config"
        for key in expected.keys() & loaded.keys()
        if tuple(loaded[key].shape) != tuple(expected[key])
    )
    if not (missing or unexpected or mismatched):
        return
    problems = []
    for count_of, what in (
        (missing, "the config asks for that are not in the file"),
        (unexpected, "in the file have no place in the model the config builds"),
        (mismatched, "have other shapes"),
    ):
        if count_of:
            examples = "; ".join(count_of[:_EXAMPLES]) + ("; ..." if len(count_of) > _EXAMPLES else "")
            problems.append(f"{len(count_of)} MoPE weight(s) {what} ({examples})")
    shape_hint = (
        "mope_A is (num_experts, or 1 with share_a, r, in_features) and mope_B (num_experts, out_features, r). "
        if mismatched
        else ""
    )
    raise MoPELoadError(
        f"MoPE adapter {adapter_name!r} does not match its adapter_config.json: {', '.join(problems)}. "
        f"{_hint(getattr(config, 'routing', ''), unexpected)}{shape_hint}"
        "Loading it would leave experts or routers randomly initialised, so it is refused. Fix: restore the "
        "adapter_config.json saved with these weights (routing, num_experts, r, share_a, shared_expert, "
        "num_experts_pattern, target_modules, layers_to_transform), and load it onto the base model it was "
        "trained on."
    )
