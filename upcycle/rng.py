"""Random generators derived from `--seed` and a key, so results do not depend on visit order."""

from __future__ import annotations

import hashlib

import torch

# Every random draw of a writer comes from `derived_generator`; provenance records this name as
# `seed_scheme` (before it, random routers and DARE masks used linear formulas that could collide).
SEED_SCHEME = "sha256"


def derived_generator(seed: int, *key: object) -> torch.Generator:
    """Return a CPU generator seeded from `seed` and `key` (e.g. "drop", layer, expert).

    Each key gets its own stream: the same (seed, key) always yields the same numbers, whatever
    else was drawn before, so tensors can be computed in any order (or in parallel).
    """
    digest = hashlib.sha256(repr((int(seed), *key)).encode()).digest()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return generator
