"""Expert construction methods side by side on the shipped tiny Llama: exact at init? max |logit
diff| vs the dense model, and expert-load balance (coefficient of variation of the experts' token
counts, averaged over layers) with a random router vs a calibrated one (k-means on FFN inputs;
neuron-cluster centroids for partition), all on the same calibration text (standard-library
Python sources).

    python scripts/bench/expert_methods.py [--samples 64] [--output-dir DIR]

Prints one markdown table (README "Expert methods" quotes it).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from upcycle.calibration import calibration_batches, load_calibration_texts
from upcycle.convert import convert

EXAMPLE = Path(__file__).parents[2] / "examples" / "tiny-llama"
CORPUS_MODULES = ("argparse", "collections", "dataclasses", "functools", "pathlib", "textwrap")
EXACT = 1e-5

# name, convert settings, calibrated router kind ("kmeans" or "centroids").
ROWS = [
    ("copy", dict(experts=8, top_k=2), "kmeans"),
    ("copy, noise 0.01", dict(experts=8, top_k=2, noise=0.01), "kmeans"),
    ("drop, r=0.5", dict(experts=8, top_k=2, method="drop"), "kmeans"),
    ("granular G=2, paper scaling", dict(experts=4, top_k=1, method="granular", granularity=2), "kmeans"),
    (
        "granular G=2, down scaling",
        dict(experts=4, top_k=1, method="granular", granularity=2, granular_scaling="down"),
        "kmeans",
    ),
    ("partition random, top-2 of 8", dict(experts=8, top_k=2, method="partition"), "centroids"),
    (
        "partition kmeans, top-2 of 8",
        dict(experts=8, top_k=2, method="partition", partition_method="kmeans"),
        "centroids",
    ),
    (
        "partition, top-8 of 8, uniform router",
        dict(experts=8, top_k=8, method="partition", router_std=0.0),
        "centroids",
    ),
    ("copy + 1 shared (qwen2_moe)", dict(experts=8, top_k=2, shared_experts=1, target="qwen2_moe"), "kmeans"),
]


def write_corpus(path: Path) -> Path:
    """Write standard-library sources to `path` (paragraphs split by blank lines) and return it."""
    path.write_text("\n\n".join(inspect.getsource(importlib.import_module(name)) for name in CORPUS_MODULES))
    return path


def run_text(directory: Path, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (logits of real tokens, expert token counts per layer (layers, experts) or None)."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    moe = model.config.model_type != "llama"
    top_k = getattr(model.config, "num_experts_per_tok", 0)
    all_logits, counts = [], 0
    with torch.no_grad():
        for batch in batches:
            output = model(**batch, output_router_logits=moe) if moe else model(**batch)
            real = batch["attention_mask"].bool()
            all_logits.append(output.logits[real])
            if moe:
                flat = real.reshape(-1)
                counts = counts + torch.stack(
                    [
                        torch.bincount(r[flat].topk(top_k).indices.flatten(), minlength=r.shape[-1])
                        for r in output.router_logits
                    ]
                )
    return torch.cat(all_logits), (counts.float() if moe else None)


def load_cv(counts: torch.Tensor) -> float:
    """Mean over layers of std/mean of the experts' token counts (0 = perfectly balanced)."""
    return (counts.std(dim=1, unbiased=False) / counts.mean(dim=1)).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="calibration texts (default 64)")
    parser.add_argument("--output-dir", default=None, help="keep the converted models here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = Path(args.output_dir or tempfile.mkdtemp(prefix="expert-methods-"))
    root.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(root / "stdlib.txt")
    texts = load_calibration_texts(corpus, args.samples)
    tokenizer = AutoTokenizer.from_pretrained(EXAMPLE)
    batches = list(calibration_batches(tokenizer, texts, max_length=256, batch_size=8))
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    dense_logits, _ = run_text(EXAMPLE, batches)
    print(
        f"tiny-llama ({EXAMPLE}), {len(texts)} calibration texts ({tokens} tokens) from {', '.join(CORPUS_MODULES)}\n"
    )
    print(
        "| method | experts, top-k | exact at init | max abs logit diff (random router) "
        "| load CV, random router | load CV, calibrated router |"
    )
    print("|---|---|---|---|---|---|")
    for index, (name, settings, calibrated) in enumerate(ROWS):
        random_dir, calibrated_dir = root / f"{index}-random", root / f"{index}-{calibrated}"
        common = dict(quiet=True, force=True, **settings)
        summary = convert(EXAMPLE, random_dir, router_init="random", **common)
        extra = dict(calibration=corpus, calibration_samples=args.samples) if calibrated == "kmeans" else {}
        convert(EXAMPLE, calibrated_dir, router_init=calibrated, **extra, **common)
        moe_logits, random_counts = run_text(random_dir, batches)
        _, calibrated_counts = run_text(calibrated_dir, batches)
        diff = (moe_logits - dense_logits).abs().max().item()
        print(
            f"| {name} | {summary.num_experts}, {summary.top_k} | {'yes' if diff <= EXACT else 'no'} | {diff:.2e} | "
            f"{load_cv(random_counts):.3f} | {load_cv(calibrated_counts):.3f} ({calibrated}) |"
        )


if __name__ == "__main__":
    main()
