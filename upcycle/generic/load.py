"""`upcycle.load`: load anything upcycle writes, generic MoE checkpoints included, without remote code."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from upcycle.checkpoint import CONFIG_FILE, resolve_source
from upcycle.errors import MOPE_IMPORT_HINT, UpcycleError
from upcycle.generic.modeling import FORMAT, upcycled_class

__all__ = ["load"]

ADAPTER_CONFIG = "adapter_config.json"


def _peft_type(adapter_config: Path) -> str | None:
    try:
        return json.loads(adapter_config.read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return None


def load(path: str | Path, *, revision: str | None = None, auto_class: str | None = None, **kwargs) -> nn.Module:
    """Load a model written by upcycle (a local directory or a Hub id).

    A generic checkpoint becomes its source's transformers class with `upcycle.moe.MoE` FFNs, built
    in-process (no ``trust_remote_code``); any other checkpoint (a stock MoE, a merged dense model)
    loads with ``auto_class`` (default ``AutoModelForCausalLM``).

    Args:
        kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``...).

    Returns:
        The model, in eval mode as transformers returns it.

    Raises:
        UpcycleError: no config.json, or a generic checkpoint whose source class transformers lacks.
    """
    import transformers

    directory, _ = resolve_source(path, revision, extra_patterns=(ADAPTER_CONFIG,))
    config_path = directory / CONFIG_FILE
    if not config_path.is_file() and (directory / ADAPTER_CONFIG).is_file():
        if _peft_type(directory / ADAPTER_CONFIG) == "MOPE":
            raise UpcycleError(
                f"{path} is an adapter, not a model; {MOPE_IMPORT_HINT}, or export it as a model with "
                "`upcycle export ADAPTER OUTPUT`"
            )
        raise UpcycleError(f"{path} is a PEFT adapter, not a model; load it with PeftModel.from_pretrained")
    if not config_path.is_file():
        raise UpcycleError(f"{directory} has no config.json; is it a model directory written by upcycle?")
    section = json.loads(config_path.read_text()).get("upcycle")
    if isinstance(section, dict) and section.get("format") == FORMAT:
        base = getattr(transformers, section.get("source_architecture", ""), None)
        if base is None:
            raise UpcycleError(
                f"{directory} was upcycled from {section.get('source_architecture')!r}, which this transformers "
                f"({transformers.__version__}) does not have; install the version it was made with"
            )
        return upcycled_class(base).from_pretrained(directory, **kwargs)
    loader = getattr(transformers, auto_class or "AutoModelForCausalLM")
    return loader.from_pretrained(directory, **kwargs)
