"""Sparse -> dense (or fewer experts): plan every output tensor, then compute, write and drop them in turn.

A MoE checkpoint (ours, with `upcycle` provenance, or a foreign Mixtral / Qwen-MoE / GraniteMoE /
FlexOlmo, per-expert or fused on disk, local or on the Hub) is folded back into its dense family
(`experts=None`), or into a MoE of the same family with fewer experts (`experts=K`). The plan lists
every output tensor before any is computed; each MoE layer is computed when its first tensor is
written, from that layer's experts only, so peak memory is one layer's experts, not the model.
Calibration, when asked for, runs the MoE once and records routing statistics for every method.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from upcycle import __version__
from upcycle.calibration import (
    MoELayerProbe,
    RoutingStatistics,
    calibration_batches,
    collect_routing_statistics,
    load_calibration_texts,
)
from upcycle.checkpoint import (
    PlannedTensor,
    TensorSpec,
    check_output_dir,
    count_parameters,
    dtype_name,
    open_checkpoint,
    parse_dtype,
    parse_shard_size,
    write_checkpoint,
)
from upcycle.errors import UpcycleError
from upcycle.families.base import NEVER_COPIED
from upcycle.merging import methods
from upcycle.merging.card import write_merge_card
from upcycle.merging.grouping import average_linkage, output_distances, weight_distances
from upcycle.merging.source import PROJECTIONS, MoESource, moe_config_object, open_moe

METHODS = ("average", "frequency", "router-weight", "task-arithmetic", "ties", "dare", "concat", "select")
TASK_VECTOR_METHODS = ("task-arithmetic", "ties", "dare")
NEEDS_CALIBRATION = ("frequency", "router-weight", "select")
DEFAULT_DENSITY = {"ties": 0.2, "dare": 0.5}  # TIES keeps the top 20% (Yadav et al.); DARE drops half


@dataclass
class MergeSummary:
    """What a merge produced."""

    output: Path
    source: str
    family: str
    source_model_type: str
    target_model_type: str
    method: str
    num_experts: int
    experts_out: int | None
    top_k_out: int | None
    moe_layers: list[int]
    intermediate_size: int
    total_parameters: int
    base: str | None
    calibration: dict | None
    expert_weights: dict[int, list[float]] = field(default_factory=dict)
    groups: dict[int, list[list[int]]] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Return the summary as JSON-ready data."""
        data = asdict(self)
        data["output"] = str(self.output)
        return data


def _upcycled_dense_source(config: dict) -> str | None:
    """Return the dense checkpoint a MoE was upcycled from, following merge provenance back, or None."""
    provenance = config.get("upcycle")
    while isinstance(provenance, dict):
        if provenance.get("operation", "upcycle") == "upcycle":
            return provenance.get("source")
        provenance = provenance.get("input_provenance")
    return None


class _Base:
    """The dense FFN that task vectors are measured from: a checkpoint's MLP, or each layer's expert mean."""

    def __init__(self, moe: MoESource, base: str | None, method: str):
        self.description = "expert-mean"
        self.checkpoint = None
        if base is not None:
            self.checkpoint = open_checkpoint(base)
            problem = self._mismatch(moe)
            if problem:
                raise UpcycleError(f"--base {base}: {problem}; give the dense model the MoE was upcycled from")
        else:
            recorded = _upcycled_dense_source(moe.config)
            if recorded is not None and Path(recorded).is_dir():
                self.checkpoint = open_checkpoint(recorded)
                if self._mismatch(moe):  # e.g. granular experts narrower than the dense FFN they came from
                    self.checkpoint = None
        if self.checkpoint is None and method == "ties":
            raise UpcycleError(
                f"--method ties needs a base FFN to measure task vectors from and {moe.name} records no local "
                "dense source of the experts' width; pass --base DENSE (the dense model the MoE came from)"
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

    def projections(self, moe: MoESource, layer: int, stacks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return the base gate/up/down of `layer`."""
        if self.checkpoint is None:
            ones = torch.ones(moe.num_experts)
            return {p: methods.weighted_mean(stacks[p], ones) for p in PROJECTIONS}
        names = moe.family.dense_mlp
        templates = {"gate": names.gate, "up": names.up, "down": names.down}
        return {p: self.checkpoint.tensors.get(t.format(layer=layer)) for p, t in templates.items()}


@dataclass
class _MergePlan:
    """Everything a layer computation needs, decided before any tensor is computed."""

    moe: MoESource
    method: str
    experts_out: int | None
    stats: dict[int, RoutingStatistics]
    base: _Base | None
    density: float
    scale: float
    seed: int
    expert_weights: dict[int, list[float]] = field(default_factory=dict)
    groups: dict[int, list[list[int]]] = field(default_factory=dict)

    def coefficients(self, layer: int) -> torch.Tensor:
        """Return the per-expert merge coefficients of `layer` for the method (unnormalised, float64)."""
        stats = self.stats.get(layer)
        experts = self.moe.num_experts
        if self.method == "router-weight":
            return stats.probability_sum
        if self.method == "concat":
            return stats.mean(stats.weight_sum) if stats else torch.full((experts,), 1.0 / experts, dtype=torch.float64)
        if self.method in ("frequency", "select") or (self.method in TASK_VECTOR_METHODS and stats):
            return stats.selection_counts
        return torch.ones(experts, dtype=torch.float64)

    def merge_group(
        self,
        layer: int,
        stacks: dict[str, torch.Tensor],
        members: list[int],
        coefficients: torch.Tensor,
        base: dict[str, torch.Tensor] | None,
    ) -> dict[str, torch.Tensor]:
        """Return gate/up/down of the experts `members` merged into one FFN by the method."""
        index = torch.tensor(members)
        sub = {p: stacks[p][index] for p in PROJECTIONS}
        weights = coefficients[index]
        if len(members) == 1:  # a singleton group keeps its expert exactly, whatever the method
            return {p: sub[p][0] for p in PROJECTIONS}
        if self.method == "select":
            chosen = int(torch.argmax(weights))
            return {p: sub[p][chosen] for p in PROJECTIONS}
        if self.method == "concat":
            return {p: methods.concat(sub[p], weights, p) for p in PROJECTIONS}
        if self.method == "task-arithmetic":
            return {p: methods.task_arithmetic(sub[p], base[p], weights, self.scale) for p in PROJECTIONS}
        if self.method == "ties":
            return {p: methods.ties(sub[p], base[p], weights, self.density, self.scale) for p in PROJECTIONS}
        if self.method == "dare":
            return {
                p: methods.dare(sub[p], base[p], weights, self.density, _seed(self.seed, layer, p, members), self.scale)
                for p in PROJECTIONS
            }
        return {p: methods.weighted_mean(sub[p], weights) for p in PROJECTIONS}

    def dense_layer(self, layer: int) -> dict[str, torch.Tensor]:
        """Return the dense FFN (gate, up, down) that replaces the MoE block of `layer`."""
        moe = self.moe
        stacks = moe.expert_stacks(layer)
        coefficients = self.coefficients(layer)
        self.expert_weights[layer] = methods.normalized(coefficients).tolist()
        base = self.base.projections(moe, layer, stacks) if self.base is not None else None
        merged = self.merge_group(layer, stacks, list(range(moe.num_experts)), coefficients, base)
        shared = moe.shared_projections(layer)
        if shared:
            stats = self.stats.get(layer)
            # Qwen2-MoE adds sigmoid(shared_expert_gate(x)) * shared(x); a fixed mean gate folds it in.
            gate = stats.shared_gate_sum / max(stats.tokens, 1) if stats else 0.5
            merged = {
                "gate": torch.cat([shared["gate"].double(), merged["gate"].double()]),
                "up": torch.cat([shared["up"].double(), merged["up"].double()]),
                "down": torch.cat([shared["down"].double() * gate, merged["down"].double()], dim=1),
            }
        return merged

    def grouped_layer(self, layer: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return (router (K, H), stacked merged experts {gate, up, down} with K first) of `layer`."""
        moe = self.moe
        stacks = moe.expert_stacks(layer)
        stats = self.stats.get(layer)
        if stats is not None and stats.expert_output_sum is not None:
            distances = output_distances(stats.mean(stats.expert_output_sum))
        else:
            distances = weight_distances([stacks[p] for p in PROJECTIONS])
        groups = average_linkage(distances, self.experts_out)
        self.groups[layer] = groups
        coefficients = self.coefficients(layer)
        self.expert_weights[layer] = methods.normalized(coefficients).tolist()
        base = self.base.projections(moe, layer, stacks) if self.base is not None else None
        router = moe.router(layer)
        rows, merged = [], {p: [] for p in PROJECTIONS}
        for members in groups:
            expert = self.merge_group(layer, stacks, members, coefficients, base)
            for p in PROJECTIONS:
                merged[p].append(expert[p])
            weights = coefficients[torch.tensor(members)]
            if self.method == "select" and len(members) > 1:
                rows.append(router[members[int(torch.argmax(weights))]].double())
            else:
                rows.append(methods.weighted_mean(router[torch.tensor(members)], weights))
        return torch.stack(rows), {p: torch.stack([t.double() for t in merged[p]]) for p in PROJECTIONS}


def _seed(seed: int, layer: int, projection: str, members: list[int]) -> int:
    """Return a DARE mask seed that depends only on the user seed, the layer, projection and group."""
    return (seed * 1_000_003 + layer * 10_007 + PROJECTIONS.index(projection) * 101 + members[0]) % (2**63)


class _LayerCache:
    """Computes a layer's merged tensors when the first is asked for, and hands them out once each."""

    def __init__(self, compute: Callable[[int], dict[str, torch.Tensor]]):
        self._compute = compute
        self._tensors: dict[str, torch.Tensor] = {}
        self._layer: int | None = None

    def take(self, layer: int, name: str, dtype: torch.dtype) -> torch.Tensor:
        if self._layer != layer:
            self._tensors = self._compute(layer)
            self._layer = layer
        return self._tensors.pop(name).to(dtype).contiguous()


def _output_layer_tensors(plan: _MergePlan, layer: int) -> dict[str, tuple[int, ...]]:
    """Return {name: shape} of the tensors that replace layer `layer`'s MoE block, in write order."""
    moe = plan.moe
    hidden, size = moe.hidden_size, moe.expert_size
    if plan.experts_out is None:
        names = moe.family.dense_mlp
        width = _dense_width(plan)
        return {
            names.gate.format(layer=layer): (width, hidden),
            names.up.format(layer=layer): (width, hidden),
            names.down.format(layer=layer): (hidden, width),
        }
    layout, experts = moe.layout, plan.experts_out
    shapes = {layout.router.format(layer=layer): (experts, hidden)}
    if layout.fused:
        shapes[layout.gate_up.format(layer=layer)] = (experts, 2 * size, hidden)
        shapes[layout.down.format(layer=layer)] = (experts, hidden, size)
    else:
        for expert in range(experts):
            shapes[layout.gate.format(layer=layer, expert=expert)] = (size, hidden)
            shapes[layout.up.format(layer=layer, expert=expert)] = (size, hidden)
            shapes[layout.down.format(layer=layer, expert=expert)] = (hidden, size)
    for name in moe.shared_tensor_names(layer):
        shapes[name] = moe.checkpoint.tensors.shape(name)
    return shapes


def _dense_width(plan: _MergePlan) -> int:
    moe = plan.moe
    routed = moe.num_experts * moe.expert_size if plan.method == "concat" else moe.expert_size
    return routed + moe.shared_size


def _grouped_tensors(plan: _MergePlan, layer: int) -> dict[str, torch.Tensor]:
    """Return the K-expert layer's tensors by output name, computed from `plan.grouped_layer`."""
    moe, layout = plan.moe, plan.moe.layout
    router, merged = plan.grouped_layer(layer)
    tensors = {layout.router.format(layer=layer): router}
    if layout.fused:
        tensors[layout.gate_up.format(layer=layer)] = torch.cat([merged["gate"], merged["up"]], dim=1)
        tensors[layout.down.format(layer=layer)] = merged["down"]
    else:
        for expert in range(plan.experts_out):
            for projection, template in (("gate", layout.gate), ("up", layout.up), ("down", layout.down)):
                tensors[template.format(layer=layer, expert=expert)] = merged[projection][expert]
    for name in moe.shared_tensor_names(layer):
        tensors[name] = moe.checkpoint.tensors.get(name)
    return tensors


def _dense_tensors(plan: _MergePlan, layer: int) -> dict[str, torch.Tensor]:
    names = plan.moe.family.dense_mlp
    merged = plan.dense_layer(layer)
    return {
        names.gate.format(layer=layer): merged["gate"],
        names.up.format(layer=layer): merged["up"],
        names.down.format(layer=layer): merged["down"],
    }


def plan_merge(plan: _MergePlan, dtype: torch.dtype | None) -> list[PlannedTensor]:
    """Return every output tensor in write order: copies of the non-MoE tensors and the merged layers.

    Raises:
        UpcycleError: a MoE block holds tensors the family does not describe (they would be lost),
            or a dense layer of the MoE is narrower or wider than the merged FFN.
    """
    moe = plan.moe
    tensors = moe.checkpoint.tensors
    moe_names: dict[int, set[str]] = {
        layer: set(moe.expert_tensor_names(layer)) | set(moe.shared_tensor_names(layer)) for layer in moe.moe_layers
    }
    layer_of = re.compile(r"\.layers\.(\d+)\.")
    copied: dict[int, list[str]] = {}
    for name in tensors.keys():
        if any(name.endswith(suffix) for suffix in moe.family.ignored_source_tensors):
            continue
        match = layer_of.search(name)
        layer = int(match.group(1)) if match else -1
        if layer in moe_names and name in moe_names[layer]:
            continue
        if layer in moe_names and name.startswith(moe.block_prefix(layer)):
            raise UpcycleError(
                f"{moe.name} has {name} in a MoE block, which {moe.family.name} does not describe; "
                "merging would drop it"
            )
        copied.setdefault(layer, []).append(name)
    if plan.experts_out is None:
        width = _dense_width(plan)
        dense_gate = moe.family.dense_mlp.gate
        for layer, names in copied.items():
            gate = dense_gate.format(layer=layer)
            if gate in names and tensors.shape(gate)[0] != width:
                raise UpcycleError(
                    f"layer {layer} of {moe.name} is dense with width {tensors.shape(gate)[0]} but the merged "
                    f"FFN is {width} wide; a {moe.family.source_model_types[0]} config has one width for all layers"
                )

    def output_dtype(source: torch.dtype) -> torch.dtype:
        return dtype if dtype is not None and source.is_floating_point else source

    planned: list[PlannedTensor] = []

    def add_copies(names: list[str]) -> None:
        for name in names:
            out = output_dtype(tensors.dtype(name))
            planned.append(
                PlannedTensor(TensorSpec(name, out, tensors.shape(name)), lambda n=name, d=out: tensors.get(n).to(d))
            )

    cache = _LayerCache(lambda layer: (_dense_tensors if plan.experts_out is None else _grouped_tensors)(plan, layer))
    top_level = copied.pop(-1, [])
    add_copies([name for name in top_level if "embed" in name])
    for layer in range(int(moe.config["num_hidden_layers"])):
        add_copies(copied.get(layer, []))
        if layer not in moe_names:
            continue
        weight_dtype = output_dtype(tensors.dtype(moe.layout.router.format(layer=layer)))
        for name, shape in _output_layer_tensors(plan, layer).items():
            planned.append(
                PlannedTensor(
                    TensorSpec(name, weight_dtype, shape),
                    lambda layer=layer, name=name, d=weight_dtype: cache.take(layer, name, d),
                )
            )
    add_copies([name for name in top_level if "embed" not in name])
    return planned


def build_dense_config(moe: MoESource, intermediate_size: int, provenance: dict) -> dict:
    """Return the dense config.json: the dense class's full dict with every field it shares with the MoE.

    Attention, norm and rope fields carry over; the expert count, top-k, router and shared-expert
    fields, which the dense class does not know, fall away; the FFN width is the merged one.

    Raises:
        UpcycleError: transformers rejects the resulting config.
    """
    from transformers import AutoConfig

    family = moe.family
    dense_type = family.source_model_types[0]
    dense_defaults = AutoConfig.for_model(dense_type).to_dict()
    moe_only = {family.experts_field, family.top_k_field, family.expert_size_field, family.shared_expert_size_field}
    fields = {
        key: value
        for key, value in moe.config.items()
        if key not in NEVER_COPIED and key not in moe_only and key not in family.overrides and key in dense_defaults
    }
    fields["intermediate_size"] = intermediate_size
    try:
        dense = AutoConfig.for_model(dense_type, **fields)
    except (ValueError, TypeError) as err:
        raise UpcycleError(f"cannot build a {dense_type} config from {moe.name}: {err}") from None
    config = dense.to_dict()
    config["architectures"] = [type(dense).__name__.replace("Config", "ForCausalLM")]
    config["upcycle"] = provenance
    return config


def build_grouped_config(moe: MoESource, experts: int, top_k: int, provenance: dict) -> dict:
    """Return the config.json of the same MoE family with `experts` experts and top-`top_k` routing."""
    changes = {moe.family.experts_field: experts, moe.family.top_k_field: top_k}
    config = moe_config_object(moe.config, **changes).to_dict()
    config.pop("_name_or_path", None)
    config["architectures"] = moe.checkpoint.config.get("architectures", [moe.family.target_architecture])
    config["upcycle"] = provenance
    return config


def _validate_settings(method: str, experts: int | None, density: float | None, calibration) -> None:
    if method not in METHODS:
        raise UpcycleError(f"unknown merge method {method!r}; use one of {', '.join(METHODS)}")
    if method in NEEDS_CALIBRATION and calibration is None:
        raise UpcycleError(f"--method {method} weighs experts by their routing and needs --calibration DATA")
    if experts is not None and method == "concat":
        raise UpcycleError(
            "--method concat builds one wider FFN and cannot keep --experts K of equal width; "
            "use another method with --experts, or concat without it"
        )
    if density is not None and not 0 < density <= 1:
        raise UpcycleError(f"--density must be in (0, 1], got {density}")


def _calibrate(
    moe: MoESource, texts: list[str], expert_outputs: bool, max_length: int, batch_size: int, quiet: bool
) -> dict[int, RoutingStatistics]:
    """Run the MoE over `texts` once and return routing statistics per MoE layer.

    Raises:
        UpcycleError: the checkpoint has no tokenizer, or transformers cannot load it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(moe.checkpoint.path)
    except (OSError, ValueError) as err:
        raise UpcycleError(
            f"calibration needs a tokenizer and {moe.name} has none that loads ({str(err).splitlines()[0]}); "
            "save one next to the weights"
        ) from None
    model = AutoModelForCausalLM.from_pretrained(moe.checkpoint.path, dtype="auto")
    model.eval()
    probes = {
        layer: MoELayerProbe(moe.module_name(layer), moe.router(layer), moe.shared_gate(layer))
        for layer in moe.moe_layers
    }
    batches = calibration_batches(tokenizer, texts, max_length=max_length, batch_size=batch_size)
    stats = collect_routing_statistics(
        model,
        batches,
        probes,
        top_k=moe.top_k,
        normalize_top_k=bool(moe.config.get("norm_topk_prob", True)),
        expert_outputs=expert_outputs,
        total=-(-len(texts) // batch_size),
        quiet=quiet,
    )
    del model
    return stats


def merge(
    source: str | Path,
    output: str | Path,
    *,
    method: str = "average",
    experts: int | None = None,
    calibration: str | Path | None = None,
    calibration_samples: int = 128,
    max_length: int = 256,
    batch_size: int = 4,
    base: str | Path | None = None,
    density: float | None = None,
    scale: float = 1.0,
    seed: int = 0,
    dtype: str | None = "auto",
    force: bool = False,
    quiet: bool = False,
    revision: str | None = None,
    max_shard_size: str | int = "5GB",
    command: str | None = None,
) -> MergeSummary:
    """Merge the MoE checkpoint `source` into a dense model (or `experts` experts) at `output`.

    Methods: average, frequency (M-SMoE usage counts), router-weight (mean routing probability),
    task-arithmetic / ties / dare (expert minus `base` FFN as task vectors), concat (exact fold of
    a fixed-weight mixture into a wider FFN), select (the most used expert). With `experts=K` the
    experts of each layer are clustered (HC-SMoE: by mean outputs on `calibration`, else by weights)
    and each cluster merged by the method. The output is written to a temporary directory next to
    `output` and renamed at the end.

    Returns:
        A `MergeSummary` with the output path, target type, method, weights and groups used.

    Raises:
        UpcycleError: an unknown method, bad settings, a dense or unsupported source, missing
            calibration data or base, or an existing output without `force`. Nothing is left at
            `output` (or next to it) when it raises.
    """
    output = Path(output)
    _validate_settings(method, experts, density, calibration)
    out_dtype = parse_dtype(dtype)
    parse_shard_size(max_shard_size)
    check_output_dir(output, force)
    moe = open_moe(source, revision=revision)
    if experts is not None and not 1 <= experts < moe.num_experts:
        raise UpcycleError(
            f"--experts must be between 1 and {moe.num_experts - 1} ({moe.name} has {moe.num_experts} experts); "
            "leave it out to merge into a dense model"
        )
    base_ffn = _Base(moe, None if base is None else str(base), method) if method in TASK_VECTOR_METHODS else None
    density = density if density is not None else DEFAULT_DENSITY.get(method, 1.0)
    texts = load_calibration_texts(calibration, calibration_samples) if calibration is not None else None
    stats = _calibrate(moe, texts, experts is not None, max_length, batch_size, quiet) if texts is not None else {}
    plan = _MergePlan(
        moe=moe,
        method=method,
        experts_out=experts,
        stats=stats,
        base=base_ffn,
        density=density,
        scale=scale,
        seed=seed,
    )
    planned = plan_merge(plan, out_dtype)
    calibration_info = (
        {
            "data": str(calibration),
            "samples": len(texts),
            "tokens": next(iter(stats.values())).tokens if stats else 0,
            "max_length": max_length,
        }
        if texts is not None
        else None
    )
    top_k_out = min(moe.top_k, experts) if experts is not None else None
    settings = {
        "method": method,
        "dtype": dtype_name(out_dtype),
        "seed": seed,
        **({"density": density, "scale": scale} if method in TASK_VECTOR_METHODS else {}),
        **({"experts": experts, "top_k": top_k_out} if experts is not None else {}),
        **(
            {"grouping": "hc-smoe expert outputs" if stats else "expert weights (no calibration data)"}
            if experts is not None
            else {}
        ),
    }
    target_type = moe.model_type if experts is not None else moe.family.source_model_types[0]
    summary = MergeSummary(
        output=output,
        source=moe.name,
        family=moe.family.name,
        source_model_type=moe.model_type,
        target_model_type=target_type,
        method=method,
        num_experts=moe.num_experts,
        experts_out=experts,
        top_k_out=top_k_out,
        moe_layers=moe.moe_layers,
        intermediate_size=_dense_width(plan) if experts is None else moe.expert_size,
        total_parameters=count_parameters(p.spec for p in planned),
        base=base_ffn.description if base_ffn is not None else None,
        calibration=calibration_info,
        expert_weights=plan.expert_weights,
        groups=plan.groups,
        settings=settings,
    )

    def merged_config(directory: Path) -> dict:
        # Built once the tensors are written: the layer computations fill in the expert weights and groups.
        provenance = {
            "version": __version__,
            "operation": "merge",
            "source": moe.name,
            "source_model_type": moe.model_type,
            "family": moe.family.name,
            "moe_layers": moe.moe_layers,
            "num_experts_in": moe.num_experts,
            "base": summary.base,
            "calibration": calibration_info,
            "expert_weights": {str(k): v for k, v in plan.expert_weights.items()},
            **({"groups": {str(k): v for k, v in plan.groups.items()}} if plan.groups else {}),
            **settings,
            "input_provenance": moe.config.get("upcycle"),
        }
        if experts is None:
            config = build_dense_config(moe, summary.intermediate_size, provenance)
        else:
            config = build_grouped_config(moe, experts, top_k_out, provenance)
        if out_dtype is not None:
            config["dtype"] = settings["dtype"]
        return config

    write_checkpoint(
        output,
        weights=planned,
        config=merged_config,
        side_files=moe.checkpoint.extra_files,
        card=lambda directory: write_merge_card(directory, summary, command=command),
        force=force,
        max_shard_size=max_shard_size,
        quiet=quiet,
        desc="merging tensors",
    )
    return summary
