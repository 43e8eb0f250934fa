"""Evaluating one child: apply a move to its parent, sized by measured latency, widen its
groups to whole blocks of channels where that costs no latency, then score it.

This is the unit of parallel work: a pure function of the job's context and a `ChildTask`, so
it runs the same in this process, a thread pool, or a Celery worker on another machine.
"""

from __future__ import annotations

import copy
import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from search.amount import find_amount
from search.arch_spec import ArchSpec, spec_of
from search.context import SearchContext
from search.latency_estimate import LatencyEstimate, Observation
from search.moves import Move, RemovalPlan, predicted_ms_saved, removal_plan
from search.prunability import broken_model_error
from search.pruning import PrunableModel, least_important, total_macs
from search.quiet import piece_of_work
from search.settings import DEFAULT_CHANNEL_BLOCK
from search.tree import ChildResult, ChildTask, Node

# A child that misses its target is still kept when it is at least this much faster than its
# parent.
MIN_PROGRESS = 0.03


@dataclass
class Pruned:
    model: nn.Module
    spec: ArchSpec
    macs: float


@dataclass
class MoveApplier:
    """Builds the children of one parent for one move at any fraction, remembering each."""

    context: SearchContext
    parent_model: nn.Module
    move: Move
    estimate: LatencyEstimate
    pruner: PrunableModel = field(init=False)
    importance: dict[str, np.ndarray] = field(init=False)
    _built: dict[tuple, Pruned] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        with piece_of_work():
            self._prepare()

    def _prepare(self) -> None:
        settings = self.context.settings
        self.pruner = PrunableModel(
            self.parent_model,
            self.context.example_input,
            round_to=settings.round_to,
            min_width_fraction=settings.min_width_fraction,
            positions=self.context.positions,
            kept_whole=self.context.kept_whole,
        )
        calib = None
        if settings.importance == "taylor" and self.context.data.labelled:
            calib = (self.context.data.calib_x[:128], self.context.data.calib_y[:128])
        self.importance = self.pruner.importance(settings.importance, calib)

    def plan(self, fraction: float) -> RemovalPlan:
        return removal_plan(
            self.move,
            self.pruner,
            self.importance,
            fraction,
            self.estimate,
            self.context.settings.max_cut,
        )

    def apply(self, fraction: float) -> Pruned:
        return self.build(self.plan(fraction))

    def widened(self, plan: RemovalPlan, multiple: int) -> RemovalPlan:
        """`plan` with each group kept wider than `multiple` widened to the next multiple of
        it, at most its width in the parent: fewer of its least important channels are
        removed. Widths stay multiples of `round_to`: the multiple is one of both."""
        step = math.lcm(multiple, self.pruner.round_to)
        wider: RemovalPlan = {}
        for name, removed in plan.items():
            size = self.pruner.groups_by_name[name].size
            keep = size - len(removed)
            if keep > step:
                keep = min(size, math.ceil(keep / step) * step)
            count = size - keep
            if count > 0:
                runs = self.pruner.groups_by_name[name].multiple
                wider[name] = least_important(self.importance[name], count, runs)
        return wider

    def build(self, plan: RemovalPlan) -> Pruned:
        """The parent with `plan`'s channels removed, built once per distinct plan."""
        key = tuple(sorted((name, len(idx)) for name, idx in plan.items()))
        if key not in self._built:
            with piece_of_work():
                self._built[key] = self._prune(plan)
        return self._built[key]

    def _prune(self, plan: RemovalPlan) -> Pruned:
        """The parent pruned by `plan`, checked to run, and offered to the oracle."""
        pruner = PrunableModel(
            copy.deepcopy(self.parent_model),
            self.context.example_input,
            round_to=self.pruner.round_to,
            min_width_fraction=0.0,
            ignored_layers=self.pruner.ignored_layers,
            positions=self.context.positions,
        )
        pruner.remove(plan)
        model = pruner.model.eval()
        try:  # the model's own code may depend on widths its narrowest version did not
            with torch.no_grad():
                model(self.context.example_input)
        except Exception as error:
            widths = ", ".join(f"{n} {pruner.groups_by_name[n].size}" for n in sorted(plan))
            raise broken_model_error(
                self.context.model_ref.source, f"with widths {widths}", error
            ) from None
        context = self.context
        spec = spec_of(model, context.model_ref, context.input_shape, context.data.token_range)
        # The oracle may time this very model instead of rebuilding it from the spec.
        context.oracle.offer_model(spec, model)
        return Pruned(model=model, spec=spec, macs=total_macs(model, context.example_input))

    def guess(self, parent_ms: float, target_ms: float) -> float:
        """Fraction at which the linear latency estimate reaches the target."""
        needed = parent_ms - target_ms
        grid = np.linspace(0.0, 1.0, 21)
        saved = [predicted_ms_saved(self.pruner, self.plan(f), self.estimate) for f in grid]
        if saved[-1] <= needed:
            return 1.0
        return float(np.interp(needed, saved, grid))


def evaluate_child(context: SearchContext, task: ChildTask) -> ChildResult:
    """Prune the parent with the task's move down to its target, fine-tune and score it."""
    parent = task.parent
    parent_model = context.build(parent.spec, context.store.get(parent.id))
    estimate = LatencyEstimate(task.baseline_ms, task.baseline_macs, task.observations)
    applier = MoveApplier(context, parent_model, task.move, estimate)
    result = ChildResult(child_id=task.child_id, node=None)

    def measure(fraction: float) -> float:
        return measure_child(applier.apply(fraction))

    def measure_child(child: Pruned) -> float:
        if child.spec.hash == parent.spec.hash:
            return parent.latency_ms
        # Asked before each probe, as fine-tuning asks at each step: a cancel (Ctrl-C with
        # --jobs above 1) stops a child being sized without waiting for all its probes.
        context.check_cancelled(f"while sizing child {task.child_id}")
        measurement = context.oracle.measure(child.spec, context.root_spec)
        result.measurements += 0 if measurement.cached else 1
        result.cache_hits += 1 if measurement.cached else 0
        latency = measurement.ratio * task.baseline_ms
        result.observations.append(
            Observation(task.move.region, parent.macs - child.macs, parent.latency_ms - latency)
        )
        return latency

    amount = find_amount(
        measure,
        task.target_ms,
        parent.latency_ms,
        applier.guess(parent.latency_ms, task.target_ms),
        max_probes=context.settings.max_probes,
        tolerance=context.settings.fit_tolerance,
    )
    fraction, latency_ms = amount.fraction, amount.latency_ms
    if fraction is None:
        # Short of the target even with all of its scope: keep the fastest probe when it is
        # real progress, so that the next depth goes on from it (one step may only cut
        # `max_cut` of a group); otherwise the move is of no use here.
        fastest = min(amount.probes, key=lambda probe: probe[1], default=None)
        if fastest is None or fastest[1] > parent.latency_ms * (1.0 - MIN_PROGRESS):
            result.reason = f"{task.move.label} cannot reach {task.target_ms:.3f} ms"
            context.sink.emit("child_skipped", id=task.child_id, reason=result.reason)
            return result
        fraction, latency_ms = fastest
    plan = applier.plan(fraction)
    child = applier.build(plan)
    widened_to = None
    tried: list[RemovalPlan] = [plan]
    for multiple in widening_multiples(task.widen_to):
        wider_plan = applier.widened(plan, multiple)
        if wider_plan in tried:
            continue
        tried.append(wider_plan)
        wider = applier.build(wider_plan)
        wider_ms = measure_child(wider)
        # Kept when no slower than this child was allowed to be: its target, or (short of
        # the target) the latency it reached.
        if wider_ms <= max(task.target_ms, latency_ms):
            child, latency_ms, widened_to = wider, wider_ms, multiple
            break
    result.node = tuned_child(
        context, task, child, latency_ms, fraction=round(fraction, 4), widened_to=widened_to
    )
    return result


def widening_multiples(widen_to: int) -> list[int]:
    """The multiples a sized child is tried widened to, widest first: `widen_to`, then its
    halves down to `DEFAULT_CHANNEL_BLOCK`, each measured until one is free. The device's
    vector width is not the whole story: on an AVX-512 CPU a ResNet's groups widened to
    multiples of 16 were mostly free, a MobileNetV2's less often than to multiples of 8."""
    multiples = [widen_to] if widen_to > 1 else []
    while multiples and multiples[-1] % 2 == 0 and multiples[-1] // 2 >= DEFAULT_CHANNEL_BLOCK:
        multiples.append(multiples[-1] // 2)
    return multiples


def tuned_child(
    context: SearchContext,
    task: ChildTask,
    child: Pruned,
    latency_ms: float,
    *,
    fraction: float | None,
    widened_to: int | None = None,
    filled_from: str | None = None,
) -> Node:
    """Fine-tune a sized child `ft_steps`, store its weights under the task's id and score
    it; the keywords are the Node fields of how it was sized."""
    parent, model = task.parent, child.model
    # Seeded by what the child is, not by its id: the same child reached in another search (a
    # greedy path inside the tree, a re-run) is fine-tuned the same way and scores the same.
    identity = f"{parent.spec.hash}/{task.move.label}/{child.spec.hash}"
    seed = context.settings.seed + zlib.crc32(identity.encode())
    context.finetune(model, steps=context.settings.ft_steps, seed=seed)
    context.store.put(task.child_id, model.state_dict())
    node = Node(
        id=task.child_id,
        parent=parent.id,
        depth=task.depth,
        move=task.move.label,
        spec=child.spec,
        latency_ms=latency_ms,
        ratio=latency_ms / task.baseline_ms,
        score=context.score(model),
        within_budget=latency_ms <= task.budget_ms,
        params=sum(p.numel() for p in model.parameters()),
        macs=child.macs,
        fraction=fraction,
        widened_to=widened_to,
        filled_from=filled_from,
    )
    context.sink.emit("node", **node.summary())
    return node
