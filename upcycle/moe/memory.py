"""Activation memory: what a forward keeps for its backward."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["saved_activation_bytes"]


def saved_activation_bytes(module: nn.Module, *inputs: torch.Tensor, **kwargs: object) -> int:
    """Run ``module(*inputs, **kwargs)`` once and measure the activations autograd keeps for backward.

    Counts each distinct storage handed to autograd once (a view keeps its whole storage alive),
    leaving out the module's parameters and the inputs, which live anyway.

    Returns:
        The bytes of those storages.
    """
    live = {tensor.untyped_storage().data_ptr() for tensor in (*module.parameters(), *inputs)}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in live:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(*inputs, **kwargs)
    return sum(storages.values())
