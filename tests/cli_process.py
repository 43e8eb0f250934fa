"""The real `archtree` command in a subprocess, as a user runs it.

PYTEST_DONT_REWRITE: no asserts here (see tests/redis_fixtures.py): a failed check raises
AssertionError itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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


# A short re-ranking and fill: what they do is tested on their own (test_engine, test_fill).
FAST = ["--width", "2", "--branching", "3", "--ft-steps", "5", "--planned-steps", "2",
        "--select-steps", "10", "--fill-probes", "2"]  # fmt: skip


# A budget every small test model can reach on a loaded 2-core machine with the default 3%
# margin: their narrowest versions have measured up to 62% (digits VGG) and 72% (digits
# ResNet) of the unpruned latency, where the per-layer overhead of tiny convolutions dominates.
REACHABLE = "80%"


def archtree(
    *args: str, home: Path, check: bool = True, extra_path: Path | None = None
) -> subprocess.CompletedProcess:
    """`archtree ARGS`; AssertionError if it fails, unless `check` is false."""
    result = run_archtree(*args, home=home, extra_path=extra_path)
    if check and result.returncode != 0:
        raise AssertionError(f"archtree {' '.join(args)} failed:\n{result.stderr}")
    return result


def main_here(args: list[str]) -> int:
    """`archtree ARGS` in this process, where module constants a test patched apply; the
    signal handlers as they were, after. A command that ends leaves SIGINT and SIGTERM
    exiting at once (archtree_cli/stop_signals.py), which here would end the test process at
    the next signal a test sends it."""
    import signal

    from archtree_cli.main import main

    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return main(args)
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The one `archtree: error:` line a refused command ends with; AssertionError unless it
    exited with 2 after exactly one such line and no traceback."""
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    if (
        result.returncode != 2
        or "Traceback" in result.stderr
        or len(errors) != 1
        or result.stderr.strip().splitlines()[-1] != errors[0]
    ):
        raise AssertionError(
            f"expected one error line and exit code 2, got {result.returncode}:\n{result.stderr}"
        )
    return errors[0]


def prune_args(tmp_path: Path, *extra: str, budget: str = REACHABLE) -> list[str]:
    """A short `prune` of the digits ResNet into `tmp_path`/out, `extra` replacing its
    defaults."""
    base = {"--model": "builtin:resnet", "--data": "builtin:digits", "--budget": budget,
            "--out": str(tmp_path / "out")}  # fmt: skip
    extra_list = list(extra)
    for flag in list(base):
        if any(e == flag or e.startswith(flag + "=") for e in extra_list):
            base.pop(flag)
    return ["prune", *[v for kv in base.items() for v in kv], *FAST, *extra_list]


def started_archtree(args: list[str], home: Path, **popen: Any) -> subprocess.Popen[str]:
    """`archtree ARGS` as a child process on `home`, its output in pipes."""
    return subprocess.Popen(
        [sys.executable, "-m", "archtree_cli.main", *args],
        cwd=ROOT,
        env={**os.environ, "ARCHTREE_HOME": str(home), "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
