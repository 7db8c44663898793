"""Benchmark: our streaming converter vs mergekit-moe on a ~200M-parameter random Llama.

Both tools upcycle the same dense checkpoint (hidden 1024, intermediate 2816, 12 layers, vocab
32000, float32) into a 4-expert MoE, each in its own process, one after the other; the script
prints wall time and peak RSS (the process's max resident set, file-backed pages included) of
each and our/theirs ratios.

    pip install mergekit            # optional peer; without it only our numbers are printed
    python scripts/bench/convert.py [--mergekit-moe PATH] [--workdir DIR] [--small]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from peak_rss import measure

MAKE_DENSE = textwrap.dedent(
    """
    import sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    hidden, inter, layers, vocab = (int(x) for x in sys.argv[2:6])
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         vocab_size=vocab, num_attention_heads=16, num_key_value_heads=16)
    LlamaForCausalLM(config).save_pretrained(sys.argv[1])
    """
)


def mergekit_config(dense: Path, experts: int) -> str:
    lines = [f"base_model: {dense}", "gate_mode: random", "dtype: float32", "experts:"]
    lines += [f'  - source_model: {dense}\n    positive_prompts: [""]' for _ in range(experts)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mergekit-moe", default=shutil.which("mergekit-moe"), help="path to mergekit-moe")
    parser.add_argument("--workdir", default=None, help="where to put the checkpoints (default: a temp dir)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--small", action="store_true", help="a 4-layer, hidden-256 model for a smoke run")
    args = parser.parse_args()

    shape = ("256", "704", "4", "32000") if args.small else ("1024", "2816", "12", "32000")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="upcycle-bench-"))
    dense = workdir / "dense"
    if not (dense / "config.json").exists():
        subprocess.run([sys.executable, "-c", MAKE_DENSE, str(dense), *shape], check=True)
    # mergekit-moe copies a tokenizer; its random gate mode never tokenizes, so any will do.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (dense / name).exists():
            shutil.copyfile(Path(__file__).parents[2] / "examples" / "tiny-llama" / name, dense / name)
    size_mib = sum(p.stat().st_size for p in dense.glob("*.safetensors")) / 2**20
    print(
        f"dense: hidden {shape[0]}, intermediate {shape[1]}, {shape[2]} layers, vocab {shape[3]}, "
        f"{size_mib:.0f} MiB float32; {args.experts} experts"
    )

    results = {}
    ours_out = workdir / "ours"
    results["upcycle convert"] = measure(
        [
            sys.executable,
            "-m",
            "upcycle.cli",
            "convert",
            str(dense),
            str(ours_out),
            "--experts",
            str(args.experts),
            "--top-k",
            "2",
            "--quiet",
            "--force",
        ]
    )
    if args.mergekit_moe:
        config = workdir / "mergekit-moe.yml"
        config.write_text(mergekit_config(dense, args.experts))
        theirs_out = workdir / "mergekit"
        shutil.rmtree(theirs_out, ignore_errors=True)
        results["mergekit-moe"] = measure([args.mergekit_moe, str(config), str(theirs_out)])
    else:
        print("mergekit-moe not found: pip install mergekit, or pass --mergekit-moe PATH")

    print("\n| tool | exit | wall s | peak RSS MiB |\n|---|---|---|---|")
    for tool, result in results.items():
        print(f"| {tool} | {result['code']} | {result['wall_s']:.1f} | {result['peak_rss_mib']:.0f} |")
        if result["code"] != 0:
            print(f"  {tool} failed: {result['stderr'].strip().splitlines()[-1:]}")
    if "mergekit-moe" in results and results["mergekit-moe"]["code"] == 0:
        ours, theirs = results["upcycle convert"], results["mergekit-moe"]
        print(
            f"\nours/mergekit: wall {ours['wall_s'] / theirs['wall_s']:.2f}x, "
            f"peak RSS {ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}x"
        )


if __name__ == "__main__":
    main()
