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
from upcycle.experts import DenseFFN, ExpertBuilder, PartitionExperts, make_expert_builder
from upcycle.families import find_family
from upcycle.families.base import NEVER_COPIED, FamilyPair
from upcycle.generic.convert import convert_generic, generic_requested
from upcycle.routers import (
    ROUTER_INITS,
    centroid_router,
    kmeans_router,
    random_router,
    virtual_group_router,
)

GROUPED_MM_ALIGNMENT = 16  # bytes: torch grouped_mm needs expert weight rows aligned to this


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
    family: FamilyPair,
    source_config: dict,
    num_experts: int,
    top_k: int,
    expert_size: int,
    provenance: dict,
    shared_expert_size: int = 0,
    dense_layers: list[int] | None = None,
) -> dict:
    """Return the target config.json content: the target class's full dict, source fields carried over.

    `dense_layers` (layers that keep their dense FFN) go to the family's `dense_layers_field`.

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
        fields[family.shared_expert_size_field] = shared_expert_size
    if family.dense_layers_field:
        fields[family.dense_layers_field] = sorted(dense_layers or [])
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
            template.format(layer=layer) in checkpoint.tensors for template in (names.gate, names.up, names.down)
        ]
        if all(present):
            layers.append(layer)
        elif any(present):
            raise UpcycleError(f"layer {layer} of {checkpoint.name} has an incomplete MLP (gate/up/down missing)")
    if not layers:
        raise UpcycleError(
            f"{checkpoint.name} has no dense MLP tensors named like {names.gate!r}; is it a {family.name} source?"
        )
    return layers


def parse_moe_layers(spec: str | list[int], num_layers: int) -> list[int]:
    """Return the sorted MoE layer indices that `spec` names: "all", "every:N" (layers N-1, 2N-1,
    ..., as transformers' decoder_sparse_step), "0,4,8", "0-3", or a list of ints.

    Raises:
        UpcycleError: the spec cannot be read, names a layer out of range, or selects none.
    """
    if isinstance(spec, (list, tuple)):
        layers = {int(layer) for layer in spec}
    elif spec.strip() == "all":
        layers = set(range(num_layers))
    elif spec.strip().startswith("every:"):
        step = spec.strip()[len("every:") :]
        if not step.isdigit() or int(step) < 1:
            raise UpcycleError(f"cannot read --moe-layers {spec!r}: every:N needs a positive N, e.g. every:2")
        layers = set(range(int(step) - 1, num_layers, int(step)))
    else:
        layers = set()
        for part in spec.split(","):
            match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if not match:
                raise UpcycleError(f"cannot read --moe-layers {spec!r}: use all, every:N, or indices like 0,4,8 or 0-3")
            first, last = int(match.group(1)), int(match.group(2) or match.group(1))
            layers.update(range(first, last + 1))
    outside = sorted(layer for layer in layers if not 0 <= layer < num_layers)
    if outside:
        raise UpcycleError(f"--moe-layers names layers {outside}; the model has layers 0-{num_layers - 1}")
    if not layers:
        raise UpcycleError(f"--moe-layers {spec!r} selects no layer")
    return sorted(layers)


def check_router_init(router_init: str | None, builder: ExpertBuilder, calibration: str | Path | None) -> str:
    """Return the router initialisation to use (None: "centroids" for partition, else "random").

    Raises:
        UpcycleError: unknown kind, kmeans without calibration data, calibration data without
            kmeans, centroids for a method without neuron clusters, or kmeans for partition.
    """
    is_partition = isinstance(builder, PartitionExperts)
    chosen = router_init or ("centroids" if is_partition else "random")
    if chosen not in ROUTER_INITS:
        raise UpcycleError(f"unknown --router-init {chosen!r}; use one of {', '.join(ROUTER_INITS)}")
    if chosen == "kmeans" and calibration is None:
        raise UpcycleError("--router-init kmeans needs --calibration DATA (a text/jsonl/parquet file or a Hub dataset)")
    if chosen != "kmeans" and calibration is not None:
        raise UpcycleError("--calibration is only used by --router-init kmeans; add it or remove --calibration")
    if chosen == "centroids" and not is_partition:
        raise UpcycleError("--router-init centroids needs --method partition (it uses the neuron clusters)")
    if chosen == "kmeans" and is_partition:
        raise UpcycleError(
            "--router-init kmeans cannot tell which hidden-state cluster belongs to which neuron partition; "
            "use --router-init centroids (default) or random with --method partition"
        )
    return chosen


def calibrated_router_rows(
    checkpoint: SourceCheckpoint,
    family: FamilyPair,
    layers: list[int],
    rows: int,
    std: float,
    seed: int,
    calibration: str | Path,
    *,
    samples: int,
    max_length: int,
    max_tokens: int,
    quiet: bool,
) -> dict[int, torch.Tensor]:
    """Return, per MoE layer, `rows` k-means router rows (rows, hidden) fitted on the FFN inputs the
    dense source produces on the calibration texts.

    The dense model runs once over streamed batches; each layer keeps a sample of at most
    `max_tokens` inputs, and each layer's sample is dropped as soon as its rows are computed.

    Raises:
        UpcycleError: the calibration data cannot be loaded, the source has no tokenizer, or too
            few tokens were seen to fit `rows` clusters.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upcycle.calibration import calibration_batches, collect_ffn_inputs, load_calibration_texts

    texts = load_calibration_texts(calibration, samples)
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    except (OSError, ValueError) as err:
        raise UpcycleError(
            f"--router-init kmeans needs the source's tokenizer, which {checkpoint.name} lacks: "
            f"{str(err).splitlines()[0]}"
        ) from None
    model = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype="auto")
    model.eval()
    gate_module = family.dense_mlp.gate.removesuffix(".weight")
    batch_size = 4
    states = collect_ffn_inputs(
        model,
        calibration_batches(tokenizer, texts, max_length=max_length, batch_size=batch_size),
        {layer: gate_module.format(layer=layer) for layer in layers},
        max_tokens=max_tokens,
        seed=seed,
        total=-(-len(texts) // batch_size),
        quiet=quiet,
    )
    del model
    router_rows = {}
    for layer in layers:
        layer_states = states.pop(layer)
        if len(layer_states) < rows:
            raise UpcycleError(
                f"calibration gave {len(layer_states)} tokens, fewer than the {rows} router rows to fit; "
                "use more or longer --calibration-samples"
            )
        router_rows[layer] = kmeans_router(layer_states.float(), rows, std, seed, layer)
    return router_rows


def plan_conversion(
    checkpoint: SourceCheckpoint,
    family: FamilyPair,
    builder: ExpertBuilder,
    *,
    layout: str,
    top_k: int,
    dtype: torch.dtype | None,
    router_std: float,
    seed: int,
    moe_layers: list[int] | None = None,
    router_init: str = "random",
    router_rows: dict[int, torch.Tensor] | None = None,
) -> tuple[list[PlannedTensor], list[int], int]:
    """Return (planned output tensors in write order, MoE layer indices, routed expert width).

    `moe_layers` (default: every layer with a dense MLP) become MoE layers; the others keep their
    dense MLP. `router_init` is "random" (N(0, router_std^2)), "kmeans" (rows from `router_rows`,
    one (rows, hidden) tensor per MoE layer, computed from calibration data) or "centroids" (the
    partition builder's neuron-cluster centroids). Granular builders repeat each row over a
    virtual group. Each tensor is computed when written, from lazily read inputs.

    Raises:
        UpcycleError: the checkpoint's MLP tensors are missing or shaped unexpectedly, or a
            requested MoE layer has no dense MLP.
    """
    tensors = checkpoint.tensors
    names = family.dense_mlp
    expert_layout = family.layouts[layout]
    num_layers = int(checkpoint.config["num_hidden_layers"])
    mlp_layers = _dense_mlp_layers(checkpoint, family, num_layers)
    if moe_layers is None:
        moe_layers = mlp_layers
    elif not set(moe_layers) <= set(mlp_layers):
        missing = sorted(set(moe_layers) - set(mlp_layers))
        raise UpcycleError(f"--moe-layers names layers without a dense MLP: {missing}")
    mlp_names = {
        template.format(layer=layer) for layer in moe_layers for template in (names.gate, names.up, names.down)
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
            plan.append(PlannedTensor(TensorSpec(name, out_dtype, tensors.shape(name)), copy(name, out_dtype)))

    def router_weights(layer: int, hidden: int, dense: DenseFFN) -> torch.Tensor:
        groups = builder.router_groups()
        if router_init == "kmeans":
            rows = router_rows[layer]
        elif router_init == "centroids":
            rows = centroid_router(builder.centroid_rows(layer, dense))
        else:
            rows = random_router(builder.routed_experts() // groups, hidden, router_std, seed, layer)
        return virtual_group_router(rows, groups)

    expert_size = None
    num_experts = builder.routed_experts()
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
        row_bytes = expert_size * torch.empty((), dtype=weight_dtype).element_size()
        dtype_name = str(weight_dtype).removeprefix("torch.")
        if row_bytes % GROUPED_MM_ALIGNMENT:
            # transformers runs experts with grouped_mm, which rejects rows not 16-byte aligned.
            raise UpcycleError(
                f"routed experts would be {expert_size} neurons wide ({row_bytes} bytes per row in {dtype_name}), "
                f"which transformers' grouped matmul cannot run (rows must be a multiple of {GROUPED_MM_ALIGNMENT} "
                "bytes); choose --experts/--granularity/--shared-experts that give a width divisible by 8"
            )
        layer_names = dict(zip(("gate", "up", "down"), (gate_name, up_name, down_name), strict=True))
        dense = DenseFFN(lambda projection, _names=layer_names: tensors.get(_names[projection]), intermediate)

        router_name = expert_layout.router.format(layer=layer)
        plan.append(
            PlannedTensor(
                TensorSpec(router_name, weight_dtype, (num_experts, hidden)),
                lambda layer=layer, hidden=hidden, dense=dense, d=weight_dtype: router_weights(layer, hidden, dense).to(
                    d
                ),
            )
        )
        plan.extend(_expert_tensors(builder, expert_layout, layer, hidden, expert_size, weight_dtype, dense))
        if family.shared_expert is not None:
            plan.extend(_shared_expert(family, builder, layer, hidden, weight_dtype, dense))
    copied[-1] = [name for name in top_level if "embed" not in name]
    add_copies(-1)
    return plan, moe_layers, expert_size


def _expert_tensors(builder, expert_layout, layer, hidden, expert_size, weight_dtype, dense) -> list[PlannedTensor]:
    experts = range(builder.routed_experts())

    def one(projection: str, expert: int) -> Callable[[], torch.Tensor]:
        return lambda: builder.projection(projection, layer, expert, dense).to(weight_dtype)

    if expert_layout.fused:

        def gate_up() -> torch.Tensor:
            stacked = torch.empty(len(experts), 2 * expert_size, hidden, dtype=weight_dtype)
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
                TensorSpec(expert_layout.down.format(layer=layer), weight_dtype, (len(experts), hidden, expert_size)),
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


def _shared_expert(
    family: FamilyPair, builder: ExpertBuilder, layer: int, hidden: int, weight_dtype: torch.dtype, dense: DenseFFN
) -> list[PlannedTensor]:
    """The shared expert (the builder's shared neurons, down_proj times the family's `down_scale`) and a
    zero sigmoid gate; width 0 (it adds exactly zero) without shared experts, for targets that always
    have one."""
    shared = family.shared_expert
    width = builder.shared_size(dense.size)

    def projection(name: str) -> torch.Tensor:
        weight = builder.shared_projection(name, dense).float()
        return (weight * shared.down_scale if name == "down" else weight).to(weight_dtype)

    planned = [
        PlannedTensor(
            TensorSpec(template.format(layer=layer), weight_dtype, shape),
            lambda name=name: projection(name),
        )
        for name, template, shape in (
            ("gate", shared.gate, (width, hidden)),
            ("up", shared.up, (width, hidden)),
            ("down", shared.down, (hidden, width)),
        )
    ]
    planned.append(
        PlannedTensor(
            TensorSpec(shared.expert_gate.format(layer=layer), weight_dtype, (1, hidden)),
            lambda: torch.zeros((1, hidden), dtype=weight_dtype),
        )
    )
    return planned


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
    method: str = "copy",
    noise: float = 0.0,
    drop_ratio: float | None = None,
    granularity: int | None = None,
    granular_scaling: str = "paper",
    partition_method: str | None = None,
    shared_experts: int = 0,
    router_init: str | None = None,
    calibration: str | Path | None = None,
    calibration_samples: int = 128,
    calibration_max_length: int = 256,
    calibration_tokens: int = 4096,
    moe_layers: str | list[int] = "all",
    router: str = "topk",
    router_options: dict | None = None,
    ffn_pattern: str | None = None,
) -> ConvertSummary:
    """Upcycle the dense checkpoint `source` (local dir or Hub id) into a stock MoE checkpoint at `output`.

    `target="generic"` (or "auto" for a source with no exact stock pair, or with `router` other
    than "topk", `router_options` or `ffn_pattern`) writes the generic format instead: see
    `upcycle.generic.convert_generic`.

    `method` builds the experts from each dense FFN (see `upcycle.experts`): "copy" (default; with
    `noise`), "drop" (`drop_ratio`), "granular" (`granularity`, `granular_scaling`; `experts` and
    `top_k` count FFN copies, the output has experts * G experts and top-k * G) or "partition"
    (`partition_method`; `experts` disjoint neuron groups). `shared_experts` moves part of the FFN
    into an always-on shared expert (targets with one: qwen2_moe). `router_init` (default "random",
    "centroids" for partition) is "random" (N(0, router_std^2), router_std defaulting to the
    source's initializer_range), "kmeans" (centroids of the FFN inputs the dense model produces on
    `calibration`: a local text/jsonl/parquet file or a Hub dataset id; `calibration_samples`
    texts, at most `calibration_tokens` sampled tokens per layer) or "centroids" (partition only).
    `moe_layers` ("all", "every:N" = layers N-1, 2N-1, ..., or "0,4,8" / "0-3") picks the layers
    that become MoE, for targets that can keep others dense.

    With "copy" and no noise the output reproduces the source's logits until it is trained; see
    README for what each other method computes at init. The output is written to a temporary
    directory next to `output` and renamed at the end.
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
    if calibration_samples < 1 or calibration_tokens < 1:
        raise UpcycleError("--calibration-samples must be at least 1")
    if top_k < 1 or top_k > experts:
        raise UpcycleError(f"--top-k must be between 1 and --experts ({experts}), got {top_k}")
    out_dtype = parse_dtype(dtype)
    max_shard_bytes = parse_size(max_shard_size)
    check_output_dir(output, force)

    checkpoint = open_checkpoint(source, revision=revision)
    stock_only = {
        "--layout": layout is not None,
        "--method": method != "copy",
        "--noise": noise > 0,
        "--shared-experts": shared_experts > 0,
        "--router-init": router_init is not None,
        "--router-std": router_std is not None,
        "--moe-layers": moe_layers != "all",
    }
    generic_options = {"router": router, "router_options": router_options, "ffn_pattern": ffn_pattern}
    if generic_requested(target, checkpoint.config, **generic_options, stock_options=stock_only, quiet=quiet):
        return convert_generic(
            source,
            output,
            experts=experts,
            top_k=top_k,
            **generic_options,
            dtype=dtype,
            seed=seed,
            force=force,
            quiet=quiet,
            revision=revision,
            command=command,
            card_model_id=card_model_id,
        )
    source_config = normalized_source_config(checkpoint.config)
    family = find_family(source_config, target)
    layout = layout or family.default_layout
    if layout not in family.layouts:
        raise UpcycleError(
            f"{family.target_model_type} has no {layout!r} layout; use --layout {' or '.join(family.layouts)}"
        )
    std = float(router_std if router_std is not None else source_config.get("initializer_range", 0.02))
    num_layers = int(source_config["num_hidden_layers"])
    selected_layers = parse_moe_layers(moe_layers, num_layers)
    if len(selected_layers) < num_layers and not family.dense_layers_field:
        raise UpcycleError(
            f"{family.target_model_type} cannot keep layers dense (every layer is MoE); use --moe-layers all, "
            f"or a target that can (qwen2_moe, qwen3_moe)"
        )
    if shared_experts and family.shared_expert is None:
        raise UpcycleError(
            f"{family.target_model_type} has no shared expert; drop --shared-experts or use --target qwen2_moe"
        )
    builder = make_expert_builder(
        method,
        experts,
        seed=seed,
        shared_experts=shared_experts,
        noise=noise,
        drop_ratio=drop_ratio,
        granularity=granularity,
        granular_scaling=granular_scaling,
        partition_method=partition_method,
    )
    router_init = check_router_init(router_init, builder, calibration)
    router_rows = None
    if router_init == "kmeans":
        router_rows = calibrated_router_rows(
            checkpoint,
            family,
            selected_layers,
            builder.routed_experts() // builder.router_groups(),
            std,
            seed,
            calibration,
            samples=calibration_samples,
            max_length=calibration_max_length,
            max_tokens=calibration_tokens,
            quiet=quiet,
        )
    plan, moe_layer_list, expert_size = plan_conversion(
        checkpoint,
        family,
        builder,
        layout=layout,
        top_k=top_k,
        dtype=out_dtype,
        router_std=std,
        seed=seed,
        moe_layers=selected_layers,
        router_init=router_init,
        router_rows=router_rows,
    )
    num_experts, routed_top_k = builder.routed_experts(), builder.routed_top_k(top_k)
    dense_size = expert_size * builder.units()
    hidden = int(source_config["hidden_size"])
    total, active = count_parameters(plan, num_experts, routed_top_k, expert_size, hidden, len(moe_layer_list))
    settings = {
        "num_experts": num_experts,
        "top_k": routed_top_k,
        "layout": layout,
        "dtype": str(out_dtype or "auto").replace("torch.", ""),
        "seed": seed,
        "router_init": router_init,
        "router_std": std,
        **builder.settings(),
        "exact_at_init": builder.exact_at_init(),
    }
    if method in ("granular", "partition"):
        settings["requested_experts"], settings["requested_top_k"] = experts, top_k
    if router_init == "kmeans":
        settings["calibration"] = str(calibration)
        settings["calibration_samples"] = calibration_samples
    provenance = {
        "version": __version__,
        "operation": "upcycle",
        "source": checkpoint.name,
        "source_model_type": source_config["model_type"],
        "family": family.name,
        "moe_layers": moe_layer_list,
        **settings,
    }
    config = build_target_config(
        family,
        source_config,
        num_experts,
        routed_top_k,
        expert_size,
        provenance,
        shared_expert_size=builder.shared_size(dense_size),
        dense_layers=[layer for layer in range(num_layers) if layer not in moe_layer_list],
    )
    if out_dtype is not None:
        config["dtype"] = str(out_dtype).replace("torch.", "")
    summary = ConvertSummary(
        output=output,
        family=family.name,
        source=checkpoint.name,
        source_model_type=source_config["model_type"],
        target_model_type=family.target_model_type,
        layout=layout,
        num_experts=num_experts,
        top_k=routed_top_k,
        moe_layers=moe_layer_list,
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
