"""Tiny models and helpers shared by the mope tests (no downloads: models are built from configs)."""

from __future__ import annotations

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import mope

FFN = ["gate_proj", "up_proj", "down_proj"]


def tiny_llama_config(**overrides) -> LlamaConfig:
    fields = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def input_ids(batch: int = 2, seq: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def randomize_routers(model, std: float = 1.0, seed: int = 2) -> None:
    """Give routers weights large enough that tokens pick different experts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "mope_router" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def mope_model(base=None, seed: int = 0, **config):
    """A tiny Llama with a MoPE adapter whose experts are non-zero (init_weights=False)."""
    config.setdefault("num_experts", 4)
    config.setdefault("r", 2)
    config.setdefault("target_modules", FFN)
    config.setdefault("init_weights", False)
    model = get_peft_model(base if base is not None else tiny_llama(seed), mope.MoPEConfig(**config))
    randomize_routers(model)
    return model.eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits
