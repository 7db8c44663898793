"""One training step of MoPE against PEFT LoRA and X-LoRA on a small Llama.

A step is forward (with labels), backward and AdamW on the adapter's parameters, float32, on CPU
(and on GPU when there is one). Contenders, all on gate/up/down_proj of every layer:

- MoPE linear: 8 experts, r 8, top-2, a router per projection (MoLoRA), aux loss added;
- MoPE block: the same experts, one router per FFN block (MixLoRA), aux loss added;
- LoRA r 64: PEFT LoRA with the same number of trainable parameters as the MoPE experts;
- LoRA r 8: PEFT LoRA with the rank of one expert;
- X-LoRA: PEFT's X-LoRA over 8 LoRA r 8 adapters saved to disk first, trainable
  (``use_trainable_adapters=True``), top-2 (``top_k_lora=2``); it runs a second forward pass to
  compute its scalings.

Times: every contender runs one step per round, rounds interleaved in one process so machine
noise hits all alike; the table shows medians and the ratio to LoRA r 64. Peak memory: each
contender runs a few steps in a fresh subprocess; the figure is the peak RSS growth over the
model-and-optimizer setup (CPU) or ``torch.cuda.max_memory_allocated`` (GPU).

    python scripts/bench/mope.py              # full run
    python scripts/bench/mope.py --quick      # fewer rounds, smaller batch

Target (issue 6): MoPE step time <= 1.3 x LoRA with the same trainable parameters (r 64).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# This file is named mope.py: drop its own folder from the path so that `import mope` finds the package.
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import mope  # noqa: E402

TARGETS = ["gate_proj", "up_proj", "down_proj"]
CONTENDERS = ("MoPE linear", "MoPE block", "LoRA r64", "LoRA r8", "X-LoRA")
REFERENCE = "LoRA r64"


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    )


def base_model(device: torch.device) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config()).to(device)


def xlora_model(device: torch.device, adapter_root: Path):
    """X-LoRA needs LoRA adapters on disk: save 8 LoRA r 8 adapters, then mix them."""
    from peft import XLoraConfig

    adapters = {}
    for index in range(8):
        lora = get_peft_model(base_model(torch.device("cpu")), LoraConfig(r=8, target_modules=TARGETS))
        lora.save_pretrained(adapter_root / f"expert{index}")
        # X-LoRA loads adapter i under the name str(i) but then activates the dict's keys
        # (peft 0.21, tuners/xlora/model.py:270-291), so the keys must be "0".."7".
        adapters[str(index)] = str(adapter_root / f"expert{index}")
    config = XLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=llama_config().hidden_size,
        adapters=adapters,
        use_trainable_adapters=True,
        top_k_lora=2,
        enable_softmax_topk=True,
        xlora_depth=1,
    )
    base = base_model(device)
    base.config.use_cache = False  # X-LoRA refuses a model that caches key/values
    return get_peft_model(base, config)


def build(name: str, device: torch.device, adapter_root: Path):
    """Return the PEFT model of contender `name`."""
    if name == "MoPE linear":
        config = mope.MoPEConfig(num_experts=8, r=8, top_k=2, target_modules=TARGETS, routing="linear")
    elif name == "MoPE block":
        config = mope.MoPEConfig(num_experts=8, r=8, top_k=2, target_modules=TARGETS, routing="block")
    elif name == "LoRA r64":
        config = LoraConfig(r=64, lora_alpha=128, target_modules=TARGETS)
    elif name == "LoRA r8":
        config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)
    elif name == "X-LoRA":
        return xlora_model(device, adapter_root)
    else:
        raise ValueError(name)
    return get_peft_model(base_model(device), config)


class Trainer:
    """One contender: its model, optimizer and a `step()` that runs one training step."""

    def __init__(self, name: str, model, input_ids: torch.Tensor):
        self.name, self.model, self.input_ids = name, model.train(), input_ids
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=1e-4)
        self.is_mope = name.startswith("MoPE")

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(input_ids=self.input_ids, labels=self.input_ids).loss
        if self.is_mope:
            loss = loss + mope.aux_loss(self.model)
        loss.backward()
        self.optimizer.step()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(trainers: dict[str, Trainer], rounds: int, device: torch.device) -> dict[str, list[float]]:
    for trainer in trainers.values():  # warm-up
        trainer.step()
        trainer.step()
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            synchronize(device)
            start = time.perf_counter()
            trainer.step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory_child(name: str, device_name: str, batch: int, seq: int) -> None:
    """Run in a fresh process: print the peak memory growth of three training steps as JSON.

    On CPU: free memory back to the OS (malloc_trim), reset the kernel's resident-set high-water
    mark (``/proc/self/clear_refs`` with 5, Linux >= 4.0), run the steps, and report VmHWM minus the
    resident set before them: activations, gradients and the AdamW state, not the model.
    """
    device = torch.device(device_name)
    with tempfile.TemporaryDirectory() as root:
        model = build(name, device, Path(root))
        input_ids = torch.randint(0, 4096, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
        trainer = Trainer(name, model, input_ids)
        gc.collect()
        if device.type == "cuda":
            synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            before = _status_kib("VmRSS") * 1024
        for _ in range(3):
            trainer.step()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _status_kib("VmHWM") * 1024
    trainable = sum(p.numel() for p in trainer.parameters)
    print(json.dumps({"peak_step_bytes": peak - before, "trainable": trainable}))


def peak_memory(name: str, device: torch.device, batch: int, seq: int) -> dict:
    command = [sys.executable, __file__, "--child", name, "--device", str(device), "--batch", str(batch)]
    command += ["--seq", str(seq)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller batch")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peak_memory_child(args.child, args.device, args.batch, args.seq)
        return

    batch, seq = (2, 128) if args.quick else (2, 256)
    rounds = args.rounds or (3 if args.quick else 7)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, os.cpu_count()={os.cpu_count()}, ", end="")
    print(f"load average {os.getloadavg()[0]:.1f}; Llama {llama_config().hidden_size} hidden, 4 layers; ", end="")
    print(f"batch {batch} x {seq} tokens; {rounds} interleaved rounds")
    for device in devices:
        input_ids = torch.randint(0, 4096, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
        trainers = {}
        skipped = {}
        with tempfile.TemporaryDirectory() as root:
            for name in CONTENDERS:
                try:
                    trainers[name] = Trainer(name, build(name, device, Path(root)), input_ids)
                except Exception as exc:  # noqa: BLE001 - a contender that cannot be set up is reported, not fatal
                    skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            times = time_steps(trainers, rounds, device)
        reference = statistics.median(times[REFERENCE])
        print(f"\n{device.type}: one training step (forward, backward, AdamW)")
        print(f"| contender | trainable params | median step ms | x {REFERENCE} | peak step memory MiB |")
        print("|---|---|---|---|---|")
        for name, trainer in trainers.items():
            median = statistics.median(times[name])
            memory = peak_memory(name, device, batch, seq)
            trainable = sum(p.numel() for p in trainer.parameters)
            print(
                f"| {name} | {trainable:,} | {median * 1e3:.1f} | {median / reference:.2f} "
                f"| {memory['peak_step_bytes'] / 2**20:.0f} |"
            )
        for name, reason in skipped.items():
            print(f"| {name} | could not be set up: {reason} | | | |")
        for name in ("MoPE linear", "MoPE block"):
            if name in times:
                ratio = statistics.median(times[name]) / reference
                verdict = "meets" if ratio <= 1.3 else "misses"
                print(f"{name}: {ratio:.2f} x {REFERENCE} ({verdict} the <= 1.3 x target)")


if __name__ == "__main__":
    main()
