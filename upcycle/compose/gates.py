"""Router rows of a composed MoE, one per expert and MoE layer, from each expert's prompts or data.

- hidden: the base model's FFN inputs (the hidden state after the post-attention norm, which is
  what the router sees) at each MoE layer, averaged over every token of the expert's positive
  prompts, minus the same mean over its negative prompts, scaled to unit norm.
- cheap_embed: the same on the base's raw token embeddings (no forward pass); one row for every layer.
- kmeans: the mean FFN input over the expert's own `data` (its centroid, as in k-means with the
  assignment given by where each text comes from), unit norm.

Special tokens (BOS, EOS, padding) run through the model but are left out of every mean. The
base model runs once over all experts' texts (one model in memory, one batch at a time); sums
are float64, and identical prompt lists are run once. The weights are the safetensors files'
memory maps, so only the pages a forward pass reads become resident: the pass runs the backbone
without the LM head and stops at the last MoE layer's FFN input (what comes after cannot change
a router row), which keeps the head and the layers after it out of peak RSS.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from upcycle.calibration import calibration_batches, load_calibration_texts
from upcycle.checkpoint import SourceCheckpoint
from upcycle.compose.recipe import Recipe
from upcycle.errors import UpcycleError
from upcycle.families import FamilyPair
from upcycle.progress import progress, progress_bars

EMBEDDING = "model.embed_tokens.weight"
BATCH_SIZE = 8


class _LastFFNInputRead(Exception):
    """Raised by the hook on the last MoE layer's FFN input: the rest of the forward pass is not needed."""


def load_tokenizer(base: SourceCheckpoint, router_init: str):
    """Return the base's tokenizer, padding on the right (a padded batch then computes what each
    text alone does: causal attention never looks at the padding after a token).

    Raises:
        UpcycleError: the base has no tokenizer.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base.path)
    except (OSError, ValueError, TypeError) as err:
        raise UpcycleError(
            f"router_init {router_init} needs the base's tokenizer, which {base.name} lacks: "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def token_batches(tokenizer, texts: list[str], max_length: int, vocab_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Yield batches of `texts` as `input_ids`, `attention_mask` and `counted` (the mask without special tokens).

    Raises:
        UpcycleError: a token id outside the model's vocabulary (another model's tokenizer).
    """
    batch_size = BATCH_SIZE if tokenizer.pad_token is not None else 1
    for batch in calibration_batches(tokenizer, texts, max_length, batch_size, vocab_size, special_tokens_mask=True):
        counted = batch["attention_mask"].bool() & ~batch["special_tokens_mask"].bool()
        yield {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "counted": counted}


def _normalized(rows: torch.Tensor) -> torch.Tensor:
    return (rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-8)).float()


def _text_sets(recipe: Recipe) -> dict[tuple[str, ...], list[str]]:
    """Return every distinct list of texts the router rows need (prompts, or data loaded here)."""
    sets: dict[tuple[str, ...], list[str]] = {}
    for expert in recipe.experts:
        if recipe.router_init == "kmeans":
            texts = load_calibration_texts(expert.data, recipe.data_samples)
            sets[("data", expert.data)] = texts
            continue
        for prompts in (expert.positive_prompts, expert.negative_prompts):
            if prompts:
                sets[("prompts", *prompts)] = list(prompts)
    return sets


def _set_key(recipe: Recipe, index: int, negative: bool = False) -> tuple[str, ...] | None:
    expert = recipe.experts[index]
    if recipe.router_init == "kmeans":
        return ("data", expert.data)
    prompts = expert.negative_prompts if negative else expert.positive_prompts
    return ("prompts", *prompts) if prompts else None


def _check_counts(recipe: Recipe, counts: dict, key: tuple[str, ...]) -> None:
    if counts[key] == 0:
        what = f"data {key[1]}" if key[0] == "data" else f"prompts {list(key[1:])!r}"
        raise UpcycleError(f"{recipe.where}: the {what} hold no token besides special tokens")


def _rows_from_means(recipe: Recipe, means: dict, layers: list[int]) -> dict[int, torch.Tensor]:
    rows = {}
    for layer in layers:
        per_expert = []
        for index in range(len(recipe.experts)):
            row = means[_set_key(recipe, index)][layer].clone()
            negative = _set_key(recipe, index, negative=True)
            if negative is not None and negative != _set_key(recipe, index):
                row -= means[negative][layer]
            per_expert.append(row)
        rows[layer] = _normalized(torch.stack(per_expert))
    return rows


def hidden_router_rows(
    base: SourceCheckpoint, family: FamilyPair, layers: list[int], recipe: Recipe, quiet: bool
) -> dict[int, torch.Tensor]:
    """Return {MoE layer: (experts, hidden) float32 unit rows} from the base model's FFN inputs on
    each expert's prompts (hidden) or data (kmeans); see the module docstring.

    Raises:
        UpcycleError: the base has no tokenizer, data cannot be loaded, or a text set holds no
            ordinary token.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(base, recipe.router_init)
    sets = _text_sets(recipe)
    with progress_bars(not quiet):
        model = AutoModelForCausalLM.from_pretrained(base.path, dtype="auto")
    model.eval()
    vocab = int(model.get_input_embeddings().num_embeddings)
    gate = family.dense_mlp.gate.removesuffix(".weight")
    named = dict(model.named_modules())
    backbone = model.base_model  # the decoder without the LM head, whose weights are then never read
    last_layer = max(layers)
    sums: dict[int, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}

    def hook_for(layer: int):
        def hook(_module, args):
            hidden = args[0].reshape(-1, args[0].shape[-1])[state["counted"]]
            sums[layer] += hidden.to(torch.float64).sum(0)
            if layer == last_layer:
                raise _LastFFNInputRead

        return hook

    handles = [named[gate.format(layer=layer)].register_forward_pre_hook(hook_for(layer)) for layer in layers]
    hidden_size = int(model.config.hidden_size)
    total = sum(-(-len(texts) // BATCH_SIZE) for texts in sets.values())
    bar = progress(None, quiet=quiet, total=total, desc=f"router prompts ({recipe.router_init})", unit="batch")
    means: dict[tuple[str, ...], dict[int, torch.Tensor]] = {}
    counts: dict[tuple[str, ...], int] = {}
    try:
        with torch.no_grad():
            for key, texts in sets.items():
                for layer in layers:
                    sums[layer] = torch.zeros(hidden_size, dtype=torch.float64)
                count = 0
                for batch in token_batches(tokenizer, texts, recipe.max_length, vocab):
                    state["counted"] = batch["counted"].reshape(-1)
                    count += int(batch["counted"].sum())
                    try:
                        backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    except _LastFFNInputRead:
                        pass
                    bar.update(1)
                counts[key] = count
                _check_counts(recipe, counts, key)
                means[key] = {layer: sums[layer] / count for layer in layers}
    finally:
        for handle in handles:
            handle.remove()
        bar.close()
    del model, backbone
    return _rows_from_means(recipe, means, layers)


def cheap_embed_router_rows(base: SourceCheckpoint, layers: list[int], recipe: Recipe) -> dict[int, torch.Tensor]:
    """Return {MoE layer: (experts, hidden) float32 unit rows} from the base's raw token embeddings of
    each expert's prompts (the same rows in every layer; no forward pass).

    Raises:
        UpcycleError: the base has no tokenizer or no `model.embed_tokens.weight`, or a prompt set
            holds no ordinary token.
    """
    if EMBEDDING not in base.tensors:
        raise UpcycleError(f"router_init cheap_embed reads {EMBEDDING}, which {base.name} does not have")
    tokenizer = load_tokenizer(base, recipe.router_init)
    embedding = base.tensors.get(EMBEDDING)
    means: dict[tuple[str, ...], dict[int, torch.Tensor]] = {}
    counts: dict[tuple[str, ...], int] = {}
    for key, texts in _text_sets(recipe).items():
        total = torch.zeros(embedding.shape[1], dtype=torch.float64)
        count = 0
        for batch in token_batches(tokenizer, texts, recipe.max_length, embedding.shape[0]):
            ids = batch["input_ids"][batch["counted"]]
            total += embedding[ids].to(torch.float64).sum(0)
            count += len(ids)
        counts[key] = count
        _check_counts(recipe, counts, key)
        means[key] = dict.fromkeys(layers, total / count)
    return _rows_from_means(recipe, means, layers)
