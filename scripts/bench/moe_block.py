"""Speed of the generic MoE block against transformers' MixtralSparseMoeBlock and a dense LlamaMLP.

Forward + backward, float32, hidden 1024, intermediate 2816, 8 experts, top-2, at 32, 512 and
4096 tokens, on CPU and (when there is one) on GPU. Every contender runs once per round, rounds
interleaved in one process so that machine noise hits all alike; the table shows medians and
ratios. The MoE blocks share weights and router, so they route identically. One more row, "our
experts only", runs our expert matmuls on evenly split rows with no router, dispatch or combine:
the floor that any dispatch on top of these GEMMs can reach.

On the CPU a MoE step allocates several large tensors (the weight gradients alone are 8x the
dense FFN's), and glibc's default allocator returns each to the kernel when it is freed, so the
next step pays page faults again. `--allocator reuse` reruns the CPU tables in a process whose
glibc keeps freed memory (what jemalloc or tcmalloc do, as PyTorch's CPU performance guide
recommends); `both` (the default) prints the two.

    python scripts/bench/moe_block.py            # full run, both allocators
    python scripts/bench/moe_block.py --quick    # fewer rounds, 32 and 512 tokens only

Targets (issue 5): at 512 and 4096 tokens ours <= 1.1 x (2 x dense) and <= transformers' fastest;
at 32 tokens <= transformers' fastest.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, MixtralConfig
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from upcycle.moe import MoE, saved_activation_bytes

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 1024, 2816, 8, 2

# glibc malloc tunables that keep freed memory in the process (read at process start only).
REUSE_ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 32),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 36),
    "MALLOC_TOP_PAD_": str(1 << 30),
}


def reusing_allocator() -> bool:
    """Whether this process runs with `REUSE_ALLOCATOR_ENV` set."""
    return all(os.environ.get(name) == value for name, value in REUSE_ALLOCATOR_ENV.items())


class ExpertsOnly(torch.nn.Module):
    """Our expert matmuls on k copies of every token, split evenly over the experts: no router,
    no dispatch, no combine (the output is the sum of the k copies' expert outputs)."""

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        self.experts = moe.experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        rows = hidden_states.reshape(-1, HIDDEN).repeat(TOP_K, 1)
        sizes = torch.full((EXPERTS,), rows.shape[0] // EXPERTS, dtype=torch.long)
        sizes[: rows.shape[0] % EXPERTS] += 1
        output = self.experts(rows, sizes).view(TOP_K, -1, HIDDEN).sum(0)
        return output.view_as(hidden_states)


def transformers_implementations(device: torch.device) -> list[str]:
    """The experts implementations of transformers' ExpertsInterface that can run here."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    names = ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]
    # deepgemm and sonicmoe are CUDA kernels (bf16 / Hub kernels); skip them off GPU.
    gpu_only = {"deepgemm", "sonicmoe"}
    return [name for name in names if device.type == "cuda" or name not in gpu_only]


def batched_mm_bytes(tokens: int) -> int:
    """Memory transformers' batched_mm needs: it gathers a full weight copy per (token, expert)
    pair, and again for the gradient."""
    return 2 * tokens * TOP_K * 3 * INTERMEDIATE * HIDDEN * 4


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def build_contenders(device: torch.device) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    ours = MoE(HIDDEN, INTERMEDIATE, EXPERTS, TOP_K, router="topk").to(device)
    contenders: dict[str, torch.nn.Module] = {"upcycle MoE": ours}
    for implementation in transformers_implementations(device):
        config = MixtralConfig(
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_local_experts=EXPERTS,
            num_experts_per_tok=TOP_K,
        )
        config._experts_implementation = implementation
        block = MixtralSparseMoeBlock(config).to(device)
        with torch.no_grad():
            block.gate.weight.copy_(ours.router.weight)
            block.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
            block.experts.down_proj.copy_(ours.experts.down_proj)
        contenders[f"Mixtral {implementation}"] = block
    dense = LlamaMLP(LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE)).to(device)
    contenders["dense LlamaMLP"] = dense
    contenders["our experts only"] = ExpertsOnly(ours)
    return contenders


def step(module: torch.nn.Module, inputs: torch.Tensor, grad: torch.Tensor) -> None:
    for parameter in module.parameters():
        parameter.grad = None
    inputs.grad = None
    module(inputs).backward(grad)


def time_once(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench(
    device: torch.device, tokens: int, rounds: int, contenders: dict[str, torch.nn.Module]
) -> tuple[dict[str, float], dict[str, int]]:
    """Return each runnable contender's median step time (s) and its saved-for-backward bytes."""
    torch.manual_seed(tokens)
    inputs = torch.randn(1, tokens, HIDDEN, device=device, requires_grad=True)
    grad = torch.randn(1, tokens, HIDDEN, device=device)
    runnable = {}
    for name, module in contenders.items():
        if name == "Mixtral batched_mm" and batched_mm_bytes(tokens) > free_bytes(device) // 2:
            print(f"  skipped {name}: needs ~{batched_mm_bytes(tokens) / 2**30:.0f} GiB (a weight copy per pair)")
            continue
        try:
            step(module, inputs, grad)  # warm-up, and a check that it runs here
            runnable[name] = module
        except Exception as error:  # noqa: BLE001 - a contender that cannot run is reported, not fatal
            print(f"  skipped {name}: {type(error).__name__}: {str(error).splitlines()[0][:100]}")
    times: dict[str, list[float]] = {name: [] for name in runnable}
    for _ in range(rounds):
        for name, module in runnable.items():
            times[name].append(time_once(lambda module=module: step(module, inputs, grad), device))
    saved = {name: saved_activation_bytes(module, inputs) for name, module in runnable.items()}
    return {name: statistics.median(samples) for name, samples in times.items()}, saved


def print_table(device: torch.device, tokens: int, medians: dict[str, float], saved: dict[str, int]) -> None:
    dense = medians["dense LlamaMLP"]
    mixtral = {name: t for name, t in medians.items() if name.startswith("Mixtral")}
    fastest = min(mixtral, key=mixtral.get) if mixtral else None
    ours = medians["upcycle MoE"]
    allocator = "memory-reusing glibc" if reusing_allocator() else "glibc default"
    allocator = f", {allocator} allocator" if device.type == "cpu" else ""
    print(f"\n{device.type}, {tokens} tokens, forward+backward float32 (median ms{allocator})")
    print(f"  {'contender':<22} {'ms':>9} {'/ (2 x dense)':>14} {'/ ours':>8} {'saved for backward MiB':>23}")
    for name, seconds in medians.items():
        print(
            f"  {name:<22} {seconds * 1e3:9.2f} {seconds / (2 * dense):14.2f} {seconds / ours:8.2f}"
            f" {saved[name] / 2**20:23.1f}"
        )
    verdict = f"  ours / (2 x dense) = {ours / (2 * dense):.2f} (target <= 1.10 at 512 and 4096)"
    if fastest is not None:
        verdict += f"; ours / fastest transformers ({fastest}) = {ours / mixtral[fastest]:.2f} (target <= 1.00)"
    print(verdict)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, 32 and 512 tokens only")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per size (default 7, quick 3)")
    parser.add_argument("--tokens", type=int, nargs="*", default=None, help="token counts (default 32 512 4096)")
    parser.add_argument("--skip", nargs="*", default=[], help="contenders to leave out, e.g. 'Mixtral eager'")
    parser.add_argument("--device", choices=["cpu", "cuda"], nargs="*", default=None, help="default: cpu and cuda")
    parser.add_argument(
        "--allocator",
        choices=["default", "reuse", "both"],
        default="both",
        help="CPU allocator: glibc's default, one that keeps freed memory, or both (two processes)",
    )
    args = parser.parse_args()
    if args.allocator != "default" and not reusing_allocator():
        rerun_with_allocators(args.allocator)
        return
    rounds = args.rounds or (3 if args.quick else 7)
    token_counts = args.tokens or ([32, 512] if args.quick else [32, 512, 4096])
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"grouped_mm available: {hasattr(torch.nn.functional, 'grouped_mm')}"
    )
    for device_name in devices:
        device = torch.device(device_name)
        contenders = {name: m for name, m in build_contenders(device).items() if name not in args.skip}
        for tokens in token_counts:
            print_table(device, tokens, *bench(device, tokens, rounds, contenders))


def rerun_with_allocators(mode: str) -> None:
    """Run this script again per allocator (the glibc tunables only apply at process start); the
    reuse pass covers the CPU only. Exits with the first failing child's status. The options
    appended to the command override the user's (argparse keeps an option's last value)."""
    passes = [("default", {}), ("reuse", REUSE_ALLOCATOR_ENV)] if mode == "both" else [("reuse", REUSE_ALLOCATOR_ENV)]
    for name, extra_env in passes:
        command = [sys.executable, __file__, *sys.argv[1:], "--allocator", "default"]
        if name == "reuse":
            command += ["--device", "cpu"]
        status = subprocess.run(command, env={**os.environ, **extra_env}).returncode
        if status:
            sys.exit(status)


if __name__ == "__main__":
    main()
