"""Live progress of a search on the terminal, rendered from the engine's events."""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from typing import Any, TextIO

from search.budget import ms_text

# A depth's time left is said on its children's lines once it is this long or longer.
TIME_LEFT_SAID_FROM_S = 30.0
# A wait between two children this many times the typical one is a stall (Redis restarting,
# a worker lost, a device gone), not the pace of the work: left out of the time left.
STALL_FACTOR = 4.0
# What a data-free search's scores are, said once.
FIDELITY_MEANS = (
    "the data have no labels: candidates are scored by fidelity to the unpruned model, minus "
    "the mean KL divergence of their class probabilities from its (0: the same outputs; "
    "the lower, the further from them)"
)


class ConsoleProgress:
    """An event sink that prints one line per meaningful step to stderr."""

    def __init__(self, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.started = time.monotonic()
        self.children_planned = 0
        self.children_seen = 0
        # When the depth started and each of its children was said, for the pace of the depth.
        self.depth_marks: list[float] = []
        # What candidates are scored by: "fidelity" (to the unpruned model) without labels.
        self.score_name = "score"
        self.evaluating_said = False
        # Events from the service carry the wall time they happened at (`time`): a replay of
        # a job's past events is stamped from its first event, as it happened, not as printed.
        self.first_event_time: float | None = None
        self.event_time: float | None = None
        # Children said so far: one evaluated again (its first run cut short) is said as such,
        # not counted twice.
        self.children_said: set[str] = set()

    def fall_silent(self) -> None:
        """Print nothing more: the command has stopped, and what still runs in other threads
        (children evaluated in parallel, finishing) must not print after its last line."""
        self.quiet = True

    def say(self, text: str) -> None:
        """A line of the command's own, stamped as the events' are."""
        self._print(text)

    def _elapsed(self) -> float:
        """Seconds since the start: of the run, or of a job's first event, when replayed."""
        if self.event_time is not None and self.first_event_time is not None:
            return self.event_time - self.first_event_time
        return time.monotonic() - self.started

    def _print(self, text: str) -> None:
        if not self.quiet:
            print(f"[{self._elapsed():6.1f}s] {text}", file=self.stream, flush=True)

    def _depth_time_left(self) -> str:
        """The time the depth's remaining children take at the pace of those done so far,
        once it is worth saying (half a minute or more)."""
        left = self.children_planned - self.children_seen
        if left <= 0 or self.children_seen == 0:
            return ""
        gaps = [later - earlier for earlier, later in itertools.pairwise(self.depth_marks)]
        if not gaps:  # a depth whose start was not seen
            return ""
        left_s = pace_s(gaps) * left
        if left_s < TIME_LEFT_SAID_FROM_S:
            return ""
        said = f"{round(left_s)} s" if left_s < 90 else f"{round(left_s / 60)} min"
        return f"; about {said} left in depth"

    def _evaluating_means(self, depth: dict[str, Any]) -> str:
        """What evaluating a child involves, said on the first depth's line only: each takes
        seconds, and no line is printed until it is done."""
        if self.evaluating_said or "ft_steps" not in depth:
            return ""
        self.evaluating_said = True
        steps = depth["ft_steps"]
        tuned = f"fine-tuned {counted(steps, 'step')}, " if steps else ""
        return f" (each pruned to its target latency, timed, {tuned}scored; a line as each ends)"

    def _best_text(self, best: dict[str, Any] | None) -> str:
        if not best:
            return "none within budget yet"
        return (
            f"best within budget {best['id']} {best['latency_ms']:.3f} ms "
            f"{self.score_name} {best['score']:.4f}"
        )

    def emit(self, kind: str, **data: Any) -> None:
        self.event_time = data.pop("time", None)
        if self.first_event_time is None:
            self.first_event_time = self.event_time
        if kind == "baseline":
            if data.get("scored_by") == "fidelity":
                self.score_name = "fidelity"
            self._print(
                f"baseline {data['latency_ms']:.3f} ms (cv {data['timing']['cv']:.1%}"
                f"{_cached(data)}), {self.score_name} {data['score']:.4f}; "
                f"budget {ms_text(data['budget_ms'])} ms"
            )
            if data.get("training_device", "cpu") != "cpu":
                self._print(f"fine-tuning and scoring on {data['training_device']}")
            if self.score_name == "fidelity":
                self._print(f"note: {FIDELITY_MEANS}")
        elif kind == "resumed":
            if data.get("scored_by") == "fidelity":
                self.score_name = "fidelity"
            stage = (
                "its tree search had finished; re-ranking and confirming its answer"
                if data["done"]
                else f"going on after depth {data['depth']}"
            )
            best_text = self._best_text(data["best"])
            self._print(
                f"resuming the search this command saved {data['elapsed_s']:.0f} s into it "
                f"(baseline {data['latency_ms']:.3f} ms, {self.score_name} {data['score']:.4f}; "
                f"budget {ms_text(data['budget_ms'])} ms; "
                f"{counted(data['candidates'], 'candidate')} evaluated, {best_text}): {stage}"
            )
        elif kind == "note":
            self._print(f"note: {data['message']}")
        elif kind == "preparing":
            self._print(preparing_text(data))
        elif kind == "feasibility":
            widen_to = data.get("widen_to")
            block = data.get("channel_block")
            widening = (
                "widening off"
                if not widen_to or widen_to <= 1
                else f"widening to multiples of {widen_to}"
                + (" (the device's channel block)" if block == widen_to else "")
            )
            self._print(f"smallest reachable {data['smallest_ms']:.3f} ms; {widening}")
        elif kind == "depth_started":
            self.children_planned, self.children_seen = data["children"], 0
            self.depth_marks = [self._elapsed()]
            children = counted(data["children"], "child", "children")
            most = f" of at most {data['max_depth']}" if data.get("max_depth") else ""
            self._print(
                f"depth {data['depth']}{most}: evaluating {children}" + self._evaluating_means(data)
            )
        elif kind == "child_merged":
            reason = merged_reason(data.get("into"), tie=bool(data.get("tie")))
            self._print(f"  {data['id']:>4} merged: {reason}")
        elif kind == "child_started" and data.get("run", 1) > 1:
            self._print(
                f"  {data['id']:>4} evaluating again (run {data['run']}: an earlier run was cut "
                "short)"
            )
        elif kind in ("node", "child_skipped"):
            again = data["id"] in self.children_said
            self.children_said.add(data["id"])
            self.children_seen += 0 if again else 1
            if not again:
                self.depth_marks.append(self._elapsed())
            if kind == "node":
                mark = "ok  " if data["within_budget"] else "over"
                # Nodes of the ending (a trim, a widening) come after the last depth's children.
                if again:
                    count = "[again]"
                elif self.children_seen <= self.children_planned:
                    count = f"[{self.children_seen}/{self.children_planned}]"
                else:
                    count = "[end]"
                # A widening of the answer into the budget's slack is not a child of a move.
                filled = data.get("filled_from")
                move = f"{filled} widened to fill" if filled else data["move"]
                self._print(
                    f"  {count} {data['id']:>4} "
                    f"{move:<22} {data['latency_ms']:8.3f} ms {mark} "
                    f"{self.score_name} {data['score']:.4f}{self._depth_time_left()}"
                )
            elif kind == "child_skipped":
                self._print(f"  {data['id']:>4} skipped: {data['reason']}")
        elif kind == "depth_done":
            best_text = self._best_text(data["best"])
            frontier = ", ".join(data["frontier"]) or "empty (no new candidate)"
            self._print(f"depth {data['depth']} done: frontier {frontier}; {best_text}")
        elif kind == "retuned":
            self._print(
                f"  {data['id']:>4} tuned {data['steps']} more steps: {self.score_name} "
                f"{data['score']:.4f} (was {data['score_before']:.4f})"
            )
        elif kind == "reranked":
            best_first = sorted(data["nodes"], key=lambda node: -node["score"])
            scores = ", ".join(f"{n['id']} {n['score']:.4f}" for n in best_first)
            self._print(f"re-ranked after {data['steps']} more fine-tuning steps: {scores}")
        elif kind == "confirm_failed":
            self._print(
                f"{data['id']} measures {data['latency_ms']:.3f} ms on confirmation, above the "
                "budget: confirming the next best"
            )
        elif kind == "trim_compared":
            trimmed = (
                f"{data['trimmed']} (the best, trimmed) has {self.score_name} "
                f"{data['trimmed_score']:.4f} at "
                f"{data['trimmed_latency_ms']:.3f} ms"
                if data["trimmed"]
                else "the best cannot be trimmed further"
            )
            self._print(
                f"{trimmed}; {data['confirmed']} has {self.score_name} "
                f"{data['confirmed_score']:.4f}: "
                f"{data['chosen']} is the answer"
            )
        elif kind == "filled":
            if data["id"] is None and data.get("unconfirmed_ms"):
                self._print(
                    f"{data['answer']} is well under the aim, but its widenings confirmed above "
                    "the budget ("
                    + ", ".join(f"{ms:.3f}" for ms in data["unconfirmed_ms"])
                    + " ms)"
                    + _refilled(data)
                )
            elif data["id"] is None:
                trades = len(data.get("trades") or [])
                self._print(
                    f"{data['answer']} is well under the aim, but no group could be widened "
                    + ("or traded for another's block " if trades else "")
                    # --fill-probes bounds each pass: the first over the groups the answer's
                    # last move cut, the second over any cut since the unpruned model.
                    + f"within it ({counted(data['probes'], 'probe')} in all, over its passes)"
                )
            else:
                source = data.get("rebuilt_from")
                self._print(
                    f"{data['id']}: {data['answer']} widened in {', '.join(data['groups'])} "
                    + _narrowed(data)
                    + (f"(rebuilt from {source}) " if source else "")
                    + f"to {data['latency_ms']:.3f} ms (was {data['answer_latency_ms']:.3f}), "
                    f"{self.score_name} {data['score']:.4f} "
                    f"(was {data['answer_score']:.4f}{_gap(data, self.score_name)}): "
                    f"{data['chosen']} is the answer" + _refilled(data)
                )
        elif kind == "confirmed":
            self._print(
                f"confirmed {data['id']} at {data['latency_ms']:.3f} ms "
                f"with more repeats ({counted(data['trims'], 'trim')}{_cached(data)})"
            )
        elif kind == "final_finetune":
            epochs = "1 epoch" if data["epochs"] == 1 else f"{data['epochs']:g} epochs"
            self._print(f"final fine-tune: {epochs} with distillation")
        elif kind == "task_lost":
            self._print(f"lost: {lost_task_text(data)}")


def pace_s(gaps: list[float]) -> float:
    """Seconds per child from the waits between children (the first from the depth's start):
    their mean, leaving out a wait STALL_FACTOR times the median or longer (a stall). With
    children evaluated in parallel most waits may be nothing: then the plain mean."""
    typical = statistics.median(gaps)
    kept = [gap for gap in gaps if gap < STALL_FACTOR * typical] if typical > 0 else gaps
    return sum(kept) / len(kept)


def _cached(data: dict[str, Any]) -> str:
    """Said of a timing taken from the latency cache (an earlier run's), not measured now."""
    return ", cached" if data.get("cached") else ""


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """`count` and `noun`, plural unless the count is one: "1 measurement", "3 candidates"
    (`plural` where it is not `noun` with an s: "2 children")."""
    return f"{count} {noun}" if count == 1 else f"{count} {plural or noun + 's'}"


def _gap(data: dict[str, Any], score_name: str = "score") -> str:
    """The widened answer's paired score gap with two standard errors: in points of accuracy,
    or as a difference of fidelities (not a share: no points)."""
    if data.get("score_gap") is None or data.get("score_gap_se") is None:
        return ""
    gap, spread = data["score_gap"], 2 * data["score_gap_se"]
    if score_name == "fidelity":
        return f"; {gap:+.4f} +- {spread:.4f}"
    return f"; {100 * gap:+.1f} +- {100 * spread:.1f} points"


def _narrowed(data: dict[str, Any]) -> str:
    """The groups a trade narrowed while it widened others, if any."""
    narrowed = data.get("narrowed") or []
    return f"and narrowed in {', '.join(narrowed)} " if narrowed else ""


def _refilled(data: dict[str, Any]) -> str:
    """Where the fill was tried again with a lower aim, after its widenings confirmed over."""
    aims = data.get("aims_ms") or []
    if len(aims) < 2:
        return ""
    return "; filled again aiming at " + ", ".join(f"{ms:.3f}" for ms in aims[1:]) + " ms"


def merged_reason(into: str | None, tie: bool = False) -> str:
    """Why a child left the tree: a sibling of the same architecture scored better (or as
    well, evaluated first), or its architecture is already in the tree."""
    if into:
        return f"same architecture as {into}, which scored " + ("as well" if tie else "better")
    return "same architecture as a node already in the tree"


# What the unpruned model's outputs on each split are for, as `preparing` says.
OUTPUTS_FOR = {
    "train": "the targets its pruned copies are fine-tuned towards",
    "calibration": "what candidates are scored against without labels",
}


def preparing_text(data: dict[str, Any]) -> str:
    """The unpruned model's outputs on a large split being computed, before the search."""
    split, samples, done = data["split"], data["samples"], data["done"]
    if not done:
        purpose = OUTPUTS_FOR.get(split, "")
        return (
            f"computing the unpruned model's outputs on its {samples:,} {split} samples"
            f"{f' ({purpose})' if purpose else ''}"
        )
    share = f"{done / samples:.0%}"
    return f"unpruned model's outputs: {done:,} of {samples:,} {split} samples ({share})"


def lost_task_text(task: dict[str, Any]) -> str:
    """A task whose worker was lost, and when another worker takes it."""
    name = task["name"].removeprefix("archtree.")
    back_by = time.strftime("%H:%M:%S", time.localtime(task["back_by"]))
    return (
        f"worker {task['worker']} stopped answering in {name} (silent {task['silent_s']:.0f} s); "
        f"another worker takes the task by about {back_by}, if one is running"
    )
