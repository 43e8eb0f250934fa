"""`python -m bench.run [--quick] [--out DIR] [--only SECTION...]`: run the benchmark suite.

Prints each section's table on stdout as it finishes and progress on stderr; writes
summary.json (rewritten after every section), summary.md and the PNG plots into --out.
The process exits 1 when a section crashed; missed targets never change the exit status.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import CACHE_DIR, RESULTS_DIR, measurement_quality, scaling, search_quality
from bench import service_overhead as service
from bench.report import (
    SectionResult,
    describe_machine,
    evaluate_targets,
    markdown,
    plot_all,
    skipped,
    targets_table,
    text_table,
    write_json,
)

SECTIONS = ("search", "measurement", "service", "scaling")
QUICK_SCALING_NOTE = (
    "skipped in --quick (two jobs, each on a fresh stack); "
    "`python -m bench.run --quick --only scaling` runs a tiny one"
)


def log(text: str) -> None:
    """Progress on stderr, with the wall-clock time."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# At batch 1 these small models spend most of their time in per-layer overhead that pruning
# cannot remove (the smallest reachable latency is 40-60% of the unpruned one on a 2-core CPU),
# so a 35% budget is unreachable; at batch 8 the convolutions dominate, as on a real workload.
FULL_BATCH_SIZE = 8


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny run: builtin:vgg on builtin:digits, one budget, few measurements; "
        "skips scaling unless --only names it",
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="results folder (default: bench/results)"
    )
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, metavar="SECTION", help=f"of {', '.join(SECTIONS)}"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=CACHE_DIR, help="trained weights (default bench/.cache)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"batch size timed in sections 1 and 2 (default {FULL_BATCH_SIZE}, 1 with --quick)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="replicates of section 1: each seed splits the data, trains the models and "
        "fine-tunes its own way; accuracy targets use the mean over seeds (default 1)",
    )
    parser.add_argument("--verbose", action="store_true", help="the engine's progress too")
    parser.add_argument(
        "--redraw",
        action="store_true",
        help="run nothing: redraw the plots and summary.md of --out from its summary.json",
    )
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 1 if args.quick else FULL_BATCH_SIZE
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    folders = (
        {"--out": args.out} if args.redraw else {"--out": args.out, "--cache-dir": args.cache_dir}
    )
    for option, folder in folders.items():
        problem = folder_problem(folder)
        if problem:
            parser.error(f"{option} {folder} {problem}: give a folder this user can write")
    return args


def folder_problem(folder: Path) -> str | None:
    """Why results cannot be written into `folder` (created when missing), or None."""
    if folder.exists() and not folder.is_dir():
        return "is a file"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"cannot be created ({error.strerror})"
    if not os.access(folder, os.W_OK | os.X_OK):
        return "is not writable"
    return None


def section_runners(
    args: argparse.Namespace, work_dir: Path
) -> dict[str, tuple[float, Callable[[], SectionResult]]]:
    """Each section's estimated seconds and the call that runs it."""
    quick = args.quick
    search = replace(
        search_quality.QUICK if quick else search_quality.FULL,
        batch_size=args.batch_size,
        seeds=args.seeds,
    )
    measurement = replace(
        measurement_quality.QUICK if quick else measurement_quality.FULL,
        batch_size=args.batch_size,
    )
    service_config = service.QUICK if quick else service.FULL
    scaling_config = scaling.QUICK if quick else scaling.FULL
    return {
        "search": (
            search_quality.estimate_s(search, quick, args.cache_dir),
            lambda: search_quality.run(
                search, args.out / "search", args.cache_dir, log, args.verbose
            ),
        ),
        "measurement": (
            measurement_quality.estimate_s(measurement),
            lambda: measurement_quality.run(measurement, work_dir / "measurement", log),
        ),
        "service": (
            service.estimate_s(service_config),
            lambda: service.run(service_config, work_dir / "service", log),
        ),
        "scaling": (
            scaling.estimate_s(scaling_config),
            lambda: scaling.run(scaling_config, work_dir / "scaling", log),
        ),
    }


def run_section(name: str, runner: Callable[[], SectionResult]) -> SectionResult:
    """Run one section; a crash becomes a failed section, so the others still run."""
    started = time.monotonic()
    try:
        return runner()
    except Exception as error:
        log(f"section {name} crashed:\n{traceback.format_exc()}")
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return SectionResult(
            name,
            name,
            status="failed",
            note=f"{type(error).__name__}: {detail}",
            wall_s=time.monotonic() - started,
        )


def summary_of(
    args: argparse.Namespace,
    machine: dict[str, Any],
    started_at: str,
    wall_s: float,
    results: list[SectionResult],
) -> dict[str, Any]:
    rows = [row for result in results for row in result.rows]
    return {
        "mode": "quick" if args.quick else "full",
        "started_at": started_at,
        "wall_s": wall_s,
        "batch_size": args.batch_size,
        "seeds": args.seeds,
        "machine": machine,
        "sections": {result.name: result.to_dict() for result in results},
        "targets": evaluate_targets(rows),
        "rows": rows,
    }


def results_of(summary: dict[str, Any]) -> list[SectionResult]:
    """The sections of a written summary.json, as the run that wrote it held them."""
    return [
        SectionResult(
            name,
            section["title"],
            rows=[row for row in summary["rows"] if row["benchmark"] == name],
            status=section["status"],
            note=section["note"],
            settings=section["settings"],
            data=section["data"],
            wall_s=section["wall_s"],
        )
        for name, section in summary["sections"].items()
    ]


def redraw(out: Path) -> int:
    """Plots and summary.md again from `out`/summary.json, after a change to how they look."""
    path = out / "summary.json"
    try:
        summary = json.loads(path.read_text())
        results = results_of(summary)
    except FileNotFoundError:
        print(f"bench: {path} does not exist: run the benchmark first.", file=sys.stderr)
        return 2
    except (ValueError, KeyError, TypeError) as error:
        print(
            f"bench: {path} is not a benchmark summary ({error!r}): run the benchmark again.",
            file=sys.stderr,
        )
        return 2
    plots = plot_all(results, out)
    (out / "summary.md").write_text(markdown(summary, results, plots))
    log(f"redrew {', '.join(plots) or 'no plot'} and summary.md in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("matplotlib") is None:
        print(
            "bench: matplotlib is missing, and the plots need it: install it into this "
            "environment (`pip install matplotlib`; `make bench` does it).",
            file=sys.stderr,
        )
        return 2
    if args.redraw:
        return redraw(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    selected = args.only or list(SECTIONS)
    machine = describe_machine()
    started_at = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    started = time.monotonic()
    results: list[SectionResult] = []
    with tempfile.TemporaryDirectory(prefix="archtree-bench-") as work:
        runners = section_runners(args, Path(work))
        skipped_quick = {"scaling"} if args.quick and not args.only else set()
        running = [name for name in selected if name not in skipped_quick]
        estimate = sum(runners[name][0] for name in running)
        log(
            f"{'quick' if args.quick else 'full'} run of {', '.join(running)}"
            + (f" ({', '.join(sorted(skipped_quick))} skipped)" if skipped_quick else "")
            + f": estimated at most {estimate / 60:.0f} min on a quiet 2-core machine if every "
            f"budget is reachable (an unreachable one takes seconds); results in {args.out}"
        )
        for name in selected:
            if name in skipped_quick:
                result = skipped(scaling.NAME, scaling.TITLE, QUICK_SCALING_NOTE)
            else:
                log(f"section {name} (about {runners[name][0] / 60:.1f} min) ...")
                result = run_section(name, runners[name][1])
            results.append(result)
            print(text_table(result), flush=True)
            summary = summary_of(args, machine, started_at, time.monotonic() - started, results)
            write_json(args.out / "summary.json", summary)
    machine["load_average_end"] = list(os.getloadavg())
    summary = summary_of(args, machine, started_at, time.monotonic() - started, results)
    print(targets_table(summary["targets"]), flush=True)
    plots = plot_all(results, args.out)
    write_json(args.out / "summary.json", summary)
    (args.out / "summary.md").write_text(markdown(summary, results, plots))
    log(f"done in {summary['wall_s'] / 60:.1f} min: {args.out / 'summary.md'}")
    return 1 if any(result.status == "failed" for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
