"""Sparse -> dense (or fewer experts): plan every output tensor, then compute, write and drop them in turn.

A MoE checkpoint (ours, with `upcycle` provenance, or a foreign Mixtral / Qwen-MoE / GraniteMoE /
FlexOlmo, per-expert or fused on disk, local or on the Hub) is folded back into its dense family
(`experts=None`), or into a MoE of the same family with fewer experts (`experts=K`). The plan lists
every output tensor before any is computed; each MoE layer is computed when its first tensor is
written, from that layer's experts only, so peak memory is one layer's experts, not the model.
Calibration, when asked for, runs the MoE once and records routing statistics for every method.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from upcycle import __version__
from upcycle.calibration import load_calibration_texts
from upcycle.checkpoint import (
    check_output_dir,
    count_parameters,
    dtype_name,
    parse_dtype,
    parse_shard_size,
    write_checkpoint,
)
from upcycle.errors import UpcycleError, flag
from upcycle.families.configs import build_dense_config, import_config_class_in_background
from upcycle.merging.base import BaseFFN
from upcycle.merging.calibrate import LayerwiseCalibration
from upcycle.merging.card import write_merge_card
from upcycle.merging.methods import DEFAULT_DENSITY, METHODS, NEEDS_CALIBRATION, TASK_VECTOR_METHODS
from upcycle.merging.plan import MergePlan, expert_stream, plan_merge
from upcycle.merging.source import MoESource, moe_config_object, open_moe
from upcycle.options import check_count, check_real
from upcycle.rng import SEED_SCHEME


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


def build_grouped_config(moe: MoESource, experts: int, top_k: int, provenance: dict) -> dict:
    """Return the config.json of the same MoE family with `experts` experts and top-`top_k` routing."""
    changes = {moe.family.experts_field: experts, moe.family.top_k_field: top_k}
    grouped = moe.family.grouped_router
    if grouped is not None:  # merged experts do not keep equal groups: one group, so top-k is over all of them
        changes.update({grouped.groups: 1, grouped.top_groups: 1})
    config = moe_config_object(moe.config, **changes).to_dict()
    config.pop("_name_or_path", None)
    config["architectures"] = moe.checkpoint.config.get("architectures", [moe.family.target_architecture])
    config["upcycle"] = provenance
    return config


def merged_config(moe: MoESource, summary: MergeSummary) -> dict:
    """Return the config.json of the merge `summary` of `moe`, its provenance under `upcycle`.

    Raises:
        UpcycleError: transformers rejects the dense config.
    """
    provenance = {
        "version": __version__,
        "operation": "merge",
        "source": moe.name,
        "source_model_type": moe.model_type,
        "family": moe.family.name,
        "moe_layers": moe.moe_layers,
        "num_experts_in": moe.num_experts,
        "base": summary.base,
        "calibration": summary.calibration,
        "expert_weights": {str(k): v for k, v in summary.expert_weights.items()},
        **({"groups": {str(k): v for k, v in summary.groups.items()}} if summary.groups else {}),
        **summary.settings,
        "input_provenance": moe.config.get("upcycle"),
    }
    if summary.experts_out is None:
        config = build_dense_config(moe.family, moe.config, moe.name, summary.intermediate_size, provenance)
    else:
        config = build_grouped_config(moe, summary.experts_out, summary.top_k_out, provenance)
    if summary.settings["dtype"] != "auto":
        config["dtype"] = summary.settings["dtype"]
    return config


def _validate_settings(method: str, experts: int | None, density: float | None, calibration: object) -> None:
    """Check the settings that need no checkpoint.

    Raises:
        UpcycleError: an unknown method, a method that needs calibration data without it, concat
            with `experts`, or a density outside (0, 1].
    """
    if method not in METHODS:
        raise UpcycleError(f"unknown merge method {method!r}; use one of {', '.join(METHODS)}")
    if method in NEEDS_CALIBRATION and calibration is None:
        raise UpcycleError(
            f"{flag('method')} {method} weighs experts by their routing and needs {flag('calibration')} DATA"
        )
    if experts is not None and method == "concat":
        raise UpcycleError(
            f"{flag('method')} concat builds one wider FFN and cannot keep {flag('experts')} K of equal width; "
            f"use another method with {flag('experts')}, or concat without it"
        )
    if density is not None:
        check_real("density", density, minimum=0.0, maximum=1.0, exclusive_minimum=True)


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
    card_model_id: str | None = None,
) -> MergeSummary:
    """Merge the MoE checkpoint `source` into a dense model (or `experts` experts) at `output`.

    Methods: average, frequency (M-SMoE usage counts), router-weight (mean routing probability),
    task-arithmetic / ties / dare (expert minus `base` FFN as task vectors), concat (exact fold of
    a fixed-weight mixture into a wider FFN), select (the most used expert). With `experts=K` the
    experts of each layer are clustered (HC-SMoE: by mean outputs on `calibration`, else by weights)
    and each cluster merged by the method. The output is written to a temporary directory next to
    `output` and renamed at the end. The model card's usage snippet loads `card_model_id` (the Hub
    repo it will be pushed to), else `output`.

    Returns:
        A `MergeSummary` with the output path, target type, method, weights and groups used.

    Raises:
        UpcycleError: an unknown method, bad settings, a dense or unsupported source, missing
            calibration data or base, or an existing output without `force`. Nothing is left at
            `output` (or next to it) when it raises.
    """
    output = Path(output)
    _validate_settings(method, experts, density, calibration)
    check_count("calibration_samples", calibration_samples)
    check_count("max_length", max_length)
    check_count("batch_size", batch_size)
    check_count("seed", seed, 0)
    check_real("scale", scale)
    out_dtype = parse_dtype(dtype)
    parse_shard_size(max_shard_size)
    check_output_dir(output, force)
    moe = open_moe(source, revision=revision)
    if experts is not None and (isinstance(experts, bool) or not isinstance(experts, int)):
        check_count("experts", experts)
    if experts is not None and not 1 <= experts < moe.num_experts:
        raise UpcycleError(
            f"{flag('experts')} must be between 1 and {moe.num_experts - 1} "
            f"({moe.name} has {moe.num_experts} experts); leave it out to merge into a dense model"
        )
    if experts is None:
        import_config_class_in_background(moe.family.source_model_types[0])
    base_ffn = BaseFFN(moe, None if base is None else str(base), method) if method in TASK_VECTOR_METHODS else None
    density = density if density is not None else DEFAULT_DENSITY.get(method, 1.0)
    texts = load_calibration_texts(calibration, calibration_samples) if calibration is not None else None
    stream = expert_stream(moe, calibrating=texts is not None, grouping=experts is not None)
    stats = (
        LayerwiseCalibration(moe, texts, experts is not None, max_length, batch_size, stream)
        if texts is not None
        else {}
    )
    plan = MergePlan(
        moe=moe,
        stream=stream,
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
            "tokens": stats.tokens,
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
        **({"seed_scheme": SEED_SCHEME} if method == "dare" else {}),
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
        intermediate_size=plan.dense_width() if experts is None else moe.expert_size,
        total_parameters=count_parameters(p.spec for p in planned),
        base=base_ffn.description if base_ffn is not None else None,
        calibration=calibration_info,
        expert_weights=plan.expert_weights,
        groups=plan.groups,
        settings=settings,
    )

    write_checkpoint(
        output,
        weights=planned,
        # Built once the tensors are written: the layer computations fill in the expert weights and groups.
        config=lambda directory: merged_config(moe, summary),
        side_files=moe.checkpoint.extra_files,
        card=lambda directory: write_merge_card(directory, summary, command=command, model_id=card_model_id),
        force=force,
        max_shard_size=max_shard_size,
        quiet=quiet,
        desc="merging tensors",
    )
    return summary
