"""The state of a folder tree, to assert that a refused run left it byte-identical."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_state(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder`, hidden ones included: files by content, mode and mtime, folders by mode."""
    state: dict[str, tuple] = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        key = str(path.relative_to(folder))
        if path.is_dir() and not path.is_symlink():
            state[key] = ("dir", info.st_mode)
        else:
            state[key] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), info.st_mode, info.st_mtime_ns)
    return state
