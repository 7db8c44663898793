"""Errors raised by mope: all are `UpcycleError`s (one-line CLI message, exit 2) and `ValueError`s
(what PEFT users catch for a bad config)."""

from __future__ import annotations

from upcycle.errors import UpcycleError


class MoPEError(UpcycleError, ValueError):
    """A MoPE configuration or model that cannot be used as asked; the message names the fix."""


class MoPEConfigError(MoPEError):
    """A `MoPEConfig` value, or its combination with the base model, is invalid."""


class MoPEMergeError(MoPEError):
    """An adapter routes per token, so folding it into the base weights would change the model."""


class MoPEExportError(MoPEError):
    """A MoPE model that has no exact stock-MoE equivalent (routing, router kind, targets, family)."""


class MoPELoadError(MoPEError):
    """A saved MoPE adapter whose weights do not match its adapter_config.json (or the base model)."""
