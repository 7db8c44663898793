"""Export a block-routed MoPE model into a stock transformers MoE checkpoint.

A ``routing="block"`` MoPE block computes ``sum_i g_i(x) FFN_i(x)`` with
``FFN_i = FFN(W_p + scaling * (B_{p,i} A_{p,i} + B_{p,s} A_{p,s}))`` (the shared-expert term is
there only with ``shared_expert``); a stock sparse MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE,
GraniteMoE, FlexOlmo) computes the same sum with expert weights stored whole. So the export is
exact (float32 logits within ~1e-6) when:

- the base model is a dense family with an exact stock MoE twin (`upcycle.families`: Llama and
  Mistral -> Mixtral, Qwen2 -> Qwen2-MoE with an empty shared expert, Qwen3 -> Qwen3-MoE,
  Granite -> GraniteMoE, OLMo 2 -> FlexOlmo), with the same requirements as `upcycle convert`;
- the adapter uses ``routing="block"`` with one expert count and one ``top_k`` for every block
  (the MoE configs have a single expert count and top-k);
- its router is the stock one in eval mode: softmax over all experts of a bias-free linear map,
  top-k, renormalised (``topk`` with the default ``normalize=True`` or ``softmax_order="after"``,
  ``noisy_topk``, or ``dense`` = ``top_k=0``, exported as k = E). ``switch`` (weights not
  renormalised), ``cosine``, ``dselect_k``, ``base``, ``sbase``, ``hash``, ``expert_choice``,
  ``sentence`` and any ``selection_bias`` / ``score_fn="sigmoid"`` have no stock equivalent;
- MoPE layers outside the FFN blocks (attention projections) have constant routing (one
  expert): they are merged into the dense weights. Per-token-routed attention adapters raise.

FFN blocks without the adapter (``layers_to_transform``) become E identical copies of the dense
FFN with a zero router, which reproduces the dense block exactly. ``modules_to_save`` copies are
exported in place of the originals. ``router_noise`` (training-time jitter) is not exported.

The model is already in memory, so the tensors come from it; they are written one at a time
through `upcycle.checkpoint.StreamingWriter` into a temporary directory that is renamed to the
output only when complete (`upcycle.checkpoint.atomic_output_dir`), in the same per-expert or
fused layouts, config (with an ``upcycle`` provenance section) and model card as `upcycle convert`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mope.card import write_mope_export_card
from mope.config import MoPEConfig
from mope.errors import MoPEExportError, MoPEMergeError
from mope.export_plan import is_adapted, plan_export
from mope.layer import Linear
from mope.router_kinds import router_kind
from mope.routing import is_softmax_renormalised
from upcycle import __version__
from upcycle.checkpoint import (
    count_parameters,
    dtype_name,
    parse_dtype,
    parse_shard_size,
    write_checkpoint,
)
from upcycle.errors import UpcycleError, flag
from upcycle.families import find_family
from upcycle.families.configs import build_target_config
from upcycle.progress import progress_bars
from upcycle.summaries import ConvertSummary, active_parameters

_LINEAR_ROUTING_MESSAGE = (
    "only routing='block' adapters are MoE models: with routing='linear' each projection mixes its own experts "
    "inside the FFN, which no stock MoE architecture computes. Train with routing='block', or keep the PeftModel."
)


def export(
    model: nn.Module,
    output: str | os.PathLike,
    *,
    adapter_name: str | None = None,
    force: bool = False,
    layout: str | None = None,
    dtype: torch.dtype | str | None = None,
    max_shard_size: str | int = "5GB",
    tokenizer: Any = None,
    side_files: Sequence[Path] = (),
    adapter_source: str | None = None,
    command: str | None = None,
    card_model_id: str | None = None,
    quiet: bool = False,
) -> ConvertSummary:
    """Write a MoPE-adapted dense model as the stock MoE checkpoint that equals it.

    Args:
        model: a `peft.PeftModel` (or `MoPEModel`) holding a ``routing="block"`` MoPE adapter.
        output: the output directory; written to a temporary sibling and renamed when complete.
        adapter_name: the adapter to export (default: the active one).
        force: replace ``output`` if it exists (only once the new checkpoint is complete).
        layout: ``"per-expert"`` or ``"fused"`` (default: the family's Hub layout).
        dtype: dtype of the written weights (default: the base model's); expert weights are
            computed in float32 first.
        max_shard_size: largest safetensors shard, e.g. ``"5GB"``.
        tokenizer: optional tokenizer saved next to the weights.
        side_files: files copied next to the weights (the base's tokenizer and generation config).
        adapter_source: where the adapter came from, for the provenance and model card.
        command: the command line that ran the export, for the model card.
        card_model_id: what the card's usage snippet loads (the Hub repo when pushing; default: ``output``).
        quiet: no progress bar.

    Returns:
        A `upcycle.ConvertSummary` of the written checkpoint (``settings`` holds the adapter's).

    Raises:
        MoPEExportError: when the model has no exact stock MoE equivalent (see the module
            docstring) or ``output`` exists and ``force`` is False. Nothing is left at ``output`` (or next
            to it) when it raises.
    """
    tuner = _mope_tuner(model)
    adapter_name = _pick_adapter(tuner, adapter_name)
    peft_config: MoPEConfig = tuner.peft_config[adapter_name]
    base = tuner.model
    output = Path(output)
    if output.exists() and not force:
        raise MoPEExportError(f"{output} already exists; choose another output or pass {flag('force')} to replace it")
    if peft_config.routing != "block":
        raise MoPEExportError(_LINEAR_ROUTING_MESSAGE)
    parse_shard_size(max_shard_size)
    source_config = base.config.to_dict()
    try:
        family = find_family(source_config)
    except UpcycleError as exc:
        raise MoPEExportError(f"cannot export this MoPE model: {exc}") from None
    layout = layout or family.default_layout
    if layout not in family.layouts:
        raise MoPEExportError(
            f"{family.target_model_type} has no {layout!r} layout; use {' or '.join(family.layouts)}."
        )
    out_dtype = parse_dtype(dtype) if isinstance(dtype, str) or dtype is None else dtype
    out_dtype = out_dtype or next(base.parameters()).dtype

    blocks = _ffn_blocks(base, int(source_config["num_hidden_layers"]))
    num_experts, top_k = _moe_shape(blocks, adapter_name)
    with torch.no_grad():
        dense = _dense_state_dict(tuner, base, adapter_name)
    if getattr(base.config, "tie_word_embeddings", False):
        dense.pop("lm_head.weight", None)
    plan, expert_size = plan_export(family, layout, dense, blocks, adapter_name, num_experts, out_dtype)
    hidden = int(source_config["hidden_size"])
    total = count_parameters(planned.spec for planned in plan)
    active = active_parameters(total, len(blocks), num_experts, top_k, 3 * expert_size * hidden)

    source = str(peft_config.base_model_name_or_path or getattr(base.config, "_name_or_path", "") or "base model")
    settings = {
        "adapter": adapter_source or adapter_name,
        "num_experts": num_experts,
        "top_k": top_k,
        "layout": layout,
        "dtype": dtype_name(out_dtype),
        "router": router_kind(peft_config),
        "r": peft_config.r,
        "lora_alpha": peft_config.lora_alpha,
        "shared_expert": peft_config.shared_expert,
        "share_a": peft_config.share_a,
        "adapted_projections": sorted(
            {
                name
                for block in blocks
                if is_adapted(block, adapter_name)
                for name in block.adapted_projections(adapter_name)
            }
        ),
        "merged_modules": sorted(
            name
            for name, module in base.named_modules()
            if isinstance(module, Linear) and adapter_name in module.mope_A
        ),
    }
    moe_layers = list(range(len(blocks)))
    provenance = {
        "version": __version__,
        "operation": "mope-export",
        "source": source,
        "source_model_type": source_config["model_type"],
        "family": family.name,
        "moe_layers": moe_layers,
        **settings,
    }
    try:
        config = build_target_config(family, source_config, num_experts, top_k, expert_size, provenance)
    except UpcycleError as exc:
        raise MoPEExportError(f"cannot build the {family.target_model_type} config: {exc}") from None
    config["dtype"] = dtype_name(out_dtype)
    summary = ConvertSummary(
        output=output,
        family=family.name,
        source=source,
        source_model_type=source_config["model_type"],
        target_model_type=family.target_model_type,
        layout=layout,
        num_experts=num_experts,
        top_k=top_k,
        moe_layers=moe_layers,
        total_parameters=total,
        active_parameters=active,
        settings=settings,
    )
    write_checkpoint(
        output,
        weights=plan,
        config=config,
        side_files=[Path(path) for path in side_files],
        extras=None if tokenizer is None else tokenizer.save_pretrained,
        card=lambda directory: write_mope_export_card(directory, summary, command, card_model_id),
        force=force,
        max_shard_size=max_shard_size,
        quiet=quiet,
    )
    return summary


def export_adapter(
    adapter: str | os.PathLike,
    output: str | os.PathLike,
    *,
    base_model: str | os.PathLike | None = None,
    revision: str | None = None,
    force: bool = False,
    layout: str | None = None,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    command: str | None = None,
    card_model_id: str | None = None,
    quiet: bool = False,
) -> ConvertSummary:
    """Load a saved MoPE adapter onto its dense base model and `export` it (the
    ``upcycle convert BASE OUT --from-mope ADAPTER`` entry point).

    Args:
        adapter: directory (or Hub id) with ``adapter_config.json`` and the adapter weights.
        output: the output directory.
        base_model: the dense model, a directory or Hub id (default: the adapter's
            ``base_model_name_or_path``); its tokenizer and generation config are copied.
        revision: Hub revision of the base model.
        force, layout, dtype, max_shard_size, command, card_model_id, quiet: as in `export`.

    Returns:
        The `upcycle.ConvertSummary` of the written checkpoint.

    Raises:
        MoPEExportError: when the adapter is unreadable, not MoPE, names no base model, or cannot
            be exported; `upcycle.UpcycleError` for an unreadable base model.
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from upcycle.checkpoint import check_output_dir, open_checkpoint

    output = Path(output)
    check_output_dir(output, force)  # before loading anything
    try:
        config = PeftConfig.from_pretrained(str(adapter))
    except (ValueError, OSError) as exc:
        raise MoPEExportError(
            f"cannot read a PEFT adapter at {adapter} ({str(exc).splitlines()[0]}); give the directory that "
            "holds adapter_config.json."
        ) from None
    if not isinstance(config, MoPEConfig):
        raise MoPEExportError(
            f"{adapter} holds a {config.peft_type.value} adapter, not MoPE; only MoPE adapters export."
        )
    if config.routing != "block":
        raise MoPEExportError(_LINEAR_ROUTING_MESSAGE)  # before loading the base model
    base_source = base_model or config.base_model_name_or_path
    if not base_source:
        raise MoPEExportError(f"{adapter} does not name its base model; pass the base model explicitly.")
    checkpoint = open_checkpoint(base_source, revision=revision)
    with progress_bars(not quiet):  # transformers' "Loading weights" bar too
        base = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype="auto")
        peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path = checkpoint.name
    return export(
        peft_model,
        output,
        force=force,
        layout=layout,
        dtype=dtype,
        max_shard_size=max_shard_size,
        side_files=checkpoint.extra_files,
        adapter_source=str(adapter),
        command=command,
        card_model_id=card_model_id,
        quiet=quiet,
    )


def _mope_tuner(model: nn.Module):
    from mope.model import MoPEModel

    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, MoPEModel):
        raise MoPEExportError(f"expected a PeftModel with a MoPE adapter, got {type(model).__name__}.")
    return tuner


def _pick_adapter(tuner, adapter_name: str | None) -> str:
    if adapter_name is None:
        active = tuner.active_adapters
        if len(active) != 1:
            raise MoPEExportError(f"several adapters are active ({active}); pass adapter_name=.")
        adapter_name = active[0]
    if adapter_name not in tuner.peft_config:
        raise MoPEExportError(f"no adapter named {adapter_name!r}; adapters: {sorted(tuner.peft_config)}.")
    return adapter_name


def _ffn_blocks(base: nn.Module, num_layers: int) -> list[nn.Module]:
    try:
        layers = base.get_submodule("model.layers")
    except AttributeError:
        raise MoPEExportError("the base model has no model.layers; only decoder-only causal LMs export.") from None
    if len(layers) != num_layers:
        raise MoPEExportError(f"expected {num_layers} decoder layers, found {len(layers)}.")
    return [layer.mlp for layer in layers]


def _moe_shape(blocks: list[nn.Module], adapter_name: str) -> tuple[int, int]:
    """Return (num_experts, top_k) shared by every adapted block.

    Raises:
        MoPEExportError: no adapted block, blocks of different shapes, or a non-stock router.
    """
    adapted = [block for block in blocks if is_adapted(block, adapter_name)]
    if not adapted:
        raise MoPEExportError(f"adapter {adapter_name!r} adapts no FFN block; there is no MoE to export.")
    shapes = {(block.num_experts[adapter_name], block.mope_router[adapter_name].top_k) for block in adapted}
    if len(shapes) > 1:
        raise MoPEExportError(
            f"adapter {adapter_name!r} has blocks with different (num_experts, top_k) {sorted(shapes)}; a stock "
            "MoE config has one expert count and one top_k for all layers, so per-layer expert counts "
            "(num_experts_pattern) cannot be exported."
        )
    for block in adapted:
        router = block.mope_router[adapter_name]
        if not is_softmax_renormalised(router):
            raise MoPEExportError(
                f"the {type(router).__name__} of adapter {adapter_name!r} is not a stock MoE router (softmax "
                "over all experts, top-k, renormalised); export supports router='topk' (normalize=True or "
                "softmax_order='after'), 'noisy_topk' and top_k=0 (dense)."
            )
    return shapes.pop()


def _dense_state_dict(tuner, base: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The dense model's effective weights: tuner wrappers removed, constant-routing MoPE layers
    outside FFN blocks merged, ``modules_to_save`` copies in place of the originals."""
    merged: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, Linear) and adapter_name in module.mope_A:
            try:
                delta = module.get_delta_weight(adapter_name)
            except MoPEMergeError as exc:
                raise MoPEExportError(
                    f"{name} has a per-token-routed MoPE adapter outside the FFN blocks, which Mixtral cannot hold "
                    f"({exc}). Give such modules one expert (num_experts_pattern) or leave them out of target_modules."
                ) from None
            weight = module.get_base_layer().weight
            merged[f"{name}.weight"] = (weight.float() + delta.float()).to(weight.dtype)

    state: dict[str, torch.Tensor] = {}
    for key, tensor in base.state_dict().items():
        if ".mope_" in key or ".original_module." in key:
            continue
        if ".modules_to_save." in key:
            if f".modules_to_save.{adapter_name}." not in key:
                continue
            key = key.replace(f".modules_to_save.{adapter_name}.", ".")
        key = key.replace(".base_layer.", ".")
        state[key] = tensor
    state.update(merged)
    return state
