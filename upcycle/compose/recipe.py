"""The compose recipe: a YAML file (or a dict) naming the base, the expert sources and the router
initialisation, read and checked in full before any checkpoint is opened.

Every key is known (an unknown one is named in the error, with where it sits), every value is
checked for its type and range, and every combination that would be ignored silently (prompts with
a random router, data without kmeans) is refused, each in one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from upcycle.errors import UpcycleError

NON_EXPERT_MODES = ("base", "average")
ROUTER_INITS = ("hidden", "cheap_embed", "random", "kmeans")
SHARED_EXPERT_MODES = ("base", "none")
TOP_LEVEL_KEYS = (
    "base",
    "base_revision",
    "non_expert",
    "target",
    "top_k",
    "router_init",
    "router_std",
    "shared_expert",
    "data_samples",
    "max_length",
    "experts",
)
EXPERT_KEYS = ("source", "revision", "positive_prompts", "negative_prompts", "data")


@dataclass(frozen=True)
class ExpertSpec:
    """One routed expert: the checkpoint whose FFNs it takes, and what its router row is made of."""

    source: str
    revision: str | None = None
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    data: str | None = None


@dataclass(frozen=True)
class Recipe:
    """A checked compose recipe (see README "upcycle compose" for each key)."""

    base: str
    experts: tuple[ExpertSpec, ...]
    base_revision: str | None = None
    non_expert: str = "base"
    target: str = "auto"
    top_k: int = 2
    router_init: str = "hidden"
    router_std: float | None = None
    shared_expert: str = "none"
    data_samples: int = 128
    max_length: int = 256
    where: str = field(default="recipe", compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Return the recipe as JSON-ready data (for provenance), defaults filled in."""
        return {
            "base": self.base,
            "base_revision": self.base_revision,
            "non_expert": self.non_expert,
            "target": self.target,
            "top_k": self.top_k,
            "router_init": self.router_init,
            "router_std": self.router_std,
            "shared_expert": self.shared_expert,
            "experts": [
                {
                    "source": expert.source,
                    "revision": expert.revision,
                    "positive_prompts": list(expert.positive_prompts),
                    "negative_prompts": list(expert.negative_prompts),
                    "data": expert.data,
                }
                for expert in self.experts
            ],
        }


def _text(where: str, key: str, value: Any, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if isinstance(value, Path):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise UpcycleError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return value


def _prompts(where: str, key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) and item.strip() for item in value):
        raise UpcycleError(f"{where}: {key} must be a list of non-empty strings, got {value!r}")
    return tuple(value)


def _count(where: str, key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UpcycleError(f"{where}: {key} must be a whole number of at least {minimum}, got {value!r}")
    return value


def _choice(where: str, key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UpcycleError(f"{where}: {key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _check_keys(where: str, data: dict, known: tuple[str, ...]) -> None:
    unknown = [key for key in data if key not in known]
    if unknown:
        raise UpcycleError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(known)}")


def _expert(where: str, entry: Any) -> ExpertSpec:
    if isinstance(entry, str):
        entry = {"source": entry}
    if not isinstance(entry, dict):
        raise UpcycleError(f"{where}: must be a mapping with a source, got {entry!r}")
    _check_keys(where, entry, EXPERT_KEYS)
    if "source" not in entry:
        raise UpcycleError(f"{where}: has no source (a local checkpoint directory or a Hub model id)")
    return ExpertSpec(
        source=_text(where, "source", entry["source"]),
        revision=_text(where, "revision", entry.get("revision"), optional=True),
        positive_prompts=_prompts(where, "positive_prompts", entry.get("positive_prompts")),
        negative_prompts=_prompts(where, "negative_prompts", entry.get("negative_prompts")),
        data=_text(where, "data", entry.get("data"), optional=True),
    )


def _check_router_inputs(recipe: Recipe) -> None:
    """Refuse router inputs the chosen router_init would ignore, and missing ones it needs."""
    where, init = recipe.where, recipe.router_init
    for index, expert in enumerate(recipe.experts):
        at = f"{where}: experts[{index}] ({expert.source})"
        has_prompts = bool(expert.positive_prompts or expert.negative_prompts)
        if init in ("random", "kmeans") and has_prompts:
            raise UpcycleError(
                f"{at} has prompts, which router_init {init} does not use; remove them or use router_init hidden "
                "or cheap_embed"
            )
        if init in ("hidden", "cheap_embed") and not expert.positive_prompts:
            raise UpcycleError(f"{at} has no positive_prompts, which router_init {init} needs")
        if init != "kmeans" and expert.data is not None:
            raise UpcycleError(f"{at} has data, which only router_init kmeans uses; remove it or use kmeans")
        if init == "kmeans" and expert.data is None:
            raise UpcycleError(
                f"{at} has no data, which router_init kmeans needs (its row is the mean FFN input on that data)"
            )


def parse_recipe(data: Any, where: str = "recipe") -> Recipe:
    """Return the checked `Recipe` that the mapping `data` describes (`where` names it in errors).

    Raises:
        UpcycleError: one line naming the key: unknown keys, missing base/experts, bad values,
            fewer experts than top_k, or router inputs that the router_init would ignore or lacks.
    """
    if not isinstance(data, dict):
        raise UpcycleError(f"{where}: must be a mapping with base and experts, got {type(data).__name__}")
    _check_keys(where, data, TOP_LEVEL_KEYS)
    if "base" not in data:
        raise UpcycleError(f"{where}: has no base (the checkpoint attention, norms and embeddings come from)")
    experts = data.get("experts")
    if not isinstance(experts, list) or not experts:
        raise UpcycleError(f"{where}: experts must be a non-empty list of {{source: ...}} entries")
    specs = tuple(_expert(f"{where}: experts[{index}]", entry) for index, entry in enumerate(experts))
    top_k = _count(where, "top_k", data.get("top_k", 2))
    if top_k > len(specs):
        raise UpcycleError(f"{where}: top_k is {top_k} but the recipe lists only {len(specs)} experts")
    router_std = data.get("router_std")
    if router_std is not None and (
        isinstance(router_std, bool) or not isinstance(router_std, (int, float)) or not 0 <= router_std < math.inf
    ):
        raise UpcycleError(f"{where}: router_std must be a finite number of at least 0, got {router_std!r}")
    shared = data.get("shared_expert", "none")
    recipe = Recipe(
        base=_text(where, "base", data["base"]),
        base_revision=_text(where, "base_revision", data.get("base_revision"), optional=True),
        experts=specs,
        non_expert=_choice(where, "non_expert", data.get("non_expert", "base"), NON_EXPERT_MODES),
        target=_text(where, "target", data.get("target", "auto")),
        top_k=top_k,
        router_init=_choice(where, "router_init", data.get("router_init", "hidden"), ROUTER_INITS),
        router_std=None if router_std is None else float(router_std),
        shared_expert=_choice(where, "shared_expert", "none" if shared is None else shared, SHARED_EXPERT_MODES),
        data_samples=_count(where, "data_samples", data.get("data_samples", 128)),
        max_length=_count(where, "max_length", data.get("max_length", 256)),
        where=where,
    )
    if recipe.router_std is not None and recipe.router_init != "random":
        raise UpcycleError(f"{where}: router_std only applies to router_init random")
    if recipe.target == "generic":
        raise UpcycleError(f"{where}: compose writes stock MoE checkpoints; target generic is not supported")
    _check_router_inputs(recipe)
    return recipe


def load_recipe(recipe: str | Path | dict) -> Recipe:
    """Return the checked recipe from a YAML file path, or from a dict already loaded.

    Raises:
        UpcycleError: the file is missing, not YAML, or the recipe is invalid (`parse_recipe`).
    """
    if isinstance(recipe, dict):
        return parse_recipe(recipe)
    import yaml

    path = Path(recipe)
    if not path.is_file():
        raise UpcycleError(f"recipe {path} does not exist (a YAML file with base and experts)")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        detail = " ".join(str(err).split())
        raise UpcycleError(f"recipe {path} is not valid YAML: {detail}") from None
    return parse_recipe(data, where=str(path))
