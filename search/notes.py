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


def at_chance(accuracy: float, labels: torch.Tensor) -> bool:
    """Whether `accuracy` on `labels` is no better than always answering their most common
    class, within `CHANCE_MARGIN_SE` standard errors."""
    if not len(labels):
        return False
    majority = majority_rate(labels)
    spread = math.sqrt(majority * (1.0 - majority) / len(labels))
    return accuracy <= majority + CHANCE_MARGIN_SE * spread


def near_chance(accuracy: float, labels: torch.Tensor, split: str) -> str | None:
    """A note when the unpruned model's `accuracy` on `labels` is no better than always
    guessing their most common class (it was not trained, or the data do not match it)."""
    if not at_chance(accuracy, labels):
        return None
    majority = majority_rate(labels)
    return (
        f"the unpruned model scores {accuracy:.1%} on the {split} split, no better than always "
        f"answering its most common class ({majority:.1%}): are its trained weights missing, or "
        "do the data not match it (labels, normalisation)? Pruning keeps accuracy, it does not "
        "create it."
    )


def pruned_near_chance(
    accuracy: float, baseline_accuracy: float, labels: torch.Tensor
) -> str | None:
    """A note when the pruned model's validation `accuracy` is no better than always
    answering the most common class while the unpruned model's was: the pruning removed what
    its fine-tuning did not have the steps to recover."""
    if not at_chance(accuracy, labels) or at_chance(baseline_accuracy, labels):
        return None
    return (
        f"the pruned model scores {accuracy:.1%} on the validation split, no better than always "
        f"answering its most common class ({majority_rate(labels):.1%}), where the unpruned "
        f"model scores {baseline_accuracy:.1%}: its fine-tuning was too short to recover from "
        "the pruning; raise --ft-steps, --select-steps or --final-epochs (or fine-tune the "
        "saved model)"
    )
