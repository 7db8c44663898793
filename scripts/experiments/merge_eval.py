"""How much of a briefly trained upcycled MoE each `upcycle merge` method keeps, in held-out loss.

Upcycles examples/tiny-llama into an 8-expert top-2 Mixtral, trains it briefly on the Python
standard library's sources (CPU, a couple of minutes), then merges it back with every method (and
into 4 experts) and prints a markdown table of held-out eval loss next to the MoE's own:

    python scripts/experiments/merge_eval.py [--steps 150] [--out /tmp/merge-eval]

Train and held-out text are disjoint files (every tenth file, by name, is held out). Calibration
uses training files only.
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import upcycle

REPO = Path(__file__).resolve().parents[2]
DENSE = REPO / "examples" / "tiny-llama"
# transformers' grouped_mm expert kernels are several times slower than the eager loop on CPU for
# a model this small (measured: ~30 s vs ~5 s per training step on a loaded 2-core machine).
EXPERTS_IMPLEMENTATION = {"experts_implementation": "eager"} if not torch.cuda.is_available() else {}


def corpus() -> tuple[list[str], list[str]]:
    """Return (train texts, held-out texts): the stdlib's top-level .py files, every tenth held out."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [path.read_text(encoding="utf-8", errors="replace") for path in files]
    return [t for i, t in enumerate(texts) if i % 10], [t for i, t in enumerate(texts) if i % 10 == 0]


def windows(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Return the texts tokenized, joined with EOS and cut into (N, seq_len) windows."""
    ids = [i for text in texts for i in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    count = len(ids) // seq_len
    return torch.tensor(ids[: count * seq_len]).view(count, seq_len)


@torch.no_grad()
def eval_loss(directory: Path, held_out: torch.Tensor, batch_size: int = 16) -> float:
    """Return the mean next-token loss of the model at `directory` over `held_out` windows."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **EXPERTS_IMPLEMENTATION).eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in held_out.split(batch_size)]
    return sum(losses) / len(losses)


def train_moe(moe_dir: Path, train: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int) -> None:
    """Train the MoE at `moe_dir` in place (all weights, router aux loss on) and save it back."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32, **EXPERTS_IMPLEMENTATION)
    model.config.output_router_logits = True  # adds the load-balancing loss to `loss`
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    model.train()
    for step in range(steps):
        batch = train[torch.randint(len(train), (batch_size,))]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.3f}", flush=True)
    model.config.output_router_logits = False
    model.save_pretrained(moe_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-windows", type=int, default=48)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    args = parser.parse_args()

    root = Path(args.out or tempfile.mkdtemp(prefix="merge-eval-"))
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(DENSE)
    train_texts, held_out_texts = corpus()
    train = windows(tokenizer, train_texts, args.seq_len)
    held_out = windows(tokenizer, held_out_texts, args.seq_len)[: args.eval_windows]
    calibration = root / "calibration.jsonl"
    with calibration.open("w") as handle:
        for text in train_texts[:: max(1, len(train_texts) // args.calibration_samples)]:
            handle.write(json.dumps({"text": text[:2000]}) + "\n")

    moe = root / "moe"
    print(f"upcycling {DENSE.name} into 8 experts, top-2, and training {args.steps} steps ...", flush=True)
    upcycle.convert(DENSE, moe, experts=8, top_k=2, force=True, quiet=True)
    started = time.time()
    train_moe(moe, train, args.steps, args.batch_size, args.lr, args.seed)
    print(f"  trained in {time.time() - started:.0f} s", flush=True)

    rows = [("dense source (before upcycling)", "-", eval_loss(DENSE, held_out), None)]
    moe_loss = eval_loss(moe, held_out)
    rows.append(("upcycled + trained MoE (8 experts, top-2)", "-", moe_loss, None))
    runs = [
        ("average", {}),
        ("frequency", {"calibration": calibration}),
        ("router-weight", {"calibration": calibration}),
        ("task-arithmetic", {}),
        ("ties", {}),
        ("dare", {}),
        ("concat", {}),
        ("concat", {"calibration": calibration}),
        ("select", {"calibration": calibration}),
        ("average", {"experts": 4}),
        ("frequency", {"experts": 4, "calibration": calibration}),
        ("frequency", {"experts": 2, "calibration": calibration}),
    ]
    for index, (method, options) in enumerate(runs):
        output = root / f"merged-{index}-{method}"
        summary = upcycle.merge(
            moe,
            output,
            method=method,
            calibration_samples=args.calibration_samples,
            force=True,
            quiet=True,
            **options,
        )
        label = method + (" (calibration weights)" if "calibration" in options and method == "concat" else "")
        label += f", {options['experts']} experts" if "experts" in options else ""
        data = "yes" if "calibration" in options else "no"
        rows.append((label, data, eval_loss(output, held_out), summary))
        print(f"  {label}: {rows[-1][2]:.4f}", flush=True)

    print(f"\nHeld-out loss on {len(held_out)} windows of {args.seq_len} tokens (stdlib files not trained on):\n")
    print("| model | calibration | FFN | parameters | eval loss | vs MoE |")
    print("|---|---|---|---|---:|---:|")
    for label, data, loss, summary in rows:
        if summary is None:
            print(f"| {label} | - | - | - | {loss:.4f} | {loss - moe_loss:+.4f} |")
            continue
        ffn = f"{summary.experts_out}x{summary.intermediate_size}" if summary.experts_out else summary.intermediate_size
        print(f"| {label} | {data} | {ffn} | {summary.total_parameters:,} | {loss:.4f} | {loss - moe_loss:+.4f} |")


if __name__ == "__main__":
    main()
