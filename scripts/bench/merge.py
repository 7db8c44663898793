"""Benchmark: peak memory of `upcycle merge` against the MoE's size and one layer's experts.

Builds a random float32 Mixtral (hidden 512, expert width 1536, 8 experts, 8 layers: ~650 MB, 75 MB
of experts per layer), then runs, each in its own process, one after the other:
- `import`: the Python runtime with torch, transformers and upcycle imported (the floor);
- `upcycle merge --method average` and `--method ties` (every expert's task vector at once);
- `naive`: load the MoE with transformers and average its experts in memory.
It prints wall time and peak RSS of each, and the merge's peak above the floor in units of one
layer's experts and of the whole model.

    python scripts/bench/merge.py [--workdir DIR] [--small]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from peak_rss import measure

MAKE_MOE = textwrap.dedent(
    """
    import sys, torch
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    hidden, inter, layers, experts = (int(x) for x in sys.argv[2:6])
    config = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, vocab_size=8000,
                           num_attention_heads=8, num_key_value_heads=8, num_local_experts=experts)
    MixtralForCausalLM(config).save_pretrained(sys.argv[1])
    """
)

NAIVE = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
    merged = [(layer.mlp.experts.gate_up_proj.mean(0), layer.mlp.experts.down_proj.mean(0))
              for layer in model.model.layers]
    """
)

IMPORT = "import torch, transformers, upcycle, upcycle.merge"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--small", action="store_true", help="a 4x smaller model, for a quick check")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-merge-"))
    hidden, inter, layers, experts = (256, 768, 8, 8) if args.small else (512, 1536, 8, 8)
    moe = work / "moe"
    if not moe.exists():
        subprocess.run(
            [sys.executable, "-c", MAKE_MOE, str(moe), *map(str, (hidden, inter, layers, experts))], check=True
        )
    model_mib = sum(p.stat().st_size for p in moe.glob("*.safetensors")) / 2**20
    layer_mib = experts * 3 * hidden * inter * 4 / 2**20
    upcycle_cli = [sys.executable, "-m", "upcycle.cli", "merge", str(moe)]
    runs = {
        "import": [sys.executable, "-c", IMPORT],
        "merge average": [*upcycle_cli, str(work / "avg"), "--force", "--quiet"],
        "merge ties": [
            *upcycle_cli,
            str(work / "ties"),
            "--method",
            "ties",
            "--base",
            str(work / "avg"),
            "--force",
            "--quiet",
        ],
        "naive (transformers)": [sys.executable, "-c", NAIVE, str(moe)],
    }
    results = {}
    for name, command in runs.items():
        results[name] = measure(command)
        if results[name]["code"] != 0:
            raise SystemExit(f"{name} failed:\n{results[name]['stderr']}")
    floor = results["import"]["peak_rss_mib"]
    print(f"MoE: {model_mib:.0f} MiB on disk, {layer_mib:.0f} MiB of experts per layer, {layers} layers\n")
    print("| run | wall s | peak RSS MiB | above import, in layers of experts | above import / model size |")
    print("|---|---:|---:|---:|---:|")
    for name, result in results.items():
        above = result["peak_rss_mib"] - floor
        print(
            f"| {name} | {result['wall_s']:.1f} | {result['peak_rss_mib']:.0f} | "
            f"{above / layer_mib:.2f} | {above / model_mib:.2f} |"
        )


if __name__ == "__main__":
    main()
