"""Tiny dense models of every supported family, built from configs with random weights."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.1,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# name -> (model_type, extra config fields); each covers a feature the converter must carry over.
DENSE_CASES: dict[str, tuple[str, dict]] = {
    "llama-gqa": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-rope-llama3": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        },
    ),
    "llama-head-dim": ("llama", {"head_dim": 16}),
    "mistral-sliding": ("mistral", {"sliding_window": 4}),
    "qwen2": ("qwen2", {}),
    "qwen3-head-dim": ("qwen3", {"head_dim": 16}),
    "granite": (
        "granite",
        {
            "embedding_multiplier": 3.0,
            "attention_multiplier": 0.5,
            "residual_multiplier": 0.7,
            "logits_scaling": 2.0,
        },
    ),
    "olmo2": ("olmo2", {}),
}


def make_dense(directory: Path, model_type: str, seed: int = 0, **fields) -> Path:
    """Save a tiny random dense model of `model_type` to `directory` and return the directory."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**COMMON, **fields})
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    return directory


def logits(directory: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """Return float32 logits of the model saved at `directory`, loaded with stock transformers."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids).logits


def write_stdlib_corpus(path: Path, modules: tuple[str, ...] = ("argparse", "dataclasses", "functools")) -> Path:
    """Write the sources of some standard-library modules to `path` as a calibration text file
    (paragraphs separated by blank lines) and return the path."""
    import importlib
    import inspect

    path.write_text("\n\n".join(inspect.getsource(importlib.import_module(name)) for name in modules))
    return path
