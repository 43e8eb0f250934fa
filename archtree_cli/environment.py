"""Settings read from the environment by the command line and the agent, outside the service's
own settings (archtree_cli/settings.py)."""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping

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


# The variables the service reads, one per field of its settings (archtree_cli/settings.py,
# ServiceSettings: a test keeps the two alike). Listed here so that a command that never reads
# the service's settings does not import them (pydantic-settings) to know their names.
SERVICE_VARIABLES = (
    "ARCHTREE_REDIS_URL",
    "ARCHTREE_ARTIFACTS_URL",
    "ARCHTREE_MAX_WEIGHTS_BYTES",
    "ARCHTREE_MAX_DATA_BYTES",
    "ARCHTREE_DEVICE_WAIT_S",
    "ARCHTREE_MEASUREMENT_TIMEOUT_S",
    "ARCHTREE_HEARTBEAT_TTL_S",
    "ARCHTREE_VISIBILITY_TIMEOUT_S",
    "ARCHTREE_TASK_LEASE_S",
    "ARCHTREE_API_WORKERS",
    "ARCHTREE_SEARCH_QUEUE",
    "ARCHTREE_EVALUATE_QUEUE",
    "ARCHTREE_AGENT_REDIS_URL",
    "ARCHTREE_ALLOW_PICKLE",
    "ARCHTREE_ALLOWED_MODULES",
    "ARCHTREE_TRAIN_DEVICE",
    "ARCHTREE_WORK_DIR",
)
# The variables the command line and the agent read themselves.
COMMAND_VARIABLES = (
    "ARCHTREE_HOME",
    "ARCHTREE_DEBUG",
    "ARCHTREE_API_URL",
    "ARCHTREE_API_TIMEOUT_S",
    "ARCHTREE_AGENT_START_WAIT_S",
)
KNOWN_VARIABLES = SERVICE_VARIABLES + COMMAND_VARIABLES
PREFIX = "ARCHTREE_"


def unknown_variable_warnings(environment: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each ARCHTREE_* variable set that Archtree does not read (a misspelled
    name, whose setting would otherwise keep its default unsaid), naming the closest known
    one where there is one."""
    names = os.environ if environment is None else environment
    warnings = []
    for name in sorted(names):
        if not name.startswith(PREFIX) or name in KNOWN_VARIABLES:
            continue
        close = difflib.get_close_matches(name, KNOWN_VARIABLES, n=1, cutoff=0.75)
        fix = (
            f"did you mean {close[0]}?"
            if close
            else "the variables it reads are in README.md, Settings (environment)"
        )
        warnings.append(f"{name} is not a setting of Archtree and is ignored: {fix}")
    return warnings
