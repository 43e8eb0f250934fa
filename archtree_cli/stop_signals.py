"""Ctrl-C and SIGTERM stop a command as KeyboardInterrupt, but never in the middle of an import
(nor of a timing process's start, see PROCESS_START).

A KeyboardInterrupt raised while a library initialises (numpy's C extension, under torch's
import, in the first second of `archtree prune`) can leave it half-loaded: the library turns
the interrupt into an ImportError or swallows it, and the command goes on, to fail later with an
internal error ("cannot load module more than once per process") instead of stopping. So a stop
signal that arrives during an import is held until the import has finished, checked every
RECHECK_S, and then stops the command as usual. An import that hangs (a user's module waiting on
something) is stopped all the same once the signal has been held MAX_HOLD_S.

Some code swallows a KeyboardInterrupt (torch-pruning's tracing retries a forward pass after a
bare `except:`), so a stop that has not reached the command's top level (`stopped`) within
REPEAT_S is raised again.

Once a command's work is saved (`work_saved`: prune's result is in its folder), a stop no
longer stops it: it says its last lines and exits as it would have, and a second stop ends it
at once, with code 0. Once a command has returned (`StopSignals.exit_code`), a stop while the
interpreter shuts down (torch takes a second or two) ends the process at once with the
command's own code: a Ctrl-C pressed because the prompt was slow to come back turned a saved
result into a traceback or a death by signal. From the interpreter's last exit handlers on,
such a signal is ignored: past them, Python puts back the default handlers, which kill.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType

RECHECK_S = 0.02
MAX_HOLD_S = 5.0
REPEAT_S = 1.0
IMPORT_MACHINERY = "<frozen importlib._bootstrap"
# Starting a process through the timing fork server: cut between the server forking the child
# and the parent sending it what to run, the child prints an EOFError traceback of its own
# under the command's last line.
PROCESS_START = ("multiprocessing/popen_forkserver.py", "multiprocessing/forkserver.py")


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, `kill`, a CI cancel), stopping a command as Ctrl-C does: its child
    processes are stopped and what it kept is said. Commands that serve (up, api, worker,
    agent) install their own handler."""


def importing(frame: FrameType | None) -> bool:
    """Whether the code running in `frame` runs within an import, or within the start of a
    process by the fork server: where a stop must wait until it has finished."""
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(IMPORT_MACHINERY) or filename.endswith(PROCESS_START):
            return True
        frame = frame.f_back
    return False


class StopSignals:
    """Handlers of SIGINT and SIGTERM while a command runs, restored on leaving. A SIGINT the
    command was started with ignored (`nohup`, a background job) stays ignored. A handler the
    command put in their place and left (the agent's, once stopped by a signal: a further one
    changes nothing) is left too: restored, a signal in the process's last moments would end
    it with a traceback."""

    def __init__(self) -> None:
        self.previous: dict[int, object] = {}
        # Since when a signal has been held back, while an import runs; None when none is.
        self.held_since: float | None = None
        self.held: int | None = None
        self.recheck_due = False
        # The signal raised and not yet caught by the command's top level.
        self.stopping: int | None = None
        # Set once the command's work is saved (`work_saved`): stops are counted, not raised.
        self.saved = False
        self.stops_after_saved = 0
        # The command's exit code, once it has returned.
        self.exit_code: int | None = None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # tests call main elsewhere
            signums = [signal.SIGTERM]
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                signums.append(signal.SIGINT)
            self.previous = {signum: signal.signal(signum, self.handle) for signum in signums}
            # Registered now, to run after the exit handlers of what the command imports.
            atexit.register(self._ignore_stops_once_returned)
            global _active
            _active = self
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        global _active
        if _active is self:
            _active = None
        self.held_since = self.held = self.stopping = None
        if self.exit_code is not None and self.previous:
            for signum in self.previous:
                signal.signal(signum, functools.partial(_exit_at_once, self.exit_code))
            return
        for signum, handler in self.previous.items():
            if signal.getsignal(signum) == self.handle:
                signal.signal(signum, handler)

    def _ignore_stops_once_returned(self) -> None:
        """Ignore stop signals once the command has returned, from the interpreter's last exit
        handlers on (the earlier ones end at once, with the command's code). Past them it puts
        back the default handlers, which kill: a Ctrl-C while it tears down (an agent pressed
        twice to stop) turned the command's exit code into a death by SIGINT."""
        if self.exit_code is None:
            return
        for signum in self.previous:
            with contextlib.suppress(ValueError):  # not the main thread: nothing to do
                signal.signal(signum, signal.SIG_IGN)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.saved:
            self.stops_after_saved += 1
            if self.stops_after_saved > 1:
                _exit_at_once(0)
            return
        now = time.monotonic()
        if importing(frame) and (self.held_since is None or now - self.held_since < MAX_HOLD_S):
            if self.held_since is None:
                self.held_since, self.held = now, signum
            self._recheck_later(signum)
            return
        self.held_since = self.held = None
        if self.stopping is None:
            self.stopping = signum
            self._repeat_later()
        raise Terminated if self.stopping == signal.SIGTERM else KeyboardInterrupt

    def raise_held(self) -> None:
        """Raise now a signal held while an import ran, where the caller knows that none runs:
        the command may otherwise finish its work before the signal's next check."""
        if self.held is not None:
            self.handle(self.held, None)

    def stopped(self) -> None:
        """The command's top level has caught the stop: it is not raised again."""
        self.stopping = None

    def _repeat_later(self) -> None:
        _after(REPEAT_S, self._repeat)

    def _repeat(self) -> None:
        """Raise a stop again that something swallowed; again later, until it is caught."""
        signum = self.stopping
        if signum is not None:
            self._repeat_later()
            _send_to_main_thread(signum)

    def _recheck_later(self, signum: int) -> None:
        if not self.recheck_due:
            self.recheck_due = True
            _after(RECHECK_S, self._deliver_held, signum)

    def _deliver_held(self, signum: int) -> None:
        """Send a held signal again to the main thread (`handle` runs once more there, or the
        handler a serving command has put in its place), unless the command has stopped or
        left. While the signal is ignored for a moment (SIGINT is, while the timing fork
        server starts), wait for that moment to pass."""
        self.recheck_due = False
        if self.held_since is None:
            return
        if signal.getsignal(signum) == signal.SIG_IGN:
            if time.monotonic() - self.held_since < MAX_HOLD_S:
                self._recheck_later(signum)
            return
        _send_to_main_thread(signum)


# The StopSignals of the command running in this process's main thread, if any.
_active: StopSignals | None = None


def work_saved() -> None:
    """The command's work is saved: a stop from now on lets it finish (see the module's
    docstring). Called by prune once its result is in its folder."""
    if _active is not None:
        _active.saved = True
        # A stop raised before and swallowed is not sent again: counted now, a second one
        # would end the process before its last lines.
        _active.stopping = _active.held = _active.held_since = None


def _exit_at_once(code: int, *_: object) -> None:
    """End the process now with `code`, what was printed flushed first."""
    for stream in (sys.stdout, sys.stderr):
        # RuntimeError: a flush the signal interrupted, in the middle of its own write.
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            stream.flush()
    os._exit(code)


def _after(seconds: float, call: Callable[..., None], *args: object) -> None:
    """Call `call(*args)` in `seconds`, from a thread that never holds up the process's exit."""
    timer = threading.Timer(seconds, call, args)
    timer.daemon = True
    timer.start()


def _send_to_main_thread(signum: int) -> None:
    """The signal again, to the main thread: its handler runs there, and a blocking call the
    thread is in returns to let it."""
    signal.pthread_kill(threading.main_thread().ident, signum)


class SignalledStop:
    """A stop that a signal handler asks for, waited for by polling in short turns.

    Not a threading.Event: its set() takes the event's lock, which the main thread holds at
    moments of its own wait(), and a handler runs in the main thread: setting the event from
    the handler then waits on itself forever. A handler here only assigns a flag."""

    TURN_S = 0.05

    def __init__(self) -> None:
        self.asked = False

    def set(self, *_: object) -> None:
        """Ask for the stop (usable as a signal handler)."""
        self.asked = True

    def is_set(self) -> bool:
        return self.asked

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the stop; whether it was asked for."""
        deadline = time.monotonic() + timeout
        while not self.asked and time.monotonic() < deadline:
            time.sleep(min(self.TURN_S, max(0.0, deadline - time.monotonic())))
        return self.asked
