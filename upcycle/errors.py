"""The one exception type for user mistakes (the CLI prints its message on one line and exits 2),
and how messages spell an option: as the CLI flag (`--top-k`) when the CLI runs, as the Python
keyword (`top_k`) when the library is called from Python."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from contextvars import ContextVar

_CLI_SPELLING: ContextVar[bool] = ContextVar("upcycle_cli_spelling", default=False)


class UpcycleError(Exception):
    """A problem with the user's input, with a message that names the input and the fix."""


class Interrupted(BaseException):
    """A termination signal (SIGTERM, SIGHUP) arrived while an output was being written.

    A `BaseException`, as `KeyboardInterrupt` is, so no `except Exception` swallows it on its way out.
    """

    def __init__(self, signal_number: int):
        self.signal_number = signal_number
        super().__init__(f"interrupted by {signal.Signals(signal_number).name}")


def flag(name: str) -> str:
    """Return option `name` (a Python keyword such as "top_k") as the caller knows it: "--top-k"
    inside `cli_spelling()`, else "top_k"."""
    return "--" + name.replace("_", "-") if _CLI_SPELLING.get() else name


@contextlib.contextmanager
def cli_spelling() -> Iterator[None]:
    """Within the block, `flag` spells options as command-line flags (the CLI wraps each command in it)."""
    token = _CLI_SPELLING.set(True)
    try:
        yield
    finally:
        _CLI_SPELLING.reset(token)


# What to tell someone loading a MoPE adapter without having imported `mope` (PEFT then fails with a
# bare KeyError: 'MOPE'). Here, not in mope, so that code below mope's layer (upcycle.load,
# upcycle inspect) can say it too; mope re-exports it as mope.MOPE_IMPORT_HINT.
MOPE_IMPORT_HINT = (
    "this is a MoPE adapter: `import mope` before PeftModel.from_pretrained (it registers the MOPE PEFT type)"
)
