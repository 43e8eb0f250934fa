"""Which channel groups a model's own code keeps from being narrowed.

torch-pruning follows the layers' channels, not what `forward` does with them: a reshape to a
fixed size (`x.view(B, 2048)`), a split into halves, or an assert on a channel count breaks
once channels are removed. The model is checked once with every group at its narrowest; only
when that fails is each group tried alone, and those that break the model are kept whole.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import nn

from search.errors import ArchtreeError, first_line
from search.pruning import CoupledLayerEmptied, PrunableModel, keep_rounded


def groups_kept_whole(
    model: nn.Module,
    example_input: torch.Tensor,
    positions: Mapping[str, int],
    round_to: int,
    min_width_fraction: float,
    source: str,
) -> dict[str, str]:
    """The groups (by name) the search must not narrow, with why: those torch-pruning cannot
    narrow soundly, those whose narrowing breaks `model`'s forward pass, and those whose
    narrowing changes the shape of its output (logits of two heads concatenated, the first
    head's classes pruned)."""
    with torch.no_grad():
        expected = model.eval()(example_input)
    expected_shape = tuple(expected.shape) if isinstance(expected, torch.Tensor) else None

    def pruned(only: str | None = None) -> tuple[PrunableModel, list[str], Exception | None]:
        """The model with every group (or `only` one) at its narrowest: its pruner, the groups
        narrowed, and the error its forward pass raised, if any."""
        pruner = PrunableModel(
            copy.deepcopy(model),
            example_input,
            round_to=round_to,
            min_width_fraction=min_width_fraction,
            positions=positions,
            kept_whole=broken,
        )
        removals = {}
        for group in pruner.groups:
            if only is not None and group.name != only:
                continue
            multiple = math.lcm(round_to, group.multiple)
            count = keep_rounded(group.size, group.removable, multiple, group.min_size)
            if count > 0:
                removals[group.name] = range(group.size - count, group.size)
        try:
            pruner.remove(removals)
            with torch.no_grad():
                output = pruner.model.eval()(example_input)
            if isinstance(output, torch.Tensor) and tuple(output.shape) != expected_shape:
                raise OutputChanged(f"its output's shape goes from {expected_shape} to "
                                    f"{tuple(output.shape)}")  # fmt: skip
        except Exception as error:  # the model's own code, on channels it did not expect
            return pruner, list(removals), error
        return pruner, list(removals), None

    broken: dict[str, str] = {}
    pruner, narrowed, error = pruned()
    if error is None:
        return dict(pruner.whole_reasons)
    for name in narrowed:
        _, _, alone = pruned(only=name)
        if isinstance(alone, OutputChanged):
            broken[name] = f"narrowing it changes the model's output: {alone}"
        elif isinstance(alone, CoupledLayerEmptied):
            broken[name] = f"it cannot be narrowed: {alone}"
        elif alone is not None:
            broken[name] = f"narrowing it breaks the model: {_said(alone)}"
    pruner, _, error = pruned()
    if error is not None:
        raise broken_model_error(source, "however its channel groups are chosen", error)
    return {**pruner.whole_reasons, **broken}


class OutputChanged(Exception):
    """A narrowed model whose output is not of the unpruned model's shape."""


def broken_model_error(source: str, when: str, error: Exception) -> ArchtreeError:
    """The error for a model whose forward pass fails once pruned (`when`: which way)."""
    return ArchtreeError(
        f"{source} fails once pruned, {when} ({_said(error)}): its forward pass depends on its "
        "channel counts in a way torch-pruning cannot follow; make it derive sizes from its "
        "inputs (x.flatten(1), not x.view(B, 2048))."
    )


def _said(error: Exception) -> str:
    """The error's type and first line, short."""
    text = first_line(error)
    text = text if len(text) <= 120 else text[:117] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def kept_whole_note(kept: Mapping[str, str]) -> str:
    """A note naming the groups kept whole, and why."""
    return f"kept whole, never pruned: {kept_whole_reasons(kept)}"


def kept_whole_reasons(kept: Mapping[str, str]) -> str:
    """The groups kept whole, and why (the first few)."""
    said = [f"the channel group of {name!r} ({why})" for name, why in kept.items()]
    more = f"; and {len(said) - 3} more" if len(said) > 3 else ""
    return "; ".join(said[:3]) + more
