"""Export a block-routed MoPE model into a stock transformers MoE checkpoint.

A ``routing="block"`` MoPE block computes ``sum_i g_i(x) FFN_i(x)`` with
``FFN_i = FFN(W_p + scaling * (B_{p,i} A_{p,i} + B_{p,s} A_{p,s}))`` (the shared-expert term is
there only with ``shared_expert``); a Mixtral sparse MoE block computes the same sum with expert
weights stored whole. So the export is exact (float32 logits within ~1e-6) when:

- the base model is Llama or Mistral without ``attention_bias``/``mlp_bias`` (their MoE twin is
  Mixtral; other families raise `MoPEExportError`);
- the adapter uses ``routing="block"`` with one expert count and one ``top_k`` for every block
  (Mixtral has a single ``num_local_experts`` / ``num_experts_per_tok``);
- its router is Mixtral's in eval mode: softmax over all experts of a bias-free linear map, top-k,
  renormalised (``topk`` with the default ``normalize=True`` or ``softmax_order="after"``,
  ``noisy_topk``, or ``dense`` = ``top_k=0``, exported as k = E). ``switch`` (weights not
  renormalised), ``cosine``, ``dselect_k``, ``base``, ``sbase``, ``hash``, ``expert_choice``,
  ``sentence`` and any ``selection_bias`` / ``score_fn="sigmoid"`` have no Mixtral equivalent;
- MoPE layers outside the FFN blocks (attention projections) have constant routing (one
  expert): they are merged into the dense weights. Per-token-routed attention adapters raise.

FFN blocks without the adapter (``layers_to_transform``) become E identical copies of the dense
FFN with a zero router, which reproduces the dense block exactly. ``modules_to_save`` copies are
exported in place of the originals. ``router_noise`` (training-time jitter) is not exported:
Mixtral's ``router_jitter_noise`` would also jitter the experts' input.

The export builds the Mixtral model in memory with transformers' own classes and
``save_pretrained``s it, so it needs RAM for the dense model plus the MoE model; the streaming,
bounded-memory path is `upcycle.convert`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mope.config import MoPEConfig
from mope.errors import MoPEExportError, MoPEMergeError
from mope.layer import GatedFFNBlock, Linear
from mope.routing import is_softmax_renormalised

_EXPORT_TARGETS = {"llama": "mixtral", "mistral": "mixtral"}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def export(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    adapter_name: str | None = None,
    overwrite: bool = False,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a MoPE-adapted Llama/Mistral as a Mixtral checkpoint that equals it.

    Args:
        model: a `peft.PeftModel` (or `MoPEModel`) holding a ``routing="block"`` MoPE adapter.
        out: the output directory; written to a temporary sibling and renamed when complete.
        adapter_name: the adapter to export (default: the active one).
        overwrite: replace ``out`` if it exists.
        tokenizer: optional tokenizer saved next to the weights.
        dtype: dtype of the written weights (default: the base model's); the expert weights are
            computed in float32 first.

    Returns:
        The output directory.

    Raises:
        MoPEExportError: when the model has no exact Mixtral equivalent (see the module docstring)
            or ``out`` exists and ``overwrite`` is False.
    """
    from transformers import MixtralConfig, MixtralForCausalLM

    tuner = _mope_tuner(model)
    adapter_name = _pick_adapter(tuner, adapter_name)
    peft_config: MoPEConfig = tuner.peft_config[adapter_name]
    base = tuner.model
    dense_config = base.config
    out = Path(out)
    if out.exists() and not overwrite:
        raise MoPEExportError(f"{out} exists; pass overwrite=True or choose another directory.")
    _check_exportable(dense_config, peft_config)

    blocks = _ffn_blocks(base, dense_config.num_hidden_layers)
    adapted = [block for block in blocks if isinstance(block, GatedFFNBlock) and adapter_name in block.mope_A]
    if not adapted:
        raise MoPEExportError(f"adapter {adapter_name!r} adapts no FFN block; there is no MoE to export.")
    shapes = {(block.num_experts[adapter_name], block.mope_router[adapter_name].top_k) for block in adapted}
    if len(shapes) > 1:
        raise MoPEExportError(
            f"adapter {adapter_name!r} has blocks with different "
            f"(num_experts, top_k) {sorted(shapes)}; Mixtral has "
            "one expert count and one top_k for all layers, so per-layer expert counts (num_experts_pattern) "
            "cannot be exported."
        )
    ((num_experts, top_k),) = shapes
    for block in adapted:
        router = block.mope_router[adapter_name]
        if not is_softmax_renormalised(router):
            raise MoPEExportError(
                f"the {type(router).__name__} of adapter {adapter_name!r} "
                "is not Mixtral's router (softmax over "
                "all experts, top-k, renormalised); export supports router='topk' (normalize=True or "
                "softmax_order='after'), 'noisy_topk' and top_k=0 (dense)."
            )

    moe_config = _mixtral_config(MixtralConfig, dense_config, num_experts, top_k, peft_config, dtype)
    state_dict = _moe_state_dict(tuner, base, blocks, adapter_name, num_experts, dtype or base.dtype)

    from transformers.initialization import no_init_weights

    with no_init_weights():
        moe_model = MixtralForCausalLM(moe_config)
    missing, unexpected = moe_model.load_state_dict(state_dict, strict=False)
    missing = [key for key in missing if not (moe_config.tie_word_embeddings and key == "lm_head.weight")]
    if missing or unexpected:
        raise MoPEExportError(
            f"internal error mapping {dense_config.model_type} weights to Mixtral: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}."
        )
    if moe_config.tie_word_embeddings:
        moe_model.tie_weights()
    moe_model.to(dtype or base.dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        moe_model.save_pretrained(temporary)
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)
        _replace_directory(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return out


def export_adapter(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    base_model: str | os.PathLike | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Load a saved MoPE adapter onto its base model and `export` it (the ``upcycle convert
    --from-mope ADAPTER`` entry point).

    Args:
        adapter: directory (or Hub id) with ``adapter_config.json`` and the adapter weights.
        out: the output directory.
        base_model: the dense model (default: the adapter's ``base_model_name_or_path``).
        overwrite, dtype: as in `export`.

    Returns:
        The output directory; tokenizer files of a local base model are copied next to the weights.

    Raises:
        MoPEExportError: when the adapter is not MoPE, names no base model, or cannot be exported.
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    config = PeftConfig.from_pretrained(str(adapter))
    if not isinstance(config, MoPEConfig):
        raise MoPEExportError(f"{adapter} holds a {config.peft_type} adapter, not MoPE.")
    base_path = base_model or config.base_model_name_or_path
    if not base_path:
        raise MoPEExportError(f"{adapter} does not name its base model; pass base_model=.")
    base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype="auto")
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    result = export(peft_model, out, overwrite=overwrite, dtype=dtype)
    if Path(base_path).is_dir():
        for name in _TOKENIZER_FILES:
            if (Path(base_path) / name).is_file():
                shutil.copy2(Path(base_path) / name, result / name)
    return result


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


def _check_exportable(dense_config, peft_config: MoPEConfig) -> None:
    model_type = dense_config.model_type
    if model_type not in _EXPORT_TARGETS:
        raise MoPEExportError(
            f"no stock MoE architecture to export a {model_type!r} model to; supported: "
            f"{', '.join(sorted(_EXPORT_TARGETS))} -> Mixtral."
        )
    for field in ("attention_bias", "mlp_bias"):
        if getattr(dense_config, field, False):
            raise MoPEExportError(f"a {model_type} model with {field}=True cannot be Mixtral (Mixtral has no biases).")
    if peft_config.routing != "block":
        raise MoPEExportError(
            "only routing='block' adapters are MoE models: with routing='linear' each projection mixes its "
            "own experts inside the FFN, which no stock MoE "
            "architecture computes. Train with routing='block'."
        )


def _ffn_blocks(base: nn.Module, num_layers: int) -> list[nn.Module]:
    layers = base.get_submodule("model.layers")
    if len(layers) != num_layers:
        raise MoPEExportError(f"expected {num_layers} decoder layers, found {len(layers)}.")
    return [layer.mlp for layer in layers]


def _mixtral_config(config_cls, dense_config, num_experts: int, top_k: int, peft_config, dtype):
    copied = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "max_position_embeddings",
        "initializer_range",
        "rms_norm_eps",
        "use_cache",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "tie_word_embeddings",
        "rope_parameters",
        "attention_dropout",
        "sliding_window",
    )
    fields = {name: getattr(dense_config, name) for name in copied if hasattr(dense_config, name)}
    fields.setdefault("sliding_window", None)
    return config_cls(
        **fields,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        router_aux_loss_coef=peft_config.aux_loss_coef,
        router_jitter_noise=0.0,
        dtype=dtype or dense_config.dtype,
    )


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
                    f"{name} has a per-token-routed MoPE adapter outside "
                    "the FFN blocks, which Mixtral cannot "
                    f"hold ({exc}). Give such modules one expert (num_experts_pattern) or leave them out of "
                    "target_modules."
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


def _moe_state_dict(tuner, base, blocks, adapter_name, num_experts, dtype) -> dict[str, torch.Tensor]:
    dense = _dense_state_dict(tuner, base, adapter_name)
    moe: dict[str, torch.Tensor] = {}
    for key, tensor in dense.items():
        if ".mlp." not in key:
            moe[key] = tensor.detach().to(dtype)
    for index, block in enumerate(blocks):
        prefix = f"model.layers.{index}.mlp"
        weights = {name: dense[f"{prefix}.{name}.weight"].float() for name in ("gate_proj", "up_proj", "down_proj")}
        experts = {name: weight.unsqueeze(0).repeat(num_experts, 1, 1) for name, weight in weights.items()}
        if isinstance(block, GatedFFNBlock) and adapter_name in block.mope_A:
            with torch.no_grad():
                for name in block.adapted_projections(adapter_name):
                    experts[name] = experts[name] + block.expert_delta_weights(adapter_name, name).float()
            router_weight = block.mope_router[adapter_name].weight.detach().float()
        else:
            router_weight = torch.zeros(num_experts, weights["gate_proj"].shape[1])
        moe[f"{prefix}.gate.weight"] = router_weight.to(dtype)
        moe[f"{prefix}.experts.gate_up_proj"] = torch.cat([experts["gate_proj"], experts["up_proj"]], dim=1).to(dtype)
        moe[f"{prefix}.experts.down_proj"] = experts["down_proj"].to(dtype)
    return moe


def _replace_directory(source: Path, target: Path) -> None:
    if not target.exists():
        os.rename(source, target)
        return
    backup = target.with_name(f"{target.name}.old-{os.getpid()}")
    os.rename(target, backup)
    os.rename(source, target)
    shutil.rmtree(backup, ignore_errors=True)
