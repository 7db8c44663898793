"""Training data: load with `datasets`, tokenize for continued pretraining (packed) or SFT (loss on
the completion only), and batch with a deterministic, resumable order.

Every example becomes ``input_ids`` and ``labels`` of equal length; ``labels`` is -100 where no loss
is taken (prompt tokens, padding). Models shift labels themselves, so position t predicts t+1.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from upcycle.data_files import DataFileError, is_local_file, load_error_detail, resolve_data_source
from upcycle.training.config import ConfigError, DataSection

IGNORE_INDEX = -100


def resolve_source(source: str, key: str) -> tuple[str, dict[str, Any]]:
    """Return ``(builder_or_hub_id, load_dataset kwargs)`` for a local file, a directory or a Hub id
    (`upcycle.data_files.resolve_data_source`, the resolver calibration uses too).

    Raises:
        ConfigError: naming `key`, for any problem the resolver finds (a missing file, an unknown
            extension, an empty or non-UTF-8 file, an empty directory).
    """
    try:
        return resolve_data_source(source)
    except DataFileError as err:
        raise ConfigError(f"{key}: {err}") from None


def check_data_sources(data: DataSection) -> None:
    """Fail early (before any model is loaded) on local data files that are missing or unreadable.

    Raises:
        ConfigError: naming ``data.train`` or ``data.eval``.
    """
    resolve_source(data.train, "data.train")
    if data.eval:
        resolve_source(data.eval, "data.eval")


def load_raw(source: str, key: str, data: DataSection, split: str) -> Any:
    """Return the `datasets.Dataset` split `split` of `source` (local file/dir or Hub id), cut to
    ``data.max_samples`` rows.

    Raises:
        ConfigError: as `resolve_source`, a split other than train of a local file, or a dataset
            `datasets` cannot load (one line, naming `key`).
    """
    from datasets import load_dataset

    builder, kwargs = resolve_source(source, key)
    if is_local_file(kwargs) and split != "train":
        raise ConfigError(f"{key}: a local file holds a single 'train' split, not {split!r}; set the split to train")
    try:
        dataset = load_dataset(builder, data.subset, split=split, **kwargs)
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        raise ConfigError(f"{key}: cannot load {source}: {load_error_detail(err)}") from None
    if data.max_samples is not None:
        dataset = dataset.select(range(min(data.max_samples, len(dataset))))
    return dataset


def _require_columns(dataset: Any, columns: list[str], key: str, source: str) -> None:
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise ConfigError(
            f"{key}: {source} has no column {missing[0]!r} (columns: {', '.join(dataset.column_names)}); "
            f"set data.{key.split('.')[-1]} or data.format"
        )


def _bos_eos(tokenizer: Any) -> tuple[list[int], int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("model.tokenizer: the tokenizer has no eos token, which separates documents and ends answers")
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = [probe[0]] if tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id] else []
    return bos, eos


def pack_texts(tokenizer: Any, texts: list[str], seq_len: int) -> list[list[int]]:
    """Return the token ids of `texts` (each as ``[bos] ids eos``) concatenated and cut into blocks
    of `seq_len`; the incomplete last block is dropped."""
    bos, eos = _bos_eos(tokenizer)
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(bos + ids + [eos])
    usable = len(stream) // seq_len * seq_len
    return [stream[start : start + seq_len] for start in range(0, usable, seq_len)]


def completion_example(tokenizer: Any, prompt: str, completion: str, seq_len: int) -> dict[str, list[int]]:
    """Return ``input_ids`` = ``[bos] prompt completion eos`` and ``labels`` masking the prompt, cut to `seq_len`."""
    bos, eos = _bos_eos(tokenizer)
    prompt_ids = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos]
    input_ids = (prompt_ids + completion_ids)[:seq_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:seq_len]
    return {"input_ids": input_ids, "labels": labels}


def chat_example(tokenizer: Any, messages: list[dict], seq_len: int) -> dict[str, list[int]]:
    """Return a chat rendered with the tokenizer's chat template, with loss on assistant turns only.

    Each assistant turn's tokens are found as the difference between the conversation rendered up
    to that turn and the same prefix rendered with a generation prompt.

    Raises:
        ConfigError: the tokenizer has no chat template, or the template does not render a
            conversation as an extension of its prefixes (the masking would be wrong).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.format: 'chat' needs a tokenizer with a chat template; use prompt_completion instead")

    def render(turns: list[dict], generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    input_ids = render(messages, False)
    labels = [IGNORE_INDEX] * len(input_ids)
    for turn, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = len(render(messages[:turn], True))
        upto = render(messages[: turn + 1], False)
        if upto != input_ids[: len(upto)] or start > len(upto):
            raise ConfigError(
                "data.format: the chat template does not render a conversation as an extension of its "
                "prefixes, so assistant tokens cannot be masked reliably; use prompt_completion instead"
            )
        labels[start : len(upto)] = input_ids[start : len(upto)]
    return {"input_ids": input_ids[:seq_len], "labels": labels[:seq_len]}


def tokenize_dataset(dataset: Any, tokenizer: Any, data: DataSection, key: str, source: str) -> Any:
    """Return `dataset` mapped to ``input_ids``/``labels`` columns according to ``data.format``.

    Raises:
        ConfigError: a missing column, or no example left after tokenization.
    """
    if data.format == "text":
        _require_columns(dataset, [data.text_field], f"{key}.text_field", source)
        if data.packing:

            def to_blocks(batch: dict[str, list]) -> dict[str, list[list[int]]]:
                blocks = pack_texts(tokenizer, [str(t) for t in batch[data.text_field]], data.seq_len)
                return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

            mapped = dataset.map(to_blocks, batched=True, remove_columns=dataset.column_names, num_proc=data.num_proc)
        else:

            def to_document(row: dict[str, Any]) -> dict[str, list[int]]:
                bos, eos = _bos_eos(tokenizer)
                ids = (bos + tokenizer(str(row[data.text_field]), add_special_tokens=False)["input_ids"] + [eos])[
                    : data.seq_len
                ]
                return {"input_ids": ids, "labels": list(ids)}

            mapped = dataset.map(to_document, remove_columns=dataset.column_names, num_proc=data.num_proc)
    elif data.format == "prompt_completion":
        _require_columns(dataset, [data.prompt_field, data.completion_field], f"{key}.prompt_field", source)
        mapped = dataset.map(
            lambda row: completion_example(
                tokenizer, str(row[data.prompt_field]), str(row[data.completion_field]), data.seq_len
            ),
            remove_columns=dataset.column_names,
            num_proc=data.num_proc,
        )
    else:
        _require_columns(dataset, [data.messages_field], f"{key}.messages_field", source)
        mapped = dataset.map(
            lambda row: chat_example(tokenizer, row[data.messages_field], data.seq_len),
            remove_columns=dataset.column_names,
            num_proc=data.num_proc,
        )
    mapped = mapped.filter(lambda row: any(label != IGNORE_INDEX for label in row["labels"][1:]))
    if len(mapped) == 0:
        raise ConfigError(
            f"{key}: {source} gives no training example (documents shorter than data.seq_len={data.seq_len} "
            "when packing, or completions cut off); lower data.seq_len or add data"
        )
    return mapped


def build_datasets(data: DataSection, tokenizer: Any, seed: int) -> tuple[Any, Any | None]:
    """Return ``(train, eval)`` tokenized datasets; eval is ``data.eval`` or a held-out
    ``data.eval_fraction`` of the raw training documents (split before packing: no leakage), or None.

    Raises:
        ConfigError: as `load_raw` and `tokenize_dataset`.
    """
    raw_train = load_raw(data.train, "data.train", data, data.split)
    if data.eval:
        raw_eval = load_raw(data.eval, "data.eval", data, data.eval_split or data.split)
    elif data.eval_split:
        raw_eval = load_raw(data.train, "data.eval_split", data, data.eval_split)
    elif data.eval_fraction > 0:
        if len(raw_train) < 2:
            raise ConfigError(f"data.eval_fraction: {data.train} has {len(raw_train)} row(s), too few to hold some out")
        parts = raw_train.train_test_split(test_size=data.eval_fraction, seed=seed, shuffle=True)
        raw_train, raw_eval = parts["train"], parts["test"]
    else:
        raw_eval = None
    train = tokenize_dataset(raw_train, tokenizer, data, "data", data.train)
    evaluation = tokenize_dataset(raw_eval, tokenizer, data, "data", data.eval or data.train) if raw_eval else None
    return train, evaluation


class PadCollator:
    """Batch examples, right-padding ``input_ids`` with `pad_token_id` and ``labels`` with -100."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Return ``input_ids``, ``attention_mask`` and ``labels`` as (B, longest) long tensors."""
        longest = max(len(example["input_ids"]) for example in examples)
        input_ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            input_ids[row, :length] = torch.tensor(example["input_ids"])
            labels[row, :length] = torch.tensor(example["labels"])
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class EpochShuffleSampler(Sampler[int]):
    """A random order of ``range(size)`` drawn from ``seed + epoch`` only.

    The order depends on nothing but the seed and the epoch set by `set_epoch` (Accelerate's
    prepared loader calls it), so a resumed run, and any number of processes sharing the batches,
    see exactly the order an uninterrupted single-process run sees.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of epoch `epoch`."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def count_target_tokens(labels: torch.Tensor) -> int:
    """Return how many positions of `labels` (B, S) are predicted after the causal shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
