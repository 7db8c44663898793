"""One background thread that runs submitted jobs in order, with a bound on the bytes they hold.

The streaming writer hands it each tensor's write, so the copy of the bytes (into the page cache,
or into a `DirectShard`'s aligned buffers) runs without the GIL on a second core while the caller
computes the next tensor. On the 2-core benchmark VM that copy was 13% of a merge's CPU time (perf,
scripts/bench/scale.py), all of it on the thread that also does the arithmetic. A `DirectShard`
hands its full buffers to one of its own, so the disk writes one while the next is filled.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable


class SerialWorker:
    """Runs jobs one at a time, in submission order, on one daemon thread.

    `name` names the thread. `submit` waits while the jobs queued hold more than `limit` bytes (the
    caller keeps computing at most that far ahead). The first exception a job raises is re-raised by
    the next `submit` or `drain`; later jobs are skipped.
    """

    def __init__(self, limit: int, name: str = "upcycle-writer"):
        self._limit = limit
        self._jobs: deque[tuple[Callable[[], None], int]] = deque()
        self._queued = 0
        self._busy = False
        self._error: BaseException | None = None
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None], nbytes: int) -> None:
        """Queue `job` (holding `nbytes` until it ran); returns once the queue has room.

        Raises:
            the exception an earlier job raised.
        """
        with self._condition:
            while self._queued > 0 and self._queued + nbytes > self._limit and self._error is None:
                self._condition.wait()
            self._raise_error()
            self._jobs.append((job, nbytes))
            self._queued += nbytes
            self._condition.notify_all()

    def drain(self) -> None:
        """Wait until every queued job ran.

        Raises:
            the exception a job raised.
        """
        with self._condition:
            while (self._jobs or self._busy) and self._error is None:
                self._condition.wait()
            self._raise_error()

    def stop(self) -> None:
        """Drop the jobs not started, wait for the one running, and end the thread (errors are dropped)."""
        with self._condition:
            self._jobs.clear()
            self._queued = 0
            self._jobs.append((None, 0))
            self._condition.notify_all()
        self._thread.join()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self._jobs.clear()
            self._queued = 0
            raise error

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._jobs:
                    self._condition.wait()
                job, nbytes = self._jobs.popleft()
                if job is None:
                    return
                self._busy = True
            try:
                if self._error is None:
                    job()
            except BaseException as error:  # handed to the submitter
                self._error = error
            finally:
                with self._condition:
                    self._busy = False
                    self._queued -= nbytes
                    self._condition.notify_all()
