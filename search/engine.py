"""The Archtree tree search.

    state = start()                      # baseline, feasibility, root node
    while not state.done:
        tasks = plan(state)              # up to `branching` moves per frontier node
        results = executor.map(evaluate_child, tasks)   # children of one depth, in parallel
        state = advance(state, results)  # merge duplicates, keep the best `width`
    retuned = executor.map(retune, to_retune(state))   # the best few tuned more, in parallel
    answer = finish(state, retuned)      # confirm under budget with more repeats, fill the
                                         # slack below a latency step, final tune

`run_search` is that loop. The service runs the same steps, with the children of a depth and
the candidates to retune spread over Celery workers and the state kept in Redis between steps.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from torch import nn

from search.arch_spec import ArchSpec
from search.budget import Budget, ms_text
from search.checkpoint import SearchCheckpoint
from search.compute_device import describe_device
from search.context import SearchContext
from search.errors import ArchtreeError
from search.expansion import (
    MoveApplier,
    Pruned,
    evaluate_child,
    tuned_child,
    widening_multiples,
)
from search.fill import (
    FillResult,
    RemovalCounts,
    Widening,
    exchanges,
    fill_in_rounds,
    widenings,
)
from search.frontier import rank_children
from search.interfaces import Executor, SequentialExecutor, TimingStats
from search.latency_estimate import LatencyEstimate
from search.moves import Move, candidate_moves
from search.notes import launch_bound, launch_bound_note, near_chance
from search.prunability import kept_whole_note, kept_whole_reasons
from search.pruning import total_macs
from search.rebuild import AncestorRebuilds, Widths
from search.score_gap import paired_gap
from search.settings import DEFAULT_CHANNEL_BLOCK, SearchSettings
from search.tree import ChildResult, ChildTask, Node, SearchState, answer_rank

# Filling the slack: channels are given back a block of widen_to at a time, then of its halves
# (DEFAULT_CHANNEL_BLOCK where widen_to is off). The widened answer replaces the answer unless
# it scores lower by more than FILL_SCORE_SLACK and by more than FILL_SCORE_Z standard errors
# of the paired difference (search/score_gap.py).
FILL_SCORE_SLACK = 0.005
FILL_SCORE_Z = 2.0
# How many of the widenings reached, widest first, are confirmed in each fill attempt.
FILL_CONFIRMATIONS = 3
# How many times the slack is filled: when every widening confirmed was over the budget, the
# next attempt aims lower by the share the narrowest of them was over.
FILL_ATTEMPTS = 2
# Trades (one group widened, another narrowed) measured for an answer no widening fills.
EXCHANGE_PROBES = 4


@dataclass
class SearchOutcome:
    """The search's answer: the pruned model, its confirmed numbers and the whole tree."""

    state: SearchState
    answer: Node
    model: nn.Module
    confirmed_latency_ms: float
    confirmed_ratio: float
    baseline_accuracy: float | None
    final_accuracy: float | None
    # Without labels, what stands for accuracy: fidelity to the unpruned model (validation).
    final_fidelity: float | None
    wall_s: float
    trims: int
    # Where a search resumed from one an earlier run saved: `after_depth` (its depths
    # searched then), `tree_search_finished`, `saved_s` (its time then); None otherwise.
    resumed: dict[str, Any] | None = None


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def start(context: SearchContext, budget: Budget) -> SearchState:
    """Measure the unpruned model, check the budget is reachable, and plant the root."""
    oracle, settings = context.oracle, context.settings
    context.prepare()
    smallest = smallest_spec(context)  # before any timing: a model with nothing to prune fails
    context.check_cancelled("before the unpruned model was measured")
    # Timed afresh, not taken from the latency cache: every other latency is a ratio to it,
    # and one timed while the machine was busy would skew all of this search's.
    reference = oracle.measure_reference(context.root_spec, refresh=True)
    baseline_ms = reference.median_ms
    budget_ms = budget.resolve(baseline_ms)
    baseline_macs = total_macs(context.base_model, context.example_input)
    root = Node(
        id="n0",
        parent=None,
        depth=0,
        move=None,
        spec=context.root_spec,
        latency_ms=baseline_ms,
        ratio=1.0,
        score=context.score(context.base_model),
        within_budget=baseline_ms <= budget_ms,
        params=parameter_count(context.base_model),
        macs=baseline_macs,
    )
    context.store.put(root.id, context.base_model.state_dict())
    state = SearchState(
        baseline_ms=baseline_ms,
        baseline_macs=baseline_macs,
        budget_ms=budget_ms,
        step_ms=max(0.0, baseline_ms - settings.aim_ms(budget_ms)) / settings.planned_steps,
        root_id=root.id,
        nodes={root.id: root},
        frontier=[root.id],
    )
    _tally(state, reference.cached)
    context.sink.emit(
        "baseline",
        latency_ms=baseline_ms,
        budget_ms=budget_ms,
        score=root.score,
        scored_by="accuracy" if context.data.labelled else "fidelity",
        params=root.params,
        macs=baseline_macs,
        timing=reference.to_dict(),
        cached=reference.cached,
        training_device=describe_device(context.train_device),
    )
    if context.data.labelled:
        untrained = near_chance(root.score, context.data.calib_y, "calibration")
        if untrained:
            context.sink.emit("note", message=untrained)
    if context.kept_whole:
        context.sink.emit("note", message=kept_whole_note(context.kept_whole))
    if root.within_budget:
        state.done = True
        return state
    smallest_ms, smallest_timing = _smallest_reachable(context, state, smallest)
    state.launch_bound = launch_bound(smallest_timing)
    launching = launch_bound_note(smallest_timing, smallest_ms)
    if launching:
        context.sink.emit("note", message=launching)
    # Read after two measurements: a remote device reports its block with its answers.
    channel_block = oracle.fingerprint().get("channel_block")
    state.widen_to = settings.widen_multiple(channel_block)
    context.sink.emit(
        "feasibility",
        smallest_ms=smallest_ms,
        budget_ms=budget_ms,
        channel_block=channel_block,
        widen_to=state.widen_to,
    )
    if smallest_ms > settings.aim_ms(budget_ms):
        enough_ms = smallest_ms / (1.0 - settings.margin) * 1.02
        # What sets the smallest widths: the share kept and the multiple rounded to. The
        # margin is worth lowering only when it alone puts the budget out of reach.
        floors = [
            option
            for option, sets_floor in (
                ("--min-width", settings.min_width_fraction > 0),
                ("--round-to", settings.round_to > 1),
            )
            if sets_floor
        ]
        if smallest_ms > budget_ms:
            why = "over the budget itself"
        else:
            why = f"too close to the budget to keep the {100 * settings.margin:g}% margin"
            floors.append("--margin")
        lower = " or ".join(floors) if floors else None
        reached = (
            f"the budget of {ms_text(budget_ms)} ms cannot be met on this device: the smallest "
            f"model pruning can reach measures {ms_text(smallest_ms)} ms "
            f"({100 * smallest_ms / baseline_ms:.0f}% of the unpruned {ms_text(baseline_ms)} ms)"
        )
        if smallest_ms > baseline_ms:
            # Fewer channels everywhere taking longer is, nearly always, noise in the timings.
            raise ArchtreeError(
                f"{reached}: the smallest model measured slower than the unpruned one, most "
                "likely noisy timing (more --threads than free cores, other work on the "
                "device): time with fewer threads, on a quieter device, and run again."
            )
        defaults = SearchSettings()
        keeping = [
            (option, f"{option} {value:g} {what}")
            for option, value, default, what in (
                (
                    "--min-width",
                    settings.min_width_fraction,
                    defaults.min_width_fraction,
                    f"keeps {100 * settings.min_width_fraction:g}% of every channel group",
                ),
                (
                    "--round-to",
                    settings.round_to,
                    defaults.round_to,
                    "keeps widths multiples of it",
                ),
            )
            if value > default
        ]
        # The budget to give, as a share of the unpruned latency: one that rounds up to all of
        # it is none to give (a budget of 100% asks for no pruning).
        share = math.ceil(100 * enough_ms / baseline_ms)
        if share >= 100 and keeping:
            # Not the model's fault: the settings keep too much of it to reach the budget.
            raise ArchtreeError(
                f"{reached}: {' and '.join(said for _, said in keeping)}. Lower "
                f"{' or '.join(option for option, _ in keeping)} to let pruning go further."
            )
        if share >= 100:
            # A budget that would leave room for the margin is one the unpruned model meets.
            raise ArchtreeError(
                f"{reached}: pruning its channels barely speeds this model up here, its time "
                "goes to what pruning does not remove (each layer's fixed cost, the layers kept "
                "whole). Time a larger batch (--batch-size), where channels weigh more, or "
                "choose a smaller architecture."
            )
        instead = f"lower {lower}" if lower else "choose a smaller architecture"
        # Said in the unit given: a share stays a share of the unpruned latency.
        enough = f"{share}% ({ms_text(enough_ms)} ms)" if budget.unit == "%" else None
        raise ArchtreeError(
            f"{reached}, {why}. Give a budget of at least {enough or ms_text(enough_ms) + ' ms'}, "
            f"or {instead}."
        )
    return state


def smallest_spec(context: SearchContext) -> ArchSpec:
    """The architecture with every group at its minimum width; refused when that is the
    unpruned one, or when the settings cannot serve the data (taylor importance without
    labels). The search's checks before any timing (search.preflight)."""
    # A uniform cut of everything does not consult the latency estimate: any will do.
    applier = MoveApplier(context, context.base_model, Move("uniform"), LatencyEstimate(1.0, 1.0))
    smallest = applier.apply(1.0)
    if smallest.spec.hash == context.root_spec.hash:
        round_to = context.settings.round_to
        why, fix = (
            (f"--round-to {round_to} keeps every channel group whole", "give a smaller --round-to")
            if round_to > 1
            else (
                f"every channel group it has must stay whole: "
                f"{kept_whole_reasons(context.kept_whole)}",
                "give a model with other layers",
            )
            if context.kept_whole
            else (
                "it has no channel group pruning can narrow (convolutions or linear layers "
                f"followed by another layer){_unpruned_kinds(context.base_model)}",
                "give a model with such layers",
            )
        )
        raise ArchtreeError(f"nothing in {context.model_ref.source} can be pruned: {why}; {fix}.")
    return smallest.spec


# Layers whose width pruning never narrows, which a model may have instead of prunable ones.
UNPRUNED_KINDS = (nn.RNNBase, nn.Embedding, nn.EmbeddingBag)


def _unpruned_kinds(model: nn.Module) -> str:
    """Which of the model's layers pruning does not narrow, by type, or nothing."""
    kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, UNPRUNED_KINDS)})
    return f"; its {', '.join(kinds)} layers are not narrowed" if kinds else ""


def _smallest_reachable(
    context: SearchContext, state: SearchState, smallest: ArchSpec
) -> tuple[float, TimingStats]:
    """Latency with every group at its minimum width, and that model's own timing."""
    context.check_cancelled("before the smallest model was measured")
    measurement = context.oracle.measure(smallest, context.root_spec)
    _tally(state, measurement.cached)
    return measurement.ratio * state.baseline_ms, measurement.candidate


def _tally(state: SearchState, cached: bool) -> None:
    state.measurements += 0 if cached else 1
    state.cache_hits += 1 if cached else 0


def plan(context: SearchContext, state: SearchState) -> list[ChildTask]:
    """The children to evaluate at the next depth: up to `branching` moves per frontier node."""
    settings = context.settings
    estimate = LatencyEstimate(state.baseline_ms, state.baseline_macs, state.observations)
    depth = state.depth + 1
    tasks = []
    for node_id in state.frontier:
        parent = state.nodes[node_id]
        if parent.within_budget:
            continue
        # The last planned step aims at the budget less the margin, not further below it.
        aim_ms = settings.aim_ms(state.budget_ms)
        target_ms = max(aim_ms, parent.latency_ms - state.step_ms)
        if depth >= settings.planned_steps or target_ms - aim_ms < 0.25 * state.step_ms:
            target_ms = aim_ms
        parent_model = context.build(parent.spec, context.store.get(parent.id))
        applier = MoveApplier(context, parent_model, Move("global"), estimate)
        moves = candidate_moves(
            applier.pruner,
            applier.importance,
            estimate,
            settings.move_kinds,
            settings.branching,
            needed_ms=parent.latency_ms - target_ms,
            max_cut=settings.max_cut,
        )
        tasks.extend(_child_task(state, parent, move, target_ms, depth) for move in moves)
    context.sink.emit(
        "depth_started",
        depth=depth,
        children=len(tasks),
        ft_steps=settings.ft_steps,
        max_depth=settings.max_depth,
    )
    return tasks


def _child_task(
    state: SearchState, parent: Node, move: Move, target_ms: float, depth: int
) -> ChildTask:
    """A task for a new child of `parent`, under the next node id, with the job's baseline,
    budget and latency observations."""
    task = ChildTask(
        child_id=f"n{state.next_id}",
        parent=parent,
        move=move,
        target_ms=target_ms,
        depth=depth,
        baseline_ms=state.baseline_ms,
        baseline_macs=state.baseline_macs,
        budget_ms=state.budget_ms,
        observations=list(state.observations),
        widen_to=state.widen_to,
    )
    state.next_id += 1
    return task


def advance(context: SearchContext, state: SearchState, results: list[ChildResult]) -> SearchState:
    """Add the evaluated children to the tree; the first `width` distinct ones in Pareto order
    of latency and score (search/frontier.py) form the frontier."""
    settings = context.settings
    state.depth += 1
    unique: dict[str, Node] = {}
    known = {node.spec.hash for node in state.nodes.values()}
    for result in results:
        state.candidates_evaluated += 1
        state.measurements += result.measurements
        state.cache_hits += result.cache_hits
        state.observations.extend(result.observations)
        node = result.node
        if node is None:
            continue
        key = node.spec.hash
        # Identical architectures reached by different moves are merged: the best score stays,
        # and the one merged away is said either way (a node already in the tree stays).
        if key in known and key not in unique:
            context.sink.emit("child_merged", id=node.id, arch_hash=key)
            continue
        if key in unique:
            kept, merged = (unique[key], node)
            tie = merged.score == kept.score  # then the one evaluated first stays
            if merged.score > kept.score:
                kept, merged = merged, kept
            context.sink.emit("child_merged", id=merged.id, arch_hash=key, into=kept.id, tie=tie)
            unique[key] = kept
            continue
        unique[key] = node
    for node in unique.values():
        state.nodes[node.id] = node
    ranked = rank_children(unique.values(), state.budget_ms)
    state.frontier = [n.id for n in ranked[: settings.width]]
    best = state.best_within_budget()
    context.sink.emit(
        "depth_done",
        depth=state.depth,
        frontier=state.frontier,
        best=best.summary() if best else None,
        candidates_evaluated=state.candidates_evaluated,
        measurements=state.measurements,
    )
    frontier_nodes = [state.nodes[i] for i in state.frontier]
    state.done = (
        not frontier_nodes
        or all(n.within_budget for n in frontier_nodes)
        or state.depth >= settings.max_depth
    )
    return state


def to_retune(context: SearchContext, state: SearchState) -> list[Node]:
    """The best `select_top` feasible nodes, which get `select_steps` more fine-tuning before
    the answer is chosen (none when select_steps is 0 or nothing is feasible). A lone
    candidate is tuned as well, so that every answer gets the same steps whatever the
    strategy."""
    settings = context.settings
    if settings.select_steps <= 0:
        return []
    return state.ranked_within_budget()[: settings.select_top]


def retune(context: SearchContext, node: Node, weights_id: str | None = None) -> dict:
    """Fine-tune a node `select_steps` more, store the weights under `weights_id` (the node's
    own id by default: a distributed job keeps each attempt apart until one is chosen) and
    score it. Returns {id, score_before, score, weights_id}: `finish` applies it."""
    settings = context.settings
    model = context.build(node.spec, context.store.get(node.id))
    seed = settings.seed + zlib.crc32(f"{node.spec.hash}/select".encode())
    context.finetune(model, steps=settings.select_steps, seed=seed)
    weights_id = weights_id or node.id
    context.store.put(weights_id, model.state_dict())
    score = context.score(model)
    context.sink.emit(
        "retuned", id=node.id, steps=settings.select_steps, score_before=node.score, score=score
    )
    return {"id": node.id, "score_before": node.score, "score": score, "weights_id": weights_id}


def finish(
    context: SearchContext,
    state: SearchState,
    started: float,
    retuned: list[dict] | None = None,
) -> SearchOutcome:
    """Confirm the best feasible node under budget with more repeats, then final fine-tune.

    The best `select_top` feasible nodes are first fine-tuned `select_steps` more and ranked
    again (`retuned`: the results of `retune` for each of `to_retune`, which run here one
    after another when not given): a score after a few steps says little about a deeply
    pruned child. A node whose confirmation lands above the budget is passed over for the
    next best feasible one (up to `confirm_candidates` in all). When the best did not
    confirm, it is also trimmed to fit, and the trimmed node, tuned as much, competes with
    the one that confirmed: a few channels off the best can cost less accuracy than a
    candidate points behind, or more, when a deeply pruned model's next latency step is far
    below the budget. An answer confirmed well under the aim is then widened group by group
    to use what it left of the budget (`_fill_slack`).
    """
    settings = context.settings
    ranked = state.ranked_within_budget()
    if not ranked:
        if not state.root.within_budget:
            raise ArchtreeError(_unmet_budget_message(settings, state))
        ranked = [state.root]
    else:
        if retuned is None:
            retuned = [retune(context, node) for node in to_retune(context, state)]
        ranked = _apply_retuned(context, state, ranked, retuned)
    confirmations = []
    for node in ranked[: settings.confirm_candidates]:
        confirmations.append((node, _confirm(context, state, node.spec)))
        if confirmations[-1][1] <= state.budget_ms:
            break
        context.sink.emit("confirm_failed", id=node.id, latency_ms=confirmations[-1][1])
    answer, confirmed_ms = confirmations[-1]
    trims = 0
    best, best_ms = confirmations[0]
    if best_ms > state.budget_ms:
        # The best did not confirm: trim it to fit, and keep whichever of the trimmed node and
        # the one that confirmed instead (if any) scores higher.
        trimmed, trimmed_ms, count = _trim_to_fit(context, state, best, best_ms)
        passed_over = confirmed_ms <= state.budget_ms
        if trimmed is None:
            if not passed_over:
                raise ArchtreeError(
                    f"the answer confirmed at {best_ms:.3f} ms, above the budget of "
                    f"{state.budget_ms:.3f} ms, and no further pruning reaches it: "
                    f"{_unconfirmed_advice(context, state)}"
                )
        elif not passed_over or (trimmed_ms <= state.budget_ms and trimmed.score > answer.score):
            answer, confirmed_ms, trims = trimmed, trimmed_ms, count
        if passed_over:
            context.sink.emit(
                "trim_compared",
                trimmed=trimmed.id if trimmed else None,
                trimmed_score=trimmed.score if trimmed else None,
                trimmed_latency_ms=trimmed_ms if trimmed else None,
                confirmed=confirmations[-1][0].id,
                confirmed_score=confirmations[-1][0].score,
                chosen=answer.id,
            )
    if confirmed_ms > state.budget_ms:
        context.sink.emit("confirmed", id=answer.id, latency_ms=confirmed_ms, trims=trims)
        raise ArchtreeError(
            f"the best candidate measures {confirmed_ms:.3f} ms on confirmation, above the budget "
            f"of {state.budget_ms:.3f} ms, even after {trims} trims: "
            + _unconfirmed_advice(context, state)
        )
    answer, latency_ms = _fill_slack(context, state, answer, confirmed_ms)
    context.sink.emit(
        "confirmed",
        id=answer.id,
        latency_ms=latency_ms,
        trims=trims,
        cached=state.confirmed_cached.get(answer.spec.hash, False),
    )
    model = context.build(answer.spec, context.store.get(answer.id))
    if settings.final_epochs > 0:
        context.sink.emit("final_finetune", epochs=settings.final_epochs)
        context.finetune(model, epochs=settings.final_epochs, seed=settings.seed)
    outcome = SearchOutcome(
        state=state,
        answer=answer,
        model=model,
        confirmed_latency_ms=latency_ms,
        confirmed_ratio=latency_ms / state.baseline_ms,
        baseline_accuracy=context.validation_accuracy(context.base_model),
        final_accuracy=context.validation_accuracy(model),
        final_fidelity=context.validation_fidelity(model),
        wall_s=time.monotonic() - started,
        trims=trims,
    )
    context.sink.emit(
        "done",
        id=answer.id,
        latency_ms=latency_ms,
        accuracy=outcome.final_accuracy,
        fidelity=outcome.final_fidelity,
        wall_s=outcome.wall_s,
    )
    return outcome


def _unmet_budget_message(settings: SearchSettings, state: SearchState) -> str:
    """Why no candidate met the budget, and what to change."""
    unmet = f"no candidate met the budget of {ms_text(state.budget_ms)} ms"
    depths = f"{state.depth} depth{'s' if state.depth != 1 else ''}"
    if not state.frontier and state.depth < settings.max_depth:
        # Every move of the last depth was skipped: none reached its target within a step.
        # Widths kept in multiples of --round-to lose whole multiples or nothing: a group a
        # few multiples wide cannot lose one within --max-cut of it.
        rounded, lower = "", ""
        if settings.round_to > 1:
            rounded = f", keeping widths multiples of --round-to {settings.round_to}"
            lower = ", lower --round-to"
        return (
            f"{unmet}: the search stopped at depth {state.depth}, where every move was "
            f"skipped, unable to reach its target removing at most --max-cut "
            f"{settings.max_cut:g} of a channel group in one step{rounded}: raise --max-cut"
            f"{lower}, or raise the budget."
        )
    return f"{unmet} within {depths}: raise --max-depth or --planned-steps, or the budget."


def _apply_retuned(
    context: SearchContext, state: SearchState, ranked: list[Node], retuned: list[dict]
) -> list[Node]:
    """Give the retuned nodes their weights and new scores, and put them back in the order of
    those scores, ahead of the rest."""
    if not retuned:
        return ranked
    by_id = {result["id"]: result for result in retuned}
    for result in retuned:
        if result["weights_id"] != result["id"]:
            context.store.put(result["id"], context.store.get(result["weights_id"]))
        state.nodes[result["id"]].score = result["score"]
    top = sorted((node for node in ranked if node.id in by_id), key=answer_rank)
    rest = [node for node in ranked if node.id not in by_id]
    # In the order they are confirmed in: equal scores, the one closest to the budget first.
    context.sink.emit(
        "reranked",
        steps=context.settings.select_steps,
        nodes=[{k: by_id[node.id][k] for k in ("id", "score_before", "score")} for node in top],
    )
    return top + rest


def _unconfirmed_advice(context: SearchContext, state: SearchState) -> str:
    """Why an answer measured under the budget confirms above it, and what to do."""
    if state.launch_bound:
        return (
            "the GPU's timings disagree, as they do where the host CPU's kernel launches set "
            "the time (see the note on the smallest model); retry with a larger --batch-size, "
            "or a slightly larger budget."
        )
    if context.oracle.fingerprint().get("gpu"):
        return (
            "the GPU's timings disagree; retry with nothing else running on the GPU or its "
            "host, or a slightly larger budget."
        )
    return (
        "the device is too noisy to confirm it; retry with --threads 1 on a quieter machine, "
        "or a slightly larger budget."
    )


def _confirm(context: SearchContext, state: SearchState, spec: ArchSpec) -> float:
    """The architecture's latency in ms, measured again with the longer confirm timing."""
    confirmed = context.oracle.measure(spec, context.root_spec, confirm=True)
    _tally(state, confirmed.cached)
    state.confirmed_cached.setdefault(spec.hash, confirmed.cached)
    return confirmed.ratio * state.baseline_ms


def trim_move(settings: SearchSettings) -> Move:
    """The move that trims an answer confirmed above budget: the strategy's own first move
    (`uniform` stays uniform), or `global` where that is a region's `focused` move."""
    kind = settings.move_kinds[0] if settings.move_kinds else "global"
    return Move(kind if kind in ("global", "latency", "uniform") else "global")


def _trim(
    context: SearchContext, state: SearchState, node: Node, measured_ms: float
) -> Node | None:
    """Remove a few more channels from a node that confirmed above budget (None when no
    further pruning reaches its target)."""
    task = _child_task(
        state,
        Node(**{**node.__dict__, "latency_ms": measured_ms}),
        trim_move(context.settings),
        context.settings.aim_ms(state.budget_ms),
        node.depth + 1,
    )
    result = evaluate_child(context, task)
    state.measurements += result.measurements
    state.cache_hits += result.cache_hits
    if result.node is not None:
        state.nodes[result.node.id] = result.node
    return result.node


def _trim_to_fit(
    context: SearchContext, state: SearchState, node: Node, measured_ms: float
) -> tuple[Node | None, float, int]:
    """Trim a node that confirmed above budget until it confirms under (`confirm_trims` times
    at most); the trimmed node gets the re-ranking's steps, as every answer does. Returns the
    last trimmed node (None when no further pruning reaches the budget), its confirmed
    latency and the number of trims."""
    trimmed, trimmed_ms, trims = node, measured_ms, 0
    while trimmed_ms > state.budget_ms and trims < context.settings.confirm_trims:
        candidate = _trim(context, state, trimmed, trimmed_ms)
        if candidate is None:
            break
        trims += 1
        trimmed, trimmed_ms = candidate, _confirm(context, state, candidate.spec)
    if trims == 0:
        return None, measured_ms, 0
    if context.settings.select_steps > 0:
        _apply_retuned(context, state, [trimmed], [retune(context, trimmed)])
    return trimmed, trimmed_ms, trims


def _fill_slack(
    context: SearchContext, state: SearchState, answer: Node, answer_ms: float
) -> tuple[Node, float]:
    """An answer confirmed more than `fit_tolerance` under the aim is widened group by group
    (`_fill_widths`), each widening measured. The widest widening reached is confirmed with
    the longer timing, and while it confirms above the budget the one reached before it
    (`FILL_CONFIRMATIONS` in all): its probe measured it under the aim, but a shared machine
    drifts. When none confirms, the probes read low against the confirmations, and the fill
    is tried again (`FILL_ATTEMPTS` in all) with the aim lowered by the share the narrowest
    of them confirmed over the budget: the widenings between the answer and the ones that
    failed are probed (those measured already cost nothing). The one that confirms is built
    from the nearest ancestor at least as wide, tuned as the answer was (`ft_steps`, then
    `select_steps`), and replaces the answer unless it scores clearly lower (by more than
    `FILL_SCORE_SLACK` and than `FILL_SCORE_Z` standard errors, judged sample by sample on
    the calibration split): a widening holds as many channels as the answer in every group
    (a trade, `_exchange`, gives a block up in one group for one in another), and two
    models' scores on a few hundred images differ by a point or more by chance. Returns the
    answer and its confirmed latency, widened or not."""
    settings = context.settings
    aim_ms = settings.aim_ms(state.budget_ms)
    if (
        settings.fill_probes <= 0
        or answer.parent is None
        or not settings.well_under(answer_ms, aim_ms)
    ):
        return answer, answer_ms
    estimate = LatencyEstimate(state.baseline_ms, state.baseline_macs, state.observations)
    rebuilds = AncestorRebuilds(context, state, answer, estimate)
    unconfirmed_ms: list[float] = []
    aims_ms: list[float] = []
    confirmed_before: set[tuple[tuple[str, int], ...]] = set()
    trades: list[dict] = []
    probes = 0
    widened = None
    fill_aim_ms = aim_ms
    while len(aims_ms) < FILL_ATTEMPTS and settings.well_under(answer_ms, fill_aim_ms):
        aims_ms.append(fill_aim_ms)
        reached, attempt_probes = _fill_widths(
            context, state, rebuilds, answer, answer_ms, fill_aim_ms, trades
        )
        probes += attempt_probes
        widened, over_ms = _confirm_widest(context, state, rebuilds, reached, confirmed_before)
        unconfirmed_ms += over_ms
        if widened is not None or not over_ms:
            break
        fill_aim_ms *= state.budget_ms / over_ms[-1]
    if widened is None:
        context.sink.emit(
            "filled",
            answer=answer.id,
            id=None,
            probes=probes,
            unconfirmed_ms=unconfirmed_ms,
            aims_ms=aims_ms,
            trades=trades,
        )
        return answer, answer_ms
    source, model, confirmed_ms = widened
    from_parent = source.id == answer.parent
    move = Move.from_label(answer.move) if from_parent else Move("global")
    task = _child_task(state, source, move, aim_ms, source.depth + 1)
    node = tuned_child(
        context,
        task,
        model,
        confirmed_ms,
        fraction=answer.fraction if from_parent else None,
        widened_to=answer.widened_to,
        filled_from=answer.id,
    )
    state.nodes[node.id] = node
    if settings.select_steps > 0:
        _apply_retuned(context, state, [node], [retune(context, node)])
    gap = paired_gap(
        context.sample_scores(context.build(node.spec, context.store.get(node.id))),
        context.sample_scores(context.build(answer.spec, context.store.get(answer.id))),
    )
    kept = not gap.clearly_below(FILL_SCORE_SLACK, FILL_SCORE_Z)
    context.sink.emit(
        "filled",
        answer=answer.id,
        id=node.id,
        rebuilt_from=source.id,
        probes=probes,
        groups=[
            name
            for name in rebuilds.sizes(rebuilds.ancestors[-1])
            if node.spec.width(name) > answer.spec.width(name)
        ],
        narrowed=[
            name
            for name in rebuilds.sizes(rebuilds.ancestors[-1])
            if node.spec.width(name) < answer.spec.width(name)
        ],
        unconfirmed_ms=unconfirmed_ms,
        aims_ms=aims_ms,
        trades=trades,
        latency_ms=confirmed_ms,
        score=node.score,
        answer_latency_ms=answer_ms,
        answer_score=answer.score,
        score_gap=gap.difference,
        score_gap_se=gap.standard_error,
        chosen=node.id if kept else answer.id,
    )
    return (node, confirmed_ms) if kept else (answer, answer_ms)


def _confirm_widest(
    context: SearchContext,
    state: SearchState,
    rebuilds: AncestorRebuilds,
    reached: list[tuple[Widths, float]],
    confirmed_before: set[tuple[tuple[str, int], ...]],
) -> tuple[tuple[Node, Pruned, float] | None, list[float]]:
    """The widest of the last `FILL_CONFIRMATIONS` widenings reached that confirms under the
    budget, as (the ancestor it is rebuilt from, the rebuilt model, its confirmed ms), or
    None; and the confirmed ms of those tried before it, widest first. Widths confirmed by an
    earlier attempt (`confirmed_before`, updated here) are not confirmed again."""
    over_ms: list[float] = []
    for widths, _ in reversed(reached[-FILL_CONFIRMATIONS:]):
        key = tuple(sorted(widths.items()))
        if key in confirmed_before:
            continue
        confirmed_before.add(key)
        source = rebuilds.covering(widths)
        candidate = rebuilds.build(source, widths)
        candidate_ms = _confirm(context, state, candidate.spec)
        if candidate_ms <= state.budget_ms:
            return (source, candidate, candidate_ms), over_ms
        over_ms.append(candidate_ms)
    return None, over_ms


def _fill_widths(
    context: SearchContext,
    state: SearchState,
    rebuilds: AncestorRebuilds,
    answer: Node,
    answer_ms: float,
    aim_ms: float,
    trades: list[dict],
) -> tuple[list[tuple[Widths, float]], int]:
    """The widths reached by giving channels back to the answer (search/fill.py), with their
    measured ms, in order, and the number of probes measured; the trades tried (`_exchange`)
    are added to `trades`.

    First the groups its last move cut, as its parent had them: the last move sized them all
    at once, so they are the likeliest to sit just under a latency step. While the answer is
    still more than `fit_tolerance` under the aim, then any group cut since the root: a deep
    path's earlier moves cut groups that its last move left alone. Each pass measures
    `fill_probes` widenings at most, a block of `widen_to` channels per group, then of its
    halves down to the default block (`widening_multiples`) for the groups whose block
    measured over the aim; a block measured over the aim is not tried again on that group."""
    settings = context.settings
    # Channels are given back in blocks that keep widths multiples of --round-to.
    blocks = widening_multiples(state.widen_to) or [DEFAULT_CHANNEL_BLOCK]
    blocks = list(dict.fromkeys(math.lcm(block, settings.round_to) for block in blocks))
    parent, root = rebuilds.ancestors[0], rebuilds.ancestors[-1]
    widths = {name: answer.spec.width(name) for name in rebuilds.sizes(root)}
    latency_ms = answer_ms
    reached: list[tuple[Widths, float]] = []
    probes = 0
    too_costly: dict[int, frozenset[str]] = {block: frozenset() for block in blocks}
    measured: list[tuple[Widths, float]] = []
    for source in [parent] if parent is root else [parent, root]:
        pass_probes = 0
        for block in blocks:
            if not settings.well_under(latency_ms, aim_ms) or pass_probes >= settings.fill_probes:
                break
            filled = _fill_from(
                context,
                state,
                rebuilds,
                source,
                widths,
                latency_ms,
                aim_ms,
                block=block,
                max_probes=settings.fill_probes - pass_probes,
                skip=too_costly[block],
                measured=measured,
            )
            pass_probes += len(filled.probes)
            too_costly[block] |= filled.too_costly
            reached += [
                (rebuilds.widths_after(source, counts), ms) for counts, ms in filled.reached
            ]
            widths, latency_ms = reached[-1] if reached else (widths, latency_ms)
        probes += pass_probes
    if settings.well_under(latency_ms, aim_ms):
        over = [(trial, ms) for trial, ms in measured if ms > aim_ms]
        tried = _exchange(
            context, state, rebuilds, answer, widths, latency_ms, aim_ms, over, block=blocks[-1]
        )
        reached += [(trial, ms) for trial, ms, kept in tried if kept]
        probes += len(tried)
        trades += [
            {
                "widened": [name for name in trial if trial[name] > widths[name]],
                "narrowed": [name for name in trial if trial[name] < widths[name]],
                "latency_ms": ms,
                "kept": kept,
            }
            for trial, ms, kept in tried
        ]
    return reached, probes


def _exchange(
    context: SearchContext,
    state: SearchState,
    rebuilds: AncestorRebuilds,
    answer: Node,
    widths: Widths,
    latency_ms: float,
    aim_ms: float,
    over: list[tuple[Widths, float]],
    *,
    block: int,
) -> list[tuple[Widths, float, bool]]:
    """For an answer still well under the aim once no widening fits: a group whose widening
    measured over the aim is widened while another loses a block (search/fill.py `exchanges`;
    first among the groups the answer's last move cut), `EXCHANGE_PROBES` such trades
    measured at most. The first that measures above the answer and at or under the aim is
    kept: the answer sat below a latency step of one group that it crosses by stepping back
    in another. Returns each trade measured, its ms and whether it was kept."""
    root = rebuilds.ancestors[-1]
    applier = rebuilds.applier(root)
    groups = applier.pruner.groups_by_name
    trials = exchanges(
        widths,
        over,
        rebuilds.sizes(root),
        {name: group.min_size for name, group in groups.items()},
        applier.importance,
        {name: rebuilds.estimate.ms_per_channel(group) for name, group in groups.items()},
        block,
        aim_ms,
        preferred=[
            name
            for name, size in rebuilds.sizes(rebuilds.ancestors[0]).items()
            if answer.spec.width(name) < size
        ],
    )
    tried = []
    for trial in trials[:EXCHANGE_PROBES]:
        trial_ms = _measure_widths(context, state, rebuilds, trial)
        tried.append((trial, trial_ms, latency_ms < trial_ms <= aim_ms))
        if tried[-1][2]:
            break
    return tried


def _measure_widths(
    context: SearchContext,
    state: SearchState,
    rebuilds: AncestorRebuilds,
    widths: Widths,
    source: Node | None = None,
) -> float:
    """The latency in ms of `source` (by default the nearest ancestor of the answer that is
    wide enough) pruned to `widths`, one measurement."""
    spec = rebuilds.build(source or rebuilds.covering(widths), widths).spec
    measurement = context.oracle.measure(spec, context.root_spec)
    _tally(state, measurement.cached)
    return measurement.ratio * state.baseline_ms


def _fill_from(
    context: SearchContext,
    state: SearchState,
    rebuilds: AncestorRebuilds,
    source: Node,
    widths: Widths,
    latency_ms: float,
    aim_ms: float,
    *,
    block: int,
    max_probes: int,
    skip: frozenset[str],
    measured: list[tuple[Widths, float]],
) -> FillResult:
    """One pass of `fill_in_rounds` from `widths` (measured at `latency_ms`), channels given
    back `block` at a time in the groups that `source` has wider, each widening measured."""
    applier = rebuilds.applier(source)
    sizes = rebuilds.sizes(source)
    groups = applier.pruner.groups_by_name
    ms_per_channel = {name: rebuilds.estimate.ms_per_channel(g) for name, g in groups.items()}

    def steps_for(counts: RemovalCounts) -> list[Widening]:
        return widenings(sizes, counts, applier.importance, ms_per_channel, block)

    def measure(counts: RemovalCounts) -> float:
        widths = rebuilds.widths_after(source, counts)
        latency_ms = _measure_widths(context, state, rebuilds, widths, source)
        measured.append((widths, latency_ms))
        return latency_ms

    return fill_in_rounds(
        {name: size - widths[name] for name, size in sizes.items() if size > widths[name]},
        latency_ms,
        steps_for,
        measure,
        aim_ms,
        tolerance=context.settings.fit_tolerance,
        max_probes=max_probes,
        skip=skip,
    )


def run_search(
    context: SearchContext,
    budget: Budget,
    executor: Executor | None = None,
    checkpoint: SearchCheckpoint | None = None,
) -> SearchOutcome:
    """The whole search in this process; children of a depth go through `executor`.

    With a `checkpoint` (whose store must be `context.store`), the state is saved after the
    unpruned model is measured and after each depth, and a search saved there before goes on
    from its last finished depth."""
    started = time.monotonic()
    executor = executor or SequentialExecutor()
    saved = checkpoint.saved() if checkpoint is not None else None
    resumed = None
    if saved is not None and saved[0].root.spec.hash == context.root_spec.hash:
        state, elapsed_s = saved
        started -= elapsed_s
        context.prepare()
        _tell_resumed(context, state, elapsed_s)
        resumed = {
            "after_depth": state.depth,
            "tree_search_finished": state.done,
            "saved_s": round(elapsed_s, 1),
        }
    else:
        state = start(context, budget)
        _save(context, checkpoint, state, time.monotonic() - started)
    while not state.done:
        tasks = plan(context, state)
        results = executor.map(partial(evaluate_child, context), tasks)
        state = advance(context, state, results)
        # Saved before the weights it no longer uses go: a crash between the two leaves the
        # state before, whose nodes' weights are all there still.
        _save(context, checkpoint, state, time.monotonic() - started)
        context.store.keep_only(live_nodes(state))
    if checkpoint is not None:
        # What follows is not saved: it runs again in full on resuming, from the weights the
        # tree search left (the re-ranking's tuning would otherwise be applied twice).
        checkpoint.nodes.stop_saving()
    retuned = executor.map(partial(_retune_apart, context), to_retune(context, state))
    return replace(finish(context, state, started, retuned), resumed=resumed)


def live_nodes(state: SearchState) -> set[str]:
    """The nodes whose weights the search may still use: the frontier, which the next depth
    prunes; every node under the budget, a candidate answer; and their ancestors, from which
    an answer's channels are given back. A node outside them never returns to them (the tree
    grows from the frontier), so its weights, most of a large model's search's memory, can go.
    """
    live = {state.root_id, *state.frontier}
    live |= {node.id for node in state.nodes.values() if node.within_budget}
    for node_id in list(live):
        parent = state.nodes[node_id].parent
        while parent is not None and parent not in live:
            live.add(parent)
            parent = state.nodes[parent].parent
    return live


def _save(
    context: SearchContext,
    checkpoint: SearchCheckpoint | None,
    state: SearchState,
    elapsed_s: float,
) -> None:
    problem = checkpoint.save(state, elapsed_s) if checkpoint is not None else None
    if problem:
        context.sink.emit("note", message=problem)


def _retune_apart(context: SearchContext, node: Node) -> dict:
    """`retune`, its weights stored beside the node's until `finish` applies them."""
    return retune(context, node, weights_id=f"{node.id}-retuned")


def _tell_resumed(context: SearchContext, state: SearchState, elapsed_s: float) -> None:
    best = state.best_within_budget()
    context.sink.emit(
        "resumed",
        depth=state.depth,
        done=state.done,
        elapsed_s=elapsed_s,
        latency_ms=state.baseline_ms,
        budget_ms=state.budget_ms,
        score=state.root.score,
        scored_by="accuracy" if context.data.labelled else "fidelity",
        candidates=state.candidates_evaluated,
        best=None if best is None else best.summary(),
    )
