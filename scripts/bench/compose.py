"""Benchmark: `upcycle compose` vs `mergekit-moe` on four ~200M-parameter Llama sources.

Four dense Llamas with distinct random weights (hidden 1024, intermediate 2816, 12 layers, vocab
32000, float32, 838 MiB each; the first is also the base) become one 4-expert Mixtral with hidden
gates from the same positive prompts, each tool in its own process, one after the other. The script
prints wall time and peak RSS (max resident set, file-backed pages included) of each and the
ours/theirs ratios.

mergekit is optional and lives in its own virtual environment (its pins differ from ours):

    python -m venv /tmp/venv-mk && /tmp/venv-mk/bin/pip install mergekit
    python scripts/bench/compose.py [--mergekit-moe PATH] [--workdir DIR] [--small]

Without mergekit-moe (on PATH, in /tmp/venv-mk, or given) only our numbers are printed.
"""

from __future__ import annotations

import argparse
import json
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
    torch.manual_seed(int(sys.argv[2]))
    hidden, inter, layers, vocab = (int(x) for x in sys.argv[3:7])
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         vocab_size=vocab, num_attention_heads=16, num_key_value_heads=16)
    LlamaForCausalLM(config).save_pretrained(sys.argv[1])
    """
)

PROMPTS = (
    ["def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)", "import os\nimport sys"],
    ["Solve for x: 3x + 7 = 22.", "What is the derivative of x squared?"],
    ["Once upon a time, in a small village by the sea,", "The old lighthouse keeper told a story."],
    ["Translate to French: the cat sleeps on the mat.", "Bonjour, comment allez-vous ?"],
)
TINY_LLAMA = Path(__file__).parents[2] / "examples" / "tiny-llama"


def find_mergekit(given: str | None) -> str | None:
    """Return the mergekit-moe to run: the given one, one on PATH, or /tmp/venv-mk's."""
    if given:
        return given
    on_path = shutil.which("mergekit-moe")
    if on_path:
        return on_path
    venv = Path("/tmp/venv-mk/bin/mergekit-moe")
    return str(venv) if venv.exists() else None


def make_sources(workdir: Path, shape: tuple[str, ...], count: int) -> list[Path]:
    sources = []
    for index in range(count):
        directory = workdir / f"source{index}"
        if not (directory / "config.json").exists():
            subprocess.run([sys.executable, "-c", MAKE_DENSE, str(directory), str(index), *shape], check=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):  # a real tokenizer: hidden gates tokenize
            if not (directory / name).exists():
                shutil.copyfile(TINY_LLAMA / name, directory / name)
        sources.append(directory)
    return sources


def recipes(sources: list[Path]) -> tuple[str, str]:
    """Return (our recipe, mergekit's config) for the same MoE: base = source 0, hidden gates."""
    ours = {
        "base": str(sources[0]),
        "router_init": "hidden",
        "top_k": 2,
        "experts": [{"source": str(s), "positive_prompts": p} for s, p in zip(sources, PROMPTS, strict=False)],
    }
    theirs = [f"base_model: {sources[0]}", "gate_mode: hidden", "dtype: float32", "experts_per_token: 2", "experts:"]
    for source, prompts in zip(sources, PROMPTS, strict=False):
        theirs += [f"  - source_model: {source}", f"    positive_prompts: {json.dumps(prompts)}"]
    return json.dumps(ours, indent=1), "\n".join(theirs) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mergekit-moe", default=None, help="path to mergekit-moe (default: PATH, /tmp/venv-mk)")
    parser.add_argument("--workdir", default=None, help="where to put the checkpoints (default: a temp dir)")
    parser.add_argument("--small", action="store_true", help="a 4-layer, hidden-256 model for a smoke run")
    args = parser.parse_args()

    shape = ("256", "704", "4", "32000") if args.small else ("1024", "2816", "12", "32000")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="upcycle-bench-compose-"))
    workdir.mkdir(parents=True, exist_ok=True)
    sources = make_sources(workdir, shape, len(PROMPTS))
    size_mib = sum(p.stat().st_size for p in sources[0].glob("*.safetensors")) / 2**20
    print(
        f"sources: 4 Llamas (distinct random weights), hidden {shape[0]}, intermediate {shape[1]}, {shape[2]} layers, "
        f"vocab {shape[3]}, {size_mib:.0f} MiB float32 each; 4 experts, top-2, hidden gates"
    )
    ours_recipe, mergekit_config = recipes(sources)
    (workdir / "compose.yaml").write_text(ours_recipe)
    (workdir / "mergekit-moe.yml").write_text(mergekit_config)

    results = {}
    command = [sys.executable, "-m", "upcycle.cli", "compose", str(workdir / "compose.yaml"), str(workdir / "ours")]
    results["upcycle compose"] = measure([*command, "--quiet", "--force"])
    mergekit = find_mergekit(args.mergekit_moe)
    if mergekit:
        shutil.rmtree(workdir / "mergekit", ignore_errors=True)
        results["mergekit-moe"] = measure([mergekit, str(workdir / "mergekit-moe.yml"), str(workdir / "mergekit")])
    else:
        print(
            "mergekit-moe not found, peer skipped: python -m venv /tmp/venv-mk && /tmp/venv-mk/bin/pip install "
            "mergekit (or pass --mergekit-moe PATH)"
        )

    print("\n| tool | exit | wall s | peak RSS MiB |\n|---|---|---|---|")
    for tool, result in results.items():
        print(f"| {tool} | {result['code']} | {result['wall_s']:.1f} | {result['peak_rss_mib']:.0f} |")
        if result["code"] != 0:
            print(f"  {tool} failed: {result['stderr'].strip().splitlines()[-1:]}")
    if results.get("mergekit-moe", {}).get("code") == 0 and results["upcycle compose"]["code"] == 0:
        ours, theirs = results["upcycle compose"], results["mergekit-moe"]
        print(
            f"| ours / mergekit | | {ours['wall_s'] / theirs['wall_s']:.2f}x | "
            f"{ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}x |"
        )


if __name__ == "__main__":
    main()
