"""A line every few seconds while a model trains: how far, the loss, and the time left."""

from __future__ import annotations

import time
from collections.abc import Callable

# Seconds between two lines: often enough to show it moves, rarely enough to read.
SAY_EVERY_S = 10.0


class TrainingProgress:
    """`search.training.train`'s progress callback, saying through `say` at most every
    `every_s` seconds (and never at the last step: the caller says the end)."""

    def __init__(
        self,
        say: Callable[[str], None],
        every_s: float = SAY_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.say = say
        self.every_s = every_s
        self.clock = clock
        self.started = clock()
        self.last_said = self.started

    def __call__(self, step: int, total: int, loss: float) -> None:
        now = self.clock()
        if now - self.last_said < self.every_s or step >= total:
            return
        self.last_said = now
        left_s = (now - self.started) / step * (total - step)
        self.say(
            f"training: step {step:,} of {total:,} ({step / total:.0%}), loss {loss:.3f}, "
            f"about {duration_text(left_s)} left"
        )


def duration_text(seconds: float) -> str:
    if seconds <= 90:
        return f"{max(1, round(seconds))} s"
    return f"{round(seconds / 60)} min"
