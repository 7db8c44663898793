"""Checking that a checkpoint's config.json describes its tensors, before anything is planned.

A config whose sizes disagree with the stored weights (a hand-edited hidden size, a vocabulary
resized without the config, a layer missing from the shards) would otherwise give an output that
does not load, or a layer silently dropped. Every shape a converter reads is held against the
config here, and the first disagreement is reported in one line naming the field, the tensor and
both values. Tensor names are those of transformers' decoder-only models (`model.layers.N.*`);
tensors a family does not have are not checked.
"""

from __future__ import annotations

import re

from upcycle.checkpoint.read import SourceCheckpoint
from upcycle.errors import UpcycleError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _expected_shapes(config: dict, layer: int) -> dict[str, tuple[tuple[int, ...], str]]:
    hidden = int(config["hidden_size"])
    heads = int(config.get("num_attention_heads") or 0)
    head_dim = int(config.get("head_dim") or (hidden // heads if heads else 0))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    intermediate = config.get("intermediate_size")
    prefix = f"model.layers.{layer}."
    kv_fields = "num_key_value_heads x head_dim, hidden_size"
    shapes = {
        f"{prefix}self_attn.q_proj.weight": ((heads * head_dim, hidden), "num_attention_heads x head_dim, hidden_size"),
        f"{prefix}self_attn.k_proj.weight": ((kv_heads * head_dim, hidden), kv_fields),
        f"{prefix}self_attn.v_proj.weight": ((kv_heads * head_dim, hidden), kv_fields),
        f"{prefix}self_attn.o_proj.weight": ((hidden, heads * head_dim), "hidden_size, num_attention_heads x head_dim"),
    }
    if isinstance(intermediate, int):
        shapes |= {
            f"{prefix}mlp.gate_proj.weight": ((intermediate, hidden), "intermediate_size, hidden_size"),
            f"{prefix}mlp.up_proj.weight": ((intermediate, hidden), "intermediate_size, hidden_size"),
            f"{prefix}mlp.down_proj.weight": ((hidden, intermediate), "hidden_size, intermediate_size"),
        }
    return shapes


def check_config_matches_tensors(checkpoint: SourceCheckpoint, config: dict) -> None:
    """Check the layer count, vocabulary, hidden size, attention heads and FFN width that `config`
    (the source config, defaults filled in) declares against `checkpoint`'s tensor shapes.

    Raises:
        UpcycleError: the first disagreement, naming the config field, the tensor and both values.
    """
    tensors = checkpoint.tensors
    where = f"{checkpoint.name}: config.json"
    layers = sorted({int(match.group(1)) for name in tensors.keys() if (match := _LAYER.match(name))})
    declared = int(config.get("num_hidden_layers", 0))
    if layers and layers != list(range(declared)):
        missing = sorted(set(range(declared)) - set(layers))
        extra = sorted(set(layers) - set(range(declared)))
        detail = f"no tensors for layers {missing}" if missing else f"tensors for layers {extra} beyond them"
        raise UpcycleError(
            f"{where} says num_hidden_layers={declared} but the weights hold {detail}; fix config.json or the weights"
        )
    hidden, vocab = int(config["hidden_size"]), int(config.get("vocab_size") or 0)
    expected = {
        "model.embed_tokens.weight": ((vocab, hidden), "vocab_size, hidden_size"),
        "lm_head.weight": ((vocab, hidden), "vocab_size, hidden_size"),
    }
    for layer in layers:
        expected |= _expected_shapes(config, layer)
    for name, (shape, fields) in expected.items():
        if name in tensors and tensors.shape(name) != shape:
            raise UpcycleError(
                f"{where} gives {name} the shape {shape} ({fields}) but the weights hold {tensors.shape(name)}; "
                "fix config.json or the weights"
            )


def _model_types_by_class() -> dict[str, set[str]]:
    """Return {transformers model class name: the model types whose auto mappings name it}."""
    from transformers.models.auto import modeling_auto

    types: dict[str, set[str]] = {}
    for attribute in dir(modeling_auto):
        mapping = getattr(modeling_auto, attribute)
        if not attribute.endswith("_MAPPING_NAMES") or not isinstance(mapping, dict):
            continue
        for model_type, classes in mapping.items():
            for class_name in classes if isinstance(classes, (list, tuple)) else (classes,):
                types.setdefault(str(class_name), set()).add(model_type)
    return types


def check_architecture_matches_model_type(config: dict, name: str) -> None:
    """Refuse a config whose `architectures` name a class of another model type than `model_type`
    (e.g. model_type "llama" with "Qwen2ForCausalLM"): which one the weights follow is unknowable.

    A class belongs to the model types that transformers' auto mappings pair it with (Gemma 3's
    text-only checkpoints are model_type "gemma3_text" with "Gemma3ForCausalLM"; several model
    types use "LlamaForCausalLM"). A class transformers does not know (remote code, an old spelling
    such as "LLaMAForCausalLM") is not judged.

    Raises:
        UpcycleError: naming both fields.
    """
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if not model_type or not isinstance(architectures, list):
        return
    owners = _model_types_by_class()
    foreign = [arch for arch in architectures if str(arch) in owners and model_type not in owners[str(arch)]]
    if foreign:
        raise UpcycleError(
            f"{name}: config.json says model_type {model_type!r} but architectures {foreign}, a class of another "
            "model type; fix whichever of the two is wrong"
        )
