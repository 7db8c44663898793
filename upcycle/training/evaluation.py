"""Evaluation: token-weighted loss and perplexity over a held-out set, across processes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from upcycle.training.data import IGNORE_INDEX


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the summed next-token cross-entropy and the number of predicted tokens of each row:
    two (B,) float32 tensors."""
    shifted_labels = labels[:, 1:].to(logits.device)
    losses = F.cross_entropy(
        logits[:, :-1, :].float().transpose(1, 2), shifted_labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses.sum(1), (shifted_labels != IGNORE_INDEX).sum(1).float()


@torch.no_grad()
def evaluate(model, loader, accelerator) -> dict[str, float]:
    """Return ``{"eval_loss", "eval_ppl", "eval_tokens"}`` over every example of the prepared `loader`.

    Per-example sums go through `gather_for_metrics`, which drops the samples Accelerate repeats
    to even out the last batch, so the result does not depend on the number of processes.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    tokens = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for batch in loader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sums, counts = accelerator.gather_for_metrics(per_example_loss(logits, batch["labels"]))
        loss_sum += sums.double().sum()
        tokens += counts.double().sum()
    if was_training:
        model.train()
    loss = float(loss_sum / tokens.clamp(min=1))
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(tokens)}
