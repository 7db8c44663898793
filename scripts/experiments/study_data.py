"""The upcycling study's data: the Python standard library's sources split by file, and a BPE tokenizer.

Every Python install carries the same corpus, so the study runs offline anywhere. Files are
assigned to a split by a hash of their path relative to the standard library, so the split does not
depend on the order the file system lists them in, and a file's text never straddles two splits.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Folders of the standard library that are not library source (tests, vendored installers,
# demos) or not part of it at all (site-packages holds the environment's own packages).
EXCLUDED_FOLDERS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "__pycache__"}
)
SPLITS = ("pretrain", "continue", "heldout")
# Shares of files per split: the dense model is pretrained on one part, every method continues on
# a disjoint part (so no run sees text twice), and all are evaluated on the held-out files.
SPLIT_SHARES = {"pretrain": 0.45, "continue": 0.45, "heldout": 0.10}
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def stdlib_root() -> Path:
    """Return the standard library's folder of this Python."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """Return the standard library's `.py` files (paths relative to `root`), sorted, without tests,
    vendored packages and `site-packages`."""
    root = root or stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if EXCLUDED_FOLDERS.isdisjoint(relative.parts[:-1]) and not relative.parts[0].startswith("config-"):
            files.append(relative)
    return sorted(files)


def split_of(relative_path: Path | str) -> str:
    """Return the split ("pretrain", "continue" or "heldout") a file belongs to, from a hash of its path."""
    digest = hashlib.sha256(Path(relative_path).as_posix().encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    cumulative = 0.0
    for split in SPLITS:
        cumulative += SPLIT_SHARES[split]
        if position < cumulative:
            return split
    return SPLITS[-1]


@dataclass(frozen=True)
class Corpus:
    """The corpus files written for one study: one JSON-lines file per split (`{"text": ...}` per source file)."""

    files: dict[str, Path]
    documents: dict[str, int]
    characters: dict[str, int]

    def texts(self, split: str) -> list[str]:
        """Return the documents of `split`, in file order."""
        with self.files[split].open() as handle:
            return [json.loads(line)["text"] for line in handle]


def write_corpus(folder: Path, max_characters: dict[str, int] | None = None, root: Path | None = None) -> Corpus:
    """Write `pretrain.jsonl`, `continue.jsonl` and `heldout.jsonl` under `folder` and return them.

    `max_characters` caps a split (files in sorted order until the cap; used by `--quick`).

    Raises:
        RuntimeError: a split came out empty (a standard library without sources).
    """
    root = root or stdlib_root()
    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[str]] = {split: [] for split in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    for relative in stdlib_sources(root):
        split = split_of(relative)
        if max_characters and sizes[split] >= max_characters.get(split, float("inf")):
            continue
        text = (root / relative).read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        rows[split].append(text)
        sizes[split] += len(text)
    files = {}
    for split in SPLITS:
        if not rows[split]:
            raise RuntimeError(f"the {split} split of {root} holds no source file")
        files[split] = folder / f"{split}.jsonl"
        with files[split].open("w") as handle:
            for text in rows[split]:
                handle.write(json.dumps({"text": text}) + "\n")
    return Corpus(files, {split: len(rows[split]) for split in SPLITS}, sizes)


def train_tokenizer(texts: list[str], vocab_size: int):
    """Return a byte-level BPE `PreTrainedTokenizerFast` with `vocab_size` entries trained on `texts`
    (bos `<s>`, eos `</s>`, unk `<unk>`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
