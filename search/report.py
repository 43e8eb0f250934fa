"""The search report: what was asked, what was found, and the tree that was explored."""

from __future__ import annotations

from typing import Any

from search.compute_device import describe_device
from search.context import SearchContext
from search.engine import SearchOutcome, parameter_count
from search.notes import (
    NOTHING_PRUNED,
    NOTHING_PRUNED_DATA_FREE,
    near_chance,
    pruned_near_chance,
)
from search.prunability import kept_whole_note


def build_report(
    context: SearchContext, outcome: SearchOutcome, inputs: dict[str, Any]
) -> dict[str, Any]:
    """report.json's content. `inputs` records the user's own words (sources, budget)."""
    state, settings = outcome.state, context.settings
    root = state.root
    return {
        "budget_ms": state.budget_ms,
        "notes": answer_notes(context, outcome),
        "inputs": inputs,
        "device": context.oracle.fingerprint(),
        "baseline": {
            "latency_ms": state.baseline_ms,
            "accuracy": outcome.baseline_accuracy,
            "params": root.params,
            "macs": root.macs,
        },
        "final": {
            "node": outcome.answer.id,
            "latency_ms": outcome.confirmed_latency_ms,
            "latency_ratio": outcome.confirmed_ratio,
            "budget_fit": outcome.confirmed_latency_ms / state.budget_ms,
            "accuracy": outcome.final_accuracy,
            "fidelity": outcome.final_fidelity,
            "params": parameter_count(outcome.model),
            "macs": outcome.answer.macs,
            "arch_hash": outcome.answer.spec.hash,
            "trims": outcome.trims,
        },
        "search": {
            "strategy": settings.strategy,
            "width": settings.width,
            "branching": settings.branching,
            "depths": state.depth,
            "candidates_evaluated": state.candidates_evaluated,
            "latency_measurements": state.measurements,
            "cache_hits": state.cache_hits,
            "wall_s": outcome.wall_s,
            "settings": settings.to_dict(),
            # The multiple groups were widened to: settings.widen_to, or the device's block.
            "widen_to": state.widen_to,
            # Where the answer was fine-tuned (a service job's children may have been tuned
            # by other workers, each on its own).
            "training_device": describe_device(context.train_device),
            "resumed": outcome.resumed,
            # Every group never narrowed, with why: the note names the first few.
            "kept_whole": dict(context.kept_whole),
        },
        "tree": [node.summary() for node in state.nodes.values()],
    }


def answer_notes(context: SearchContext, outcome: SearchOutcome) -> list[str]:
    """What a user should know about the answer beyond its numbers, one line each."""
    notes = []
    if context.data.labelled and outcome.baseline_accuracy is not None:
        untrained = near_chance(outcome.baseline_accuracy, context.data.val_y, "validation")
        if untrained:
            notes.append(untrained)
        elif outcome.final_accuracy is not None:
            lost = pruned_near_chance(
                outcome.final_accuracy, outcome.baseline_accuracy, context.data.val_y
            )
            if lost:
                notes.append(lost)
    if context.kept_whole:
        notes.append(kept_whole_note(context.kept_whole))
    if outcome.answer.spec.hash == outcome.state.root.spec.hash:
        notes.append(NOTHING_PRUNED if context.data.labelled else NOTHING_PRUNED_DATA_FREE)
    if outcome.resumed is not None:
        notes.append(resumed_note(outcome.resumed))
    return notes


def resumed_note(resumed: dict[str, Any]) -> str:
    """That the search went on from one an earlier run saved, and from where."""
    where = (
        "with its tree search finished"
        if resumed["tree_search_finished"]
        else f"after depth {resumed['after_depth']}"
    )
    return (
        f"this search went on from the one an earlier run of the same command saved {where}: "
        "the unpruned model's timing and the tree up to there come from that run"
    )
