"""Where the FFNs of a Hugging Face model are: a small table per model family, or a user's regex.

An FFN *site* is the module that the MoE block replaces. Most architectures keep the whole FFN
in one module (``mlp``); BERT-style encoders split it in two (``intermediate``: up projection and
activation; ``output``: down projection, dropout, residual and LayerNorm), so their site also
names the down projection, which becomes an identity once the MoE at ``intermediate`` computes
the whole FFN.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from upcycle.errors import UpcycleError, flag

__all__ = ["FFN_SITES", "FFNSite", "FoundSite", "SplitFFN", "find_sites", "site_for"]


@dataclass(frozen=True)
class FFNSite:
    """How to find a family's FFNs.

    Attributes:
        pattern: regex searched in each module's dotted name (``re.search``); a match is a site.
            Patterns are not anchored at the start, so they match in a base model and in a model
            with a head alike (``encoder.layer.0...`` and ``bert.encoder.layer.0...``).
        down: for split FFNs, the down projection's path relative to the site's parent module
            (``"output.dense"`` in BERT); None when the site holds the whole FFN.
    """

    pattern: str
    down: str | None = None


_DECODER_MLP = FFNSite(r"(^|\.)layers\.\d+\.mlp$")
_BERT_LIKE = FFNSite(r"(^|\.)layer\.\d+\.intermediate$", down="output.dense")

# model_type -> site. Llama-likes, Gemma, Phi (fc1/fc2) and Phi-3 (fused gate_up) all keep their
# FFN at `model.layers.N.mlp` (ViT at `vit.layers.N.mlp`); GPT-2 at `transformer.h.N.mlp`; BERT-likes split it.
FFN_SITES: dict[str, FFNSite] = {
    **{
        model_type: _DECODER_MLP
        for model_type in (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "granite",
            "olmo",
            "olmo2",
            "gemma",
            "gemma2",
            "phi",
            "phi3",
            "stablelm",
            "starcoder2",
            "cohere",
        )
    },
    "gpt2": FFNSite(r"(^|\.)h\.\d+\.mlp$"),
    "gpt_neox": FFNSite(r"(^|\.)layers\.\d+\.mlp$"),
    "gptj": FFNSite(r"(^|\.)h\.\d+\.mlp$"),
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "vit": _DECODER_MLP,  # transformers 5 ViT: vit.layers.N.mlp (fc1/fc2)
}

# Attribute names of the activation on BERT-style `intermediate` modules.
_SPLIT_ACTIVATIONS = ("intermediate_act_fn", "act_fn", "activation")


class SplitFFN(nn.Module):
    """A view of a split FFN (BERT's ``intermediate.dense`` + ``output.dense``) as one plain MLP
    with ``fc1``/``fc2``/``act_fn``, so that `upcycle.moe.read_dense_ffn` reads it like any other."""

    def __init__(self, fc1: nn.Module, fc2: nn.Module, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fc1 = fc1
        self.fc2 = fc2
        self.act_fn = act_fn


@dataclass
class FoundSite:
    """One FFN found in a model.

    Attributes:
        name: the site module's dotted name.
        ffn: the module to read the dense FFN from (the site itself, or a `SplitFFN` view).
        down_name: the dotted name of the down projection to replace by an identity, or None.
    """

    name: str
    ffn: nn.Module
    down_name: str | None


def site_for(model_type: str, ffn_pattern: str | None = None) -> FFNSite:
    """Return the FFN site of ``model_type``, or one from a user's regex.

    Args:
        model_type: the source config's ``model_type``.
        ffn_pattern: a regex (``re.search`` on module names) that overrides the table.

    Raises:
        UpcycleError: the regex does not compile, or the family is not in the table and no regex was given.
    """
    if ffn_pattern is not None:
        try:
            re.compile(ffn_pattern)
        except re.error as err:
            raise UpcycleError(f"{flag('ffn_pattern')} {ffn_pattern!r} is not a valid regex ({err})") from None
        return FFNSite(ffn_pattern)
    if model_type not in FFN_SITES:
        raise UpcycleError(
            f"upcycle does not know where the FFNs of model_type {model_type!r} are; pass {flag('ffn_pattern')} REGEX "
            f"matching their module names (e.g. '\\.mlp$'). Known families: {', '.join(sorted(FFN_SITES))}"
        )
    return FFN_SITES[model_type]


def _split_view(model: nn.Module, name: str, site: FFNSite) -> tuple[nn.Module, str]:
    parent_name = name.rpartition(".")[0]
    down_name = f"{parent_name}.{site.down}" if parent_name else site.down
    intermediate = model.get_submodule(name)
    try:
        down = model.get_submodule(down_name)
    except AttributeError:
        raise UpcycleError(f"{name} is an FFN site but its down projection {down_name} does not exist") from None
    fc1 = next((module for module in intermediate.children() if isinstance(module, nn.Linear)), None)
    activation = next((getattr(intermediate, a) for a in _SPLIT_ACTIVATIONS if hasattr(intermediate, a)), None)
    if fc1 is None or activation is None:
        raise UpcycleError(f"{name} ({type(intermediate).__name__}) has no linear layer and activation to upcycle")
    return SplitFFN(fc1, down, activation), down_name


def find_sites(model: nn.Module, site: FFNSite) -> list[FoundSite]:
    """Return every FFN of ``model`` that ``site`` matches, in module order.

    Raises:
        UpcycleError: nothing matches (the message lists the modules that look like FFNs).
    """
    regex = re.compile(site.pattern)
    found = []
    for name, module in model.named_modules():
        if not name or not regex.search(name):
            continue
        if site.down is None:
            found.append(FoundSite(name, module, None))
        else:
            ffn, down_name = _split_view(model, name, site)
            found.append(FoundSite(name, ffn, down_name))
    if not found:
        hints = [name for name, _ in model.named_modules() if re.search(r"mlp|ffn|feed_forward|intermediate", name)]
        raise UpcycleError(
            f"no module of {type(model).__name__} matches the FFN pattern {site.pattern!r}; "
            f"modules that look like FFNs: {', '.join(hints[:6]) or '(none)'}; pass {flag('ffn_pattern')} REGEX"
        )
    return found
