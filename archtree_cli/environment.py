"""Settings read from the environment by the command line and the agent, outside the service's
own settings (archtree_cli/settings.py)."""

from __future__ import annotations

import math
import os

from search.errors import ArchtreeError


def seconds_from_environment(variable: str, default: float, *, zero_allowed: bool) -> float:
    """$`variable` as seconds, `default` when it is unset or empty; a value that is not a finite
    number above 0 (or 0 itself, when `zero_allowed`) is refused in one line."""
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and (seconds >= 0 if zero_allowed else seconds > 0)):
        bound = "0 or more (0: do not wait)" if zero_allowed else "above 0"
        raise ArchtreeError(
            f"{variable} must be a number of seconds {bound}, like {default:g}, not {text!r}"
        )
    return seconds
