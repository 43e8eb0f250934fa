"""The benchmark's results: rows, section results, targets, tables, markdown and plots.

Every row has the fields of ROW_FIELDS (null where they do not apply); what is particular to
a section goes in the row's `details`. Plots use matplotlib's Agg backend, imported only
when plots are drawn.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from search.score_gap import ScoreGap, paired_gap

ROW_FIELDS = (
    "benchmark",
    "model",
    "budget_fraction",
    "strategy",
    "accuracy",
    "latency_ms",
    "budget_ms",
    "fit",
    "candidates",
    "measurements",
    "wall_s",
)
FIT_RANGE = (0.93, 1.00)
ARCHTREE_MARGIN = 0.02
ANCHORED_CV_MAX = 0.02
OVERHEAD_MS_MAX = 5.0
POLLING_P99_MS_MAX = 20.0
SPEEDUP_MIN = 1.6
# Standard errors either side of a difference for a 95 % interval.
Z95 = 1.96
# The numbering of the sections.
SECTION_NUMBERS = {"search_quality": 1, "measurement": 2, "service": 3, "scaling": 4}


def make_row(benchmark: str, model: str | None = None, **fields: Any) -> dict[str, Any]:
    """A summary row: the ROW_FIELDS (None unless given), plus `details` for the rest."""
    row: dict[str, Any] = dict.fromkeys(ROW_FIELDS)
    row["benchmark"], row["model"] = benchmark, model
    details = {key: fields.pop(key) for key in list(fields) if key not in ROW_FIELDS}
    row.update(fields)
    row["details"] = details
    return row


@dataclass
class SectionResult:
    """What one section measured: its rows, or why it was skipped, plus extra data."""

    name: str
    title: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    status: str = "ok"  # ok, skipped or failed
    note: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "status": self.status,
            "note": self.note,
            "wall_s": self.wall_s,
            "settings": self.settings,
            "data": self.data,
        }


def skipped(name: str, title: str, note: str) -> SectionResult:
    """A section that did not run, and why."""
    return SectionResult(name, title, status="skipped", note=note)


def describe_machine() -> dict[str, Any]:
    """CPU model, cores, torch version and threads, Python, host and load."""
    from latency.fingerprint import cpu_model

    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "timing_threads": 1,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "load_average_start": list(os.getloadavg()),
    }


# --- targets -------------------------------------------------------------------------------


def _target(name: str, value: str, passed: bool | None, detail: str = "") -> dict[str, Any]:
    result = "n/a" if passed is None else ("pass" if passed else "miss")
    return {"target": name, "value": value, "result": result, "detail": detail}


def _rows(rows: Sequence[dict[str, Any]], benchmark: str, metric: str | None = None) -> list:
    return [
        r
        for r in rows
        if r["benchmark"] == benchmark and (metric is None or r["details"].get("metric") == metric)
    ]


def in_fit_range(fit: float) -> bool:
    """Whether a fit (latency / budget) lies in the target's range."""
    low, high = FIT_RANGE
    return low <= fit <= high


def fits_budget(row: dict[str, Any]) -> bool:
    """Whether a row's `fit` lies in the target's range."""
    return in_fit_range(row["fit"])


def fit_count(fits: Sequence[dict[str, Any]]) -> str:
    """Rows in range of rows, with each strategy's count when there are several:
    `23/36 rows (archtree 9/12, greedy 9/12, uniform 5/12)`."""
    inside = sum(map(fits_budget, fits))
    return f"{inside}/{len(fits)} rows" + _fit_by_strategy(fits)


def _fit_by_strategy(fits: Sequence[dict[str, Any]]) -> str:
    """Rows in range per strategy, so that one strategy's misses are not charged to all."""
    strategies = sorted({r["strategy"] for r in fits})
    if len(strategies) < 2:
        return ""
    counts = []
    for strategy in strategies:
        own = [r for r in fits if r["strategy"] == strategy]
        counts.append(f"{strategy} {sum(map(fits_budget, own))}/{len(own)}")
    return " (" + ", ".join(counts) + ")"


def evaluate_targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured value and pass, miss or n/a."""
    targets = []
    search = _rows(rows, "search_quality")
    fits = [r for r in search if r["fit"] is not None]
    low, high = FIT_RANGE
    inside = [r for r in fits if fits_budget(r)]
    unreachable = len(search) - len(fits)
    targets.append(
        _target(
            f"budget fit in [{low:.2f}, {high:.2f}]",
            fit_count(fits) + (f" ({unreachable} rows without a result)" if unreachable else ""),
            (len(inside) == len(fits)) if fits else None,
            ", ".join(
                f"{_short(r['model'])} {r['budget_fraction']:.0%} {r['strategy']} {r['fit']:.3f}"
                for r in fits
                if not fits_budget(r)
            ),
        )
    )
    models = sorted({r["model"] for r in search})
    lowest = min((r["budget_fraction"] for r in search), default=None)
    for model in models:
        # Each (budget, strategy) holds one row per seed; accuracies are compared as means.
        by_key: dict[tuple[float, str], list[dict[str, Any]]] = {}
        for r in search:
            if r["model"] == model and r["accuracy"] is not None:
                by_key.setdefault((r["budget_fraction"], r["strategy"]), []).append(r)
        tree, uniform = by_key.get((lowest, "archtree")), by_key.get((lowest, "uniform"))
        if tree is None or uniform is None:
            value, passed, detail = "no result at that budget", None, ""
        else:
            value = f"{100 * (mean_accuracy(tree) - mean_accuracy(uniform)):+.1f} points"
            passed = mean_accuracy(tree) >= mean_accuracy(uniform) + ARCHTREE_MARGIN
            detail = _interval_note([(lowest, tree, uniform)])
        targets.append(
            _target(
                f"{_short(model)}: archtree >= uniform + {100 * ARCHTREE_MARGIN:g} points at "
                f"{lowest:.0%}",
                value,
                passed,
                detail,
            )
        )
        pairs = [
            (fraction, by_key[(fraction, "archtree")], by_key[(fraction, "greedy")])
            for fraction in sorted({f for f, _ in by_key}, reverse=True)
            if (fraction, "archtree") in by_key and (fraction, "greedy") in by_key
        ]
        targets.append(
            _target(
                f"{_short(model)}: archtree never below greedy",
                ", ".join(
                    f"{f:.0%}: {100 * (mean_accuracy(t) - mean_accuracy(g)):+.1f}"
                    for f, t, g in pairs
                )
                or "no pairs",
                all(mean_accuracy(t) >= mean_accuracy(g) for _, t, g in pairs) if pairs else None,
                _interval_note(pairs),
            )
        )
    anchored = _rows(rows, "measurement", "anchored")
    targets.append(
        _target(
            f"reference-anchored CV < {ANCHORED_CV_MAX:.0%}",
            f"{anchored[0]['details']['cv']:.2%}" if anchored else "not measured",
            anchored[0]["details"]["cv"] < ANCHORED_CV_MAX if anchored else None,
        )
    )
    overhead = _rows(rows, "service", "measurement_overhead")
    targets.append(
        _target(
            f"measurement overhead < {OVERHEAD_MS_MAX:g} ms (median)",
            f"{overhead[0]['latency_ms']:.2f} ms" if overhead else "not measured",
            overhead[0]["latency_ms"] < OVERHEAD_MS_MAX if overhead else None,
        )
    )
    polling = _rows(rows, "service", "polling")
    targets.append(
        _target(
            f"polling p99 < {POLLING_P99_MS_MAX:g} ms at 100 clients",
            f"{polling[0]['latency_ms']:.1f} ms" if polling else "not measured",
            polling[0]["latency_ms"] < POLLING_P99_MS_MAX if polling else None,
        )
    )
    speedup = _rows(rows, "scaling", "speedup")
    value = speedup[0]["details"]["speedup"] if speedup else None
    targets.append(
        _target(
            f"2 workers >= {SPEEDUP_MIN:g}x faster than 1",
            f"{value:.2f}x" if value is not None else "not measured",
            value >= SPEEDUP_MIN if value is not None else None,
            f"per evaluated candidate; wall-time ratio {speedup[0]['details']['wall_ratio']:.2f}"
            + _rounds(speedup[0]["details"].get("round_speedups"))
            if speedup
            else "",
        )
    )
    return targets


def mean_accuracy(rows: Sequence[dict[str, Any]]) -> float:
    """The mean accuracy of one (budget, strategy)'s rows, one per seed."""
    return statistics.fmean(r["accuracy"] for r in rows)


def accuracy_gap(row: dict[str, Any], other: dict[str, Any]) -> ScoreGap | None:
    """The paired gap in validation accuracy between two search rows of one model and seed,
    from the images each answer got wrong (None when a row does not list them)."""
    wrong, other_wrong = row["details"].get("val_wrong"), other["details"].get("val_wrong")
    samples = row["details"].get("val_samples")
    if wrong is None or other_wrong is None or not samples:
        return None
    if other["details"].get("val_samples") != samples or _seed(row) != _seed(other):
        return None
    return paired_gap(_correct(wrong, samples), _correct(other_wrong, samples))


def seeds_gap(
    rows: Sequence[dict[str, Any]], others: Sequence[dict[str, Any]]
) -> tuple[ScoreGap, list[ScoreGap]] | None:
    """The mean of the per-seed paired gaps between two (budget, strategy)s, its standard error
    from each seed's validation images, and the per-seed gaps (None when no seed has both)."""
    others_by_seed = {_seed(other): other for other in others}
    gaps = [
        gap
        for row in rows
        if _seed(row) in others_by_seed
        and (gap := accuracy_gap(row, others_by_seed[_seed(row)])) is not None
    ]
    if not gaps:
        return None
    error = math.sqrt(sum(gap.standard_error**2 for gap in gaps)) / len(gaps)
    difference = statistics.fmean(gap.difference for gap in gaps)
    return ScoreGap(difference, error, gaps[0].samples), gaps


def _seed(row: dict[str, Any]) -> int:
    return row["details"].get("seed") or 0


def _correct(wrong: Sequence[int], samples: int) -> torch.Tensor:
    correct = torch.ones(samples)
    correct[list(wrong)] = 0.0
    return correct


def _interval_note(
    pairs: Sequence[tuple[float, Sequence[dict[str, Any]], Sequence[dict[str, Any]]]],
) -> str:
    """Each pair's gap with its 95 % interval, paired image by image on the validation split
    (with several seeds: the mean gap, from each seed's images, and the gap of each seed)."""
    known = [(fraction, gap) for fraction, a, b in pairs if (gap := seeds_gap(a, b)) is not None]
    if not known:
        return ""
    seeds = max(len(per_seed) for _, (_, per_seed) in known)
    where = f"the {known[0][1][0].samples:,} validation images" + (
        f" of each of {seeds} seeds" if seeds > 1 else ""
    )

    def one(fraction: float, gap: ScoreGap, per_seed: list[ScoreGap]) -> str:
        text = (
            f"{fraction:.0%}: {100 * gap.difference:+.1f} +- {100 * Z95 * gap.standard_error:.1f}"
        )
        if len(per_seed) > 1:
            text += " (" + ", ".join(f"{100 * g.difference:+.1f}" for g in per_seed) + ")"
        return text

    return f"95 % intervals, paired on {where}: " + ", ".join(
        one(fraction, gap, per_seed) for fraction, (gap, per_seed) in known
    )


def _rounds(speedups: list[float] | None) -> str:
    if not speedups or len(speedups) < 2:
        return ""
    return "; per round " + ", ".join(f"{value:.2f}x" for value in speedups)


def _short(model: str | None) -> str:
    return (model or "").removeprefix("builtin:")


# --- tables --------------------------------------------------------------------------------

Column = tuple[str, str, Callable[[Any], str]]


def _fixed(digits: int) -> Callable[[Any], str]:
    return lambda value: f"{value:.{digits}f}"


def _percent(digits: int = 0) -> Callable[[Any], str]:
    return lambda value: f"{value:.{digits}%}"


def _joined(digits: int) -> Callable[[Any], str]:
    return lambda values: " / ".join(f"{value:.{digits}f}" for value in values)


_TEXT: Callable[[Any], str] = str

# What a service row's `latency_ms` is, by its metric.
SERVICE_STATISTICS = {
    "measurement_overhead": "median",
    "submission_to_first_child": "one job",
    "polling": "p99",
    "polling_saturation": "p99",
}

# What the columns that need it mean, said under each section's table in summary.md.
COLUMN_NOTES = {
    "search_quality": (
        "`latency ms`: the answer re-measured after the search, interleaved with the unpruned "
        "model; `budget ms`: the budget fraction of the unpruned latency that the search itself "
        "measured, so it differs a little between rows of the same fraction; `fit`: latency / "
        "budget (the target is 0.93-1.00); `ft steps`: fine-tuning steps over the whole search."
    ),
    "measurement": (
        "`CV`: standard deviation / mean of the repeats' medians; `spread`: (max - min) / "
        "median; `ratio remote/local`: median ratio of an agent's measurement to the local "
        "device's, `range` its smallest and largest."
    ),
    "service": (
        "`value ms` is the row's `statistic`: the median overhead of one measurement, the time "
        "from submission to the first evaluated child of one job, or the 99th percentile of "
        "status polls; `n`: samples or requests."
    ),
}

COLUMNS: dict[str, list[Column]] = {
    "search_quality": [
        ("model", "model", _short),
        ("budget", "budget_fraction", _percent()),
        ("strategy", "strategy", _TEXT),
        ("seed", "details.seed", _TEXT),
        ("accuracy", "accuracy", _fixed(4)),
        ("latency ms", "latency_ms", _fixed(3)),
        ("budget ms", "budget_ms", _fixed(3)),
        ("fit", "fit", _fixed(3)),
        ("candidates", "candidates", _TEXT),
        ("measurements", "measurements", _TEXT),
        ("ft steps", "details.ft_steps_total", _TEXT),
        ("wall s", "wall_s", _fixed(0)),
        ("note", "details.note", _TEXT),
    ],
    "measurement": [
        ("model", "model", _short),
        ("metric", "details.metric", _TEXT),
        ("median ms", "latency_ms", _fixed(4)),
        ("CV", "details.cv", _percent(2)),
        ("spread", "details.spread", _percent(2)),
        ("ratio remote/local", "details.ratio_median", _fixed(3)),
        ("range", "details.ratio_range", _TEXT),
        ("n", "measurements", _TEXT),
        ("wall s", "wall_s", _fixed(1)),
    ],
    # The long description goes last, so that the numbers line up on a terminal.
    "service": [
        ("metric", "details.metric", _TEXT),
        ("statistic", "details.metric", lambda metric: SERVICE_STATISTICS.get(metric, "-")),
        ("value ms", "latency_ms", _fixed(2)),
        ("n", "measurements", _TEXT),
        ("wall s", "wall_s", _fixed(1)),
        ("what", "details.summary", _TEXT),
    ],
    "scaling": [
        ("model", "model", _short),
        ("metric", "details.metric", _TEXT),
        ("run", "details.run", _TEXT),
        ("workers", "details.workers", _TEXT),
        ("status", "details.status", _TEXT),
        ("candidates", "candidates", _TEXT),
        ("measurements", "measurements", _TEXT),
        ("wall s", "wall_s", _fixed(1)),
        ("depths s", "details.search_s", _fixed(1)),
        ("ending s", "details.ending_s", _fixed(1)),
        ("speedup", "details.speedup", _fixed(2)),
        ("per round", "details.round_speedups", _joined(2)),
        ("wall ratio", "details.wall_ratio", _fixed(2)),
    ],
}


def _lookup(row: dict[str, Any], path: str) -> Any:
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


# Columns left out when no row has a value there other than these (seed: a one-seed run).
_QUIET_COLUMNS = {"details.seed": (None, 0)}


def _cells(result: SectionResult) -> tuple[list[str], list[list[str]]]:
    columns = [
        column
        for column in COLUMNS[result.name]
        if column[1] not in _QUIET_COLUMNS
        or any(_lookup(row, column[1]) not in _QUIET_COLUMNS[column[1]] for row in result.rows)
    ]
    headers = [header for header, _, _ in columns]
    body = []
    for row in result.rows:
        cells = []
        for _, path, render in columns:
            value = _lookup(row, path)
            cells.append("-" if value is None else render(value))
        body.append(cells)
    return headers, body


def text_table(result: SectionResult) -> str:
    """The section's rows as a fixed-width table, or its skip note."""
    heading = f"== {result.title} =="
    if result.status != "ok":
        return f"{heading}\n{result.status}: {result.note}\n"
    headers, body = _cells(result)
    widths = [max(len(cell) for cell in column) for column in zip(headers, *body, strict=True)]
    lines = [heading, "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in body]
    if result.note:
        lines.append(f"note: {result.note}")
    return "\n".join(lines) + "\n"


def targets_table(targets: Sequence[dict[str, Any]]) -> str:
    """The targets as a fixed-width table."""
    width = max(len(t["target"]) for t in targets)
    lines = ["== Targets =="]
    lines += [f"{t['target']:<{width}}  {t['result']:<4}  {t['value']}" for t in targets]
    return "\n".join(lines) + "\n"


def _markdown_table(headers: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return [line(headers), line(["---"] * len(headers)), *(line(cells) for cells in body)]


def markdown(summary: dict[str, Any], results: Sequence[SectionResult], plots: list[str]) -> str:
    """summary.md: machine, targets, then each section's table, notes and plots."""
    machine = summary["machine"]
    lines = [
        "# Archtree benchmark",
        "",
        f"Mode **{summary['mode']}**, started {summary['started_at']}, took "
        f"{summary['wall_s'] / 60:.1f} min. Machine: {machine['cpu_model']}, "
        f"{machine['cores']} cores, torch {machine['torch_version']} "
        f"({machine['torch_threads']} threads for training, {machine['timing_threads']} for "
        f"timing), Python {machine['python_version']}. Load average (1, 5, 15 min) at start "
        f"{_load(machine.get('load_average_start'))}, at end "
        f"{_load(machine.get('load_average_end'))}.",
        "",
        "Latencies are medians in ms on this CPU at batch "
        f"{summary.get('batch_size', 1)}; targets are reported, never asserted.",
        "",
        "## Targets",
        "",
        *_markdown_table(
            ["target", "value", "result", "detail"],
            [[t["target"], t["value"], t["result"], t["detail"]] for t in summary["targets"]],
        ),
    ]
    for result in results:
        lines += ["", f"## {SECTION_NUMBERS.get(result.name, '-')}. {result.title}", ""]
        if result.status != "ok":
            lines.append(f"**{result.status}**: {result.note}")
            continue
        if result.settings:
            settings = ", ".join(f"{k} {v}" for k, v in result.settings.items())
            lines += [f"Settings: {settings}.", ""]
        lines += _markdown_table(*_cells(result))
        if result.name in COLUMN_NOTES:
            lines += ["", COLUMN_NOTES[result.name]]
        failed = [
            r for r in result.rows if r["details"].get("error") and r["benchmark"] == result.name
        ]
        if failed:
            lines += ["", "Rows without a result (the engine's message):", ""]
            lines += [
                f"- {_short(r['model'])} at {r['budget_fraction']:.0%}, {r['strategy']}: "
                f"{r['details']['error']}"
                for r in failed
            ]
        if result.note:
            lines += ["", f"Note: {result.note}"]
        for plot in plots:
            if plot.startswith(result.name.split("_")[0]):
                lines += ["", f"![{plot}]({plot})"]
    return "\n".join(lines) + "\n"


def _load(values: Sequence[float] | None) -> str:
    return "n/a" if not values else ", ".join(f"{v:.2f}" for v in values)


# --- plots ---------------------------------------------------------------------------------

# Marker, colour and size of each strategy in the search plots.
_MARKERS = {
    "archtree": ("o", "tab:blue", 110),
    "greedy": ("s", "tab:orange", 45),
    "uniform": ("^", "tab:green", 45),
}


def plot_all(results: Sequence[SectionResult], out_dir: Path) -> list[str]:
    """Draw every plot the results allow; returns the file names written in `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    written = []
    for result in results:
        if result.status != "ok":
            continue
        if result.name == "search_quality":
            written += _plot_search(result, out_dir)
        elif result.name == "measurement":
            written += _plot_measurement(result, out_dir)
        elif result.name == "scaling":
            written += _plot_scaling(result, out_dir)
    return written


def _plot_search(result: SectionResult, out_dir: Path) -> list[str]:
    """Accuracy against latency as a share of the job's own L(M0), with the budget lines.

    Shares, not milliseconds: the machine's level drifts between jobs, the ratio does not.
    """
    import matplotlib.pyplot as plt

    written = []
    for model in sorted({r["model"] for r in result.rows}):
        rows = [r for r in result.rows if r["model"] == model]
        figure, axes = plt.subplots(figsize=(7, 4.5))
        # Hollow markers of different sizes: answers that coincide (greedy's and archtree's
        # often do) stay visible. One point per seed; the budget lines name the fractions.
        for strategy, (marker, colour, size) in _MARKERS.items():
            points = [r for r in rows if r["strategy"] == strategy and r["fit"] is not None]
            axes.scatter(
                [r["details"]["remeasured_ratio"] for r in points],
                [r["accuracy"] for r in points],
                marker=marker,
                facecolors="none",
                edgecolors=colour,
                linewidths=1.6,
                label=strategy,
                s=size,
            )
        for fraction in sorted({r["budget_fraction"] for r in rows}):
            reachable = any(r["fit"] is not None for r in rows if r["budget_fraction"] == fraction)
            axes.axvline(fraction, color="grey", linestyle="--" if reachable else ":", linewidth=1)
            axes.text(
                fraction,
                0.98,
                f"budget {fraction:.0%}" + ("" if reachable else " (unreachable)") + " ",
                rotation=90,
                fontsize=7,
                ha="right",
                va="top",
                transform=axes.get_xaxis_transform(),
                color="grey",
            )
        accuracy = result.data.get("models", {}).get(model, {}).get("val_accuracy")
        if accuracy is not None:
            axes.scatter([1.0], [accuracy], marker="*", color="black", s=90, label="unpruned")
        axes.set_xlabel("latency / unpruned latency (re-measured, interleaved with the unpruned)")
        axes.set_ylabel("validation accuracy")
        seeds = len({r["details"].get("seed") for r in rows})
        axes.set_title(
            f"{_short(model)}: accuracy against latency"
            + (f" (one point per seed, {seeds} seeds)" if seeds > 1 else "")
        )
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        name = f"search_{_short(model)}.png"
        figure.tight_layout()
        figure.savefig(out_dir / name, dpi=110)
        plt.close(figure)
        written.append(name)
    return written


def _plot_measurement(result: SectionResult, out_dir: Path) -> list[str]:
    import matplotlib.pyplot as plt

    series = result.data.get("repeats", {})
    if not series:
        return []
    figure, axes = plt.subplots(figsize=(7, 4))
    for label, values in series.items():
        centre = statistics.median(values)
        axes.plot(
            range(1, len(values) + 1),
            [v / centre for v in values],
            marker="o",
            markersize=3,
            label=label,
        )
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("repeat")
    axes.set_ylabel("median / median of all repeats")
    axes.set_title("Repeated measurements of one model")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out_dir / "measurement_repeats.png", dpi=110)
    plt.close(figure)
    return ["measurement_repeats.png"]


def _plot_scaling(result: SectionResult, out_dir: Path) -> list[str]:
    import matplotlib.pyplot as plt

    runs = [r for r in result.rows if r["details"].get("metric") == "job" and r["wall_s"]]
    if not runs:
        return []
    figure, axes = plt.subplots(figsize=(5, 3.5))
    labels = [
        f"run {r['details'].get('run', i + 1)}\n{r['details']['workers']} w"
        for i, r in enumerate(runs)
    ]
    colors = ["#4c72b0" if r["details"]["workers"] == 1 else "#dd8452" for r in runs]
    axes.bar(labels, [r["wall_s"] for r in runs], color=colors)
    axes.set_xlabel("runs, in order, and their Celery workers")
    axes.set_ylabel("job wall time (s)")
    axes.set_title("Parallel scaling of one job")
    figure.tight_layout()
    figure.savefig(out_dir / "scaling.png", dpi=110)
    plt.close(figure)
    return ["scaling.png"]


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as indented JSON, atomically."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=2, default=float))
    temporary.replace(path)
