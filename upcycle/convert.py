"""Dense -> sparse: plan every output tensor, then compute, write and drop them one at a time."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from upcycle import __version__
from upcycle.card import write_model_card
from upcycle.checkpoint import (
    CONFIG_FILE,
    SourceCheckpoint,
    StreamingWriter,
    TensorSpec,
    atomic_output_dir,
    check_output_dir,
    open_checkpoint,
    parse_dtype,
)
from upcycle.errors import UpcycleError
from upcycle.experts import CopyExperts
from upcycle.families import find_family
from upcycle.families.base import NEVER_COPIED, FamilyPair
from upcycle.routers import random_router


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its spec, and how to compute it from the source (called once, when written)."""

    spec: TensorSpec
    compute: Callable[[], torch.Tensor]


@dataclass
class ConvertSummary:
    """What a conversion produced."""

    output: Path
    family: str
    source: str
    source_model_type: str
    target_model_type: str
    layout: str
    num_experts: int
    top_k: int
    moe_layers: list[int]
    total_parameters: int
    active_parameters: int
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Return the summary as JSON-ready data."""
        data = asdict(self)
        data["output"] = str(self.output)
        return data


def parse_size(text: str | int) -> int:
    """Return a byte count from "5GB", "500MB", "1024" or an int.

    Raises:
        UpcycleError: the text is not a size.
    """
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise UpcycleError(f"cannot read size {text!r}: use e.g. 5GB, 500MB or a byte count")
    unit = (match.group(2) or "B").upper().rstrip("B").rstrip("I")
    return int(float(match.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[unit])


def normalized_source_config(config: dict) -> dict:
    """Return the source config as its transformers class writes it (legacy rope fields folded into
    `rope_parameters`, every default explicit).

    Raises:
        UpcycleError: transformers does not know the model_type or rejects the config.
    """
    from transformers import AutoConfig

    fields = {key: value for key, value in config.items() if key != "model_type"}
    try:
        return AutoConfig.for_model(config["model_type"], **fields).to_dict()
    except (ValueError, KeyError, TypeError) as err:
        raise UpcycleError(f"transformers cannot read this {config['model_type']!r} config: {err}") from None


def build_target_config(
    family: FamilyPair, source_config: dict, num_experts: int, top_k: int, expert_size: int, provenance: dict
) -> dict:
    """Return the target config.json content: the target class's full dict, source fields carried over.

    Raises:
        UpcycleError: transformers rejects the resulting config.
    """
    from transformers import AutoConfig

    target_defaults = AutoConfig.for_model(family.target_model_type).to_dict()
    fields = {
        key: value
        for key, value in source_config.items()
        if key not in NEVER_COPIED
        and key not in family.dropped_fields
        and (key in target_defaults or key in family.extra_copied_fields)
    }
    fields.update(family.overrides)
    fields[family.experts_field] = num_experts
    fields[family.top_k_field] = top_k
    fields[family.expert_size_field] = expert_size
    if family.shared_expert_size_field:
        fields[family.shared_expert_size_field] = 0
    try:
        target = AutoConfig.for_model(family.target_model_type, **fields)
    except (ValueError, TypeError) as err:
        raise UpcycleError(f"cannot build a {family.target_model_type} config: {err}") from None
    config = target.to_dict()
    config["architectures"] = [family.target_architecture]
    config["upcycle"] = provenance
    return config


def _dense_mlp_layers(checkpoint: SourceCheckpoint, family: FamilyPair, num_layers: int) -> list[int]:
    names = family.dense_mlp
    layers = []
    for layer in range(num_layers):
        present = [
            template.format(layer=layer) in checkpoint.tensors
            for template in (names.gate, names.up, names.down)
        ]
        if all(present):
            layers.append(layer)
        elif any(present):
            raise UpcycleError(
                f"layer {layer} of {checkpoint.name} has an incomplete MLP (gate/up/down missing)"
            )
    if not layers:
        raise UpcycleError(
            f"{checkpoint.name} has no dense MLP tensors named like {names.gate!r}; "
            f"is it a {family.name} source?"
        )
    return layers


def plan_conversion(
    checkpoint: SourceCheckpoint,
    family: FamilyPair,
    builder: CopyExperts,
    *,
    layout: str,
    top_k: int,
    dtype: torch.dtype | None,
    router_std: float,
    seed: int,
) -> tuple[list[PlannedTensor], list[int], int]:
    """Return (planned output tensors in write order, MoE layer indices, routed expert width).

    Raises:
        UpcycleError: the checkpoint's MLP tensors are missing or shaped unexpectedly.
    """
    tensors = checkpoint.tensors
    names = family.dense_mlp
    expert_layout = family.layouts[layout]
    num_layers = int(checkpoint.config["num_hidden_layers"])
    moe_layers = _dense_mlp_layers(checkpoint, family, num_layers)
    mlp_names = {
        template.format(layer=layer)
        for layer in moe_layers
        for template in (names.gate, names.up, names.down)
    }

    def output_dtype(name: str) -> torch.dtype:
        source = tensors.dtype(name)
        return dtype if dtype is not None and source.is_floating_point else source

    def copy(name: str, out_dtype: torch.dtype) -> Callable[[], torch.Tensor]:
        return lambda: tensors.get(name).to(out_dtype)

    plan: list[PlannedTensor] = []
    layer_of = re.compile(r"\.layers\.(\d+)\.")
    copied: dict[int, list[str]] = {}
    for name in tensors.keys():
        if name in mlp_names or any(name.endswith(suffix) for suffix in family.ignored_source_tensors):
            continue
        match = layer_of.search(name)
        copied.setdefault(int(match.group(1)) if match else -1, []).append(name)

    def add_copies(key: int) -> None:
        for name in copied.get(key, []):
            out_dtype = output_dtype(name)
            plan.append(
                PlannedTensor(TensorSpec(name, out_dtype, tensors.shape(name)), copy(name, out_dtype))
            )

    expert_size = None
    # Write order follows the model: embeddings, the layers in turn, then final norm and head.
    top_level = copied.pop(-1, [])
    copied[-1] = [name for name in top_level if "embed" in name]
    add_copies(-1)
    for layer in range(num_layers):
        add_copies(layer)
        if layer not in moe_layers:
            continue
        gate_name, up_name, down_name = (t.format(layer=layer) for t in (names.gate, names.up, names.down))
        intermediate, hidden = tensors.shape(gate_name)
        if tensors.shape(up_name) != (intermediate, hidden) or tensors.shape(down_name) != (
            hidden,
            intermediate,
        ):
            raise UpcycleError(f"layer {layer}: gate/up/down shapes do not match a gated FFN")
        expert_size = builder.expert_size(intermediate)
        weight_dtype = output_dtype(gate_name)

        def dense(projection: str, _layer_names=(gate_name, up_name, down_name)) -> torch.Tensor:
            return tensors.get(_layer_names[("gate", "up", "down").index(projection)])

        router_name = expert_layout.router.format(layer=layer)
        plan.append(
            PlannedTensor(
                TensorSpec(router_name, weight_dtype, (builder.num_experts, hidden)),
                lambda layer=layer, hidden=hidden, d=weight_dtype: random_router(
                    builder.num_experts, hidden, router_std, seed, layer
                ).to(d),
            )
        )
        plan.extend(_expert_tensors(builder, expert_layout, layer, hidden, expert_size, weight_dtype, dense))
        if family.shared_expert is not None:
            plan.extend(_empty_shared_expert(family, layer, hidden, weight_dtype))
    copied[-1] = [name for name in top_level if "embed" not in name]
    add_copies(-1)
    return plan, moe_layers, expert_size


def _expert_tensors(
    builder, expert_layout, layer, hidden, expert_size, weight_dtype, dense
) -> list[PlannedTensor]:
    experts = range(builder.num_experts)

    def one(projection: str, expert: int) -> Callable[[], torch.Tensor]:
        return lambda: builder.projection(projection, layer, expert, dense).to(weight_dtype)

    if expert_layout.fused:

        def gate_up() -> torch.Tensor:
            stacked = torch.empty(builder.num_experts, 2 * expert_size, hidden, dtype=weight_dtype)
            for expert in experts:
                stacked[expert, :expert_size] = one("gate", expert)()
                stacked[expert, expert_size:] = one("up", expert)()
            return stacked

        def down() -> torch.Tensor:
            return torch.stack([one("down", expert)() for expert in experts])

        return [
            PlannedTensor(
                TensorSpec(
                    expert_layout.gate_up.format(layer=layer),
                    weight_dtype,
                    (len(experts), 2 * expert_size, hidden),
                ),
                gate_up,
            ),
            PlannedTensor(
                TensorSpec(
                    expert_layout.down.format(layer=layer), weight_dtype, (len(experts), hidden, expert_size)
                ),
                down,
            ),
        ]
    planned = []
    for expert in experts:
        for projection, template, shape in (
            ("gate", expert_layout.gate, (expert_size, hidden)),
            ("up", expert_layout.up, (expert_size, hidden)),
            ("down", expert_layout.down, (hidden, expert_size)),
        ):
            name = template.format(layer=layer, expert=expert)
            planned.append(PlannedTensor(TensorSpec(name, weight_dtype, shape), one(projection, expert)))
    return planned


def _empty_shared_expert(
    family: FamilyPair, layer: int, hidden: int, weight_dtype: torch.dtype
) -> list[PlannedTensor]:
    """A width-0 shared expert (it adds exactly zero) and a zero gate, for targets that always have one."""
    shared = family.shared_expert
    shapes = {
        shared.gate: (0, hidden),
        shared.up: (0, hidden),
        shared.down: (hidden, 0),
        shared.expert_gate: (1, hidden),
    }
    return [
        PlannedTensor(
            TensorSpec(template.format(layer=layer), weight_dtype, shape),
            lambda shape=shape: torch.zeros(shape, dtype=weight_dtype),
        )
        for template, shape in shapes.items()
    ]


def count_parameters(
    plan: list[PlannedTensor], num_experts: int, top_k: int, expert_size: int, hidden: int, moe_layers: int
) -> tuple[int, int]:
    """Return (total parameters, parameters active per token) of a planned MoE."""
    total = sum(p.spec.nbytes // torch.empty((), dtype=p.spec.dtype).element_size() for p in plan)
    inactive_per_layer = (num_experts - top_k) * 3 * expert_size * hidden
    return total, total - moe_layers * inactive_per_layer


def _copy_side_files(checkpoint: SourceCheckpoint, directory: Path) -> None:
    for path in checkpoint.extra_files:
        shutil.copyfile(path, directory / path.name)


def convert(
    source: str | Path,
    output: str | Path,
    *,
    experts: int = 8,
    top_k: int = 2,
    target: str = "auto",
    layout: str | None = None,
    dtype: str | None = "auto",
    seed: int = 0,
    router_std: float | None = None,
    force: bool = False,
    quiet: bool = False,
    revision: str | None = None,
    max_shard_size: str | int = "5GB",
    command: str | None = None,
    card_model_id: str | None = None,
) -> ConvertSummary:
    """Upcycle the dense checkpoint `source` (local dir or Hub id) into a stock MoE checkpoint at `output`.

    Every expert is a copy of the dense FFN and the router is N(0, router_std^2) (default: the
    source's initializer_range), so the output reproduces the source's logits exactly until it is
    trained. The output is written to a temporary directory next to `output` and renamed at the end.
    The model card's usage snippet loads `card_model_id` (the Hub repo it will be pushed to), else `output`.

    Returns:
        A `ConvertSummary` with the output path, family, parameter counts and settings.

    Raises:
        UpcycleError: bad settings, an unsupported or unreadable source, or an existing output
            without `force`. Nothing is left at `output` (or next to it) when it raises.
    """
    output = Path(output)
    if experts < 1:
        raise UpcycleError(f"--experts must be at least 1, got {experts}")
    if top_k < 1 or top_k > experts:
        raise UpcycleError(f"--top-k must be between 1 and --experts ({experts}), got {top_k}")
    out_dtype = parse_dtype(dtype)
    max_shard_bytes = parse_size(max_shard_size)
    check_output_dir(output, force)

    checkpoint = open_checkpoint(source, revision=revision)
    source_config = normalized_source_config(checkpoint.config)
    family = find_family(source_config, target)
    layout = layout or family.default_layout
    if layout not in family.layouts:
        raise UpcycleError(
            f"{family.target_model_type} has no {layout!r} layout; use --layout {' or '.join(family.layouts)}"
        )
    std = float(router_std if router_std is not None else source_config.get("initializer_range", 0.02))
    builder = CopyExperts(num_experts=experts)
    plan, moe_layers, expert_size = plan_conversion(
        checkpoint, family, builder, layout=layout, top_k=top_k, dtype=out_dtype, router_std=std, seed=seed
    )
    hidden = int(source_config["hidden_size"])
    total, active = count_parameters(plan, experts, top_k, expert_size, hidden, len(moe_layers))
    settings = {
        "num_experts": experts,
        "top_k": top_k,
        "layout": layout,
        "dtype": str(out_dtype or "auto").replace("torch.", ""),
        "seed": seed,
        "router_init": "random",
        "router_std": std,
        **builder.settings(),
    }
    provenance = {
        "version": __version__,
        "operation": "upcycle",
        "source": checkpoint.name,
        "source_model_type": source_config["model_type"],
        "family": family.name,
        "moe_layers": moe_layers,
        **settings,
    }
    config = build_target_config(family, source_config, experts, top_k, expert_size, provenance)
    if out_dtype is not None:
        config["dtype"] = str(out_dtype).replace("torch.", "")
    summary = ConvertSummary(
        output=output,
        family=family.name,
        source=checkpoint.name,
        source_model_type=source_config["model_type"],
        target_model_type=family.target_model_type,
        layout=layout,
        num_experts=experts,
        top_k=top_k,
        moe_layers=moe_layers,
        total_parameters=total,
        active_parameters=active,
        settings=settings,
    )
    with atomic_output_dir(output, force) as directory:
        writer = StreamingWriter(directory, [p.spec for p in plan], max_shard_bytes)
        for planned in tqdm(plan, desc="writing tensors", unit="tensor", disable=quiet):
            writer.write(planned.spec.name, planned.compute())
        writer.close()
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _copy_side_files(checkpoint, directory)
        write_model_card(directory, summary, command=command, model_id=card_model_id)
    return summary
