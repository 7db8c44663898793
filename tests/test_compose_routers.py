"""Router initialisation of `upcycle compose`: hidden, cheap_embed and kmeans rows against hand
computations, and hidden gates that send each corpus to the expert trained on it."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_compose_support import perturbed, save_char_tokenizer
from tiny_models import make_dense
from transformers import AutoModelForCausalLM, AutoTokenizer

from upcycle.compose import compose

TINY_LLAMA = Path(__file__).parents[1] / "examples" / "tiny-llama"
ROUTER = "model.layers.{layer}.block_sparse_moe.gate.weight"


def bare_source(module: str) -> str:
    """Return `module`'s source with every docstring removed: Python code and no English prose."""
    tree = ast.parse(inspect.getsource(importlib.import_module(module)))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def docstrings(modules: tuple[str, ...]) -> list[str]:
    """Return the long prose docstrings (no doctests) of the callables in `modules`, one line each."""
    texts = []
    for module in modules:
        for value in vars(importlib.import_module(module)).values():
            doc = inspect.getdoc(value) if callable(value) else None
            if doc and len(doc) > 80 and ">>>" not in doc:
                texts.append(" ".join(doc.split()))
    return texts


def router_rows(directory: Path, layers: int) -> list[torch.Tensor]:
    with safe_open(directory / "model.safetensors", "pt") as reader:
        return [reader.get_tensor(ROUTER.format(layer=layer)) for layer in range(layers)]


def hand_ffn_input_mean(model_dir: Path, texts: list[str]) -> list[torch.Tensor]:
    """Per layer, the mean post-attention-norm output over the non-special tokens of `texts`, each
    text run alone (no padding): what the hidden router is made of."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layers = model.model.layers
    sums = [torch.zeros(model.config.hidden_size, dtype=torch.float64) for _ in layers]
    count = 0
    keep: list[torch.Tensor] = []

    def hook_for(index):
        def hook(_module, _args, output):
            sums[index] += output[0][keep[0]].double().sum(0)

        return hook

    handles = [layer.post_attention_layernorm.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    for text in texts:
        encoded = tokenizer(text, return_tensors="pt", return_special_tokens_mask=True)
        keep[:] = [~encoded["special_tokens_mask"][0].bool()]
        count += int(keep[0].sum())
        with torch.no_grad():
            model(input_ids=encoded["input_ids"])
    for handle in handles:
        handle.remove()
    return [total / count for total in sums]


def unit(row: torch.Tensor) -> torch.Tensor:
    return (row / row.norm()).float()


@pytest.fixture(scope="module")
def char_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny llama with a character tokenizer that adds BOS, and two FFN-perturbed copies."""
    root = tmp_path_factory.mktemp("compose-char")
    base = make_dense(root / "base", "llama")
    save_char_tokenizer(base)
    return {"base": base, "a": perturbed(base, root / "a", 1), "b": perturbed(base, root / "b", 2)}


POSITIVE = (["def f(x):\n    return x + 1", "for key in items:"], ["The quick brown fox jumps.", "Hello world"])
NEGATIVE = (["Hello there"], [])


def test_hidden_rows_are_the_prompt_means_of_the_ffn_inputs(char_models, tmp_path):
    experts = [
        {"source": str(char_models[name]), "positive_prompts": POSITIVE[i]}
        | ({"negative_prompts": NEGATIVE[i]} if NEGATIVE[i] else {})
        for i, name in enumerate(("a", "b"))
    ]
    compose(
        {"base": str(char_models["base"]), "router_init": "hidden", "experts": experts}, tmp_path / "moe", quiet=True
    )
    rows = router_rows(tmp_path / "moe", 2)
    code, english = (hand_ffn_input_mean(char_models["base"], list(prompts)) for prompts in POSITIVE)
    negative = hand_ffn_input_mean(char_models["base"], NEGATIVE[0])
    for layer in range(2):
        expected = torch.stack([unit(code[layer] - negative[layer]), unit(english[layer])])
        assert torch.allclose(rows[layer], expected, atol=1e-5), (rows[layer] - expected).abs().max()
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["upcycle"]["experts"][0]["negative_prompts"] == NEGATIVE[0]


def test_hidden_rows_of_some_layers_are_those_of_all_layers(char_models, tmp_path):
    """The prompt pass stops at the last MoE layer's FFN input: the rows it gives are bit for bit
    those of a pass through every layer."""
    experts = [{"source": str(char_models[name]), "positive_prompts": POSITIVE[i]} for i, name in enumerate("ab")]
    recipe = {"base": str(char_models["base"]), "router_init": "hidden", "target": "qwen2_moe", "experts": experts}
    compose(recipe, tmp_path / "all", quiet=True)
    compose(recipe, tmp_path / "first", moe_layers=[0], quiet=True)
    gate = "model.layers.{layer}.mlp.gate.weight"
    with (
        safe_open(tmp_path / "all" / "model.safetensors", "pt") as every,
        safe_open(tmp_path / "first" / "model.safetensors", "pt") as first,
    ):
        assert torch.equal(first.get_tensor(gate.format(layer=0)), every.get_tensor(gate.format(layer=0)))
        assert gate.format(layer=1) not in first.keys()


def test_cheap_embed_rows_are_the_prompt_means_of_the_token_embeddings(char_models, tmp_path):
    experts = [{"source": str(char_models[name]), "positive_prompts": POSITIVE[i]} for i, name in enumerate("ab")]
    recipe = {"base": str(char_models["base"]), "router_init": "cheap_embed", "experts": experts}
    compose(recipe, tmp_path / "moe", quiet=True)
    rows = router_rows(tmp_path / "moe", 2)
    tokenizer = AutoTokenizer.from_pretrained(char_models["base"])
    with safe_open(char_models["base"] / "model.safetensors", "pt") as reader:
        embedding = reader.get_tensor("model.embed_tokens.weight").double()
    expected = []
    for prompts in POSITIVE:
        ids = [i for text in prompts for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
        expected.append(unit(embedding[ids].mean(0)))
    for layer in range(2):
        assert torch.allclose(rows[layer], torch.stack(expected), atol=1e-6)


def test_kmeans_rows_are_each_experts_data_mean(char_models, tmp_path):
    texts = (["x = [i * 2 for i in range(10)]", "import os\nprint(os.sep)"], ["A story about a cat.", "It rained."])
    experts = []
    for index, name in enumerate("ab"):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts[index]))
        experts.append({"source": str(char_models[name]), "data": str(data)})
    compose(
        {"base": str(char_models["base"]), "router_init": "kmeans", "experts": experts}, tmp_path / "moe", quiet=True
    )
    rows = router_rows(tmp_path / "moe", 2)
    means = [hand_ffn_input_mean(char_models["base"], list(t)) for t in texts]
    for layer in range(2):
        assert torch.allclose(rows[layer], torch.stack([unit(m[layer]) for m in means]), atol=1e-5)


def _fine_tune(directory: Path, text: str, steps: int = 24) -> Path:
    """Save a copy of the shipped tiny Llama trained for `steps` steps on `text` (one thread: fast and steady)."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32)
    ids = torch.tensor(tokenizer(text)["input_ids"])
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - 65, (8,), generator=generator)
            batch = torch.stack([ids[start : start + 64] for start in starts])
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_LLAMA / name, directory / name)
    return directory


def test_hidden_gates_send_each_corpus_to_the_expert_trained_on_it(tmp_path):
    english = docstrings(("argparse", "functools", "json", "textwrap", "string", "collections", "os", "shutil"))
    code_ft = _fine_tune(tmp_path / "code", bare_source("functools")[:12000])
    english_ft = _fine_tune(tmp_path / "english", " ".join(english[::2])[:12000])
    prompts_code = [bare_source("dataclasses")[start : start + 300] for start in (1000, 5000, 9000, 13000)]
    prompts_english = [" ".join(english[start : start + 3])[:300] for start in (1, 9, 17, 25)]
    recipe = {
        "base": str(TINY_LLAMA),
        "router_init": "hidden",
        "top_k": 1,
        "experts": [
            {"source": str(code_ft), "positive_prompts": prompts_code},
            {"source": str(english_ft), "positive_prompts": prompts_english},
        ],
    }
    compose(recipe, tmp_path / "moe", quiet=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "moe")
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    held_out = {0: bare_source("textwrap")[:2000], 1: " ".join(english[1::2])[:2000]}
    for expert, text in held_out.items():
        ids = torch.tensor([tokenizer(text)["input_ids"][:512]])
        with torch.no_grad():
            router_logits = moe(input_ids=ids, output_router_logits=True).router_logits
        share = torch.stack([(logits.argmax(-1) == expert).float().mean() for logits in router_logits]).mean()
        assert share >= 0.7, (
            f"only {share:.2f} of the {'code' if expert == 0 else 'English'} tokens reach expert {expert}"
        )
