"""Where a writer's output goes: a temporary directory next to the output, renamed to it only when
complete, so that a failed or interrupted run leaves the output as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from upcycle.errors import UpcycleError


def check_output_dir(output: Path, force: bool) -> None:
    """Refuse to overwrite an existing output unless `force`.

    Raises:
        UpcycleError: `output` exists and `force` is False.
    """
    if output.exists() and not force:
        raise UpcycleError(f"{output} already exists; choose another output or pass --force to replace it")


@contextlib.contextmanager
def atomic_output_dir(output: Path, force: bool) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `output`; on success move it to `output`.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and `output`
    is left as it was. With `force`, an existing `output` is replaced only after success.

    Raises:
        UpcycleError: `output` exists and `force` is False.
    """
    output = Path(output)
    check_output_dir(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f"{output.name}.tmp-", dir=output.parent))
    try:
        yield temporary
        if output.exists():
            backup = Path(tempfile.mkdtemp(prefix=f"{output.name}.old-", dir=output.parent))
            os.replace(output, backup / output.name)
            os.replace(temporary, output)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(temporary, output)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
