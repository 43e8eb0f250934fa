"""Section 2, measurement quality: how repeatable one model's latency is, and whether a
remote agent on this machine agrees with the local device.

Repeatability: one pruned model (every channel group cut to half its width) is measured
`repeats` times with the harness's default settings, alternately alone (absolute: its median)
and interleaved with the unpruned model (reference-anchored: ratio x L(M0), L(M0) being the
first repeat's reference median, as a job keeps its own baseline). For each: CV (standard
deviation / mean of the repeats' medians), spread ((max - min) / median) and the median of the
harness's own per-measurement robust CV.

Agreement: a private redis-server and a real agent process (default timing settings) measure
the same architectures as a local oracle in this process, alternating which goes first;
the ratio of medians remote / local, alone and reference-anchored.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.report import SectionResult, make_row

NAME, TITLE = "measurement", "Measurement quality"
AGREEMENT_CLASS = "bench-agreement"


@dataclass(frozen=True)
class MeasurementConfig:
    """The model measured, how often, and the widths compared between local and remote."""

    model: str
    data: str
    repeats: int
    agreement_keeps: tuple[float, ...]
    keep: float = 0.5
    batch_size: int = 1


FULL = MeasurementConfig("builtin:resnet", "builtin:mnist", 30, (1.0, 0.8, 0.6, 0.45, 0.3))
QUICK = MeasurementConfig("builtin:vgg", "builtin:digits", 3, (1.0, 0.5))


def estimate_s(config: MeasurementConfig) -> float:
    """Rough seconds on a quiet machine: about 1.2 s per repeat, 3 s per compared width."""
    return 10 + 1.2 * config.repeats + 3 * len(config.agreement_keeps)


def pruned_variant(model: nn.Module, input_shape: Sequence[int], keep: float) -> nn.Module:
    """A copy of `model` with every prunable channel group cut to `keep` of its width."""
    from search.pruning import PrunableModel

    example = torch.zeros(1, *input_shape)
    pruner = PrunableModel(copy.deepcopy(model), example, min_width_fraction=0.0)
    pruner.remove({g.name: range(max(1, round(g.size * keep)), g.size) for g in pruner.groups})
    return pruner.model.eval()


def spread_stats(values: Sequence[float]) -> dict[str, float]:
    """Median, CV (sample standard deviation / mean) and spread ((max - min) / median)."""
    median = statistics.median(values)
    cv = statistics.stdev(values) / statistics.fmean(values) if len(values) > 1 else 0.0
    return {"median": median, "cv": cv, "spread": (max(values) - min(values)) / median}


def measure_repeats(
    config: MeasurementConfig, log: Callable[[str], None]
) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    """The absolute and reference-anchored repeat rows, and the series for the plot."""
    from latency.harness import TimingSettings, time_interleaved, time_model
    from search.inputs import load_inputs
    from search.timing_input import timing_input

    inputs = load_inputs(config.model, config.data)
    reference = inputs.model.eval()
    candidate = pruned_variant(reference, inputs.data.input_shape, config.keep)
    example = timing_input(config.batch_size, tuple(inputs.data.input_shape))
    settings = TimingSettings()
    absolute, ratios, reference_ms = [], [], []
    absolute_cv, anchored_cv = [], []
    started = time.monotonic()
    for repeat in range(config.repeats):
        alone = time_model(candidate, example, settings)
        candidate_stats, reference_stats, ratio = time_interleaved(
            candidate, reference, example, settings
        )
        absolute.append(alone.median_ms)
        absolute_cv.append(alone.cv)
        ratios.append(ratio)
        reference_ms.append(reference_stats.median_ms)
        anchored_cv.append(max(candidate_stats.cv, reference_stats.cv))
        if (repeat + 1) % 10 == 0:
            log(f"measurement repeats: {repeat + 1}/{config.repeats}")
    wall_s = time.monotonic() - started
    baseline_ms = reference_ms[0]
    anchored = [ratio * baseline_ms for ratio in ratios]
    rows = []
    for metric, values, within in (
        ("absolute", absolute, absolute_cv),
        ("anchored", anchored, anchored_cv),
    ):
        stats = spread_stats(values)
        rows.append(
            make_row(
                NAME,
                config.model,
                latency_ms=stats["median"],
                measurements=len(values),
                wall_s=wall_s,
                metric=metric,
                cv=stats["cv"],
                spread=stats["spread"],
                within_cv_median=statistics.median(within),
                keep=config.keep,
                baseline_ms=baseline_ms if metric == "anchored" else None,
                reference_spread=spread_stats(reference_ms)["spread"],
                values_ms=values,
            )
        )
    return rows, {"absolute": absolute, "reference-anchored": anchored}


def measure_agreement(
    config: MeasurementConfig, work_dir: Path, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Ratio of medians remote agent / local device, alone and reference-anchored."""
    import redis

    from bench.service_overhead import ServiceStack
    from latency.cache import MemoryLatencyCache
    from latency.local_oracle import LocalOracle
    from latency.remote_oracle import RemoteOracle
    from search.arch_spec import build_from_spec, spec_of
    from search.inputs import load_inputs

    inputs = load_inputs(config.model, config.data)
    shape = tuple(inputs.data.input_shape)
    reference = spec_of(inputs.model, inputs.model_ref, shape)
    specs = [
        spec_of(pruned_variant(inputs.model, shape, keep), inputs.model_ref, shape)
        for keep in config.agreement_keeps
    ]
    started = time.monotonic()
    with ServiceStack(work_dir, log) as stack:
        url = stack.start_redis()
        stack.start_agent(AGREEMENT_CLASS)
        client = redis.Redis.from_url(url)
        # Fresh caches: every request below is timed, none is answered from a cache.
        remote = RemoteOracle(
            client, AGREEMENT_CLASS, batch_size=config.batch_size, cache=MemoryLatencyCache()
        )
        local = LocalOracle(
            build_from_spec, threads=1, batch_size=config.batch_size, fresh_process=True
        )
        absolute, anchored = [], []
        for index, spec in enumerate(specs):
            oracles = (local, remote) if index % 2 == 0 else (remote, local)
            alone = {id(o): o.measure_reference(spec).median_ms for o in oracles}
            absolute.append(alone[id(remote)] / alone[id(local)])
            if spec.hash != reference.hash:
                pair = {id(o): o.measure(spec, reference).ratio for o in oracles}
                anchored.append(pair[id(remote)] / pair[id(local)])
        client.close()
    wall_s = time.monotonic() - started
    rows = []
    for metric, ratios in (("agreement-absolute", absolute), ("agreement-anchored", anchored)):
        if not ratios:
            continue
        rows.append(
            make_row(
                NAME,
                config.model,
                measurements=2 * len(ratios),
                wall_s=wall_s,
                metric=metric,
                ratio_median=statistics.median(ratios),
                ratio_range=f"{min(ratios):.3f}-{max(ratios):.3f}",
                ratios=ratios,
                keeps=list(config.agreement_keeps),
            )
        )
    return rows


def run(
    config: MeasurementConfig,
    work_dir: Path,
    log: Callable[[str], None] = print,
) -> SectionResult:
    """Repeatability rows, then agreement rows (skipped, with a note, without the service)."""
    from bench.service_overhead import missing_prerequisites

    started = time.monotonic()
    result = SectionResult(NAME, TITLE)
    result.settings = {
        "model": f"{config.model} cut to {config.keep:.0%} width",
        "repeats": config.repeats,
        "timing": "harness defaults, 1 thread",
        "batch": config.batch_size,
    }
    rows, series = measure_repeats(config, log)
    result.rows += rows
    result.data["repeats"] = series
    missing = missing_prerequisites(modules=("latency.agent", "latency.remote_oracle"))
    if missing:
        result.note = f"local/remote agreement skipped: {missing}"
    else:
        result.rows += measure_agreement(config, work_dir / "agreement", log)
    result.wall_s = time.monotonic() - started
    return result
