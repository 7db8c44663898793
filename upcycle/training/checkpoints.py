"""Resumable runs: Accelerate checkpoints marked complete, found again, and the per-step log.

Accelerate writes ``<output>/checkpoints/checkpoint_<i>`` (``automatic_checkpoint_naming``, oldest
removed beyond ``total_limit``) but not atomically: a run killed while saving leaves a partial
folder. So a checkpoint counts only once ``trainer_state.json`` (the step it holds) has been
written into it after `save_state` returned on every process; resuming skips and removes the rest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from upcycle.training.config import ConfigError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
FINAL = "final"
LOG_FILE = "metrics.jsonl"
_INDEX = re.compile(r"^checkpoint_(\d+)$")


def _indexed(output_dir: Path) -> list[tuple[int, Path]]:
    folder = Path(output_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in folder.iterdir() if (m := _INDEX.match(path.name))]
    return sorted(found)


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Return the complete checkpoints under `output_dir`, oldest first."""
    return [path for _, path in _indexed(output_dir) if (path / STATE_FILE).is_file()]


def remove_incomplete_checkpoints(output_dir: Path) -> list[Path]:
    """Delete checkpoint folders a killed save left without a state file; return them."""
    removed = [path for _, path in _indexed(output_dir) if not (path / STATE_FILE).is_file()]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def next_checkpoint_index(output_dir: Path) -> int:
    """Return the index Accelerate must give the next checkpoint (one past every existing folder)."""
    indexed = _indexed(output_dir)
    return indexed[-1][0] + 1 if indexed else 0


def find_resume_checkpoint(output_dir: Path, resume: str) -> Path | None:
    """Return the checkpoint to resume from: ``resume == "latest"`` gives the newest complete one
    (None when there is none, so a retried job starts fresh), anything else is a checkpoint path.

    Raises:
        ConfigError: an explicit path that is not a complete checkpoint.
    """
    if resume == "latest":
        complete = complete_checkpoints(output_dir)
        return complete[-1] if complete else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(
            f"--resume: {path} is not a complete checkpoint (no {STATE_FILE}); pass a checkpoint_<i> folder"
        )
    return path


def check_fresh_output(output_dir: Path, overwrite: bool) -> None:
    """Refuse to start a new run over an earlier run's checkpoints or final model.

    Raises:
        ConfigError: naming ``output.dir``, unless `overwrite`.
    """
    output_dir = Path(output_dir)
    earlier = [name for name in (CHECKPOINTS, FINAL) if (output_dir / name).exists()]
    if earlier and not overwrite:
        raise ConfigError(
            f"output.dir: {output_dir} already holds a run ({', '.join(earlier)}); pass --resume to continue it, "
            "set output.overwrite: true to start over, or choose another output.dir"
        )


def clear_output(output_dir: Path) -> None:
    """Remove an earlier run's checkpoints, final model and log from `output_dir` (``output.overwrite``)."""
    for name in (CHECKPOINTS, FINAL, f"{FINAL}-moe", f"{FINAL}-dense", LOG_FILE, "run.json"):
        path = Path(output_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def write_json_atomic(path: Path, values: dict) -> None:
    """Write `values` as JSON to `path` through a temporary file and a rename."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(values, indent=2) + "\n")
    os.replace(temporary, path)


def read_state(checkpoint: Path) -> dict:
    """Return the ``trainer_state.json`` of a complete checkpoint."""
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def save_checkpoint(accelerator, output_dir: Path, state: dict) -> Path:
    """Save the full training state with ``accelerator.save_state()``, then mark it complete with
    `state` (the step, epoch); return the checkpoint folder. Every process must call it."""
    folder = Path(output_dir) / CHECKPOINTS / f"checkpoint_{accelerator.save_iteration}"
    accelerator.save_state()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(folder / STATE_FILE, state)
    accelerator.wait_for_everyone()
    return folder


class MetricsLog:
    """Append-only JSON-lines log of training records (main process only).

    On resume the records past the checkpoint's step (written by the killed run after its last
    checkpoint) are dropped, so the log reads as one uninterrupted run.
    """

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        if resume_step is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
        elif self.path.exists():
            kept = [
                line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(f"{line}\n" for line in kept))

    def write(self, record: dict) -> None:
        """Append one record (a dict with a ``step``)."""
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
