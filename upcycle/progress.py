"""Progress bars: ours are tqdm's (`progress`), and `progress_bars` turns transformers' own
loading/saving bars off when quiet."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

Item = TypeVar("Item")


def progress(iterable: Iterable[Item], *, quiet: bool, **options: Any) -> Iterable[Item]:
    """Return `iterable` wrapped in a tqdm bar (`options`: desc, unit, total...), or without a bar when `quiet`.

    `disable` is passed only when quiet: tqdm reads `TQDM_DISABLE` (and the other `TQDM_*`
    variables) as defaults, which an explicit `disable=False` would override.
    """
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=True, **options) if quiet else tqdm(iterable, **options)


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Turn transformers' loading/saving progress bars off inside the block when not ``enabled``."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
