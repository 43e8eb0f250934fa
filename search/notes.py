"""Notes for the user: what the numbers of a search do not say by themselves, one line each.

The engine emits a note as it finds it (event `note`), and the report lists those that concern
the answer (`notes` in report.json, and in a job's progress over the API).
"""

from __future__ import annotations

import math

import torch

from search.interfaces import TimingStats

NOTHING_PRUNED = (
    "the unpruned model already meets the budget: nothing was pruned (give a smaller budget "
    "to trade accuracy for latency)"
)
# The same, for a search scored by fidelity (data without labels).
NOTHING_PRUNED_DATA_FREE = NOTHING_PRUNED.replace("trade accuracy", "trade fidelity")

# A timing is launch-bound when the host's kernel launches take at least this share of it.
LAUNCH_BOUND_SHARE = 0.8

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


def launch_bound(stats: TimingStats) -> bool:
    """Whether the host's kernel launches took most of a GPU timing (`LAUNCH_BOUND_SHARE`):
    the GPU then waits on the CPU, and the time follows the CPU's speed, not the model's work."""
    return stats.launch_ms is not None and stats.launch_ms >= LAUNCH_BOUND_SHARE * stats.median_ms


def launch_bound_note(smallest: TimingStats, smallest_ms: float) -> str | None:
    """A note when the smallest model pruning can reach is launch-bound on the GPU."""
    if not launch_bound(smallest) or smallest.launch_ms is None:
        return None
    share = smallest.launch_ms / smallest.median_ms
    return (
        f"the smallest model pruning can reach ({smallest_ms:.3f} ms) spends {share:.0%} of its "
        "time launching kernels from the host CPU while the GPU waits: near that size, pruning "
        "saves little and timings follow the host CPU's speed, so they can disagree from one "
        "measurement to the next. A larger --batch-size gives the GPU more work per launch."
    )
