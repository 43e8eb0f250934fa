"""Notes for the user: what the numbers of a search do not say by themselves, one line each.

The engine emits a note as it finds it (event `note`), and the report lists those that concern
the answer (`notes` in report.json, and in a job's progress over the API).
"""

from __future__ import annotations

import math

import torch

NOTHING_PRUNED = (
    "the unpruned model already meets the budget: nothing was pruned (give a smaller budget "
    "to trade accuracy for latency)"
)

# How many standard errors of the majority-class rate an accuracy must clear to count as
# better than guessing: three, so that a trained model on a small split is not flagged.
CHANCE_MARGIN_SE = 3.0


def majority_rate(labels: torch.Tensor) -> float:
    """The accuracy of always answering the most common label."""
    return float(torch.bincount(labels).max()) / len(labels)


def near_chance(accuracy: float, labels: torch.Tensor, split: str) -> str | None:
    """A note when the unpruned model's `accuracy` on `labels` is no better than always
    guessing their most common class (it was not trained, or the data do not match it)."""
    if not len(labels):
        return None
    majority = majority_rate(labels)
    spread = math.sqrt(majority * (1.0 - majority) / len(labels))
    if accuracy > majority + CHANCE_MARGIN_SE * spread:
        return None
    return (
        f"the unpruned model scores {accuracy:.1%} on the {split} split, no better than always "
        f"answering its most common class ({majority:.1%}): are its trained weights missing, or "
        "do the data not match it (labels, normalisation)? Pruning keeps accuracy, it does not "
        "create it."
    )
