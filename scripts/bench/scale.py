"""Benchmark: `upcycle convert` and `upcycle merge` at a real size, against the disk they run on.

Builds a Llama-3.2-1B-shaped random bfloat16 model (hidden 2048, intermediate 8192, 16 layers, 32
heads, 8 kv heads, vocab 128256, tied embeddings: 2.47 GB), written tensor by tensor with our
streaming writer (never the whole state dict in memory), with examples/tiny-llama's tokenizer
(2048 ids, all inside the model's vocabulary). Then, each in its own process, one after the
other, with every input file dropped from the page cache first (posix_fadvise DONTNEED):

- `upcycle convert` into 8 experts (13.75 GB);
- `upcycle merge` of that MoE back into a dense model: `average`, `frequency` (with a small
  calibration file), `ties` and `dare` (against the dense model) and `--experts 4`;
- `upcycle export` of a block-routed MoPE adapter (8 LoRA experts of rank 16 on the FFN, top-2,
  random non-zero weights; built once with PEFT and kept next to the dense model) into the same
  8-expert MoE: it loads the dense model whole (the export works from the PEFT model in memory)
  and writes through the same streaming writer;
- `mergekit-moe` on the same conversion, if found (`--mergekit-moe PATH`, default: on PATH).

Each job is timed to durable: the process plus a `sync` after it. The disk's limit for a job is
bytes read / direct read rate + bytes written / direct write rate, with both rates measured by `dd`
(iflag=direct / oflag=direct, random data: this disk writes zeros faster than data) on the output
disk in the same run. Printed per job: wall seconds, MB/s (bytes read + written / wall), the share
of the limit (wall / limit; 1.0x is the disk's speed), peak RSS (scripts/bench/peak_rss.py), and
the job's CPU seconds (user + system, all threads), which other jobs on the machine do not inflate.
Outputs are deleted as soon as they are measured; the full run needs about 20 GB free at once.

    python scripts/bench/scale.py [--workdir DIR] [--small] [--mergekit-moe PATH] [--jobs convert,average,...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peak_rss import measure

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

FULL = {"hidden": 2048, "intermediate": 8192, "layers": 16, "heads": 32, "kv_heads": 8, "vocab": 128256}
SMALL = {"hidden": 512, "intermediate": 2048, "layers": 4, "heads": 8, "kv_heads": 2, "vocab": 32000}
JOBS = ("convert", "average", "frequency", "ties", "dare", "experts4", "export", "mergekit-moe")


def llama_config(shape: dict) -> dict:
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["hidden"] // shape["heads"],
        vocab_size=shape["vocab"],
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    config.architectures = ["LlamaForCausalLM"]
    result = config.to_dict()
    result["dtype"] = "bfloat16"
    return result


def make_dense(directory: Path, shape: dict) -> None:
    """Write the random bf16 Llama one tensor at a time (generated, written, dropped)."""
    import torch

    from upcycle.checkpoint.write import StreamingWriter, TensorSpec

    hidden, inter, heads, kv = shape["hidden"], shape["intermediate"], shape["heads"], shape["kv_heads"]
    kv_width = hidden // heads * kv
    shapes = {"model.embed_tokens.weight": (shape["vocab"], hidden)}
    for layer in range(shape["layers"]):
        prefix = f"model.layers.{layer}."
        shapes |= {
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
            prefix + "self_attn.q_proj.weight": (hidden, hidden),
            prefix + "self_attn.k_proj.weight": (kv_width, hidden),
            prefix + "self_attn.v_proj.weight": (kv_width, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, hidden),
            prefix + "mlp.gate_proj.weight": (inter, hidden),
            prefix + "mlp.up_proj.weight": (inter, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inter),
        }
    shapes["model.norm.weight"] = (hidden,)
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = StreamingWriter(tmp, [TensorSpec(n, torch.bfloat16, s) for n, s in shapes.items()], "5GB")
    generator = torch.Generator().manual_seed(0)
    for name, tensor_shape in shapes.items():
        if len(tensor_shape) == 1:
            tensor = torch.ones(tensor_shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(tensor_shape, generator=generator) * 0.02).to(torch.bfloat16)
        writer.write(name, tensor)
        del tensor
    writer.close()
    (tmp / "config.json").write_text(json.dumps(llama_config(shape), indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(REPO / "examples" / "tiny-llama" / name, tmp / name)
    tmp.rename(directory)


def make_mope_adapter(directory: Path, dense: Path) -> None:
    """Save a block-routed MoPE adapter for `dense`: 8 experts of rank 16 on gate/up/down, top-2, with random
    non-zero LoRA and router weights (the bytes an export writes do not depend on their values)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    import mope

    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.bfloat16)
    config = mope.MoPEConfig(
        num_experts=8, top_k=2, r=16, routing="block", target_modules=["gate_proj", "up_proj", "down_proj"]
    )
    model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name or "mope_router" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tmp.rename(directory)


def files_of(*directories: Path) -> list[Path]:
    return [path for directory in directories for path in sorted(directory.rglob("*")) if path.is_file()]


def size_of(*directories: Path) -> int:
    return sum(path.stat().st_size for path in files_of(*directories))


def drop_from_cache(*directories: Path) -> None:
    """Drop every file of `directories` from the page cache (they are clean: written and synced)."""
    for path in files_of(*directories):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def dd_rates(workdir: Path, size_mib: int) -> tuple[float, float]:
    """Return (direct write, direct read) bytes per second of the disk under `workdir`, measured by dd
    with random data (a random source file in the page cache, copied with oflag=direct, then read
    back with iflag=direct)."""
    source, target = workdir / "dd-source.bin", workdir / "dd-target.bin"
    block = 64
    with open(source, "wb") as handle:
        for _ in range(size_mib // block):
            handle.write(os.urandom(block * 2**20))
    rates = []
    for args in (
        [f"if={source}", f"of={target}", "oflag=direct", "conv=fsync"],
        [f"if={target}", "of=/dev/null", "iflag=direct"],
    ):
        result = subprocess.run(["dd", f"bs={block}M", *args], capture_output=True, text=True, check=True)
        match = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", result.stderr)
        rates.append(int(match.group(1)) / float(match.group(2)))
    source.unlink()
    target.unlink()
    return rates[0], rates[1]


def timed(command: list[str]) -> dict:
    """Run `command` (peak RSS, wall) and a `sync` after it: the time until its output is durable."""
    result = measure(command)
    start = time.perf_counter()
    os.sync()
    result["sync_s"] = time.perf_counter() - start
    result["durable_s"] = result["wall_s"] + result["sync_s"]
    return result


def mergekit_config(dense: Path, experts: int) -> str:
    lines = [f"base_model: {dense}", "gate_mode: random", "dtype: bfloat16", "experts:"]
    lines += [f'  - source_model: {dense}\n    positive_prompts: [""]' for _ in range(experts)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="where to put the checkpoints (default: a temp dir)")
    parser.add_argument("--small", action="store_true", help="a hidden-512, 4-layer model for a quick run")
    parser.add_argument("--mergekit-moe", default=shutil.which("mergekit-moe"), help="path to mergekit-moe")
    parser.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated subset of {','.join(JOBS)}")
    parser.add_argument("--dd-mib", type=int, default=None, help="dd test size (default 4096, --small 512)")
    parser.add_argument("--keep", action="store_true", help="keep the dense model and the MoE afterwards")
    args = parser.parse_args()
    jobs = args.jobs.split(",")
    shape = SMALL if args.small else FULL
    work = Path(args.workdir or tempfile.mkdtemp(prefix="upcycle-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    dense, moe = work / "dense", work / "moe"
    if not (dense / "config.json").exists():
        start = time.perf_counter()
        make_dense(dense, shape)
        print(f"built the dense model in {time.perf_counter() - start:.1f} s")
    calibration = work / "calibration.txt"
    calibration.write_text("\n".join(f"The quick brown fox {i} jumps over the lazy dog {i * 7}." for i in range(64)))
    write_rate, read_rate = dd_rates(work, args.dd_mib or (512 if args.small else 4096))
    print(
        f"dense: hidden {shape['hidden']}, intermediate {shape['intermediate']}, {shape['layers']} layers, "
        f"vocab {shape['vocab']}, bfloat16, {size_of(dense) / 1e9:.2f} GB; "
        f"dd direct write {write_rate / 1e6:.0f} MB/s, direct read {read_rate / 1e6:.0f} MB/s"
    )

    cli = [sys.executable, "-m", "upcycle.cli"]
    results: dict[str, tuple[dict, int, int]] = {}

    def run(job: str, command: list[str], inputs: list[Path], output: Path) -> None:
        shutil.rmtree(output, ignore_errors=True)
        os.sync()
        drop_from_cache(*inputs)
        result = timed(command)
        read, written = size_of(*inputs), size_of(output) if output.exists() else 0
        results[job] = (result, read, written)
        limit = read / read_rate + written / write_rate
        status = "" if result["code"] == 0 else f" FAILED: {result['stderr'].strip().splitlines()[-1:]}"
        print(
            f"{job}: {result['durable_s']:.1f} s (sync {result['sync_s']:.1f}), limit {limit:.1f} s, "
            f"peak RSS {result['peak_rss_mib']:.0f} MiB{status}",
            flush=True,
        )

    if "convert" in jobs or not (moe / "config.json").exists():
        convert = [*cli, "convert", str(dense), str(moe), "--experts", "8", "--top-k", "2", "--quiet"]
        run("convert", convert, [dense], moe)
    merges = {
        "average": [],
        "frequency": [
            "--method",
            "frequency",
            "--calibration",
            str(calibration),
            "--calibration-samples",
            "16",
            "--max-length",
            "32",
        ],
        "ties": ["--method", "ties", "--base", str(dense)],
        "dare": ["--method", "dare", "--base", str(dense)],
        "experts4": ["--experts", "4"],
    }
    for job, options in merges.items():
        if job not in jobs:
            continue
        inputs = [moe, dense] if job in ("ties", "dare") else [moe]
        out = work / f"merged-{job}"
        run(f"merge {job}", [*cli, "merge", str(moe), str(out), *options, "--quiet"], inputs, out)
        shutil.rmtree(out, ignore_errors=True)
    if "export" in jobs:
        adapter = work / "mope-adapter"
        if not (adapter / "adapter_config.json").exists():
            make_mope_adapter(adapter, dense)
        out = work / "exported"
        run(
            "export",
            [*cli, "export", str(adapter), str(out), "--base-model", str(dense), "--quiet"],
            [dense, adapter],
            out,
        )
        shutil.rmtree(out, ignore_errors=True)
    if "mergekit-moe" in jobs:
        if args.mergekit_moe:
            if not args.keep:
                shutil.rmtree(moe, ignore_errors=True)  # room for theirs
            config = work / "mergekit-moe.yml"
            config.write_text(mergekit_config(dense, 8))
            out = work / "mergekit"
            run("mergekit-moe", [args.mergekit_moe, str(config), str(out)], [dense], out)
            shutil.rmtree(out, ignore_errors=True)
        else:
            print("mergekit-moe not found: pip install mergekit, or pass --mergekit-moe PATH")
    if not args.keep:
        shutil.rmtree(moe, ignore_errors=True)

    cores = os.cpu_count() or 1
    print(f"\nCPU s: user + system seconds of the job (all threads); / {cores} cores: the wall time it needs at least")
    print("when the machine is quiet, whatever the disk (it shows how far CPU load from other jobs inflated wall s).")
    print(
        "\n| job | wall s (to durable) | GB read | GB written | MB/s | disk limit s | x limit | peak RSS MiB "
        f"| CPU s | CPU s / {cores} cores / disk limit |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for job, (result, read, written) in results.items():
        limit = read / read_rate + written / write_rate
        wall = result["durable_s"]
        print(
            f"| {job} | {wall:.1f} | {read / 1e9:.2f} | {written / 1e9:.2f} | {(read + written) / wall / 1e6:.0f} "
            f"| {limit:.1f} | {wall / limit:.2f}x | {result['peak_rss_mib']:.0f} | {result['cpu_s']:.1f} "
            f"| {result['cpu_s'] / cores / limit:.2f}x |"
        )
    if "convert" in results and "mergekit-moe" in results and results["mergekit-moe"][0]["code"] == 0:
        ours, theirs = results["convert"][0], results["mergekit-moe"][0]
        print(
            f"\nconvert / mergekit-moe: wall {ours['durable_s'] / theirs['durable_s']:.2f}x, "
            f"peak RSS {ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}x"
        )
    layer_experts = 8 * 3 * shape["hidden"] * shape["intermediate"] * 2
    print(f"one layer's experts: {layer_experts / 2**20:.0f} MiB (bfloat16)")


if __name__ == "__main__":
    main()
