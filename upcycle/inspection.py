"""What a checkpoint or MoPE adapter holds, read from config files and tensor shapes only.

`inspect_source` resolves a local folder or Hub id and returns a JSON-ready dict whose keys are
the stable schema documented in README ("inspect"). Tensor shapes come from the safetensors
headers (`safe_open`, no tensor data is read), so inspecting a 100B-parameter MoE reads a few
kilobytes. Expert tensors are recognised by name: the per-expert layout (`...experts.E.<proj>`),
the fused layout (`...experts.gate_up_proj` of shape (E, 2I, H) and friends) and the fused
templates the family modules declare (GraniteMoE's `input_linear`/`output_linear`).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from safetensors import safe_open

from upcycle.checkpoint import CONFIG_FILE, open_checkpoint, resolve_source
from upcycle.errors import MOPE_IMPORT_HINT, UpcycleError
from upcycle.families import FAMILIES
from upcycle.families.moe_fields import (
    EXPERTS_FIELDS,
    SHARED_EXPERTS_FIELDS,
    TOP_K_FIELDS,
    first_positive_field,
    router_kind,
)

SCHEMA_VERSION = 1
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

_PER_EXPERT = re.compile(r"\.layers\.(?P<layer>\d+)\.(?:.+\.)?experts\.(?P<expert>\d+)\.")
_FUSED_GENERIC = re.compile(r"\.layers\.(?P<layer>\d+)\.(?:.+\.)?experts\.(?P<name>[A-Za-z_]\w*)(?:\.weight)?$")
_SHARED = re.compile(r"\.layers\.(?P<layer>\d+)\.(?:.+\.)?shared_experts?\.")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _fused_family_patterns() -> list[re.Pattern]:
    """Regexes for the fused expert tensors the family modules declare (e.g. GraniteMoE's)."""
    patterns = set()
    for family in FAMILIES:
        for layout in family.layouts.values():
            if layout.fused:
                for template in (layout.gate_up, layout.down):
                    patterns.add(re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)") + "$")
    return [re.compile(pattern) for pattern in sorted(patterns)]


def inspect_model(directory: Path, name: str) -> dict[str, Any]:
    """Return the inspection dict of the transformers checkpoint in `directory` (dense or MoE).

    Raises:
        UpcycleError: no config.json, no weights, or unreadable weights.
    """
    checkpoint = open_checkpoint(directory)
    config, tensors = checkpoint.config, checkpoint.tensors
    shapes = {tensor: tensors.shape(tensor) for tensor in tensors.keys()}
    fused_patterns = _fused_family_patterns()
    routed = defaultdict(int)  # layer -> parameters of all its routed experts
    experts_in = defaultdict(set)  # layer -> expert indices (per-expert layout)
    fused_experts: dict[int, int] = {}  # layer -> leading dim of its fused expert tensors
    expert_size: int | None = None
    shared_size: dict[int, int] = {}
    shared_down: dict[int, str] = {}
    layouts = set()
    for tensor, shape in shapes.items():
        if match := _PER_EXPERT.search(tensor):
            layer = int(match["layer"])
            routed[layer] += math.prod(shape)
            experts_in[layer].add(int(match["expert"]))
            layouts.add("per-expert")
            if tensor.endswith(("down_proj.weight", "w2.weight")):
                expert_size = shape[1]
            continue
        fused = next((m for p in fused_patterns if (m := p.search(tensor))), None) or _FUSED_GENERIC.search(tensor)
        if fused and len(shape) == 3:
            layer = int(fused["layer"])
            routed[layer] += math.prod(shape)
            fused_experts[layer] = shape[0]
            layouts.add("fused")
            if "down" in tensor or "output_linear" in tensor:
                expert_size = shape[-1]
            continue
        if (match := _SHARED.search(tensor)) and tensor.endswith(("up_proj.weight", "gate_proj.weight")):
            shared_size[int(match["layer"])] = shape[0]
            shared_down[int(match["layer"])] = tensor.rsplit(".", 2)[0] + ".down_proj.weight"

    experts_per_layer = {layer: len(indices) for layer, indices in experts_in.items()} | fused_experts
    moe_layers = sorted(experts_per_layer)
    layer_indices = {int(m.group(1)) for tensor in shapes if (m := _LAYER.search(tensor))}
    num_layers = int(config.get("num_hidden_layers") or (max(layer_indices) + 1 if layer_indices else 0))
    num_experts = max(experts_per_layer.values()) if experts_per_layer else None
    top_k = first_positive_field(config, TOP_K_FIELDS) if moe_layers else None
    declared = first_positive_field(config, EXPERTS_FIELDS)
    if num_experts is not None and declared is not None and declared != num_experts:
        raise UpcycleError(
            f"{name}: config.json declares {declared} experts but the weights hold {num_experts}; "
            "the checkpoint is inconsistent"
        )
    total = sum(math.prod(shape) for shape in shapes.values())
    active = total
    if moe_layers and top_k is not None:
        for layer in moe_layers:
            count = experts_per_layer[layer]
            active -= routed[layer] // count * max(count - top_k, 0)
    widths = set(shared_size.values())
    shared_width = max(widths) if widths else 0
    # An all-zero shared down_proj in every layer is the placeholder written for engines that always run a
    # shared expert (upcycle's qwen2_moe and glm4_moe without shared experts): it adds nothing, so none.
    downs = [name for name in shared_down.values() if name in shapes]
    if downs and not any(tensors.get(name).any() for name in downs):
        shared_width = 0
    # One shared MLP, unless the config counts the shared experts it is made of (DeepSeek-V3 style).
    shared_count = (first_positive_field(config, SHARED_EXPERTS_FIELDS) or 1) if shared_width > 0 else 0
    provenance = config.get("upcycle")
    dtypes = sorted({str(tensors.dtype(tensor)).replace("torch.", "") for tensor in shapes})
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "moe" if moe_layers else "dense",
        "source": name,
        "path": str(directory),
        "model_type": config.get("model_type"),
        "architecture": (config.get("architectures") or [None])[0],
        "family": (provenance or {}).get("family") or config.get("model_type"),
        "layout": (sorted(layouts)[0] if len(layouts) == 1 else "mixed") if layouts else None,
        "num_layers": num_layers,
        "moe_layers": moe_layers,
        "dense_layers": [layer for layer in range(num_layers) if layer not in experts_per_layer],
        "num_experts": num_experts,
        "top_k": top_k,
        "expert_size": expert_size,
        "shared_experts": shared_count,
        "shared_expert_size": shared_width,
        "router": router_kind(config) if moe_layers else None,
        "total_parameters": total,
        "active_parameters": active if (not moe_layers or top_k is not None) else None,
        "dtypes": dtypes,
        "provenance": provenance,
    }


_MOPE_TENSOR = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<kind>mope_shared_A|mope_shared_B|mope_A|mope_B|mope_router)"
    r"(?:\.(?P<projection>[A-Za-z_]\w*))?$"
)


def inspect_adapter(directory: Path, name: str) -> dict[str, Any]:
    """Return the inspection dict of the MoPE adapter folder `directory` (adapter_config.json + weights).

    Modules whose weights sit under `...mope_A.<projection>` are block-routed FFN blocks (one router
    for gate/up/down); `...<projection>.mope_A` are linear-routed layers. Routed expert tensors are
    `mope_A`/`mope_B` whose leading dimension is the module's expert count; routers and shared
    experts are always active.

    Raises:
        UpcycleError: not a MoPE adapter, or its weights file is missing or unreadable.
    """
    adapter = json.loads((directory / ADAPTER_CONFIG).read_text())
    peft_type = adapter.get("peft_type")
    if peft_type != "MOPE":
        raise UpcycleError(
            f"{name} is a {peft_type} adapter; upcycle inspect reads model folders and MoPE adapters only"
        )
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise UpcycleError(f"{name} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    try:
        with safe_open(str(weights), framework="pt") as reader:
            shapes = {tensor: tuple(reader.get_slice(tensor).get_shape()) for tensor in reader.keys()}
    except Exception as err:  # safetensors raises its own error types for a corrupt header
        raise UpcycleError(f"cannot read {weights}: {str(err).splitlines()[0]}") from None

    modules: dict[str, dict[str, Any]] = {}
    tensors_of: dict[str, list[tuple[str, str | None, tuple[int, ...]]]] = defaultdict(list)
    for tensor, shape in sorted(shapes.items()):
        match = _MOPE_TENSOR.match(tensor)
        if not match:
            continue
        module, kind, projection = match["module"], match["kind"], match["projection"]
        if kind == "mope_router" and projection == "weight":
            projection = None
        tensors_of[module].append((kind, projection, shape))
    top_k = int(adapter.get("top_k", 0))
    total = active = 0
    for module, entries in tensors_of.items():
        projections = sorted({p for kind, p, _ in entries if p is not None and kind != "mope_router"})
        routed_b = [shape for kind, _, shape in entries if kind == "mope_B"]
        experts = routed_b[0][0] if routed_b else 0
        rank = routed_b[0][-1] if routed_b else None
        kept = experts if top_k == 0 else min(top_k, experts)
        parameters = routed = 0
        for kind, _, shape in entries:
            parameters += math.prod(shape)
            if kind in ("mope_A", "mope_B") and len(shape) == 3 and shape[0] == experts:
                routed += math.prod(shape)
        total += parameters
        active += parameters - (routed // experts * (experts - kept) if experts else 0)
        layer = _LAYER.search(f".{module}.")
        modules[module] = {
            "name": module,
            "kind": "block" if projections else "linear",
            "layer": int(layer.group(1)) if layer else None,
            "projections": projections,
            "experts": experts,
            "rank": rank,
            "router": any(kind == "mope_router" for kind, _, _ in entries),
            "shared_expert": any(kind.startswith("mope_shared") for kind, _, _ in entries),
            "parameters": parameters,
        }
    listed = [modules[module] for module in sorted(modules, key=lambda m: (modules[m]["layer"] or -1, m))]
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "mope_adapter",
        "source": name,
        "path": str(directory),
        "peft_type": peft_type,
        "base_model": adapter.get("base_model_name_or_path"),
        "routing": adapter.get("routing"),
        "num_experts": adapter.get("num_experts"),
        "top_k": top_k,
        "r": adapter.get("r"),
        "lora_alpha": adapter.get("lora_alpha"),
        "router": adapter.get("router"),
        "shared_expert": bool(adapter.get("shared_expert")),
        "share_a": bool(adapter.get("share_a")),
        "target_modules": sorted(adapter.get("target_modules") or []),
        "layers": sorted({m["layer"] for m in listed if m["layer"] is not None}),
        "modules": listed,
        "total_parameters": total,
        "active_parameters": active,
        "loading": MOPE_IMPORT_HINT,
    }


def inspect_source(source: str | Path, revision: str | None = None) -> dict[str, Any]:
    """Return the inspection dict of a local folder or Hub id: a model checkpoint or a MoPE adapter.

    Raises:
        UpcycleError: the source cannot be resolved, is neither a model nor a MoPE adapter folder,
            or its files are unreadable.
    """
    directory, name = resolve_source(source, revision, extra_patterns=(ADAPTER_CONFIG,))
    if (directory / ADAPTER_CONFIG).is_file() and not (directory / CONFIG_FILE).is_file():
        return inspect_adapter(directory, name)
    if not (directory / CONFIG_FILE).is_file():
        raise UpcycleError(f"{name} has neither config.json nor adapter_config.json; nothing to inspect")
    return inspect_model(directory, name)


def _router_line(router: dict[str, Any]) -> str:
    """Return the report's router line: the kind, renormalisation, and a grouped router's fields."""
    line = router["kind"] + (", renormalised" if router["renormalize"] else "")
    if "groups" in router:
        line += f", top-{router['top_groups']} of {router['groups']} groups, routed scaling {router['routed_scaling']}"
    return line


def format_report(info: dict[str, Any]) -> str:
    """Return the human-readable, multi-line report of an inspection dict."""
    from upcycle.card import human_count

    def params(total: int, active: int | None) -> str:
        shown = f"{human_count(total)} total ({total:,})"
        return shown if active is None else f"{shown}, {human_count(active)} active per token ({active:,})"

    rows: list[tuple[str, Any]]
    if info["kind"] == "mope_adapter":
        head = f"{info['source']}: MoPE adapter for {info['base_model'] or 'an unnamed base model'}"
        rows = [
            ("routing", info["routing"]),
            ("experts", f"{info['num_experts']} per module, top-{info['top_k']}, rank {info['r']}"),
            ("router", info["router"]),
            ("shared expert", "yes" if info["shared_expert"] else "no"),
            ("layers", ", ".join(map(str, info["layers"])) or "-"),
            ("modules", len(info["modules"])),
            ("parameters", params(info["total_parameters"], info["active_parameters"])),
            ("loading", "`import mope`, then PeftModel.from_pretrained(base, ADAPTER)"),
        ]
        lines = [
            f"  {m['name']}: {m['kind']}{' ' + '/'.join(m['projections']) if m['projections'] else ''}, "
            f"{m['experts']} experts of rank {m['rank']}"
            for m in info["modules"]
        ]
        body = "\n".join(f"{key:<14} {value}" for key, value in rows)
        return f"{head}\n{body}\n" + "\n".join(lines)
    head = f"{info['source']}: {info['kind']} {info['model_type']} ({info['architecture']})"
    rows = [("family", info["family"]), ("layers", info["num_layers"])]
    if info["kind"] == "moe":
        router = info["router"]
        rows += [
            ("layout", info["layout"]),
            ("MoE layers", ", ".join(map(str, info["moe_layers"]))),
            ("dense layers", ", ".join(map(str, info["dense_layers"])) or "-"),
            ("experts", f"{info['num_experts']} (top-{info['top_k']}), expert size {info['expert_size']}"),
            ("shared experts", f"{info['shared_experts']} (size {info['shared_expert_size']})"),
            ("router", _router_line(router)),
        ]
    rows.append(("parameters", params(info["total_parameters"], info["active_parameters"])))
    rows.append(("dtypes", ", ".join(info["dtypes"])))
    provenance = info["provenance"]
    if provenance:
        rows.append(
            (
                "provenance",
                f"upcycle {provenance.get('version', '?')} {provenance.get('operation', '')} "
                f"from {provenance.get('source', '?')}",
            )
        )
    return head + "\n" + "\n".join(f"{key:<14} {value}" for key, value in rows)
