"""The checkpoints a compose reads: the base and every expert source, opened lazily and checked to
share the base's architecture and shapes before anything is planned; the view of their tensors
the plan copies (the base's, or the elementwise mean over the experts' sources); and the expert
builder that gives routed expert e the FFN of source e.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from upcycle.checkpoint import LazyTensors, SourceCheckpoint, open_checkpoint
from upcycle.checkpoint.validate import check_architecture_matches_model_type, check_config_matches_tensors
from upcycle.compose.recipe import Recipe
from upcycle.errors import UpcycleError
from upcycle.experts import ExpertBuilder, LazyFFN
from upcycle.families.base import DenseMLPNames
from upcycle.families.configs import normalized_source_config

# Config fields every source must share with the base (after transformers fills in defaults):
# anything that changes a tensor's shape or what the FFN computes.
MATCHED_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "hidden_act",
    "mlp_bias",
    "attention_bias",
    "tie_word_embeddings",
)
CHECKED_WITH_BASE = ("model_type", "architectures")


@dataclass
class OpenedSources:
    """The base and the expert sources, each distinct (source, revision) opened once."""

    base: SourceCheckpoint
    base_config: dict  # normalized (transformers defaults filled in)
    experts: list[SourceCheckpoint]  # one per routed expert, in recipe order (repeats share an object)
    distinct: list[SourceCheckpoint] = field(default_factory=list)  # the experts' distinct sources, in order


def _open(label: str, source: str, revision: str | None, base: SourceCheckpoint | None = None) -> SourceCheckpoint:
    try:
        checkpoint = open_checkpoint(source, revision=revision)
        # The check reads transformers' auto mappings (about a second); a source that names the
        # base's model_type and architectures was checked with the base.
        same = base is not None and all(checkpoint.config.get(k) == base.config.get(k) for k in CHECKED_WITH_BASE)
        if not same:
            check_architecture_matches_model_type(checkpoint.config, checkpoint.name)
    except UpcycleError as err:
        raise UpcycleError(f"{label}: {err}") from None
    return checkpoint


def _check_same_shape(label: str, checkpoint: SourceCheckpoint, config: dict, base: OpenedSources) -> None:
    """Refuse a source whose architecture, config shapes or tensor shapes differ from the base's.

    Raises:
        UpcycleError: naming the source and the first field or tensor that differs, with both values.
    """
    for key in MATCHED_FIELDS:
        mine, theirs = config.get(key), base.base_config.get(key)
        if mine != theirs:
            raise UpcycleError(
                f"{label} {checkpoint.name}: {key} is {mine!r} but the base {base.base.name} has {theirs!r}; "
                "every source must share the base's architecture and shapes"
            )
    try:
        check_config_matches_tensors(checkpoint, config)
    except UpcycleError as err:
        raise UpcycleError(f"{label}: {err}") from None
    base_tensors, tensors = base.base.tensors, checkpoint.tensors
    missing = [name for name in base_tensors.keys() if name not in tensors]
    if missing:
        raise UpcycleError(f"{label} {checkpoint.name} has no tensor {missing[0]}, which the base has")
    extra = [name for name in tensors.keys() if name not in base_tensors]
    if extra:
        raise UpcycleError(f"{label} {checkpoint.name} has a tensor {extra[0]} that the base lacks")
    for name in base_tensors.keys():
        if tensors.shape(name) != base_tensors.shape(name):
            raise UpcycleError(
                f"{label} {checkpoint.name}: {name} has shape {tensors.shape(name)} but "
                f"{base_tensors.shape(name)} in the base {base.base.name}"
            )


def open_sources(recipe: Recipe) -> OpenedSources:
    """Open the base and every expert source lazily (no weights read) and check they match.

    Raises:
        UpcycleError: a source is missing or unreadable, or differs from the base in model_type,
            a shape-bearing config field or a tensor shape (one line naming it).
    """
    base = _open(f"{recipe.where}: base", recipe.base, recipe.base_revision)
    opened = OpenedSources(base=base, base_config=normalized_source_config(base.config), experts=[])
    check_config_matches_tensors(base, opened.base_config)
    cache: dict[tuple[str, str | None], SourceCheckpoint] = {}
    for index, expert in enumerate(recipe.experts):
        key = (expert.source, expert.revision)
        if key not in cache:
            label = f"{recipe.where}: experts[{index}]"
            checkpoint = _open(label, expert.source, expert.revision, base)
            if checkpoint.config.get("model_type") != base.config.get("model_type"):
                raise UpcycleError(
                    f"{label} {checkpoint.name}: model_type is {checkpoint.config.get('model_type')!r} but the base "
                    f"{base.name} has {base.config.get('model_type')!r}; every source must share the base's "
                    "architecture and shapes"
                )
            _check_same_shape(label, checkpoint, normalized_source_config(checkpoint.config), opened)
            cache[key] = checkpoint
            opened.distinct.append(checkpoint)
        opened.experts.append(cache[key])
    return opened


class AveragedTensors:
    """The base's tensors as the plan sees them, with every tensor not in `from_base` replaced by the
    elementwise mean over `sources` (BTX's non-expert merge), computed when it is read.

    Names, shapes and dtypes are the base's (the sources were checked to agree). A mean is summed in
    float64 one source tensor at a time and returned in float64, so the plan's cast to the output
    dtype rounds once; memory is one float64 tensor plus the one being read.
    """

    def __init__(self, base: LazyTensors, sources: list[LazyTensors], from_base: set[str]):
        self._base = base
        self._sources = sources
        self._from_base = from_base

    def keys(self) -> list[str]:
        """Return every tensor name of the base, sorted."""
        return self._base.keys()

    def __contains__(self, name: object) -> bool:
        return name in self._base

    def __len__(self) -> int:
        return len(self._base)

    def shape(self, name: str) -> tuple[int, ...]:
        """Return the base's shape of `name`."""
        return self._base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        """Return the base's dtype of `name`."""
        return self._base.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        """Return the base's tensor `name` (for `from_base` names and integer tensors), else the mean."""
        if name in self._from_base or not self._base.dtype(name).is_floating_point:
            return self._base.get(name)
        total = None
        for source in self._sources:
            tensor = source.get(name).to(torch.float64)
            total = tensor if total is None else total.add_(tensor)
            del tensor
        return total.div_(len(self._sources))


def planning_checkpoint(opened: OpenedSources, non_expert: str, moe_layers: list[int], mlp: DenseMLPNames):
    """Return the checkpoint the plan reads: the base, or the base whose non-expert tensors are means.

    The MoE layers' dense FFN tensors always come from the base (they only feed a shared expert).
    """
    base = opened.base
    if non_expert == "base":
        return base
    from_base = {template.format(layer=layer) for layer in moe_layers for template in (mlp.gate, mlp.up, mlp.down)}
    tensors = AveragedTensors(base.tensors, [source.tensors for source in opened.distinct], from_base)
    return SourceCheckpoint(
        path=base.path, name=base.name, config=base.config, tensors=tensors, extra_files=base.extra_files
    )


@dataclass
class SourceExperts(ExpertBuilder):
    """Routed expert e of every MoE layer is the dense FFN of expert source e, copied bit for bit;
    with `shared_base`, the base's whole FFN is the always-on shared expert (else it has width 0).

    The `dense` FFN the plan passes in is the base's: it feeds only the shared expert.
    """

    sources: list[LazyTensors] = field(default_factory=list)
    mlp: DenseMLPNames = field(default_factory=DenseMLPNames)
    shared_base: bool = False

    def __post_init__(self):
        self.method = "compose"

    def units(self) -> int:
        return 1

    def expert_size(self, dense_size: int) -> int:
        return dense_size

    def shared_size(self, dense_size: int) -> int:
        return dense_size if self.shared_base else 0

    def routed_dense(self, dense: LazyFFN) -> LazyFFN:
        return dense

    def routed_projection(self, name: str, layer: int, expert: int, dense: LazyFFN) -> torch.Tensor:
        return self.sources[expert].get(getattr(self.mlp, name).format(layer=layer))

    def settings(self) -> dict:
        return {"method": self.method, "shared_expert": "base" if self.shared_base else "none"}
