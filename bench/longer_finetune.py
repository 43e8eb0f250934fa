"""After a benchmark run: the search section's answers, fine-tuned longer.

The search section compares strategies after the same short final fine-tune (one epoch in the
full run). A gap between two answers then mixes what their architectures can reach with how
far the fine-tune has brought each back. This takes every answer a run saved
(`<results>/search/`) through more epochs of the same final fine-tune (distillation from the
unpruned model, the final learning rate, batch-norm statistics recomputed) and prints each
strategy's accuracy after each stage, with the gaps the targets judge (archtree minus uniform,
archtree minus greedy), paired image by image and pooled over seeds. A gap that stays as the
fine-tune goes on is the architecture's; one that closes was the fine-tune's.

    python -m bench.longer_finetune                   # the full run in bench/results
    python -m bench.longer_finetune --epochs 1 1 2    # stages of 1, 1 and 2 more epochs

Writes `longer-finetune.md` and `longer-finetune.json` beside the run's `summary.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from bench.report import Z95, seeds_gap
from bench.saved_answers import UsageError, load_answers, results_parser
from bench.search_quality import FULL, QUICK

DEFAULT_EPOCHS = (1.0, 1.0, 2.0)
STRATEGY_ORDER = ("archtree", "greedy", "uniform")
# The gaps reported at each stage: (strategy, the strategy it is compared with).
COMPARED = (("archtree", "uniform"), ("archtree", "greedy"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = results_parser("python -m bench.longer_finetune", __doc__.split("\n\n")[0])
    parser.add_argument(
        "--epochs",
        type=float,
        nargs="+",
        default=list(DEFAULT_EPOCHS),
        help="epochs of each further stage of fine-tuning, one after another "
        f"(default {' '.join(f'{e:g}' for e in DEFAULT_EPOCHS)})",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    if any(epochs <= 0 for epochs in args.epochs):
        parser.error("every --epochs stage must be above 0")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def fine_tune_further(
    summary: dict[str, Any],
    answers: Sequence[dict[str, Any]],
    epochs: Sequence[float],
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Each answer's validation accuracy as saved, then after each stage of `epochs` more of
    its search's final fine-tune. One row per answer and stage, with the images it got wrong."""
    from search.artifacts import load_pruned
    from search.context import SearchContext
    from search.inputs import load_inputs
    from search.training import correct

    config = QUICK if summary.get("mode") == "quick" else FULL
    contexts: dict[tuple[str, int], SearchContext] = {}
    rows = []
    for answer in answers:
        model, seed = answer["model"], answer["seed"]
        if (model, seed) not in contexts:
            inputs = load_inputs(model, config.data, weights=str(answer["weights"]), seed=seed)
            # No oracle: nothing here is timed, only fine-tuned and scored.
            contexts[model, seed] = SearchContext(
                model_ref=inputs.model_ref,
                base_model=inputs.model,
                data=inputs.data,
                oracle=None,
                settings=replace(config.settings, seed=seed).effective(),
            )
        context = contexts[model, seed]
        pruned = load_pruned(answer["folder"])
        total = answer["details"].get("final_epochs") or 0.0
        started = time.monotonic()
        accuracies = []
        for stage, more in enumerate([0.0, *epochs]):
            if more > 0:
                # Each stage shuffles the training split its own way.
                context.finetune(pruned, epochs=more, seed=1000 * (seed + 1) + stage)
                total += more
            correct_images = correct(pruned, context.data.val_x, context.data.val_y)
            accuracies.append(float(correct_images.mean()))
            rows.append(
                {
                    "model": model,
                    "budget_fraction": answer["budget_fraction"],
                    "strategy": answer["strategy"],
                    "seed": seed,
                    "stage": stage,
                    "epochs": total,
                    "accuracy": accuracies[-1],
                    "run_accuracy": answer["accuracy"],
                    "details": {
                        "seed": seed,
                        "val_wrong": (correct_images == 0).nonzero().flatten().tolist(),
                        "val_samples": len(correct_images),
                    },
                }
            )
        log(
            f"{answer['folder'].name}: "
            + " -> ".join(f"{a:.3f}" for a in accuracies)
            + f" ({time.monotonic() - started:.0f} s)"
        )
    return rows


def table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines: per model, budget and stage, each strategy's mean accuracy over seeds
    and the compared gaps with their 95 % intervals (points)."""
    strategies = [s for s in STRATEGY_ORDER if any(r["strategy"] == s for r in rows)]
    compared = [pair for pair in COMPARED if set(pair) <= set(strategies)]
    header = ["model", "budget", "final epochs", *strategies] + [f"{a} - {b}" for a, b in compared]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keys = sorted(
        {(r["model"], r["budget_fraction"], r["stage"]) for r in rows},
        key=lambda k: (k[0], -k[1], k[2]),
    )
    for model, fraction, stage in keys:
        group = [
            r
            for r in rows
            if (r["model"], r["budget_fraction"], r["stage"]) == (model, fraction, stage)
        ]
        by_strategy = {s: [r for r in group if r["strategy"] == s] for s in strategies}
        cells = [
            model.removeprefix("builtin:"),
            f"{fraction:.0%}",
            "/".join(sorted({f"{r['epochs']:g}" for r in group})),
        ]
        cells += [
            f"{statistics.fmean(r['accuracy'] for r in by_strategy[s]):.3f}"
            if by_strategy[s]
            else "-"
            for s in strategies
        ]
        for a, b in compared:
            gap = seeds_gap(by_strategy[a], by_strategy[b])
            cells.append(
                "-"
                if gap is None
                else f"{100 * gap[0].difference:+.1f} +- {100 * Z95 * gap[0].standard_error:.1f}"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        summary, answers = load_answers(args.results, args.cache_dir)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    started = time.monotonic()
    print(
        f"fine-tuning {len(answers)} answers of the run of {summary.get('started_at', '?')} "
        f"further: stages of {', '.join(f'{e:g}' for e in args.epochs)} epochs",
        flush=True,
    )
    rows = fine_tune_further(summary, answers, args.epochs)
    lines = table(rows)
    mismatched = [
        r for r in rows if r["stage"] == 0 and abs(r["accuracy"] - r["run_accuracy"]) > 1e-6
    ]
    text = [
        "# The search section's answers, fine-tuned longer",
        "",
        f"`python -m bench.longer_finetune --epochs {' '.join(f'{e:g}' for e in args.epochs)}` "
        f"on the run of {summary.get('started_at', '?')} ({summary.get('seeds') or 1} seeds, "
        f"{time.monotonic() - started:.0f} s). Accuracy on each seed's validation images, "
        "the mean over seeds; gaps in points with their 95 % intervals, paired image by image "
        "and pooled over seeds. `final epochs` counts the search's own final fine-tune.",
        "",
        *lines,
    ]
    if mismatched:
        text += [
            "",
            f"Warning: {len(mismatched)} saved answers score otherwise than the run recorded: "
            "the cached unpruned models or data splits are not the run's.",
        ]
    (args.results / "longer-finetune.md").write_text("\n".join(text) + "\n")
    (args.results / "longer-finetune.json").write_text(
        json.dumps({"epochs": args.epochs, "rows": rows}) + "\n"
    )
    print("\n".join(lines))
    print(f"written: {args.results / 'longer-finetune.md'}, longer-finetune.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
