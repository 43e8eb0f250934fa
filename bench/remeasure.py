"""After a benchmark run: every saved answer timed again, in rounds spread over time.

The search section re-measures each answer once, right after its search. On a host whose load
drifts, that one timing reads the ratio of the answer to the unpruned model wherever the drift
had it then, and an answer its search confirmed under the budget can read over it. This times
every answer a run saved (`<results>/search/`) again, `--rounds` times, as the section did (a
fresh process, interleaved with the unpruned model, one thread, the section's repeats), taking
the answers in turn in each round, forward and then backward, so that one answer's timings lie
minutes apart. For each answer it gives the fit (latency / budget) as its search confirmed
it, as the run re-measured it, in each round, and the median of the run's and the rounds'
re-measurements; and how many answers each of those puts in the target's range, per strategy.

    python -m bench.remeasure                  # the full run in bench/results, 3 rounds
    python -m bench.remeasure --rounds 5

Writes `remeasure.md` and `remeasure.json` beside the run's `summary.json`, whose rows are left
as they are.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.report import FIT_RANGE, fit_count, in_fit_range
from bench.saved_answers import UsageError, load_answers, results_parser
from bench.search_quality import FULL, QUICK, SearchQualityConfig, remeasure_answer

DEFAULT_ROUNDS = 3
MAX_ROUNDS = 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = results_parser("python -m bench.remeasure", __doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds",
        type=int,
        default=DEFAULT_ROUNDS,
        help=f"timings of every answer, one round after another (default {DEFAULT_ROUNDS}, "
        f"at most {MAX_ROUNDS})",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= MAX_ROUNDS:
        parser.error(f"--rounds must be between 1 and {MAX_ROUNDS}, not {args.rounds}")
    return args


def run_config(summary: dict[str, Any]) -> SearchQualityConfig:
    """The search section's settings of the run that wrote `summary`: its mode and batch."""
    config = QUICK if summary.get("mode") == "quick" else FULL
    batch_size = summary.get("batch_size")
    return replace(config, batch_size=batch_size) if isinstance(batch_size, int) else config


def input_shape(folder: Path) -> list[int]:
    """The shape of one sample the answer in `folder` was searched on (its arch.json)."""
    arch_path = folder / "arch.json"
    try:
        shape = json.loads(arch_path.read_text())["input_shape"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(
            f"{arch_path} gives no input shape ({error}): the results folder is damaged; run "
            "the benchmark's search section again (python -m bench.run --only search)"
        ) from None
    if not (isinstance(shape, list) and shape and all(isinstance(n, int) for n in shape)):
        raise UsageError(
            f"{arch_path} gives the input shape {shape!r}, not a list of sizes: the results "
            "folder is damaged; run the benchmark's search section again"
        )
    return shape


def remeasure_rounds(
    summary: dict[str, Any],
    answers: Sequence[dict[str, Any]],
    shapes: Sequence[Sequence[int]],
    rounds: int,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Each answer, of the input shape `shapes` gives at its index, timed `rounds` more
    times, the answers in turn in each round (every other round backward). One row per
    answer: its fits as confirmed, as the run re-measured it, in each round, and their median
    over the run's and the rounds' re-measurements."""
    config = run_config(summary)
    timings: list[list[dict[str, float]]] = [[] for _ in answers]
    for round_index in range(rounds):
        order = range(len(answers)) if round_index % 2 == 0 else reversed(range(len(answers)))
        for i in order:
            answer = answers[i]
            started = time.monotonic()
            pruned_stats, reference_stats, ratio = remeasure_answer(
                answer["folder"],
                answer["model"],
                config.data,
                answer["weights"],
                answer["seed"],
                shapes[i],
                config,
            )
            fit = ratio * answer["details"]["baseline_ms"] / answer["budget_ms"]
            timings[i].append(
                {
                    "fit": fit,
                    "ratio": ratio,
                    "cv": max(pruned_stats.cv, reference_stats.cv),
                    "reference_ms": reference_stats.median_ms,
                }
            )
            log(
                f"round {round_index + 1}/{rounds} {answer['folder'].name}: fit {fit:.3f} "
                f"(ratio {ratio:.3f}, unpruned {reference_stats.median_ms:.2f} ms, "
                f"{time.monotonic() - started:.0f} s)"
            )
    rows = []
    for answer, timed in zip(answers, timings, strict=True):
        fits = [answer["fit"], *(t["fit"] for t in timed)]
        rows.append(
            {
                "model": answer["model"],
                "budget_fraction": answer["budget_fraction"],
                "strategy": answer["strategy"],
                "seed": answer["seed"],
                "answer": answer["folder"].name,
                "confirmed_fit": answer["details"].get("report_fit"),
                "run_fit": answer["fit"],
                "round_fits": [t["fit"] for t in timed],
                "rounds": timed,
                "median_fit": statistics.median(fits),
                "spread": (max(fits) - min(fits)) / statistics.median(fits),
            }
        )
    return rows


def table(rows: Sequence[dict[str, Any]], rounds: int) -> list[str]:
    """Markdown lines: one per answer, its fits each way; a fit outside the range is bold."""
    header = [
        "model",
        "budget",
        "strategy",
        "seed",
        "confirmed",
        "run",
        *(f"round {n + 1}" for n in range(rounds)),
        "median",
        "spread",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row["model"].removeprefix("builtin:"),
            f"{row['budget_fraction']:.0%}",
            row["strategy"],
            str(row["seed"]),
            _fit_cell(row["confirmed_fit"]),
            _fit_cell(row["run_fit"]),
            *(_fit_cell(fit) for fit in row["round_fits"]),
            _fit_cell(row["median_fit"]),
            f"{row['spread']:.1%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _fit_cell(fit: float | None) -> str:
    if fit is None:
        return "-"
    return f"{fit:.3f}" if in_fit_range(fit) else f"**{fit:.3f}**"


def counts(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Answers in the target's range as confirmed, as the run re-measured them, and as the
    median of every re-measurement says."""
    counted: dict[str, str] = {}
    for label, key in (
        ("as the searches confirmed them", "confirmed_fit"),
        ("as the run re-measured them", "run_fit"),
        ("as the median of the run's and the rounds' re-measurements", "median_fit"),
    ):
        fits = [{"strategy": r["strategy"], "fit": r[key]} for r in rows if r[key] is not None]
        counted[label] = fit_count(fits)
    return counted


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary, answers = load_answers(args.results, args.cache_dir)
        # Before the first timing, so that a damaged folder costs nothing.
        shapes = [input_shape(answer["folder"]) for answer in answers]
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    started = time.monotonic()
    print(
        f"timing the {len(answers)} answers of the run of {summary.get('started_at', '?')} "
        f"again, {args.rounds} rounds",
        flush=True,
    )
    try:
        rows = remeasure_rounds(summary, answers, shapes, args.rounds)
    except KeyboardInterrupt:
        print("stopped: nothing written (the run's own results are as they were)", file=sys.stderr)
        return 130
    lines = table(rows, args.rounds)
    low, high = FIT_RANGE
    spreads = sorted(rows, key=lambda r: r["spread"])
    median_spread = statistics.median(r["spread"] for r in rows)
    in_range = [f"- {count} {label}" for label, count in counts(rows).items()]
    text = [
        "# The search section's answers, timed again",
        "",
        f"`python -m bench.remeasure --rounds {args.rounds}` on the run of "
        f"{summary.get('started_at', '?')} ({time.monotonic() - started:.0f} s). Each fit is "
        "latency / budget, the latency the ratio to the unpruned model, timed interleaved with "
        "it, times the search's own measurement of the unpruned model; bold is outside the "
        f"target's range [{low:.2f}, {high:.2f}]. `confirmed`: the search's confirmation; "
        "`run`: the run's re-measurement, right after the search; `round N`: this command's; "
        "`median`: of the run's and the rounds'; `spread`: the re-measurements' range over "
        "their median.",
        "",
        *lines,
        "",
        f"In range [{low:.2f}, {high:.2f}]:",
        *in_range,
        "",
        f"Spread of an answer's re-measurements: median {median_spread:.1%}, largest"
        f" {spreads[-1]['spread']:.1%} ({spreads[-1]['answer']}).",
    ]
    (args.results / "remeasure.md").write_text("\n".join(text) + "\n")
    (args.results / "remeasure.json").write_text(
        json.dumps({"rounds": args.rounds, "started_at": summary.get("started_at"), "rows": rows})
        + "\n"
    )
    print("\n".join(lines))
    print("\n".join(in_range))
    print(f"written: {args.results / 'remeasure.md'}, remeasure.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
