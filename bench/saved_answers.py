"""A benchmark run's saved search answers: its summary's search rows, each with the folder its
answer was saved in and the unpruned weights it was searched from.

Commands that work on a finished run (bench.longer_finetune, bench.remeasure) load them here,
and refuse a results folder they cannot work with in one line that says what to do.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench import CACHE_DIR, RESULTS_DIR
from bench.search_quality import NAME, answer_folder


class UsageError(Exception):
    """A results folder or option this command cannot work with; the message says why."""


def results_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The options of a command that works on a finished run: --results (the run's folder)
    and --cache-dir (where its unpruned weights are, when not where the run left them)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS_DIR,
        help="a benchmark run's results folder, holding summary.json and search/ "
        "(default bench/results)",
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=CACHE_DIR, help="trained weights (default bench/.cache)"
    )
    return parser


def load_answers(results: Path, cache_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run's summary and its search rows that saved an answer, each with its folder and
    the unpruned weights it was searched from."""
    summary_path = results / "summary.json"
    if not summary_path.is_file():
        raise UsageError(
            f"{summary_path} does not exist: run the benchmark first (make bench), or pass the "
            "results folder of a run with --results"
        )
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as error:
        raise UsageError(
            f"{summary_path} is not valid JSON ({error}): run the benchmark again"
        ) from None
    seeds = summary.get("seeds") or 1
    answers = []
    for row in summary.get("rows", []):
        if row.get("benchmark") != NAME or row.get("accuracy") is None:
            continue
        seed = row["details"].get("seed") or 0
        name = answer_folder(row["model"], row["budget_fraction"], row["strategy"], seed, seeds)
        folder = results / "search" / name
        if not (folder / "arch.json").is_file():
            raise UsageError(
                f"{folder} holds no saved answer: the results folder is incomplete; run the "
                "benchmark's search section again (python -m bench.run --only search)"
            )
        weights = run_weights(folder, cache_dir)
        answers.append({**row, "folder": folder, "seed": seed, "weights": weights})
    if not answers:
        raise UsageError(f"{summary_path} has no search answers: run the search section first")
    return summary, answers


def run_weights(folder: Path, cache_dir: Path) -> Path:
    """The unpruned weights the answer in `folder` was searched from (its report names them),
    found where the run left them or by name in `cache_dir`."""
    report_path = folder / "report.json"
    try:
        weights = Path(json.loads(report_path.read_text())["inputs"]["weights"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(
            f"{report_path} does not name the unpruned weights ({error}): the results folder "
            "is incomplete; run the benchmark's search section again"
        ) from None
    for candidate in (weights, cache_dir / weights.name):
        if candidate.is_file():
            return candidate
    raise UsageError(
        f"the unpruned weights {weights.name} that {folder.name} was searched from are neither "
        f"at {weights.parent} nor in {cache_dir}: pass the folder holding them with --cache-dir"
    )
