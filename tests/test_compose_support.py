"""Helpers for the compose tests (no tests here): perturbed fine-tunes of a tiny base, a
character-level tokenizer, and a hook that forces every router to one expert."""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import COMMON

MLP_MARK = ".mlp."


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    """Return every tensor of the single-file checkpoint in `directory`."""
    with safe_open(directory / "model.safetensors", "pt") as reader:
        return {name: reader.get_tensor(name) for name in reader.keys()}


def perturbed(base: Path, directory: Path, seed: int, scale: float = 0.05, ffn_only: bool = True) -> Path:
    """Save a copy of `base` whose FFN tensors (and, unless `ffn_only`, every other float tensor)
    are perturbed by N(0, scale^2) noise drawn from `seed`: a stand-in for a fine-tune of `base`."""
    shutil.copytree(base, directory)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, tensor in read_all(base).items():
        if MLP_MARK in name or not ffn_only:
            tensor = tensor + scale * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        tensors[name] = tensor.contiguous()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def save_char_tokenizer(directory: Path) -> None:
    """Save a character-level tokenizer (ids < 97) that adds a BOS token, a special token the router means skip."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_letters + string.digits + " .,:;()[]{}=_+-*/'\"#<>!?\n%&|@"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(dict.fromkeys(chars))}}
    assert len(vocab) <= COMMON["vocab_size"]
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.save_pretrained(directory)


def recipe_file(directory: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    """Write `recipe` as YAML (JSON is YAML) and return its path."""
    path = directory / name
    path.write_text(json.dumps(recipe, indent=1))
    return path


class ForcedRouter:
    """Inside the block, every `*TopKRouter` of `model` sends each token to `expert` with weight 1
    (transformers 5 routers return (logits, top-k weights, top-k indices))."""

    def __init__(self, model: torch.nn.Module, expert: int):
        self.model, self.expert, self.handles = model, expert, []

    def _hook(self, _module, _args, output):
        logits, weights, indices = output
        return logits, torch.ones_like(weights[:, :1]), torch.full_like(indices[:, :1], self.expert)

    def __enter__(self):
        routers = [m for m in self.model.modules() if type(m).__name__.endswith("TopKRouter")]
        assert routers, "no TopKRouter modules found"
        self.handles = [router.register_forward_hook(self._hook) for router in routers]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
