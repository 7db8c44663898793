"""Calibration data: load text with `datasets`, tokenize it, and stream batches through a model.

Routines that collect statistics (FFN inputs for router initialisation, routing counts for
merging) build on `calibration_batches`, which yields one tokenized batch at a time so memory
stays bounded by a batch, whatever the data size.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from upcycle.errors import UpcycleError

LOCAL_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TEXT_FIELDS = ("text", "content", "prompt")


def load_calibration_texts(data: str | Path, samples: int = 128, split: str = "train") -> list[str]:
    """Return up to `samples` non-empty texts from a local text/jsonl/parquet file or a Hub dataset id.

    JSON/parquet rows use the first of the fields `text`, `content`, `prompt` that exists.

    Raises:
        UpcycleError: the file does not exist, has an unknown extension, has no text field, or the
            dataset cannot be loaded.
    """
    from datasets import load_dataset

    path = Path(data)
    if path.suffix:
        if not path.is_file():
            raise UpcycleError(f"calibration file {data} does not exist")
        if path.suffix not in LOCAL_FORMATS:
            raise UpcycleError(
                f"calibration file {data} has extension {path.suffix!r}; use one of {', '.join(LOCAL_FORMATS)}"
            )
        builder = LOCAL_FORMATS[path.suffix]
        kwargs = {"data_files": {split: str(path)}}
        if builder == "text":
            kwargs["sample_by"] = "paragraph"
        source = (builder, kwargs)
    else:
        source = (str(data), {})
    try:
        dataset = load_dataset(source[0], split=split, streaming=True, **source[1])
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        raise UpcycleError(f"cannot load calibration data {data}: {str(err).splitlines()[0]}") from None
    texts: list[str] = []
    for row in dataset:
        field = next((name for name in TEXT_FIELDS if name in row), None)
        if field is None:
            raise UpcycleError(f"calibration data {data} has no {'/'.join(TEXT_FIELDS)} field (fields: {list(row)})")
        text = str(row[field]).strip()
        if text:
            texts.append(text)
        if len(texts) >= samples:
            break
    if not texts:
        raise UpcycleError(f"calibration data {data} holds no text")
    return texts


def calibration_batches(
    tokenizer, texts: list[str], max_length: int = 256, batch_size: int = 4
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield tokenized batches (`input_ids`, `attention_mask`) of `texts`, truncated to `max_length`."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    for start in range(0, len(texts), batch_size):
        yield tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
