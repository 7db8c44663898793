"""The model a recipe trains: optional on-the-fly upcycling, MoE loss settings written into the
model's own config, and the training mode (full, LoRA, MoPE, router-only, experts-only, pattern)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from upcycle.errors import MOPE_IMPORT_HINT, UpcycleError
from upcycle.families.moe_fields import biased_routers
from upcycle.training.config import ConfigError, RecipeConfig

# Parameter names in transformers-5 MoE models (Mixtral/Qwen2Moe/Qwen3Moe/FlexOlmo/Olmoe:
# `mlp.gate.weight`, `mlp.experts.gate_up_proj`; GraniteMoe: `block_sparse_moe.router.weight`).
# Dense FFNs use `gate_proj`, which `\.gate\.` does not match.
ROUTER_PATTERNS = (r"\.(gate|router)\.(weight|bias|e_score_correction_bias)$",)
EXPERT_PATTERNS = (r"\.experts\.", r"\.shared_experts?\.", r"\.shared_expert_gate\.")
MOPE_EXPORT_BASES = ("llama", "mistral")


@dataclass(frozen=True)
class ModelFacts:
    """What the checks need to know about the model that will be trained."""

    model_type: str
    is_moe: bool
    has_jitter_field: bool
    upcycled_from: str | None = None
    # Whether its routers carry an e_score_correction_bias; None: not looked at (moe.bias_update_rate 0).
    has_selection_bias: bool | None = None
    # Whether a stock MoE computes a load-balancing loss (its config has router_aux_loss_coef).
    has_aux_loss: bool = True


def _auto_config(path: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoConfig

    from upcycle.checkpoint import looks_like_hub_id

    if not Path(path).exists() and not looks_like_hub_id(path):
        raise ConfigError(f"model.path: directory {path} does not exist (and is not a Hub model id)")
    if (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file():
        import mope  # registers the MOPE PEFT type, so a MoPE adapter is recognised

        hint = f" ({MOPE_IMPORT_HINT})" if mope.is_mope_adapter(Path(path)) else ""
        raise ConfigError(
            f"model.path: {path} is a PEFT adapter, not a model{hint}; set model.path to its base model and "
            "the adapter section (mope/lora) to train one"
        )
    try:
        return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.path: cannot read a model config from {path}: {str(err).splitlines()[0]}") from None


def is_moe_config(hf_config) -> bool:
    """Return True for a transformers MoE config (one that can return router logits)."""
    return hasattr(hf_config, "output_router_logits")


def model_facts(config: RecipeConfig) -> ModelFacts:
    """Return the facts about the model `config` trains (after `model.upcycle` when set), from configs only.

    Raises:
        ConfigError: ``model.path`` has no readable config; ``model.upcycle`` for a model the
            converter has no pair for.
    """
    from transformers import AutoConfig

    trust = config.model.trust_remote_code
    source = _auto_config(config.model.path, config.model.revision, trust)
    look = config.moe.bias_update_rate > 0
    if config.model.upcycle is None:
        bias = has_selection_bias(source, trust) if look else None
        aux = not is_moe_config(source) or hasattr(source, "router_aux_loss_coef")
        return ModelFacts(
            source.model_type, is_moe_config(source), hasattr(source, "router_jitter_noise"), None, bias, aux
        )
    from upcycle.families import find_family

    try:
        family = find_family(source.to_dict(), config.model.upcycle.target)
    except UpcycleError as err:
        raise ConfigError(f"model.upcycle: {err}") from None
    target = AutoConfig.for_model(family.target_model_type)
    bias = has_selection_bias(target, False) if look else None
    aux = hasattr(target, "router_aux_loss_coef")
    return ModelFacts(
        family.target_model_type, True, hasattr(target, "router_jitter_noise"), source.model_type, bias, aux
    )


def has_selection_bias(hf_config, trust_remote_code: bool) -> bool | None:
    """Return whether the causal LM of `hf_config` has routers with an ``e_score_correction_bias``
    buffer (DeepSeek-V3-style loss-free balancing), from a skeleton built on the meta device (no
    memory, no weights read); None when transformers cannot build one from the config."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    except (ValueError, TypeError, ImportError, OSError):
        return None
    return bool(biased_routers(skeleton))


def check_mode_fits(config: RecipeConfig, facts: ModelFacts) -> None:
    """Check that the training mode and MoE settings make sense for the model, before anything loads.

    Raises:
        ConfigError: naming the key that does not fit (``model.mode``, ``model.lora.target_parameters``,
            ``moe.*`` or ``output.export``).
    """
    mode = config.model.mode
    described = f"{config.model.path} is a dense {facts.model_type}"
    if mode in ("router_only", "experts_only") and not facts.is_moe:
        raise ConfigError(
            f"model.mode: {mode!r} needs a MoE model but {described}; add a model.upcycle block to convert it "
            "first, or use full, lora or mope"
        )
    if mode == "lora" and config.model.lora.target_parameters and not facts.is_moe:
        raise ConfigError(
            f"model.lora.target_parameters: fused expert parameters exist only in MoE models but {described}; "
            "use model.lora.target_modules"
        )
    routed = facts.is_moe or mode == "mope"
    moe = config.moe
    if not routed:
        for key, value in (("aux_loss_coef", moe.aux_loss_coef), ("z_loss_coef", moe.z_loss_coef)):
            if value:
                raise ConfigError(
                    f"moe.{key}: {described} trained with mode {mode!r}, which has no router; "
                    "remove it, add a model.upcycle block, or use mode mope"
                )
    if moe.aux_loss_coef and mode != "mope" and not facts.has_aux_loss:
        raise ConfigError(
            f"moe.aux_loss_coef: {facts.model_type} computes no load-balancing loss (no router_aux_loss_coef); "
            "set it to null, and use moe.bias_update_rate for loss-free balancing"
        )
    if moe.bias_update_rate and facts.has_selection_bias is False:
        raise ConfigError(
            f"moe.bias_update_rate: {facts.model_type} has no router owning an e_score_correction_bias "
            "(loss-free balancing needs a DeepSeek-V3-style router, e.g. glm4_moe); set it to 0 or use "
            "moe.aux_loss_coef"
        )
    if moe.router_jitter and mode != "mope" and not facts.has_jitter_field:
        raise ConfigError(
            f"moe.router_jitter: {facts.model_type} has no router jitter field (router_jitter_noise); set it to 0"
        )
    if config.output.export == "dense" and not facts.is_moe:
        raise ConfigError(f"output.export: 'dense' merges a MoE back into its dense family but {described}")
    if config.output.export == "moe":
        base = facts.model_type
        if base not in MOPE_EXPORT_BASES or config.model.mope.get("routing") != "block":
            raise ConfigError(
                "output.export: 'moe' turns a routing: block MoPE adapter on a llama/mistral model into Mixtral; "
                f"this run has routing {config.model.mope.get('routing', 'linear')!r} on {base}"
            )


def upcycle_model(config: RecipeConfig, destination: Path, reuse: bool) -> Path:
    """Convert ``model.path`` to a MoE at `destination` and return the directory to train from.

    With `reuse` (a resumed run) an existing conversion is kept: the checkpoint holds the trained
    weights, the conversion only the architecture. A fresh run converts again, replacing it.

    Raises:
        UpcycleError: from `upcycle.convert`.
    """
    from upcycle.convert import convert

    if reuse and (destination / "config.json").is_file():
        return destination
    options = config.model.upcycle
    try:
        convert(
            config.model.path,
            destination,
            experts=options.experts,
            top_k=options.top_k,
            target=options.target,
            layout=options.layout,
            seed=options.seed,
            router_std=options.router_std,
            revision=config.model.revision,
            quiet=True,
            force=True,
            command="recipes/finetune.py (model.upcycle)",
            **options.options,
        )
    except TypeError as err:  # an option name upcycle.convert does not take
        raise ConfigError(f"model.upcycle.options: {err}") from None
    return destination


def _dtype(name: str) -> torch.dtype | str:
    return "auto" if name == "auto" else getattr(torch, name)


def load_model(config: RecipeConfig, path: str | Path):
    """Return the causal LM at `path` with the `moe` section written into its config.

    For MoE models ``output_router_logits`` is switched on (the aux loss and metrics read the
    router logits), ``router_aux_loss_coef`` is set when ``moe.aux_loss_coef`` is given and
    ``router_jitter_noise`` when the model has it. The fields are set before the model is built
    because models copy some of them at construction, and they are saved with the model.

    Raises:
        ConfigError: the weights cannot be loaded.
    """
    from transformers import AutoModelForCausalLM

    revision = None if config.model.upcycle is not None else config.model.revision
    hf_config = _auto_config(str(path), revision, config.model.trust_remote_code)
    if is_moe_config(hf_config):
        hf_config.output_router_logits = True
        if config.moe.aux_loss_coef is not None:
            hf_config.router_aux_loss_coef = config.moe.aux_loss_coef
        if hasattr(hf_config, "router_jitter_noise"):
            hf_config.router_jitter_noise = config.moe.router_jitter
    kwargs = {}
    if config.model.attn_implementation:
        kwargs["attn_implementation"] = config.model.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            config=hf_config,
            revision=revision,
            dtype=_dtype(config.model.dtype),
            trust_remote_code=config.model.trust_remote_code,
            **kwargs,
        )
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.path: cannot load weights from {path}: {str(err).splitlines()[0]}") from None
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def load_tokenizer(config: RecipeConfig, model_path: str | Path):
    """Return the tokenizer of ``model.tokenizer`` (default: the model), with a pad token set.

    Raises:
        ConfigError: no tokenizer can be loaded.
    """
    from transformers import AutoTokenizer

    source = config.model.tokenizer or config.model.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source,
            revision=None if config.model.tokenizer else config.model.revision,
            trust_remote_code=config.model.trust_remote_code,
        )
    except (OSError, ValueError, TypeError) as err:
        key = "model.tokenizer" if config.model.tokenizer else "model.path"
        raise ConfigError(f"{key}: cannot load a tokenizer from {source}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        # Padding positions carry label -100 and attention_mask 0, so any id works; eos is conventional.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def _freeze_all_but(model: nn.Module, patterns: tuple[str, ...] | list[str], key: str) -> None:
    compiled = [re.compile(pattern) for pattern in patterns]
    matched = 0
    for name, parameter in model.named_parameters():
        keep = any(pattern.search(name) for pattern in compiled)
        parameter.requires_grad_(keep)
        matched += keep
    if not matched:
        raise ConfigError(f"{key}: no parameter name matches {list(patterns)}")


def apply_mode(model: nn.Module, config: RecipeConfig) -> nn.Module:
    """Return the model prepared for ``model.mode``: PEFT-wrapped (lora, mope) or with every
    parameter outside the mode's patterns frozen.

    Raises:
        ConfigError: a PEFT config the model does not fit (no target module found, bad MoPE
            option), or patterns matching no parameter; naming the key.
    """
    mode = config.model.mode
    if mode == "router_only":
        _freeze_all_but(model, ROUTER_PATTERNS, "model.mode")
    elif mode == "experts_only":
        _freeze_all_but(model, EXPERT_PATTERNS, "model.mode")
    elif mode == "pattern":
        _freeze_all_but(model, config.model.trainable_patterns, "model.trainable_patterns")
    elif mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = config.model.lora
        try:
            peft_config = LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                target_parameters=lora.target_parameters,
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, peft_config)
        except ValueError as err:
            raise ConfigError(f"model.lora: {str(err).splitlines()[0]}") from None
    elif mode == "mope":
        from peft import get_peft_model

        import mope

        options = {"task_type": "CAUSAL_LM", **config.model.mope}
        if config.moe.aux_loss_coef is not None:
            options["aux_loss_coef"] = config.moe.aux_loss_coef
        options["z_loss_coef"] = config.moe.z_loss_coef
        options["router_noise"] = config.moe.router_jitter
        try:
            model = get_peft_model(model, mope.MoPEConfig(**options))
        except TypeError as err:
            raise ConfigError(f"model.mope: {str(err).splitlines()[0]}") from None
        except (ValueError, UpcycleError, mope.MoPEError) as err:
            raise ConfigError(f"model.mope: {str(err).splitlines()[0]}") from None
    return model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """Return ``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Return AdamW parameter groups: decay on matrices and expert stacks, none on norms and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def moe_block_classes(model: nn.Module) -> list[type]:
    """Return the classes of the model's MoE blocks: modules that own an ``experts`` child."""
    classes = []
    for module in model.modules():
        if isinstance(getattr(module, "experts", None), nn.Module) and type(module) not in classes:
            classes.append(type(module))
    return classes


def mark_zero3_leaf_modules(model: nn.Module) -> list[type]:
    """Make every MoE block a DeepSpeed ZeRO-3 leaf module and return the block classes.

    ZeRO-3 gathers parameters through hooks on the modules a forward runs; an MoE block runs only
    the experts its tokens chose, so ranks would gather different parameters and hang. A leaf
    module is gathered whole on every rank. Call before ``accelerator.prepare``.
    """
    from deepspeed.utils import set_z3_leaf_modules

    classes = moe_block_classes(model)
    if classes:
        set_z3_leaf_modules(model, classes)
    return classes
