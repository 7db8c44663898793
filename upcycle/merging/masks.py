"""DARE's keep masks, drawn on background threads ahead of the projections that use them.

Drawing is the serial part of a DARE merge: one generator, ~3.5 ns per entry (`torch.rand`), 8 x 16.8M
entries per projection at the 1B shape, ~0.5 s, while the rest of the merge runs on both cores. Each
projection's masks come from a generator of their own (`dare_generator`), so drawing the next projections'
masks on other threads while this one is merged gives the same bits.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

import numpy as np
import torch

from upcycle.merging.methods import dare_masks
from upcycle.merging.source import PROJECTIONS
from upcycle.rng import derived_generator


def dare_generator(seed: int, layer: int, projection: str, members: list[int]) -> torch.Generator:
    """Return the generator of the DARE masks of one group: a stream of its own per (seed, layer, projection,
    members), whatever the other groups are (`upcycle.rng.derived_generator`, keyed by sha256)."""
    return derived_generator(seed, "dare", layer, projection, tuple(members))


# Threads drawing masks: two projections' masks are drawn at once (their generators are independent), so the
# serial drawing (~22 s of a 1B-shaped 8-expert merge) no longer sets the pace: merge dare on scripts/bench/scale.py
# took 33.7-34.4 s with one thread, 30.3-30.8 s with two (alternating runs).
DRAWING_THREADS = 2


class DareMasksAhead:
    """The masks of the merge of all `experts` experts of each layer into one, drawn in the order requested on
    `DRAWING_THREADS` daemon threads (a failed or interrupted merge does not wait for them)."""

    def __init__(self, seed: int, experts: int, numel: int, density: float):
        self._seed, self._experts, self._numel, self._density = seed, experts, numel, density
        self._futures: dict[tuple[int, str], Future] = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def request(self, layer: int) -> None:
        """Queue the masks of every projection of `layer` (once)."""
        for projection in PROJECTIONS:
            if (layer, projection) not in self._futures:
                future: Future = Future()
                self._futures[(layer, projection)] = future
                self._queue.put((future, layer, projection))
        while len(self._threads) < DRAWING_THREADS:
            thread = threading.Thread(target=self._run, name="upcycle-dare-masks", daemon=True)
            thread.start()
            self._threads.append(thread)

    def take(self, layer: int, projection: str) -> list[np.ndarray]:
        """Return the packed masks of `projection` of `layer` (`methods.dare_masks`), drawn now if not requested.

        Raises:
            whatever drawing them raised.
        """
        future = self._futures.pop((layer, projection), None)
        if future is None:
            return self._draw(layer, projection)
        return future.result()

    def _draw(self, layer: int, projection: str) -> list[np.ndarray]:
        generator = dare_generator(self._seed, layer, projection, list(range(self._experts)))
        return dare_masks(generator, self._experts, self._numel, self._density)

    def _run(self) -> None:
        while True:
            future, layer, projection = self._queue.get()
            try:
                future.set_result(self._draw(layer, projection))
            except BaseException as err:  # handed to the taker, who raises it
                future.set_exception(err)
