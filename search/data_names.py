"""The builtin datasets' names, and what to say of a data file that does not exist. Without
torch: the command line's client checks the data file of a submission with it too."""

from __future__ import annotations

import difflib
from pathlib import Path

BUILTIN_DATASETS = ("mnist", "digits")


def missing_data_file(given: str) -> str:
    """The error for a data file `given` that does not exist, with the builtin dataset it
    looks like a name of (`mnist`, `MNIST.npz`, `minst`), if any."""
    message = f"data file {given!r} does not exist; check the path"
    stem = Path(given).stem.lower() if "/" not in given else ""
    close = difflib.get_close_matches(stem, BUILTIN_DATASETS, n=1, cutoff=0.7)
    if close:
        message += f", or give builtin:{close[0]} for the builtin dataset"
    return message
