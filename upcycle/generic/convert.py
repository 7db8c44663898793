"""Dense -> generic MoE for any Hugging Face model: replace each FFN by an `upcycle.moe.MoE` whose
experts are copies of it, then save in the generic format (see `upcycle.generic.modeling`).

Unlike the stock converter, which streams tensor by tensor, this one builds the model in memory:
the MoE block is our own module, so the simplest exact path is transformers' own `from_pretrained`
and `save_pretrained` around a module swap. Peak memory is the source plus its FFNs times E.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from upcycle import __version__
from upcycle.card import EXACT_LIMITATION, UPCYCLE_LIMITATIONS, CardFacts, write_card
from upcycle.checkpoint import (
    CONFIG_FILE,
    SIDE_FILES,
    check_output_dir,
    dtype_name,
    parse_dtype,
    resolve_source,
    write_checkpoint,
)
from upcycle.errors import UpcycleError, flag
from upcycle.families import find_family
from upcycle.generic.modeling import (
    CLASS_PREFIX,
    FORMAT,
    MODELING_FILE,
    auto_classes,
    modeling_source,
    replace_sites,
)
from upcycle.generic.sites import site_for
from upcycle.moe import MoE, moe_modules
from upcycle.options import check_count, given_options
from upcycle.progress import progress_bars
from upcycle.summaries import ConvertSummary, active_parameters

__all__ = ["convert_generic", "generic_requested", "load_source_model"]


def load_source_model(directory: Path, dtype: torch.dtype | None) -> torch.nn.Module:
    """Return the stock transformers model saved in ``directory`` (the class its config names), in eval mode.

    Raises:
        UpcycleError: the config cannot be read, names no architecture, or names a class transformers lacks.
    """
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as err:
        raise UpcycleError(f"transformers cannot read the config in {directory}: {str(err).splitlines()[0]}") from None
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise UpcycleError(
            f"{directory}/config.json names no transformers architecture ({architectures or 'none'}); "
            'set `architectures` to the model class, e.g. ["GPT2LMHeadModel"]'
        )
    return model_class.from_pretrained(directory, dtype=dtype or "auto").eval()


def _parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(parameter.numel() for parameter in model.parameters())
    active = total
    for _, block in moe_modules(model):
        per_expert = sum(parameter[0].numel() for parameter in block.experts.parameters())
        active = active_parameters(active, 1, block.num_experts, block.top_k, per_expert)
    return total, active


def convert_generic(
    source: str | Path,
    output: str | Path,
    *,
    experts: int = 8,
    top_k: int = 2,
    router: str = "topk",
    router_options: dict | None = None,
    block_options: dict | None = None,
    ffn_pattern: str | None = None,
    dtype: str | None = "auto",
    seed: int = 0,
    force: bool = False,
    quiet: bool = False,
    revision: str | None = None,
    command: str | None = None,
    card_model_id: str | None = None,
):
    """Upcycle any Hugging Face model at ``source`` into the generic MoE format at ``output``.

    Every FFN the family table (or ``ffn_pattern``) finds becomes a `MoE` block with ``experts``
    copies of it and a ``router`` (any kind of `upcycle.moe.ROUTERS`, with ``router_options``).
    With a router whose weights sum to 1 (the default ``topk``) the output computes what the source
    computes. The output loads with `upcycle.load` and with the matching transformers Auto class
    and ``trust_remote_code=True``.

    Args:
        block_options: further `MoE` arguments (``capacity_factor``, ``num_shared_experts``...).
        ffn_pattern: a regex over module names that overrides the family table.
        card_model_id: what the model card's usage snippet loads (the Hub repo it will be pushed to);
            default ``output``.

    Returns:
        A `upcycle.convert.ConvertSummary` with family ``"generic"``.

    Raises:
        UpcycleError: bad settings, no FFN found, an unreadable source, or an existing output
            without ``force``; nothing is left at ``output`` then.
    """
    output = Path(output)
    check_count("experts", experts)
    check_count("top_k", top_k, 1, experts)
    out_dtype = parse_dtype(dtype)
    check_output_dir(output, force)
    directory, name = resolve_source(source, revision)
    with progress_bars(not quiet):
        model = load_source_model(directory, out_dtype)
    config = model.config
    site = site_for(config.model_type, ffn_pattern)
    router_options = dict(router_options or {})
    block_options = dict(block_options or {})
    with torch.random.fork_rng(devices=[]):  # the routers' init draws from the global generator; restore it after
        torch.manual_seed(seed)
        replaced = replace_sites(
            model,
            site,
            lambda ffn: MoE.from_dense(
                ffn, experts, top_k, router=router, router_options=router_options, **block_options
            ).eval(),
        )
    architecture = type(model).__name__
    classes = auto_classes(config.model_type, architecture)
    if architecture not in classes.values():
        classes["AutoModel"] = architecture
    total, active = _parameter_counts(model)
    effective_top_k = moe_modules(model)[0][1].top_k
    settings = {
        "num_experts": experts,
        "top_k": effective_top_k,
        "router": router,
        "router_options": router_options,
        "block_options": block_options,
        "seed": seed,
        "expert_init": "copy",
        "dtype": dtype_name(out_dtype),
    }
    section = {
        "format": FORMAT,
        "version": __version__,
        "operation": "upcycle",
        "source": name,
        "source_model_type": config.model_type,
        "source_architecture": architecture,
        "ffn_pattern": site.pattern,
        "ffn_down": site.down,
        "moe_modules": replaced,
        "num_moe_layers": len(replaced),
        **settings,
    }
    summary = ConvertSummary(
        output=output,
        family="generic",
        source=name,
        source_model_type=config.model_type,
        target_model_type=config.model_type,
        layout=FORMAT,
        num_experts=experts,
        top_k=effective_top_k,
        moe_layers=list(range(len(replaced))),
        total_parameters=total,
        active_parameters=active,
        settings=settings,
    )

    def save_weights(directory: Path) -> None:
        with progress_bars(not quiet):
            # Module names as they are in memory: transformers skips its legacy key renames (GPT-NeoX
            # `lm_head` saved as `embed_out`) when it loads custom classes, so it must not apply them here.
            model.save_pretrained(directory, save_original_format=False)

    def amended_config(directory: Path) -> dict:
        saved = json.loads((directory / CONFIG_FILE).read_text())
        saved["upcycle"] = section
        saved["architectures"] = [f"{CLASS_PREFIX}{architecture}"]
        saved["auto_map"] = {auto: f"{MODELING_FILE[:-3]}.{CLASS_PREFIX}{cls}" for auto, cls in classes.items()}
        return saved

    write_checkpoint(
        output,
        weights=save_weights,
        config=amended_config,
        side_files=[directory / name for name in SIDE_FILES if (directory / name).is_file()],
        extras=lambda target: (target / MODELING_FILE).write_text(modeling_source(classes)),
        card=lambda target: _write_card(target, summary, classes, replaced, command, card_model_id or str(output)),
        force=force,
        quiet=quiet,
    )
    if not quiet:
        print(f"upcycled {len(replaced)} FFNs ({replaced[0]}, ...) into MoE blocks with {experts} experts")
    return summary


def _write_card(
    directory: Path, summary, classes: dict[str, str], replaced: list[str], command: str | None, model_id: str
) -> None:
    auto = next(iter(classes))
    usage = "\n".join(
        [
            f"from transformers import {auto}",
            "import upcycle",
            "",
            f'model = {auto}.from_pretrained("{model_id}", trust_remote_code=True)  # needs pip install upcycle',
            f'model = upcycle.load("{model_id}")  # the same model, without remote code',
        ]
    )
    facts = CardFacts(
        title=Path(str(summary.output)).name,
        operation="upcycle",
        model_id=model_id,
        summary=(
            f"A sparse Mixture-of-Experts upcycled from `{summary.source}` ({summary.source_model_type}) in upcycle's "
            f"generic format: each of its {len(replaced)} FFNs (`{replaced[0]}`, ...) is an upcycle MoE block of "
            f"{summary.num_experts} copies with a `{summary.settings['router']}` router."
        ),
        base_models=[summary.source],
        tags=["moe", "upcycled", "mixture-of-experts", "custom_code", summary.source_model_type],
        command=command,
        model_type=summary.source_model_type,
        num_experts=summary.num_experts,
        top_k=summary.top_k,
        moe_layers=len(replaced),
        total_parameters=summary.total_parameters,
        active_parameters=summary.active_parameters,
        settings={key: value for key, value in summary.settings.items() if value not in ({}, None)},
        limitations=(EXACT_LIMITATION, *UPCYCLE_LIMITATIONS),
        usage=usage,
        pipeline_tag="text-generation" if auto == "AutoModelForCausalLM" else "feature-extraction",
    )
    write_card(directory, facts)


def generic_requested(
    target: str,
    source_config: dict,
    *,
    router: str = "topk",
    router_options: dict | None = None,
    ffn_pattern: str | None = None,
    stock_options: dict[str, bool] | None = None,
    quiet: bool = False,
) -> bool:
    """Decide whether `upcycle.convert` writes the generic format.

    ``target="generic"`` asks for it; ``"auto"`` falls back to it (with a notice on stderr) when the
    source has no exact stock MoE counterpart, or when a generic-only option is given (a router
    other than plain ``topk``, router options, an FFN pattern).

    Args:
        stock_options: ``{option: given}`` for options only the stock converter has (``layout``...).

    Raises:
        UpcycleError: generic-only options with a stock target, or stock-only options with the generic format.
    """
    generic_only = given_options(
        {"router": router != "topk", "router_options": bool(router_options), "ffn_pattern": ffn_pattern is not None}
    )
    if target not in ("auto", FORMAT):
        if generic_only:
            raise UpcycleError(
                f"{', '.join(generic_only)} need the generic format; a stock {target} has a softmax top-k router "
                f"over its own MLPs; use {flag('target')} generic"
            )
        return False
    reason = None
    if target == "auto":
        try:
            find_family(source_config, "auto")
        except UpcycleError as err:
            reason = str(err).split(";")[0]
        if reason is None and not generic_only:
            return False
        reason = reason or f"{', '.join(generic_only)} given"
    stock_only = given_options(stock_options or {})
    if stock_only:
        raise UpcycleError(
            f"{', '.join(stock_only)} apply to stock MoE targets only, not to the generic format; drop them"
        )
    if reason is not None and not quiet:
        print(
            f"upcycle: notice: {reason}; writing the generic format instead "
            "(loads with upcycle.load(OUT) or the Auto class with trust_remote_code=True)",
            file=sys.stderr,
        )
    return True
