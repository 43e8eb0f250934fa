"""Ctrl-C and SIGTERM stop `archtree` cleanly even when they arrive during an import.

A signal in the first second of `archtree prune` lands while torch and numpy load; numpy's
extension then turned the interrupt into an ImportError, and the command ended in an internal
error instead of stopping. The modules below do what such a library does, at the moment the
signal arrives, so the tests need not hit that moment by chance.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.cli_process import FAST, REACHABLE, run_archtree
from tests.redis_fixtures import ROOT

MODEL = """
def model():
    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
"""


def user_module(tmp_path: Path, name: str, body: str, model: str = MODEL) -> Path:
    """A folder holding `name.py`, which defines `model` and runs `body` at its first import:
    the command's, not a timing process's (they import it again, and one sent SIGTERM dies)."""
    folder = tmp_path / "modules"
    folder.mkdir(exist_ok=True)
    once = f"""
    import os

    if not os.path.exists({str(tmp_path / "imported")!r}):
        open({str(tmp_path / "imported")!r}, "w").close()
    """
    body = textwrap.indent(textwrap.dedent(body), "    ")
    (folder / f"{name}.py").write_text(textwrap.dedent(once) + body + model)
    return folder


def prune(tmp_path: Path, module: str, folder: Path):
    return run_archtree(
        "prune", "--model", f"module:{module}:model", "--data", "builtin:digits",
        "--budget", "50%", "--out", str(tmp_path / "out"),
        home=tmp_path / "home", extra_path=folder,
    )  # fmt: skip


def assert_stopped_in_one_line(result, said: str, code: int) -> None:
    """The command stopped as Ctrl-C (`said` "interrupted") or SIGTERM ("terminated") stops
    it: its exit code, no traceback, and the one line saying so last."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"archtree: {said}: "), result.stderr


@pytest.mark.parametrize(
    ("signum", "said", "code"),
    [(signal.SIGINT, "interrupted", 130), (signal.SIGTERM, "terminated", 143)],
)
def test_a_signal_during_an_import_stops_the_command_once_the_import_has_finished(
    tmp_path: Path, signum: int, said: str, code: int
):
    folder = user_module(
        tmp_path,
        "halfloaded",
        f"""
        import signal

        try:
            signal.raise_signal({int(signum)})  # Ctrl-C or SIGTERM while this module loads
        except KeyboardInterrupt:
            # What a C extension's initialisation does with it.
            raise ImportError("cannot load module more than once per process") from None
        """,
    )
    result = prune(tmp_path, "halfloaded", folder)
    assert_stopped_in_one_line(result, said, code)
    assert "ImportError" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_signal_during_an_import_that_hangs_stops_the_command_all_the_same(tmp_path: Path):
    folder = user_module(
        tmp_path,
        "hangs",
        """
        import signal
        import threading

        signal.raise_signal(signal.SIGINT)
        while True:  # an import waiting on something that never comes
            threading.Event().wait(1)
        """,
    )
    result = prune(tmp_path, "hangs", folder)
    assert_stopped_in_one_line(result, "interrupted", 130)


def test_a_stop_that_something_swallows_is_raised_again(tmp_path: Path):
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / "swallows.py").write_text(
        textwrap.dedent(
            f"""
            import os
            import signal

            from torch import nn

            from search.zoo import BUILTIN_MODELS

            # The command's first forward pass, not a timing process's.
            FIRED = {str(tmp_path / "fired")!r}


            class Swallows(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.layers = BUILTIN_MODELS["vgg"].constructor(10, 1)

                def forward(self, x):
                    if not os.path.exists(FIRED):
                        open(FIRED, "w").close()
                        try:
                            signal.raise_signal(signal.SIGINT)  # Ctrl-C during a forward pass
                        except BaseException:  # a bare `except:`, as torch-pruning's tracing has
                            pass
                    return self.layers(x)


            def model():
                return Swallows()
            """
        )
    )
    result = prune(tmp_path, "swallows", folder)
    assert_stopped_in_one_line(result, "interrupted", 130)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("signum", "said", "code"),
    [(signal.SIGINT, "interrupted", 130), (signal.SIGTERM, "terminated", 143)],
)
def test_a_signal_while_the_command_reads_its_options_stops_it_in_one_line(
    tmp_path: Path, signum: int, said: str, code: int
):
    # Python imports sitecustomize from the path at start: this one raises the signal as the
    # command loads the modules of its options, the moment a Ctrl-C right after Enter lands.
    # The signal is held until that import ends; the next check for it is put off, as on a
    # loaded machine, where the command could finish before it: it stops all the same.
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""
            import signal
            import sys


            class SignalOnImport:
                def find_spec(self, name, path=None, target=None):
                    if name == "archtree_cli.service_commands":
                        sys.meta_path.remove(self)
                        sys.modules["archtree_cli.stop_signals"].RECHECK_S = 600
                        signal.raise_signal({int(signum)})
                    return None


            sys.meta_path.insert(0, SignalOnImport())
            """
        )
    )
    result = run_archtree("models", home=tmp_path / "home", extra_path=folder)
    assert result.returncode == code, result.stderr
    assert result.stderr == f"archtree: {said}\n"
    assert result.stdout == ""


# Signals at random moments of short waits, each setting the stop from its handler: with a
# threading.Event this deadlocks within a few hundred rounds (the handler's set() waits for
# the lock the interrupted wait() holds), as `archtree up` once hung on a SIGTERM.
SIGNALLED_WAITS = """
import random, signal, sys
from archtree_cli.stop_signals import SignalledStop

for _ in range(3000):
    stop = SignalledStop()
    signal.signal(signal.SIGALRM, stop.set)
    signal.setitimer(signal.ITIMER_REAL, random.uniform(0.0001, 0.003))
    while not stop.wait(0.0005):
        pass
print("every stop seen")
"""


def test_a_stop_asked_by_a_signal_handler_mid_wait_never_deadlocks():
    done = subprocess.run(
        [sys.executable, "-c", SIGNALLED_WAITS], cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "every stop seen", done.stderr


def test_a_handler_the_command_left_in_place_is_not_replaced_on_leaving():
    """As the agent's, stopped by a signal: a second signal in the process's last moments,
    handled by the default handler again, would end it with a traceback."""
    import signal

    from archtree_cli.stop_signals import StopSignals

    def left_by_the_command(signum, frame) -> None:
        pass

    before = signal.getsignal(signal.SIGTERM)
    with StopSignals():
        signal.signal(signal.SIGTERM, left_by_the_command)
    try:
        assert signal.getsignal(signal.SIGTERM) is left_by_the_command
        with StopSignals():  # one the command does not replace is restored
            assert signal.getsignal(signal.SIGTERM) is not left_by_the_command
        assert signal.getsignal(signal.SIGTERM) is left_by_the_command
    finally:
        signal.signal(signal.SIGTERM, before)


# A model pruning speeds up, unlike MODEL, whose time is its layers' fixed costs.
PRUNABLE_MODEL = """
def model():
    from search.model_source import ModelRef, build_model

    return build_model(ModelRef("builtin:vgg", num_classes=10, in_channels=1))
"""


def fast_prune(tmp_path: Path, module: str, folder: Path):
    return run_archtree(
        "prune", "--model", f"module:{module}:model", "--data", "builtin:digits",
        "--budget", REACHABLE, "--out", str(tmp_path / "out"), *FAST,
        home=tmp_path / "home", extra_path=folder,
    )  # fmt: skip


def test_a_stop_once_the_result_is_saved_lets_prune_end_as_it_would_have(tmp_path: Path):
    """A Ctrl-C just after the result reached its folder said that nothing was written there
    and left the saved search, which the next run resumed, to be refused for the result."""
    folder = user_module(tmp_path, "stopped_after_saving", """
    import signal
    import time

    import search.checkpoint

    removing = search.checkpoint.SearchCheckpoint.remove

    def stopped_then_removed(self):
        # The result is saved; its saved search is removed next, as the command ends.
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # the handler runs here
        removing(self)

    search.checkpoint.SearchCheckpoint.remove = stopped_then_removed
    """, PRUNABLE_MODEL)  # fmt: skip
    result = fast_prune(tmp_path, "stopped_after_saving", folder)
    assert result.returncode == 0, result.stderr
    assert "interrupted" not in result.stderr and "Traceback" not in result.stderr
    assert f"saved to {tmp_path / 'out'}" in result.stdout + result.stderr
    assert json.loads((tmp_path / "out" / "report.json").read_text())["final"]
    assert not list((tmp_path / "home" / "searches").glob("*/state.json"))  # nothing to resume


def test_a_stop_while_the_process_shuts_down_ends_it_at_once_with_its_code(tmp_path: Path):
    """torch takes a second or two to shut down after the summary: a SIGTERM then killed the
    process (exit 143 for a saved result), a Ctrl-C printed a traceback."""
    folder = user_module(tmp_path, "stopped_while_leaving", """
    import atexit
    import signal
    import time

    def stopped_while_leaving():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # ended at once by the signal, before the line below
        open(os.path.join(os.path.dirname(__file__), "outlived"), "w").close()

    atexit.register(stopped_while_leaving)
    """, PRUNABLE_MODEL)  # fmt: skip
    result = fast_prune(tmp_path, "stopped_while_leaving", folder)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    assert (tmp_path / "out" / "report.json").exists()
    assert not (folder / "outlived").exists()  # ended by the signal, not after it


def test_a_stop_swallowed_before_the_result_was_saved_is_not_sent_again():
    """Sent again every second until caught, it would have counted as the second stop after
    the save, which ends the process at once, before its last lines."""
    from archtree_cli.stop_signals import StopSignals, work_saved

    with StopSignals() as signals:
        signals.stopping = signal.SIGINT  # raised, and swallowed by code under the command
        work_saved()
        assert signals.saved and signals.stopping is None


def test_a_stop_in_the_interpreters_last_teardown_leaves_the_commands_exit_code():
    """Past its exit handlers Python puts back the default handlers: an agent stopped with
    Ctrl-C and pressed again while torch tore down died by SIGINT (exit -2), not with 0."""
    script = textwrap.dedent("""
    import os, signal, sys
    from archtree_cli.main import main

    class TornDownLast:
        def __del__(self, os=os):
            os.write(1, b"tearing down\\n")
            os.read(0, 1)  # until the test has sent its signal

    torn_down_last = TornDownLast()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    sys.exit(main(["models"]))
    """)
    child = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    lines = []
    for line in child.stdout:
        lines.append(line)
        if line == b"tearing down\n":
            break
    assert lines[-1] == b"tearing down\n", lines
    child.send_signal(signal.SIGINT)
    child.stdin.close()
    child.stdout.close()
    assert child.wait(timeout=60) == 0, child.stderr.read()
    assert b"resnet" in b"".join(lines)  # the command ran


def test_a_stop_waits_while_the_fork_server_starts_a_timing_process():
    """Cut between the server forking a timing child and the command sending it its job, the
    child printed an EOFError traceback under the command's one-line message."""
    import multiprocessing.popen_forkserver

    from archtree_cli.stop_signals import importing

    where = {}
    code = compile(
        "where['frame'] = sys._getframe()", multiprocessing.popen_forkserver.__file__, "exec"
    )
    exec(code, {"sys": sys, "where": where})
    assert importing(where["frame"])
    assert not importing(sys._getframe())  # elsewhere, a stop stops at once
