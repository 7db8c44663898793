"""File names and dtype tables of Hugging Face checkpoints on disk, shared by the reader and the writer."""

from __future__ import annotations

import torch

from upcycle.errors import UpcycleError

CONFIG_FILE = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_SAFETENSORS = "model.safetensors"
SHARD_PATTERN = "model{suffix}.safetensors"  # huggingface_hub's pattern: model-00001-of-00003.safetensors
BIN_INDEX = "pytorch_model.bin.index.json"

# Files besides the weights that travel with a model: tokenizer, chat template, generation config.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
GENERATION_CONFIG = "generation_config.json"
SIDE_FILES = (*TOKENIZER_FILES, GENERATION_CONFIG)

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES_BY_SAFETENSORS_NAME = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """Return the torch dtype named by `name` ("float32", "bf16", ...), or None for None/"auto".

    Raises:
        UpcycleError: the name is not a supported floating dtype.
    """
    if name is None or name == "auto":
        return None
    if name not in DTYPE_NAMES:
        raise UpcycleError(f"unknown dtype {name!r}: use one of auto, {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


def dtype_name(dtype: torch.dtype | None) -> str:
    """Return the config.json spelling of `dtype` ("float32", "bfloat16"), or "auto" for None."""
    return str(dtype or "auto").replace("torch.", "")
