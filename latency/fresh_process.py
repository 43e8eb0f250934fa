"""Timing in a fresh process: each measurement runs in a child forked from a clean server.

A process that has run many differently shaped convolutions times small models slower, in
proportion, than large ones. On a 2-core AVX-512 Xeon (torch 2.13, oneDNN 3.12, batch 8, one
thread), a pruned MobileNetV2 timed interleaved with the unpruned one measured 0.307 of its
latency in a new process, 0.328 after the process had run 300 convolution shapes, 0.335 after
900 and 0.350 after 2,700: the candidate 18 % slower, the reference 3.5 %. Running one shape
many times changes nothing, nor does handing memory back to the system; the state lies in
the convolution library's per-shape objects. A search process builds, tunes and times
hundreds of shapes, so its measurements drifted upwards as it went, and its answers ran
faster, in a new process, than it believed: in the benchmark, 6-13 % under what the search
had confirmed. An inference server runs one model: the new process is the right view.

So the oracle's timings run in children of a `forkserver`: a server process started once,
which imports torch and the harness and never runs a model; every measurement forks a child
from it, builds the models there from their picklable factories, times them and exits. The
child costs 0.2-0.5 s on the benchmark's models on top of the timing: 0.04 s to start, about
0.15 s to build the two models, and warming their kernels up from nothing.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch
from torch import nn

from latency.harness import RunCounter, TimingSettings, time_interleaved, time_model
from search.errors import ArchtreeError
from search.interfaces import TimingStats
from search.timing_input import timing_input

# What the server imports before it forks: the children then start with torch loaded.
_PRELOAD = ["torch", "latency.harness", "search.arch_spec"]
# How long the parent waits on its child's answer at a time.
SIGNAL_CHECK_S = 0.1
# The dtypes a model can be timed in, by name.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TimingJob:
    """What a child needs: zero-argument factories (picklable) and how to time them."""

    candidate: Callable[[], nn.Module]
    reference: Callable[[], nn.Module] | None
    input_shape: tuple[int, ...]
    batch_size: int
    dtype: str
    settings: TimingSettings
    # Token ids below this are the input, for a model that embeds its inputs.
    token_range: int | None = None
    # How often the child tells the parent how many runs it has timed (None: never).
    report_every_s: float | None = None


def run_timing_job(
    job: TimingJob, after_run: Callable[[], None] | None = None
) -> tuple[TimingStats, TimingStats | None, float | None]:
    """In the child: build the models, time them (interleaved when there is a reference),
    calling `after_run` after every run."""
    dtype = DTYPES[job.dtype]
    example = timing_input(
        job.batch_size, job.input_shape, dtype=dtype, token_range=job.token_range
    )
    candidate = job.candidate().to(dtype=dtype).eval()
    if job.reference is None:
        return time_model(candidate, example, job.settings, after_run), None, None
    reference = job.reference().to(dtype=dtype).eval()
    return time_interleaved(candidate, reference, example, job.settings, after_run)


def _serve(job: TimingJob, sender: Connection) -> None:
    """The child's entry: run the job, send back its result or the error it raised."""
    # Ctrl-C reaches the whole process group: the parent stops this child, which must not
    # print a KeyboardInterrupt traceback of its own under the parent's one-line message.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    counter = (
        None
        if job.report_every_s is None
        else RunCounter(lambda runs: sender.send(("runs", runs)), job.report_every_s)
    )
    try:
        outcome: tuple[str, object] = ("ok", run_timing_job(job, counter))
    except Exception as error:  # noqa: BLE001 - handed to the parent, which raises it
        outcome = ("error", error)
    try:
        sender.send(outcome)
    except BrokenPipeError:
        pass  # the parent stopped waiting (Ctrl-C as it started this child): no one to tell
    except Exception as error:  # noqa: BLE001 - an error that does not pickle
        sender.send(("error", RuntimeError(f"{type(error).__name__}: {error}")))
    finally:
        sender.close()


def _start_server() -> None:
    """Start the fork server, if it is not running, with SIGINT ignored: Ctrl-C reaches the
    whole process group, and the server, which ignores it only once it has imported torch
    (seconds), would die of it in the meantime with a traceback, failing the timing that
    waits for it. What Ctrl-C stops is the parent's to decide (an agent finishes its request).
    Python leaves a SIGINT that its parent ignored ignored; only the main thread may change a
    handler, so from another thread the server starts as it is, on first use."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


class FreshProcessTimer:
    """Runs `TimingJob`s one at a time, each in a new child of a forkserver.

    Each job is one `Process`, joined before `run` returns: nothing is left running between
    jobs but the server, which exits with this process.
    """

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(_PRELOAD)
        self._lock = threading.Lock()
        _start_server()

    def run(
        self, job: TimingJob, on_runs: Callable[[int], None] | None = None
    ) -> tuple[TimingStats, TimingStats | None, float | None]:
        """Time `job` in a new process; one job at a time, as two would slow each other.
        `on_runs` gets the count of runs timed so far, as often as the job reports it
        (`report_every_s`)."""
        with self._lock:
            receiver, sender = self._context.Pipe(duplex=False)
            child = self._context.Process(target=_serve, args=(job, sender), daemon=True)
            try:
                child.start()
                sender.close()
                # Waited for in turns: a signal that lands just before a read blocks does not
                # end it, and Ctrl-C's handler runs only once this thread is back in Python.
                while True:
                    while not receiver.poll(SIGNAL_CHECK_S):
                        pass
                    status, result = receiver.recv()
                    if status != "runs":
                        break
                    if on_runs is not None:
                        on_runs(result)
            except EOFError:
                status, result = "died", None
            except BaseException:  # the parent stops (Ctrl-C): the timing is not wanted
                if child.pid is not None:  # started, even if Ctrl-C came as it started
                    child.terminate()
                raise
            finally:
                sender.close()
                receiver.close()
                if child.pid is not None:
                    child.join()
        if status == "died":
            raise ArchtreeError(
                f"the timing process died while timing a model (exit code {child.exitcode}; "
                "out of memory?): free memory or lower --batch-size, then run again"
            )
        if status == "error":
            assert isinstance(result, BaseException)
            raise result
        return result  # type: ignore[return-value]
