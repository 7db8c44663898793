"""Benchmark: the merge arithmetic on one projection of one layer at a real shape, old against new.

Llama-3.2-1B upcycled to 8 experts: each projection of one expert is a (8192, 2048) bfloat16 tensor, the base
(dense) FFN's too. Times `ties`, `dare`, `task_arithmetic` and `weighted_mean` of upcycle/merging/methods.py
against the same functions at a git revision (default f8d7acc~1, the last before they were
threaded; loaded from `git show`), alternating old and new
`--repeats` times in this one process, and checks that both give the same bits. Also times
`grouping.weight_distances` on the three projections (old and new: the same groups is checked in the tests).
Prints, per method, the best wall and CPU (process) seconds per projection and the old/new ratios.

    python scripts/bench/merge_methods.py [--old-ref f8d7acc~1] [--repeats 3] [--skip-old ties]

Wall time is noisy on a shared machine: CPU seconds count both threads, so new CPU > new wall means the
threads ran in parallel. Disk limit reference: 48 projections at ~16 s in all is ~0.33 s per projection.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from upcycle.merging import grouping, methods  # noqa: E402

EXPERTS, OUT, IN = 8, 8192, 2048


def module_at(ref: str, path: str, directory: Path) -> ModuleType:
    """Return the module `path` (relative to the repository) as it is at git revision `ref`."""
    source = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=REPO, capture_output=True, text=True, check=True)
    file = directory / f"old_{Path(path).stem}.py"
    file.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(function: Callable[..., torch.Tensor], *args: object) -> tuple[float, float, torch.Tensor]:
    """Return (wall seconds, CPU seconds of this process, result) of one call `function(*args)`."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-ref", default="f8d7acc~1", help="git revision of the old methods (default f8d7acc~1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-old", nargs="*", default=[], help="methods whose old version is not timed")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    experts = [(0.02 * torch.randn(OUT, IN, generator=generator)).bfloat16() for _ in range(EXPERTS)]
    base = (0.02 * torch.randn(OUT, IN, generator=generator)).bfloat16()
    coefficients = torch.arange(1, EXPERTS + 1, dtype=torch.float64)  # usage counts: not all equal
    with tempfile.TemporaryDirectory() as directory:
        old = module_at(args.old_ref, "upcycle/merging/methods.py", Path(directory))
        old_grouping = module_at(args.old_ref, "upcycle/merging/grouping.py", Path(directory))
    calls = {
        "ties": lambda module: module.ties(experts, base, coefficients, 0.5),
        "dare": lambda module: module.dare(
            torch.stack(experts) if module is old else experts,  # the old one indexed a stack
            base,
            coefficients,
            0.5,
            torch.Generator().manual_seed(1),
        ),
        "task_arithmetic": lambda module: module.task_arithmetic(experts, base, coefficients),
        "weighted_mean": lambda module: module.weighted_mean(experts, coefficients),
    }
    print(f"one projection: {EXPERTS} x ({OUT}, {IN}) bfloat16, torch threads {torch.get_num_threads()}")
    print(
        f"{'method':16s} {'old wall':>9s} {'old cpu':>8s} {'new wall':>9s} {'new cpu':>8s} {'wall x':>7s} {'cpu x':>6s}"
    )
    for name, call in calls.items():
        best = {"old": (float("inf"), float("inf")), "new": (float("inf"), float("inf"))}
        for _ in range(args.repeats):
            wall, cpu, new_result = timed(call, methods)
            best["new"] = (min(best["new"][0], wall), min(best["new"][1], cpu))
            if name in args.skip_old:
                continue
            wall, cpu, old_result = timed(call, old)
            best["old"] = (min(best["old"][0], wall), min(best["old"][1], cpu))
            assert torch.equal(old_result.view(-1).view(torch.uint8), new_result.view(-1).view(torch.uint8)), name
            del old_result
        (old_wall, old_cpu), (new_wall, new_cpu) = best["old"], best["new"]
        print(
            f"{name:16s} {old_wall:9.2f} {old_cpu:8.2f} {new_wall:9.2f} {new_cpu:8.2f} "
            f"{old_wall / new_wall:7.1f} {old_cpu / new_cpu:6.1f}",
            flush=True,
        )
    projections = [list(experts), [expert.T.contiguous() for expert in experts[:EXPERTS]], list(experts)]
    best = {}
    for label, module, argument in (
        ("old", old_grouping, [torch.stack(p) for p in projections]),
        ("new", grouping, projections),
    ):
        for _ in range(args.repeats):
            wall, cpu, distances = timed(module.weight_distances, argument)
            best[label] = min(best.get(label, (float("inf"),) * 2), (wall, cpu))
        groups = grouping.average_linkage(distances, 4)
        print(f"weight_distances {label}: wall {best[label][0]:.2f} s, cpu {best[label][1]:.2f} s (layer), {groups}")


if __name__ == "__main__":
    main()
