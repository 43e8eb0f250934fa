"""A line every few seconds while a slow model is timed (by `measure`, or `prune` on this
machine): the runs timed, of how many, and the time left."""

from __future__ import annotations

from collections.abc import Callable

from archtree_cli.training_progress import SAY_EVERY_S, duration_text


class TimingProgress:
    """A `latency.harness.RunsReport`: told the runs timed so far, the fewest the timing takes
    and the time it has taken, every `every_s` seconds, it says so through `say`. A timing
    shorter than that says nothing."""

    def __init__(self, say: Callable[[str], None], every_s: float = SAY_EVERY_S) -> None:
        self.say = say
        self.every_s = every_s

    def __call__(self, runs: int, planned: int, elapsed_s: float) -> None:
        each_s = elapsed_s / max(runs, 1)
        if runs < planned:
            self.say(
                f"timed {runs:,} of at least {planned:,} runs ({each_s:.3g} s a run), about "
                f"{duration_text(each_s * (planned - runs))} left"
            )
        else:
            # The planned runs are done; more follow while their times vary (another round).
            self.say(
                f"timed {runs:,} runs ({each_s:.3g} s a run), at least {planned:,} planned: "
                "more while their times vary"
            )
