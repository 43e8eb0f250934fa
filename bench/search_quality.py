"""Section 1, search quality: archtree, greedy and uniform at several budgets, on two models.

Every search runs the engine in this process with a local oracle (one thread), the same
fine-tuning budget for every strategy (ft_steps per child, select_steps for each of the
best select_top candidates, final_epochs), and its own
latency cache, so no strategy profits from another's measurements. After the search the
benchmark reloads the saved model (load_pruned) and times it itself, interleaved with the
unpruned model, with 4x the oracle's repeats: `latency_ms` is that ratio times the job's own
baseline L(M0), and `fit` is latency_ms / budget_ms.

With `seeds` above 1, every search is repeated on replicates: seed s splits the data its own
way, trains the unpruned model on that split and seeds the search's fine-tuning. An answer's
accuracy moves by a point or so from one seed to the next, as much as strategies differ.
"""

from __future__ import annotations

import functools
import itertools
import math
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from archtree_cli.commands import counted
from bench import CACHE_DIR
from bench.report import SectionResult, make_row
from bench.train_models import seeded_recipe, trained_weights, weights_path
from latency.fresh_process import FreshProcessTimer, TimingJob
from latency.harness import TimingSettings
from search.interfaces import EventSink, TimingStats
from search.settings import STRATEGIES, SearchSettings

NAME, TITLE = "search_quality", "Search quality"
UNREACHABLE_MARK = "cannot be met on this device"


@dataclass(frozen=True)
class SearchQualityConfig:
    """Models, data, budgets (fractions of each model's latency) and search settings."""

    models: tuple[str, ...]
    data: str
    budgets: tuple[float, ...]
    settings: SearchSettings
    timing: TimingSettings
    strategies: tuple[str, ...] = STRATEGIES
    batch_size: int = 1
    remeasure_factor: float = 4.0
    # Each search runs once per seed (0, 1, ...), each seed a replicate of its own: the data
    # split, the unpruned model trained on it and the search's fine-tuning. Targets use the
    # mean over seeds.
    seeds: int = 1


FULL = SearchQualityConfig(
    models=("builtin:resnet", "builtin:mobilenetv2"),
    data="builtin:mnist",
    budgets=(0.70, 0.50, 0.35),
    # Three moves per node keep a full run near half an hour; `focused` is the one left out.
    settings=SearchSettings(
        width=3,
        branching=3,
        move_kinds=("global", "latency", "uniform"),
        planned_steps=3,
        ft_steps=20,
        final_epochs=1.0,
    ),
    timing=TimingSettings(),
)
QUICK = SearchQualityConfig(
    models=("builtin:vgg",),
    data="builtin:digits",
    budgets=(0.70,),
    settings=SearchSettings(
        width=2,
        branching=2,
        planned_steps=2,
        max_depth=3,
        max_probes=3,
        ft_steps=3,
        final_epochs=0.1,
    ),
    timing=TimingSettings(
        warmup_runs=3, warmup_s=0.01, min_runs=10, min_time_s=0.03, max_remeasures=1
    ),
)
# Seconds per search on a quiet 2-core machine at batch 8 (the mean of the two models in the
# full run of 2026-11-27, rounded up), for the estimate printed before a run; an unreachable
# budget costs 10-20 s.
SECONDS_PER_SEARCH = {"archtree": 180.0, "greedy": 100.0, "uniform": 50.0}
SECONDS_PER_SEARCH_QUICK = {"archtree": 12.0, "greedy": 8.0, "uniform": 5.0}
# The batch those seconds were taken at: full runs at 8, quick runs at 1.
ESTIMATE_BATCH = {False: 8, True: 1}


# Seconds to train each model on a quiet 2-core machine, when its weights are not cached.
TRAINING_SECONDS = {"builtin:resnet": 70.0, "builtin:mobilenetv2": 300.0, "builtin:vgg": 10.0}


def estimate_s(config: SearchQualityConfig, quick: bool, cache_dir: Path = CACHE_DIR) -> float:
    """Upper estimate of the section's time when every budget is reachable."""
    per_search = SECONDS_PER_SEARCH_QUICK if quick else SECONDS_PER_SEARCH
    runs = len(config.models) * len(config.budgets) * config.seeds
    searching = runs * sum(per_search.get(s, 60.0) for s in config.strategies)
    training = sum(
        TRAINING_SECONDS.get(model, 120.0)
        for model in config.models
        for seed in range(config.seeds)
        if not weights_path(cache_dir, model, config.data, seeded_recipe(model, seed)).is_file()
    )
    return searching * (config.batch_size / ESTIMATE_BATCH[quick]) ** 0.5 + training


class SearchEvents:
    """Event sink that counts the engine's events and keeps the baseline and feasibility."""

    def __init__(self, forward: EventSink | None = None) -> None:
        self.counts: Counter[str] = Counter()
        self.baseline: dict[str, Any] = {}
        self.feasibility: dict[str, Any] = {}
        self.rerank_steps = 0
        # What the search's ending did: (id, confirmed ms) of candidates above the budget on
        # confirmation, the trimmed best against the one that confirmed, if compared, and the
        # answer widened to fill the budget's slack, if tried.
        self.confirm_failed: list[tuple[str, float]] = []
        self.trim_compared: dict[str, Any] | None = None
        self.filled: dict[str, Any] | None = None
        self.forward = forward

    def emit(self, kind: str, **data: Any) -> None:
        self.counts[kind] += 1
        if kind == "baseline":
            self.baseline = data
        elif kind == "feasibility":
            self.feasibility = data
        elif kind == "reranked":
            self.rerank_steps += data["steps"] * len(data["nodes"])
        elif kind == "confirm_failed":
            self.confirm_failed.append((data["id"], data["latency_ms"]))
        elif kind == "trim_compared":
            self.trim_compared = data
        elif kind == "filled":
            self.filled = data
        if self.forward is not None:
            self.forward.emit(kind, **data)


def final_finetune_steps(settings: SearchSettings, train_size: int) -> int:
    """Steps of the answer's final fine-tune, counted as search.training.train counts them."""
    if settings.final_epochs <= 0 or train_size < 2:
        return 0
    batch = max(1, min(settings.ft_batch_size, train_size))
    return max(1, round(settings.final_epochs * math.ceil(train_size / batch)))


def trained_model(model: str, data: str, weights: str, seed: int) -> torch.nn.Module:
    """The trained unpruned model of a seed: the reference of the re-measurement."""
    from search.inputs import load_inputs

    return load_inputs(model, data, weights=weights, seed=seed).model


def run_search_once(
    model: str,
    data: str,
    weights: Path,
    fraction: float,
    strategy: str,
    config: SearchQualityConfig,
    out_dir: Path,
    verbose: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """One search, its artifacts saved in `out_dir`, re-measured and scored here: one row."""
    from archtree_cli.commands import prune
    from archtree_cli.progress import ConsoleProgress
    from latency.local_oracle import LocalOracle
    from search.arch_spec import build_from_spec
    from search.artifacts import load_pruned
    from search.errors import ArchtreeError
    from search.inputs import load_inputs
    from search.training import correct

    settings = replace(config.settings, strategy=strategy, seed=seed).effective()
    oracle = LocalOracle(
        build_from_spec,
        threads=1,
        batch_size=config.batch_size,
        settings=config.timing,
        fresh_process=True,
    )
    events = SearchEvents(ConsoleProgress(quiet=not verbose))
    common = {
        "budget_fraction": fraction,
        "strategy": strategy,
        "seed": seed,
        "ft_steps": settings.ft_steps,
        "final_epochs": settings.final_epochs,
        "batch_size": config.batch_size,
    }
    started = time.monotonic()
    try:
        report, _ = prune(
            model=model,
            data=data,
            budget=f"{100 * fraction:g}%",
            out=str(out_dir),
            settings=settings,
            oracle=oracle,
            weights=str(weights),
            sink=events,
        )
    except ArchtreeError as error:
        message = str(error)
        unreachable = UNREACHABLE_MARK in message
        return make_row(
            NAME,
            model,
            **common,
            budget_ms=events.baseline.get("budget_ms"),
            candidates=0,
            measurements=oracle.measurements,
            wall_s=time.monotonic() - started,
            baseline_ms=events.baseline.get("latency_ms"),
            smallest_ms=events.feasibility.get("smallest_ms"),
            ft_steps_total=events.counts["node"] * settings.ft_steps,
            note="unreachable" if unreachable else "failed",
            error=message,
        )
    wall_s = time.monotonic() - started
    inputs = load_inputs(model, data, weights=str(weights), seed=settings.seed)

    pruned = load_pruned(out_dir)
    pruned_stats, reference_stats, ratio = remeasure_answer(
        out_dir, model, data, weights, seed, inputs.data.input_shape, config
    )
    baseline_ms = report["baseline"]["latency_ms"]
    latency_ms = ratio * baseline_ms
    val_correct = correct(pruned, inputs.data.val_x, inputs.data.val_y)
    fine_tuned = events.counts["node"]
    final_steps = final_finetune_steps(settings, len(inputs.data.train_x))
    return make_row(
        NAME,
        model,
        **common,
        accuracy=float(val_correct.mean()),
        latency_ms=latency_ms,
        budget_ms=report["budget_ms"],
        fit=latency_ms / report["budget_ms"],
        candidates=report["search"]["candidates_evaluated"],
        measurements=oracle.measurements,
        wall_s=wall_s,
        baseline_ms=baseline_ms,
        baseline_accuracy=report["baseline"]["accuracy"],
        smallest_ms=events.feasibility.get("smallest_ms"),
        remeasured_ratio=ratio,
        remeasured_ms=pruned_stats.median_ms,
        remeasured_reference_ms=reference_stats.median_ms,
        remeasured_cv=max(pruned_stats.cv, reference_stats.cv),
        report_latency_ms=report["final"]["latency_ms"],
        report_fit=report["final"]["budget_fit"],
        report_accuracy=report["final"]["accuracy"],
        # The validation images the answer gets wrong: strategies are compared image by image.
        val_wrong=(val_correct == 0).nonzero().flatten().tolist(),
        val_samples=len(val_correct),
        cache_hits=oracle.cache_hits,
        depths=report["search"]["depths"],
        trims=report["final"]["trims"],
        confirm_failed=[
            {"id": node_id, "fit": latency_ms / report["budget_ms"]}
            for node_id, latency_ms in events.confirm_failed
        ],
        trim_compared=events.trim_compared,
        filled=events.filled,
        params=report["final"]["params"],
        macs=report["final"]["macs"],
        fine_tuned_children=fine_tuned,
        ft_steps_total=fine_tuned * settings.ft_steps + events.rerank_steps + final_steps,
        note=None,
    )


def remeasure_answer(
    folder: Path,
    model: str,
    data: str,
    weights: Path,
    seed: int,
    input_shape: Sequence[int],
    config: SearchQualityConfig,
) -> tuple[TimingStats, TimingStats, float]:
    """The answer saved in `folder` timed again against the trained unpruned model, interleaved,
    one thread, with `config.remeasure_factor` times the oracle's repeats, in a fresh process as
    the search's own measurements were (latency/fresh_process.py): the answer's stats, the
    unpruned model's, and their ratio (the median of per-pair ratios)."""
    from search.artifacts import load_pruned

    remeasure = replace(config.timing, threads=1).scaled(config.remeasure_factor)
    pruned_stats, reference_stats, ratio = FreshProcessTimer().run(
        TimingJob(
            candidate=functools.partial(load_pruned, str(folder)),
            reference=functools.partial(trained_model, model, data, str(weights), seed),
            input_shape=tuple(input_shape),
            batch_size=config.batch_size,
            dtype="float32",
            settings=remeasure,
        )
    )
    assert reference_stats is not None and ratio is not None
    return pruned_stats, reference_stats, ratio


def run(
    config: SearchQualityConfig,
    out_dir: Path,
    cache_dir: Path = CACHE_DIR,
    log: Callable[[str], None] = print,
    verbose: bool = False,
) -> SectionResult:
    """Train (or load) each model, then search every (budget, strategy); one row per search.

    Strategies run one after another inside each budget (and seed), so that a drift of the
    machine hits them alike.
    """
    started = time.monotonic()
    clear_previous_answers(out_dir)
    result = SectionResult(NAME, TITLE)
    result.settings = {
        "data": config.data,
        "strategies": "/".join(config.strategies),
        "width": config.settings.width,
        "branching": config.settings.branching,
        "moves": "/".join(config.settings.move_kinds[: config.settings.branching]),
        "planned_steps": config.settings.planned_steps,
        "ft_steps per child": config.settings.ft_steps,
        "final_epochs": config.settings.final_epochs,
        "batch": config.batch_size,
        "oracle min_time_s": config.timing.min_time_s,
        "re-measure": f"{config.remeasure_factor:g}x repeats, interleaved with the unpruned model",
        "seeds": config.seeds,
    }
    models: dict[str, dict[str, Any]] = {}
    for model in config.models:
        trained = [
            trained_weights(
                model, config.data, cache_dir, recipe=seeded_recipe(model, seed), log=log
            )
            for seed in range(config.seeds)
        ]
        models[model] = trained[0].to_dict()
        if config.seeds > 1:
            # The unpruned models' mean, each on its own seed's validation split.
            accuracies = [t.val_accuracy for t in trained]
            models[model]["val_accuracy"] = statistics.fmean(accuracies)
            models[model]["val_accuracy_by_seed"] = accuracies
        for fraction in config.budgets:
            for seed, strategy in itertools.product(range(config.seeds), config.strategies):
                name = answer_folder(model, fraction, strategy, seed, config.seeds)
                log(f"search {name} ...")
                row = run_search_once(
                    model,
                    config.data,
                    trained[seed].weights,
                    fraction,
                    strategy,
                    config,
                    out_dir / name,
                    verbose,
                    seed,
                )
                result.rows.append(row)
                log(f"search {name}: {_describe(row)}")
        baselines = [
            r["details"]["baseline_ms"]
            for r in result.rows
            if r["model"] == model and r["details"].get("baseline_ms")
        ]
        models[model]["baseline_ms"] = statistics.median(baselines) if baselines else None
    result.data["models"] = models
    unreachable = [r for r in result.rows if r["details"].get("note") == "unreachable"]
    if unreachable:
        result.note = (
            f"{len(unreachable)} of {len(result.rows)} searches had an unreachable budget on "
            "this machine (fit null; the engine's message is listed)."
        )
    result.wall_s = time.monotonic() - started
    return result


def answer_folder(model: str, fraction: float, strategy: str, seed: int, seeds: int) -> str:
    """The folder, under the section's output, that one search's answer is saved in."""
    name = f"{model.removeprefix('builtin:')}-{round(100 * fraction)}-{strategy}"
    return f"{name}-s{seed}" if seeds > 1 else name


def clear_previous_answers(out_dir: Path) -> None:
    """Remove the answers an earlier run saved in `out_dir` (folders holding an arch.json), so
    that it holds this run's only: a run with another number of seeds names them otherwise."""
    if not out_dir.is_dir():
        return
    for folder in out_dir.iterdir():
        if folder.is_dir() and (folder / "arch.json").is_file():
            shutil.rmtree(folder)


def _describe(row: dict[str, Any]) -> str:
    if row["fit"] is None:
        return f"{row['details']['note']} after {row['wall_s']:.0f} s: {row['details']['error']}"
    return (
        f"accuracy {row['accuracy']:.4f}, {row['latency_ms']:.3f} ms for a budget of "
        f"{row['budget_ms']:.3f} ms (fit {row['fit']:.3f}), "
        f"{counted(row['candidates'], 'candidate')}, "
        f"{counted(row['measurements'], 'measurement')}, {row['wall_s']:.0f} s"
    )
