"""The real `archtree` command in a subprocess, as a user runs it.

PYTEST_DONT_REWRITE: no asserts here (see tests/redis_fixtures.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_archtree(
    *args: str,
    home: Path,
    extra_path: Path | None = None,
    env: dict[str, str] | None = None,
    drop: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """`python -m archtree_cli.main ARGS` from the repository root, with ARCHTREE_HOME at
    `home`, `extra_path` importable, `env` added and the variables in `drop` removed."""
    paths = [str(ROOT)] + ([str(extra_path)] if extra_path else [])
    environment = {
        **os.environ,
        "ARCHTREE_HOME": str(home),
        "PYTHONPATH": os.pathsep.join(paths),
        **(env or {}),
    }
    for name in drop:
        environment.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "archtree_cli.main", *args],
        capture_output=True,
        text=True,
        env=environment,
        cwd=ROOT,
        timeout=600,
    )
