"""Recipe configuration: a YAML file of nested sections, dotted command-line overrides, validation.

Every key a recipe reads is a dataclass field below, so an unknown or mistyped key, a value of the
wrong type or a value outside its choices fails at load time with one line that names the key.
``load_config(path, ["train.lr=1e-4", "model.upcycle.experts=4"])`` returns a `RecipeConfig`.

Why a hand-written engine (``_coerce``, ``_build``, ``_set_dotted``: about 100 lines) rather than a
schema library. Measured with pydantic 2.13 on these same dataclasses (``extra="forbid"``):

- pydantic is not a dependency of upcycle nor of anything upcycle depends on (it is installed in
  the dev environment through unrelated tools); it would add pydantic and the compiled
  pydantic-core, about 9 MB installed, for one YAML file.
- Its error for ``train.max_steps=many`` is four lines (``1 validation error for RecipeConfig`` /
  ``train.max_steps`` / ``Input should be a valid integer, unable to parse string as an integer
  [type=int_parsing, ...]`` / a documentation URL); a typo such as ``train.lrr`` gives
  ``Unexpected keyword argument`` without the keys that exist. The one-line ``<key>: <problem>``
  messages this module gives (``train.lrr: unknown key; known keys here: seed, lr, ...``) would need
  a translation layer over pydantic's error types anyway.
- Its default (lax) mode accepts ``max_steps: "3"`` as 3 and ``gradient_checkpointing: "yes"`` as
  True, which a typed config should refuse; strict mode refuses ``lr: 1e-4`` (YAML 1.1 reads it as a
  string) and even the nested section mappings (``dataclass_exact_type``), so every field would need
  its own annotation. Choices would become ``Literal`` types: the code moves, it does not go away.
- jsonschema (also not a dependency) would mean writing the schema a second time beside the
  dataclasses. The cross-field rules (`check_values`) stay hand-written with any library.

Revisit if the config needs what `_coerce` does not handle (unions of sections, custom types).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from upcycle.errors import UpcycleError

MODES = ("full", "lora", "mope", "router_only", "experts_only", "pattern")
DATA_FORMATS = ("text", "prompt_completion", "chat")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
MIXED_PRECISION = ("no", "fp16", "bf16")
TRACKERS = ("tensorboard", "wandb")
EXPORTS = ("none", "moe", "dense")


class ConfigError(UpcycleError):
    """A recipe config problem; the message starts with the offending key."""


def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclass
class UpcycleSection:
    """Convert the dense `model.path` with `upcycle.convert` before training (Sparse Upcycling)."""

    experts: int = 8
    top_k: int = 2
    target: str = "auto"
    layout: str | None = None
    seed: int = 0
    router_std: float | None = None
    # Further `upcycle.convert` keyword arguments (e.g. method, granularity, router_init).
    options: dict = field(default_factory=dict)


@dataclass
class LoraSection:
    """`peft.LoraConfig` fields for ``model.mode: lora``."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str | None = "all-linear"
    # Fused expert tensors (transformers-5 MoE: mlp.experts.gate_up_proj / down_proj) are
    # parameters, not modules: LoRA reaches them through target_parameters.
    target_parameters: list[str] | None = None


@dataclass
class ModelSection:
    """``model``: what to train. ``path`` (local dir or Hub id), ``revision``, ``tokenizer`` (default:
    the model's), ``dtype`` of the loaded weights (keep float32 master weights with mixed precision),
    ``mode`` (full, lora, mope, router_only, experts_only, pattern with ``trainable_patterns``),
    ``upcycle`` (convert first), ``lora`` / ``mope`` (adapter options), ``gradient_checkpointing``,
    ``attn_implementation``, ``trust_remote_code`` (off unless you ask)."""

    path: str = ""
    revision: str | None = None
    tokenizer: str | None = None
    dtype: str = field(default="float32", metadata=_choices("float32", "bfloat16", "float16", "auto"))
    mode: str = field(default="full", metadata=_choices(*MODES))
    trainable_patterns: list[str] = field(default_factory=list)
    upcycle: UpcycleSection | None = None
    lora: LoraSection = field(default_factory=LoraSection)
    mope: dict = field(default_factory=dict)
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None
    trust_remote_code: bool = False


@dataclass
class DataSection:
    """``data``: ``train`` / ``eval`` (local text/jsonl/json/parquet/csv file, directory or Hub id),
    ``subset``, ``split``, ``eval_split`` or ``eval_fraction`` (held out of train), ``format`` (text:
    packed when ``packing``; prompt_completion; chat), the field names, ``seq_len``, ``max_samples``,
    ``num_proc`` for tokenization."""

    train: str = ""
    eval: str | None = None
    eval_fraction: float = 0.05
    subset: str | None = None
    split: str = "train"
    eval_split: str | None = None
    format: str = field(default="text", metadata=_choices(*DATA_FORMATS))
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    seq_len: int = 1024
    packing: bool = True
    max_samples: int | None = None
    num_proc: int | None = None


@dataclass
class MoESection:
    """Router training knobs; written into the model's own config fields where it has them.
    ``bias_update_rate`` (0: off) turns on DeepSeek-V3 auxiliary-loss-free balancing for models whose
    routers carry an ``e_score_correction_bias`` (glm4_moe, DeepSeek-V3): after each optimizer step
    each bias moves by this much towards the experts loaded below the mean (`upcycle.training.balancing`)."""

    aux_loss_coef: float | None = None
    z_loss_coef: float = 0.0
    router_jitter: float = 0.0
    capacity_factor: float | None = 1.25
    bias_update_rate: float = 0.0


@dataclass
class TrainSection:
    """``train``: AdamW (``lr``, ``weight_decay``, betas, epsilon), ``lr_scheduler`` with
    ``warmup_steps`` or ``warmup_ratio``, length (``max_steps`` or ``epochs``), batch
    (``per_device_batch_size`` x processes x ``gradient_accumulation_steps``), ``max_grad_norm``
    (null: no clipping), ``mixed_precision``, ``seed``."""

    seed: int = 0
    lr: float = 2e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    lr_scheduler: str = field(default="cosine", metadata=_choices(*SCHEDULERS))
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_steps: int | None = None
    epochs: int = 1
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    mixed_precision: str = field(default="no", metadata=_choices(*MIXED_PRECISION))


@dataclass
class EvalSection:
    """``eval``: perplexity every ``every_steps`` (0: only at the end), ``at_start``, ``batch_size``,
    ``max_examples`` of the eval set."""

    every_steps: int = 0
    at_start: bool = True
    batch_size: int | None = None
    max_examples: int | None = None


@dataclass
class CheckpointSection:
    """``checkpoint``: ``save_state`` every ``every_steps`` (0: never), keeping ``total_limit``."""

    every_steps: int = 0
    total_limit: int | None = 3


@dataclass
class LoggingSection:
    """``logging``: a record every ``every_steps`` to metrics.jsonl and the ``report_to`` trackers
    (tensorboard, wandb; [] for none) under ``project`` / ``run_name``; ``router_metrics``."""

    every_steps: int = 10
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    project: str = "upcycle"
    run_name: str | None = None
    router_metrics: bool = True


@dataclass
class OutputSection:
    """``output``: ``dir`` (checkpoints, logs, final), ``overwrite`` an earlier run, ``export`` (moe:
    MoPE -> Mixtral; dense: `upcycle.merge` with ``merge`` options), ``push_to_hub`` repo id, ``private``."""

    dir: str = ""
    overwrite: bool = False
    export: str = field(default="none", metadata=_choices(*EXPORTS))
    # `upcycle.merge` settings for export: dense (e.g. {method: frequency, calibration: data.jsonl}).
    merge: dict = field(default_factory=lambda: {"method": "average"})
    push_to_hub: str | None = None
    private: bool = True


@dataclass
class RecipeConfig:
    """The whole recipe: one dataclass per YAML section."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    moe: MoESection = field(default_factory=MoESection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    output: OutputSection = field(default_factory=OutputSection)

    def to_dict(self) -> dict:
        """Return the whole config as nested plain dicts (for trackers and the saved run config)."""
        return dataclasses.asdict(self)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> type | None:
    """Return the dataclass inside `tp` (``Section`` or ``Section | None``), else None."""
    for candidate in typing.get_args(tp) or (tp,):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return `value` converted to the annotated type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as err:
                errors.append(err)
        raise errors[-1]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        # YAML 1.1 reads `1e-4` (no dot) as a string: accept any number a user would write.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        (item_type,) = typing.get_args(tp)
        if isinstance(value, list):
            return [_coerce(f"{key}[{i}]", item, item_type) for i, item in enumerate(value)]
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{key}: expected {name}, got {value!r}")


def _build(cls: type, values: Any, prefix: str) -> Any:
    """Return an instance of the dataclass `cls` filled from the dict `values`, validated."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _field_types(cls)
    for key in values:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"{where}: unknown key; known keys here: {', '.join(fields)}")
    kwargs = {}
    for name, spec in fields.items():
        if name not in values:
            continue
        key = f"{prefix}.{name}" if prefix else name
        section = _is_section(hints[name])
        value = values[name]
        if section is not None:
            kwargs[name] = None if value is None and _optional(hints[name]) else _build(section, value, key)
            continue
        value = _coerce(key, value, hints[name])
        choices = spec.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
        kwargs[name] = value
    return cls(**kwargs)


def _optional(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Return ``(dotted_key, value)`` from ``key=value``; the value is read as YAML (``true``, ``[a, b]``).

    Raises:
        ConfigError: no ``=`` or an empty key.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--override {text!r}: expected key=value, e.g. train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def config_from_dict(values: dict, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
    """Return a validated `RecipeConfig` from nested dicts plus dotted ``key=value`` overrides.

    Raises:
        ConfigError: an unknown key, a wrong type, a value outside its choices or range, or a
            required key left empty; the message starts with the key.
    """
    tree = copy.deepcopy(values or {})  # overrides must not leak into the caller's dicts
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    config = _build(RecipeConfig, tree, "")
    check_values(config)
    return config


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
    """Read the YAML recipe at `path`, apply `overrides` and return the validated `RecipeConfig`.

    Raises:
        ConfigError: the file is missing or not YAML, or any problem `config_from_dict` reports.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model, data, train, ...)")
    return config_from_dict(values or {}, overrides)


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def check_values(config: RecipeConfig) -> None:
    """Check ranges and cross-field rules that types alone do not catch.

    Raises:
        ConfigError: naming the first offending key.
    """
    _require(bool(config.model.path), "model.path", "required: a local model directory or a Hub model id")
    _require(bool(config.data.train), "data.train", "required: a local text/jsonl/parquet file or a Hub dataset id")
    _require(bool(config.output.dir), "output.dir", "required: the directory for checkpoints and the final model")
    train = config.train
    _require(train.lr > 0, "train.lr", f"must be > 0, got {train.lr}")
    _require(train.per_device_batch_size >= 1, "train.per_device_batch_size", "must be >= 1")
    _require(train.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps", "must be >= 1")
    _require(train.max_steps is None or train.max_steps >= 1, "train.max_steps", "must be >= 1 (or null: use epochs)")
    _require(train.epochs >= 1, "train.epochs", "must be >= 1")
    _require(train.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    _require(0.0 <= train.warmup_ratio < 1.0, "train.warmup_ratio", "must be in [0, 1)")
    _require(
        train.max_grad_norm is None or train.max_grad_norm > 0,
        "train.max_grad_norm",
        "must be > 0 (or null: no clipping)",
    )
    _require(config.data.seq_len >= 2, "data.seq_len", "must be >= 2")
    _require(0.0 <= config.data.eval_fraction < 1.0, "data.eval_fraction", "must be in [0, 1)")
    _require(config.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0 (0: no checkpoints)")
    _require(
        config.checkpoint.total_limit is None or config.checkpoint.total_limit >= 1,
        "checkpoint.total_limit",
        "must be >= 1 (or null: keep all)",
    )
    _require(config.eval.every_steps >= 0, "eval.every_steps", "must be >= 0 (0: only at the end)")
    _require(config.logging.every_steps >= 1, "logging.every_steps", "must be >= 1")
    for tracker in config.logging.report_to:
        _require(tracker in TRACKERS, "logging.report_to", f"{tracker!r} is not one of {', '.join(TRACKERS)}")
    moe = config.moe
    _require(moe.aux_loss_coef is None or moe.aux_loss_coef >= 0, "moe.aux_loss_coef", "must be >= 0")
    _require(moe.z_loss_coef >= 0, "moe.z_loss_coef", "must be >= 0")
    _require(0.0 <= moe.router_jitter < 1.0, "moe.router_jitter", "must be in [0, 1)")
    _require(moe.capacity_factor is None or moe.capacity_factor > 0, "moe.capacity_factor", "must be > 0 or null")
    _require(
        0.0 <= moe.bias_update_rate < math.inf,
        "moe.bias_update_rate",
        f"must be a finite number >= 0 (0: off), got {moe.bias_update_rate}",
    )
    mode = config.model.mode
    _require(
        mode != "pattern" or bool(config.model.trainable_patterns),
        "model.trainable_patterns",
        "mode 'pattern' needs at least one regex of parameter names to train",
    )
    _require(
        mode == "mope" or not config.model.mope,
        "model.mope",
        f"set only with model.mode: mope (mode is {mode!r})",
    )
    _require(
        config.output.export != "moe" or mode == "mope",
        "output.export",
        "'moe' exports a block-routed MoPE adapter; it needs model.mode: mope",
    )
    _require(
        config.output.export != "dense" or mode not in ("lora", "mope"),
        "output.export",
        "'dense' merges a trained MoE checkpoint; with an adapter (lora, mope) there is none to merge",
    )
    _require(
        not moe.bias_update_rate or mode not in ("lora", "mope"),
        "moe.bias_update_rate",
        f"the router biases live in the base model, which a {mode} adapter does not save; "
        "use mode full, router_only, experts_only or pattern",
    )
    for key in ("aux_loss_coef", "z_loss_coef", "router_noise"):
        _require(
            key not in config.model.mope,
            f"model.mope.{key}",
            "set the router losses and noise in the moe section (moe.aux_loss_coef, moe.z_loss_coef, "
            "moe.router_jitter) so one knob drives MoE and MoPE models",
        )
    if config.model.upcycle is not None:
        up = config.model.upcycle
        _require(up.experts >= 1, "model.upcycle.experts", "must be >= 1")
        _require(1 <= up.top_k <= up.experts, "model.upcycle.top_k", f"must be between 1 and experts ({up.experts})")
