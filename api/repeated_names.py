"""A name given twice in one JSON object is refused: JSON readers take the last of them
without a word, and which one the client meant is unknown."""

from __future__ import annotations

import collections
import contextlib
import json

from search.errors import ArchtreeError


def refuse_repeated_names(text: str | bytes, what: str) -> None:
    """ArchtreeError when an object of `text` (`what` names it: "the job spec") gives a name
    more than once. Text that is not JSON, or nested too deep to read, passes: the checks
    that read it say what is wrong with it."""

    def object_of(pairs: list[tuple[str, object]]) -> dict[str, object]:
        counts = collections.Counter(name for name, _ in pairs)
        for name, count in counts.items():
            if count > 1:
                raise ArchtreeError(
                    f"{what} gives {json.dumps(name)} {count} times in one object: give each "
                    "field once"
                )
        return dict(pairs)

    with contextlib.suppress(ValueError, RecursionError):
        json.loads(text, object_pairs_hook=object_of)
