"""Digests of what every writer produces for fixed inputs and seeds, so that a restructuring (or a
faster writer) can prove its outputs bit-identical to the recorded ones.

`python tests/output_digests.py record` rewrites tests/output_digests.json; `... print` prints the
digests of the current code as JSON, which `test_output_digests.py` compares case by case. Both run
with MKL's conditional numerical reproducibility on (`MKL_CBWR=COMPATIBLE`, set before torch loads):
without it MKL picks kernels by memory alignment, so the k-means router case differed in the last
float32 bit depending on which cases had run before it in the same process.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

os.environ["MKL_CBWR"] = "COMPATIBLE"
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
TINY_LLAMA = REPO / "examples" / "tiny-llama"
DIGESTS_FILE = Path(__file__).with_name("output_digests.json")


def tensor_digest(directory: Path) -> str:
    """Return the sha256 over every tensor's name, dtype, shape and bytes in `directory`, in name order
    (independent of how the tensors are split into shards)."""
    digest = hashlib.sha256()
    readers = {}
    names = {}
    for path in sorted(directory.glob("*.safetensors")):
        reader = safe_open(str(path), framework="pt")
        readers[path] = reader
        for name in reader.keys():
            names[name] = path
    for name in sorted(names):
        tensor = readers[names[name]].get_tensor(name)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def config_digest(directory: Path) -> str:
    """Return the sha256 of config.json without the `upcycle` provenance section (it names paths) and
    without `transformers_version` (the stamp of the installed transformers: 5.25.0 changed only that
    field, so the record would otherwise break with every transformers release)."""
    config = json.loads((directory / "config.json").read_text())
    config.pop("upcycle", None)
    config.pop("transformers_version", None)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _corpus(work: Path) -> Path:
    import importlib
    import inspect

    path = work / "corpus.txt"
    if not path.exists():
        path.write_text("\n\n".join(inspect.getsource(importlib.import_module(m)) for m in ("argparse", "functools")))
    return path


def _dense(work: Path, model_type: str, **fields) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import make_dense

    directory = work / f"dense-{model_type}"
    if not directory.exists():
        make_dense(directory, model_type, **fields)
    return directory


def _convert(source: Callable[[Path], Path], **options) -> Callable[[Path, Path], None]:
    def run(work: Path, out: Path) -> None:
        import upcycle

        if options.get("calibration") == "CORPUS":
            options["calibration"] = _corpus(work)
        upcycle.convert(source(work), out, quiet=True, **options)

    return run


def _merge(**options) -> Callable[[Path, Path], None]:
    def run(work: Path, out: Path) -> None:
        import upcycle

        moe = work / "moe-drop"
        if not moe.exists():
            upcycle.convert(TINY_LLAMA, moe, experts=4, top_k=2, method="drop", quiet=True)
        if options.get("calibration") == "CORPUS":
            options["calibration"] = _corpus(work)
        if options.get("base") == "DENSE":
            options["base"] = TINY_LLAMA
        upcycle.merge(moe, out, quiet=True, **options)

    return run


def _mope_export(work: Path, out: Path) -> None:
    sys.path.insert(0, str(REPO / "tests" / "peft_mope"))
    from mope_testlib import mope_model

    import mope

    model = mope_model(routing="block", num_experts=4, top_k=2)
    mope.export(model, out, quiet=True)


def _tiny(work: Path) -> Path:
    return TINY_LLAMA


CASES: dict[str, Callable[[Path, Path], None]] = {
    "convert-copy": _convert(_tiny, experts=4, top_k=2),
    "convert-copy-fused-bf16": _convert(_tiny, experts=4, top_k=2, layout="fused", dtype="bfloat16"),
    "convert-noise": _convert(_tiny, experts=4, top_k=2, noise=0.01, seed=3),
    "convert-drop": _convert(_tiny, experts=4, top_k=2, method="drop", drop_ratio=0.3),
    "convert-granular-paper": _convert(_tiny, experts=2, top_k=1, method="granular", granularity=2),
    "convert-granular-down": _convert(
        _tiny, experts=2, top_k=1, method="granular", granularity=2, granular_scaling="down"
    ),
    "convert-partition-kmeans": _convert(_tiny, experts=4, top_k=2, method="partition", partition_method="kmeans"),
    "convert-router-kmeans": _convert(
        _tiny, experts=4, top_k=2, router_init="kmeans", calibration="CORPUS", calibration_samples=16
    ),
    "convert-qwen2moe-shared": _convert(
        _tiny, experts=4, top_k=2, target="qwen2_moe", shared_experts=1, moe_layers="every:2"
    ),
    "convert-generic": _convert(_tiny, experts=4, top_k=2, target="generic"),
    "convert-qwen2": _convert(lambda work: _dense(work, "qwen2"), experts=2, top_k=1),
    "convert-qwen3-fused": _convert(
        lambda work: _dense(work, "qwen3", head_dim=16), experts=2, top_k=1, layout="fused"
    ),
    "convert-granite": _convert(lambda work: _dense(work, "granite"), experts=2, top_k=1),
    "convert-olmo2": _convert(lambda work: _dense(work, "olmo2"), experts=2, top_k=1),
    "merge-average": _merge(),
    "merge-frequency": _merge(method="frequency", calibration="CORPUS", calibration_samples=8),
    "merge-ties": _merge(method="ties", base="DENSE", density=0.5),
    "merge-dare": _merge(method="dare", base="DENSE", density=0.5, seed=1),
    "merge-experts-2": _merge(experts=2),
    "mope-export": _mope_export,
}


def compute(work: Path, names: list[str] | None = None) -> dict[str, dict[str, str]]:
    """Run the cases (all, or `names`) in `work` and return {case: {"tensors": ..., "config": ...}}."""
    results = {}
    for name in names or list(CASES):
        out = work / f"out-{name}"
        CASES[name](work, out)
        results[name] = {"tensors": tensor_digest(out), "config": config_digest(out)}
    return results


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] not in (["record"], ["print"]):
        raise SystemExit("usage: python tests/output_digests.py record|print")
    with tempfile.TemporaryDirectory() as tmp:
        digests = compute(Path(tmp))
    if sys.argv[1] == "print":
        print(json.dumps(digests))
    else:
        DIGESTS_FILE.write_text(json.dumps(digests, indent=2, sort_keys=True) + "\n")
        print(f"recorded {len(digests)} cases in {DIGESTS_FILE}")
