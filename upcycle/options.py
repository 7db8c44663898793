"""Reading and checking the options a conversion is given, before anything is read or written."""

from __future__ import annotations

import re

from upcycle.errors import UpcycleError


def parse_moe_layers(spec: str | list[int], num_layers: int) -> list[int]:
    """Return the sorted MoE layer indices that `spec` names: "all", "every:N" (layers N-1, 2N-1,
    ..., as transformers' decoder_sparse_step), "0,4,8", "0-3", or a list of ints.

    Raises:
        UpcycleError: the spec cannot be read, names a layer out of range, or selects none.
    """
    if isinstance(spec, (list, tuple)):
        layers = {int(layer) for layer in spec}
    elif spec.strip() == "all":
        layers = set(range(num_layers))
    elif spec.strip().startswith("every:"):
        step = spec.strip()[len("every:") :]
        if not step.isdigit() or int(step) < 1:
            raise UpcycleError(f"cannot read --moe-layers {spec!r}: every:N needs a positive N, e.g. every:2")
        layers = set(range(int(step) - 1, num_layers, int(step)))
    else:
        layers = set()
        for part in spec.split(","):
            match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if not match:
                raise UpcycleError(f"cannot read --moe-layers {spec!r}: use all, every:N, or indices like 0,4,8 or 0-3")
            first, last = int(match.group(1)), int(match.group(2) or match.group(1))
            layers.update(range(first, last + 1))
    outside = sorted(layer for layer in layers if not 0 <= layer < num_layers)
    if outside:
        raise UpcycleError(f"--moe-layers names layers {outside}; the model has layers 0-{num_layers - 1}")
    if not layers:
        raise UpcycleError(f"--moe-layers {spec!r} selects no layer")
    return sorted(layers)
