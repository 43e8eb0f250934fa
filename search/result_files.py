"""The names of the files a search's result is made of, and the check that they can be put in
a folder. Without torch: the command line's client checks a fetch's folder with it too."""

from __future__ import annotations

from pathlib import Path

from search.errors import ArchtreeError

ARTIFACT_NAMES = ("arch.json", "model.safetensors", "report.json")


def check_result_places(out: Path, out_name: str = "--out") -> None:
    """ArchtreeError when something other than a file holds one of a result's names in
    `out` (a folder named model.safetensors): the result could not be put there. `out_name`:
    what the caller calls `out` (its option, or its argument)."""
    for name in ARTIFACT_NAMES:
        path = out / name
        if path.exists() and not path.is_file():
            what = "a folder" if path.is_dir() else "not a file"
            raise ArchtreeError(
                f"{path} is {what} where the result's {name} goes: move it away, or choose "
                f"another {out_name}."
            )
