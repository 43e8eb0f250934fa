"""What each `archtree` command does; main.py only parses and reports errors."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import re
import sys
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from archtree_cli.paths import archtree_home, latency_cache_dir
from archtree_cli.progress import ConsoleProgress, counted
from archtree_cli.stop_signals import work_saved
from search.budget import ms_text
from search.errors import ArchtreeError

if TYPE_CHECKING:  # torch loads with the commands that use it, not with every command
    import torch

# Bounds of the timing options: far above any device, far below what overflows the kernels.
MAX_BATCH_SIZE = 65536
# The most children `prune --jobs` evaluates at once, as the most threads a device times with.
MAX_JOBS = 1024
# What `measure` times a model source on when no --input-shape is given.
DEFAULT_INPUT_SHAPE = "1,28,28"
# The largest input batch `measure` builds, in bytes (float32).
MAX_INPUT_BYTES = 2 * 1024**3


def warn_of_threads_over_cores(
    count: int, option: str = "--threads", what: str = "threads"
) -> None:
    """Say so when `option` (threads, or tasks run at once) is more than the cores this
    process may use."""
    # The cores this process may use (Linux); elsewhere, the machine's.
    affinity = getattr(os, "sched_getaffinity", None)
    cores = len(affinity(0)) if affinity else os.cpu_count() or 1
    if count > cores:
        outcome = "timings come out slow and noisy" if what == "threads" else "each runs slower"
        print(
            f"archtree: warning: {option} {count} is more than the {cores} cores this "
            f"process may use: the {what} take turns, and {outcome}",
            file=sys.stderr,
        )


# How often a long timing on this machine says how far it has got, in seconds.
TIMING_PROGRESS_EVERY_S = 10.0


def say_timing_progress(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


def _oracle(args: argparse.Namespace, quiet: bool = False):
    """The oracle that times on this machine for `measure` and `prune`: a slow model's timing
    (a huge batch, a slow device) says how far it has got every few seconds, unless `quiet`."""
    from archtree_cli.timing_progress import TimingProgress
    from latency.cache import DiskLatencyCache
    from latency.local_oracle import LocalOracle, check_threads, parse_device
    from search.arch_spec import build_from_spec

    device, device_class = parse_device(args.device)
    check_threads(args.threads)
    if not 1 <= args.batch_size <= MAX_BATCH_SIZE:
        raise ArchtreeError(
            f"--batch-size must be between 1 and {MAX_BATCH_SIZE}, got {args.batch_size}"
        )
    warn_of_threads_over_cores(args.threads)
    cache_dir = latency_cache_dir(args.cache_dir)
    if args.cache_dir:
        _check_writable(cache_dir, "--cache-dir")
    else:
        _check_writable(cache_dir, "the latency cache", fix=HOME_FIX + ", or give --cache-dir")
    return LocalOracle(
        build_from_spec,
        device=device,
        device_class=device_class,
        threads=args.threads,
        batch_size=args.batch_size,
        cache=DiskLatencyCache(cache_dir, on_write_failure=_warn),
        fresh_process=True,
        on_runs=None if quiet else TimingProgress(say_timing_progress, TIMING_PROGRESS_EVERY_S),
    )


def _warn(line: str) -> None:
    print(f"archtree: warning: {line}", file=sys.stderr, flush=True)


def _result_files(folder: Path) -> list[str]:
    """The names of the result files `folder` holds."""
    from search.result_files import ARTIFACT_NAMES

    return [name for name in ARTIFACT_NAMES if (folder / name).exists()]


def result_snapshot(folder: Path) -> tuple | None:
    """What tells the result `folder` holds from another written since (each file's name,
    size and time), or None when it holds none."""
    snapshot = []
    for name in _result_files(folder):
        try:
            status = (folder / name).stat()
        except OSError:
            continue
        snapshot.append((name, status.st_size, status.st_mtime_ns))
    return tuple(snapshot) or None


def _check_out_dir(out: str, overwrite: bool, inputs: dict[str, str | None] | None = None) -> None:
    """Before any work: --out is a folder this process can write, holding no result unless
    `overwrite`, and none of the files a result would replace is one of `inputs` (by option),
    even with `overwrite`."""
    from search.result_files import check_result_places

    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ArchtreeError(f"--out {out} is a file: give a folder.")
    check_result_places(folder)
    existing = _result_files(folder)
    for option, given in (inputs or {}).items():
        clash = next((name for name in existing if _same_file(folder / name, given)), None)
        if clash:
            raise ArchtreeError(
                f"--out {out} would replace the {option} file {given} (the result's {clash}): "
                "choose another --out."
            )
    if existing and not overwrite:
        raise ArchtreeError(
            f"{out} already holds a result ({', '.join(existing)}): choose another --out, "
            "or pass --overwrite to replace it."
        )
    _check_writable(folder, "--out")


def _same_file(path: Path, other: str | None) -> bool:
    """Whether `other` (a path, or a source like builtin:mnist) is the file at `path`."""
    if not other:
        return False
    try:
        return os.path.samefile(path, other)
    except OSError:  # not a file (a builtin source), or gone
        return False


HOME_FIX = "set ARCHTREE_HOME to a folder you can write to"


def _check_writable(folder: Path, option: str, fix: str = "give a folder you can write to") -> None:
    """Create `folder` if needed and write a file in it, so that a search never ends unable to
    save; a folder created only for the check is removed again."""
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ArchtreeError(
            f"cannot write to {option} {folder}: {blocking} is a file, not a folder: {fix}."
        )
    created = [parent for parent in (folder, *folder.parents) if not parent.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ArchtreeError(
            f"cannot write to {option} {folder} ({error.strerror or error}): {fix}."
        ) from None
    finally:
        for parent in created:  # deepest first
            with contextlib.suppress(OSError):
                parent.rmdir()


def prune(
    *,
    model: str,
    data: str,
    budget: str,
    out: str,
    settings,
    oracle,
    weights: str | None = None,
    allow_pickle: bool = False,
    num_classes: int | None = None,
    quiet: bool = False,
    jobs: int = 1,
    sink=None,
    overwrite: bool = True,
    replaces: tuple | None = None,
    command: str = "prune",
    notes: list[str] | None = None,
    checkpoint=None,
    restarted: bool = False,
    train_device=None,
) -> tuple[dict[str, Any], Path]:
    """Run one search in this process and write its artifacts. Returns the report and the
    folder they were written to: `out`, unless `overwrite` is off and another run wrote a
    result there meanwhile, which is then kept and this one goes to a new folder beside it
    (`replaces`: a result_snapshot of what `out` held at the start, which may be replaced;
    None: nothing may).
    `notes` (about the options, such as those the strategy overrides) lead the report's.
    `train_device` (a torch.device) is where candidates are fine-tuned and scored, the CPU
    by default.
    With a `checkpoint` (search.checkpoint.SearchCheckpoint, acquired), the search is saved
    after each depth and goes on from what it saved before; it is removed once the search
    ends, with a result or an error.

    Progress goes to the console unless `sink` (an EventSink) is given.
    """
    from search.artifacts import save_artifacts
    from search.budget import parse_budget
    from search.context import SearchContext
    from search.engine import run_search
    from search.inputs import load_inputs
    from search.interfaces import SequentialExecutor, ThreadExecutor
    from search.quiet import quiet_gate
    from search.report import build_report

    parsed_budget = parse_budget(budget)
    progress = sink if sink is not None else ConsoleProgress(quiet=quiet)
    if isinstance(progress, ConsoleProgress):
        # Before anything is said of the search: a large model takes minutes to check and
        # time, which its timing's progress lines alone did not say were of the unpruned one.
        batch = getattr(oracle, "batch_size", 1)
        resuming = checkpoint is not None and (checkpoint.folder / "state.json").exists()
        progress.say(
            f"checking {model}"
            + ("" if resuming else f", then timing it unpruned at batch {batch}: the search "
               "starts from that latency")
        )  # fmt: skip
    try:
        inputs = load_inputs(
            model,
            data,
            weights=weights,
            allow_pickle=allow_pickle,
            num_classes=num_classes,
            seed=settings.seed,
        )
        batch_size = getattr(oracle, "batch_size", 1)
        if batch_size > 1 and getattr(oracle, "device", None) == "cpu":  # timed here, in RAM
            shape = tuple(inputs.data.input_shape)
            _check_activations_fit(
                inputs.model,
                shape,
                inputs.data.token_range,
                batch_size,
                model,
                f"inputs of shape {shape} from {data}",
            )
    except ArchtreeError:
        if checkpoint is not None:  # refused before the search: no empty folder left behind
            checkpoint.remove_if_unused()
        raise
    stopping = threading.Event()

    def stop_children() -> None:
        """Ctrl-C: the children running in parallel stop at their next fine-tuning step, and
        those that finish meanwhile print nothing after the command's last line."""
        stopping.set()
        if isinstance(progress, ConsoleProgress):
            progress.fall_silent()

    executor = ThreadExecutor(jobs, on_stop=stop_children) if jobs > 1 else SequentialExecutor()
    context = SearchContext(
        model_ref=inputs.model_ref,
        base_model=inputs.model,
        data=inputs.data,
        oracle=oracle,
        settings=settings,
        sink=progress,
        cancelled=stopping.is_set,
        **({"store": checkpoint.nodes} if checkpoint is not None else {}),
        **({"train_device": train_device} if train_device is not None else {}),
    )
    # A model timed on this machine runs alone: the other children's work waits meanwhile.
    gate = getattr(oracle, "gate", None)
    with quiet_gate(gate) if gate is not None else contextlib.nullcontext():
        try:
            outcome = run_search(context, parsed_budget, executor, checkpoint)
        except ArchtreeError:
            if checkpoint is not None:  # run again, it would end the same way
                checkpoint.remove()
            raise
    report = build_report(
        context,
        outcome,
        inputs={
            "command": command,
            "model": model,
            "weights": weights,
            "data": data,
            "budget": str(parsed_budget),
        },
    )
    report["notes"] = [*(notes or []), *report["notes"]]
    folder = result_folder(Path(out), overwrite, replaces)
    try:
        save_artifacts(folder, outcome.answer.spec, outcome.model, report)
    except ArchtreeError as error:
        if checkpoint is None or checkpoint.saved() is None:
            raise
        # The search is kept (only what follows the tree search runs again): say so.
        raise ArchtreeError(
            f"{error}; the search is saved with its tree search finished, and "
            f"{goes_on_from_there(restarted)}"
        ) from None
    work_saved()  # a stop from now on lets the command end as it would have
    if checkpoint is not None:
        checkpoint.remove()
    return report, folder


def result_folder(out: Path, overwrite: bool, replaces: tuple | None) -> Path:
    """Where a search that ends now saves its result: `out`, unless `overwrite` is off and
    `out` holds a result other than `replaces` (what it held at the start, which may be
    replaced), written there while the search ran: then the first `out-N` holding none."""
    if overwrite or result_snapshot(out) == replaces:
        return out
    return _folder_without_result(out)


def _folder_without_result(folder: Path) -> Path:
    """`folder`, or when it holds a result by now, the first `folder-N` that holds none."""
    if not _result_files(folder):
        return folder
    number = 2
    while _result_files(folder.with_name(f"{folder.name}-{number}")):
        number += 1
    free = folder.with_name(f"{folder.name}-{number}")
    print(
        f"archtree: note: {folder} received another result while this search ran; it is kept, "
        f"and this one is saved to {free}",
        file=sys.stderr,
    )
    return free


def goes_on_from_there(restarted: bool) -> str:
    """How to go on with a saved search: the same command, unless it was given --restart,
    which would clear the search again."""
    if restarted:
        return "the same command without --restart goes on from there"
    return "the same command goes on from there (--restart starts it afresh)"


def run_prune(args: argparse.Namespace) -> int:
    from archtree_cli.main import settings_from, strategy_notes
    from search.budget import parse_budget

    parse_budget(args.budget)
    settings = settings_from(args)
    if not 1 <= args.jobs <= MAX_JOBS:
        raise ArchtreeError(
            f"--jobs must be from 1 to {MAX_JOBS} (children evaluated at once), not {args.jobs}."
        )
    train_device = _train_device(args.train_device)
    _check_out_dir(args.out, args.overwrite, {"--weights": args.weights, "--data": args.data})
    # The result found in --out now, which --overwrite replaces; one another run writes there
    # while this one searches is kept either way, and this one goes beside it.
    replaces = result_snapshot(Path(args.out))
    oracle = _oracle(args, quiet=args.quiet)
    notes = strategy_notes(args)
    args.saved_search = _saved_search(args, settings)
    report, folder = prune(
        model=args.model,
        data=args.data,
        budget=args.budget,
        out=args.out,
        settings=settings,
        oracle=oracle,
        weights=args.weights,
        allow_pickle=args.allow_pickle,
        num_classes=args.num_classes,
        quiet=args.quiet,
        jobs=args.jobs,
        overwrite=False,
        replaces=replaces,
        notes=notes,
        checkpoint=args.saved_search,
        restarted=args.restart,
        train_device=train_device,
    )
    print_summary(report, str(folder), after_progress=not args.quiet)
    return 0


def _train_device(name: str) -> torch.device:
    """The torch device `--train-device NAME` names, or one line saying what to give."""
    from search.compute_device import UnknownDevice, resolve_train_device

    try:
        return resolve_train_device(name)
    except UnknownDevice as error:
        raise ArchtreeError(f"--train-device {error}") from None


def _saved_search(args: argparse.Namespace, settings):
    """The checkpoint of this search under ARCHTREE_HOME, acquired, or None (said on stderr)
    when it cannot be written or another run of the same command holds it."""
    from importlib.metadata import PackageNotFoundError, version

    from search.checkpoint import SearchCheckpoint, file_identity
    from search.code_identity import code_identity

    try:
        release = version("archtree")
    except PackageNotFoundError:  # run from a checkout that is not installed
        release = None
    about = {
        "archtree": release,
        "host": platform.node(),
        "model": args.model,
        "code": code_identity(args.model),  # a module edited since: another search
        "weights": file_identity(args.weights),
        "allow_pickle": args.allow_pickle,
        "data": file_identity(args.data),
        "num_classes": args.num_classes,
        "budget": args.budget,
        "settings": settings.to_dict(),
        "device": args.device,
        "batch_size": args.batch_size,
        "threads": args.threads,
        # Where its depths were fine-tuned (`demo` fine-tunes where torch picks).
        "train_device": getattr(args, "train_device", None),
    }
    checkpoint = SearchCheckpoint(archtree_home() / "searches", about)
    if about["code"] is None and args.model.startswith("module:"):
        # Its code cannot be read (a module in a zip archive, more than MAX_FILES of the
        # user's files): a search saved for it could be resumed after an edit.
        print(
            f"archtree: note: the code of {args.model} cannot be read to tell an edit of it, so "
            "this search is not saved to go on from where it stopped if interrupted, and its "
            "timings are not kept in the latency cache",
            file=sys.stderr,
        )
        return None
    try:
        if checkpoint.acquire():
            unreadable = None if args.restart else checkpoint.unreadable()
            discarded = args.restart and (checkpoint.folder / "state.json").exists()
            if args.restart or unreadable:
                try:
                    checkpoint.clear()
                except OSError as error:
                    checkpoint.release()
                    return _not_saved(
                        checkpoint,
                        f"the state an earlier run saved there cannot be removed: "
                        f"{error.strerror or error}; make the folder writable, or delete it",
                    )
            if unreadable:
                print(
                    f"archtree: note: the search an earlier run of this command saved in "
                    f"{checkpoint.folder} cannot be read ({unreadable}): it starts afresh",
                    file=sys.stderr,
                )
            if discarded:
                print(
                    f"archtree: note: --restart: the search an earlier run of this command "
                    f"saved in {checkpoint.folder} is discarded; it starts afresh",
                    file=sys.stderr,
                )
            return checkpoint
        why = "another run of this same command is saving its search there"
    except OSError as error:
        why = f"{error.strerror or error}; {HOME_FIX}"
    return _not_saved(checkpoint, why)


def _not_saved(checkpoint, why: str) -> None:
    """Say that the search runs without `checkpoint`, and why; None, the checkpoint it has."""
    print(
        f"archtree: note: this search is not saved in {checkpoint.folder} ({why}), so it cannot "
        "go on from where it stopped if interrupted",
        file=sys.stderr,
    )


def print_summary(report: dict[str, Any], out: str, after_progress: bool = True) -> None:
    """The result's table, search counts and notes; set apart by a blank line from the
    progress lines printed before it, when there are some."""
    base, final, search = report["baseline"], report["final"], report["search"]

    def accuracy(value: float | None) -> str:
        return "n/a (data-free)" if value is None else f"{value:.4f}"

    rows = [
        ("latency (ms)", f"{base['latency_ms']:.3f}", f"{final['latency_ms']:.3f}"),
        ("accuracy (val)", accuracy(base["accuracy"]), accuracy(final["accuracy"])),
        ("parameters", f"{base['params']:,}", f"{final['params']:,}"),
        ("MACs", f"{base['macs']:,.0f}", f"{final['macs']:,.0f}"),
    ]
    fidelity = final.get("fidelity")  # data-free runs only (reports of earlier versions: none)
    if fidelity is not None:
        rows.insert(2, ("fidelity (val)", "0 (itself)", f"{fidelity:.4f}"))
    if after_progress:
        print()
    print(f"{'':<16} {'unpruned':>16} {'pruned':>16}")
    for name, before, after in rows:
        print(f"{name:<16} {before:>16} {after:>16}")
    print(
        f"\nbudget {ms_text(report['budget_ms'])} ms, final at {share_text(final['budget_fit'])} "
        "of it; "
        f"{search['strategy']} searched {counted(search['depths'], 'depth')}, "
        f"{counted(search['candidates_evaluated'], 'candidate')}, "
        f"{counted(search['latency_measurements'], 'measurement')}"
        + (
            f" (and {search['cache_hits']} taken from the latency cache)"
            if search["cache_hits"]
            else ""
        )
        + f" in {search['wall_s']:.0f} s"
    )
    if final.get("trims"):
        print(
            f"the answer was trimmed {counted(final['trims'], 'time')} after it measured over "
            "the budget on confirmation"
        )
    if fidelity is not None:
        print(
            "fidelity: how close the pruned model's outputs stay to the unpruned model's on "
            "the validation split, minus the mean KL divergence of their class probabilities "
            "(0: the same outputs; the lower, the further): the data have no labels to measure "
            "accuracy with"
        )
    for note in report.get("notes", []):  # reports of earlier versions have none
        print(f"note: {note}")
    print(f"saved to {Path(out)}/ (arch.json, model.safetensors, report.json)")


def run_measure(args: argparse.Namespace) -> int:
    import torch

    from search.arch_spec import spec_of
    from search.artifacts import load_pruned
    from search.data_source import MAX_CLASSES
    from search.inputs import check_forward
    from search.model_source import SIZED_BY_OPTIONS, ModelRef, build_model, load_weights
    from search.timing_input import timing_input

    result = _result_folder(args)
    shape, shape_label = _measure_input_shape(args, result)
    source = result.model.source if result else args.model
    if not source.startswith("module:") and len(shape) != 3:
        if args.input_shape is None:  # a result folder's own shape
            raise ArchtreeError(
                f"{shape_label} is {list(shape)}, not an image's C,H,W, which {source} takes: "
                f"{_DAMAGED_ARCH}"
            )
        raise ArchtreeError(
            f"{args.model} takes images: give --input-shape as C,H,W, e.g. 1,28,28 (a model of "
            "your own, module:, may take another shape)."
        )
    input_bytes = 4 * args.batch_size * math.prod(shape)
    if input_bytes > MAX_INPUT_BYTES:
        smaller = "shape or batch size" if args.input_shape is not None else "--batch-size"
        raise ArchtreeError(
            f"{shape_label} at --batch-size {args.batch_size} is an input of "
            f"{input_bytes / 1024**3:.3g} GiB: give a smaller {smaller}."
        )
    if result:
        ref, model = result.model, load_pruned(args.model)
    else:
        if args.num_classes is not None and args.model.startswith("module:"):
            raise ArchtreeError(
                f"--num-classes {args.num_classes} does not apply to {args.model}, which builds "
                "its own model: leave --num-classes out (it sizes builtin, torchvision and timm "
                "models)."
            )
        classes = 10 if args.num_classes is None else args.num_classes
        if not 1 <= classes <= MAX_CLASSES:
            raise ArchtreeError(
                f"--num-classes must be between 1 and {MAX_CLASSES}, not {classes}."
            )
        ref = ModelRef(source=args.model, num_classes=classes, in_channels=shape[0])
        model = build_model(ref)
    if args.weights:
        load_weights(
            model,
            args.weights,
            allow_pickle=args.allow_pickle,
            sized_by=SIZED_BY_OPTIONS,
        )
    oracle = _oracle(args)
    token_range = result.token_range if result else _token_range(model, shape)
    # Before the batch is built: the check runs the model on a few samples only.
    _check_activations_fit(model, shape, token_range, args.batch_size, args.model, shape_label)
    check_forward(
        model,
        timing_input(args.batch_size, shape, token_range=token_range),
        args.model,
        shape_label,
        classifier=False,
        token_range=token_range,
        batch_option="--batch-size",
    )
    spec = spec_of(model, ref, shape, token_range)
    tokens = "" if token_range is None else f" of token ids below {token_range}"

    def say_timing() -> None:  # not said of a timing the cache holds
        print(
            f"measuring {args.model} at batch {args.batch_size}, input {shape}{tokens} "
            "(Ctrl-C stops)",
            file=sys.stderr,
            flush=True,
        )

    # A TorchScript module may come from a file the cache's key does not cover (the code it
    # holds is not Python's): timed afresh each time.
    scripted = isinstance(model, torch.jit.ScriptModule)
    stats = oracle.measure_reference(spec, refresh=args.fresh or scripted, on_timing=say_timing)
    fingerprint = oracle.fingerprint()
    pruned = f"{ref.source} pruned, " if result else ""
    print(f"model      {args.model} ({pruned}arch {spec.hash})")
    hardware = fingerprint.get("cpu_model") or fingerprint.get("cpu")
    if fingerprint.get("gpu"):
        hardware = f"{fingerprint['gpu']} (host {hardware})"
    print(f"device     {fingerprint.get('device_class')} on {fingerprint.get('host')}: {hardware}")
    print(f"setup      batch {args.batch_size}, input {shape}{tokens}, {args.threads} thread(s)")
    print(f"median     {stats.median_ms:.4f} ms")
    print(f"p90        {stats.p90_ms:.4f} ms")
    print(f"IQR        {stats.iqr_ms:.4f} ms")
    print(f"CV         {stats.cv:.2%}")
    print(f"runs       {stats.n} timed, after warm-up runs (the progress lines count both)")
    if stats.launch_ms is not None:
        print(f"launch     {_launch_line(stats)}")
    if stats.cached:
        print(
            "cached     yes: timed before with these settings and kept in the latency cache "
            "(--fresh times it again)"
        )
    return 0


# What to do about a result folder's arch.json that no `prune` or `fetch` wrote as it is.
_DAMAGED_ARCH = (
    "the file is damaged or was edited; save the result again with `archtree prune` (or "
    "`archtree fetch` for a service job), or give --input-shape to time it on another shape."
)


def _measure_input_shape(args: argparse.Namespace, result) -> tuple[tuple[int, ...], str]:
    """The shape of one sample `measure` times the model on, and how its errors name where it
    came from: --input-shape when given, else the result folder's arch.json, else the
    default."""
    if args.input_shape is None and result is not None:
        shape = tuple(result.input_shape)
        label = f"the input_shape of {Path(args.model) / 'arch.json'}"
        if not 1 <= len(shape) <= 4 or min(shape, default=0) < 1:
            raise ArchtreeError(
                f"{label} is {list(shape)}, not one sample's shape (1 to 4 positive numbers): "
                f"{_DAMAGED_ARCH}"
            )
        return shape, label
    text = DEFAULT_INPUT_SHAPE if args.input_shape is None else args.input_shape
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not 1 <= len(shape) <= 4 or min(shape) < 1:
        raise ArchtreeError(
            f"--input-shape {text!r} is not one sample's shape, 1 to 4 positive "
            "numbers: C,H,W for an image, e.g. 1,28,28."
        )
    return shape, f"--input-shape {text}"


def _launch_line(stats) -> str:
    """The host's part of a GPU timing, and what to do when it sets the time."""
    from search.notes import launch_bound

    share = stats.launch_ms / stats.median_ms
    line = f"{stats.launch_ms:.4f} ms of each run launching kernels from the host ({share:.0%})"
    if launch_bound(stats):
        line += (
            ": launch-bound, the GPU waits on the host CPU, whose speed sets this time; a larger "
            "--batch-size gives the GPU more work per launch"
        )
    return line


def _result_folder(args: argparse.Namespace):
    """The architecture spec of the result folder given as --model (one `prune` or `fetch`
    wrote), or None when --model is a model source; the options such a folder sets itself
    are refused."""
    from search.artifacts import ARTIFACT_NAMES, load_result_spec
    from search.model_source import SOURCE_FORMS, SOURCE_PREFIXES, WEIGHT_SUFFIXES, looks_like_path

    if args.model.partition(":")[0] in SOURCE_PREFIXES:
        return None  # a model source, whatever else it holds (build_model checks it)
    path = Path(args.model)
    if path.is_file():
        folder = path.parent
        if path.name in ARTIFACT_NAMES or (folder / "arch.json").is_file():
            raise ArchtreeError(
                f"{args.model!r} is a file of the result folder {folder}: give its folder, "
                f"--model {folder}{os.sep} (archtree measure times the model it holds)."
            )
        weights = path.name.lower().endswith(WEIGHT_SUFFIXES)  # build_model says: --weights
        if looks_like_path(args.model) and not weights:
            raise ArchtreeError(
                f"{args.model!r} is a file, not a model source: --model takes a folder "
                f"`archtree prune` or `fetch` wrote, or a model source ({SOURCE_FORMS})."
            )
    if not path.is_dir():
        if looks_like_path(args.model) and not path.exists():
            raise ArchtreeError(
                f"no folder {args.model!r}: --model takes a folder `archtree prune` or `fetch` "
                f"wrote, or a model source ({SOURCE_FORMS})"
            )
        return None
    for option, given in (
        ("--weights", args.weights),
        ("--num-classes", args.num_classes),
        ("--allow-pickle", args.allow_pickle or None),
    ):
        if given is not None:
            raise ArchtreeError(
                f"{option} is not used with a result folder as --model: {args.model} holds "
                "its model (arch.json, model.safetensors); leave it out."
            )
    return load_result_spec(args.model)


def _token_range(model, shape: tuple[int, ...]) -> int | None:
    """The ids a model that looks its inputs up in an embedding is timed on, unless it runs on
    float inputs (its embedding is inside, as a ViT's positions); None for other models."""
    import torch

    from search.timing_input import embeds_inputs, timing_input, token_range_of

    if not embeds_inputs(model):
        return None
    try:
        with torch.inference_mode():
            model(timing_input(1, shape))
    except Exception:  # noqa: BLE001 - it does not take floats: token ids, checked after
        return token_range_of(model)
    return None


# The batch a forward pass's memory is measured at, then scaled to --batch-size: large enough
# to take the kernels the whole batch takes (PyTorch switches some convolutions to oneDNN from
# 16 samples), small enough to run in a blink.
PROBE_BATCH = 16
# How far the memory a batch needs is taken above the measured batch's, scaled: the memory per
# sample of the builtin models at batch 4096 has measured up to 1.2x that at batch 16.
FORWARD_MEMORY_MARGIN = 1.5
# Where a forward pass's peak cannot be measured (not Linux): its input and largest layer
# output, and that output's input, times this (and the margin). The builtin models'
# convolution work buffers (im2col, oneDNN's) have made their peaks up to 2.3x that.
UNMEASURED_FACTOR = 2.5


def _check_activations_fit(
    model, shape: tuple[int, ...], token_range: int | None, batch_size: int, source: str,
    shape_label: str,
) -> None:  # fmt: skip
    """ArchtreeError when a forward pass at `batch_size` would need more memory than this
    machine has available, said before any large allocation (a model that fails on a sample is
    left to check_forward)."""
    from search.memory import available_memory_bytes

    available = available_memory_bytes()
    if available is None:
        return
    memory = _forward_memory(model, shape, token_range, batch_size, available)
    if memory is None:
        return
    needed = memory.needed(batch_size)
    if needed > available:
        fits = memory.fits(available)
        advice = f"at most --batch-size {fits} fits" if fits else "even one sample does not fit"
        raise ArchtreeError(
            f"{source} at --batch-size {batch_size} and {shape_label} needs about "
            f"{needed / 1024**3:.3g} GiB for a forward pass (its activations and its layers' "
            f"work buffers, as measured on a few samples), more than the "
            f"{available / 1024**3:.3g} GiB available to it here (the machine's free memory, "
            "or its container's or `ulimit -v`'s limit where lower): give a smaller "
            f"--batch-size ({advice}) or input shape."
        )


@dataclass(frozen=True)
class ForwardMemory:
    """The memory a forward pass takes: `per_sample` for each sample of the batch, its input
    included, and `fixed` for the call whatever its batch (a convolution's weights laid out
    anew for its kernel, which a wide layer makes hundreds of MB)."""

    per_sample: float
    fixed: float = 0.0

    def needed(self, batch_size: int) -> float:
        return FORWARD_MEMORY_MARGIN * (self.fixed + self.per_sample * batch_size)

    def fits(self, available: float) -> int:
        """The largest batch whose forward pass fits in `available` bytes (0: not one)."""
        return max(0, int((available / FORWARD_MEMORY_MARGIN - self.fixed) // self.per_sample))


def _forward_memory(
    model, shape: tuple[int, ...], token_range: int | None, batch_size: int, available: int
) -> ForwardMemory | None:
    """The memory a forward pass of `model` takes (see _forward_bytes_per_sample). Where the
    batch seems not to fit at the probe's rate per sample, the peak is measured again on twice
    the probe: what grows with the batch is told from what each call takes once, which the
    probe's rate alone counts again for every sample."""
    import torch

    from search.timing_input import timing_input

    measured = _forward_bytes_per_sample(model, shape, token_range, batch_size, available)
    if measured is None:
        return None
    per_sample, probe, grown, floor = measured
    memory = ForwardMemory(per_sample)
    larger = 2 * probe
    if (
        memory.needed(batch_size) <= available
        or grown is None
        or probe < PROBE_BATCH
        or larger > batch_size
        or larger * per_sample > available / 4
    ):
        return memory
    samples = timing_input(larger, shape, token_range=token_range)

    def forward() -> None:
        with torch.inference_mode():
            model(samples)

    try:
        grown_larger = _peak_growth(forward)
    except Exception:  # noqa: BLE001 - it ran on the probe: take the probe's rate
        return memory
    if grown_larger is None:
        return memory
    input_bytes = samples.element_size() * samples[0].numel()
    rate = max(floor, (grown_larger - grown) / probe + input_bytes)
    fixed = max(0.0, grown + input_bytes * probe - rate * probe)
    fitted = ForwardMemory(rate, fixed)
    return fitted if fitted.needed(batch_size) < memory.needed(batch_size) else memory


def _forward_bytes_per_sample(
    model, shape: tuple[int, ...], token_range: int | None, batch_size: int, available: int
) -> tuple[float, int, int | None, float] | None:
    """The memory a forward pass of `model` takes per sample of the batch, its input included:
    its peak measured on min(`batch_size`, PROBE_BATCH) samples (fewer where even that might
    not fit in `available`), never below its input and largest layer output plus that output's
    input; with the probe's size, the peak's growth on it (None where not measured) and that
    floor. None when a sample fails (check_forward says why), or a TorchScript model's peak
    cannot be measured (another's is then estimated from its layer outputs)."""
    import torch

    from search.timing_input import timing_input

    def forward(samples) -> None:
        with torch.inference_mode():
            model(samples)

    largest = 0

    def note(_module, _inputs, output) -> None:
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel())

    one = timing_input(1, shape, token_range=token_range)
    scripted = isinstance(model, torch.jit.ScriptModule)  # it takes no hooks
    hooks = [] if scripted else [module.register_forward_hook(note) for module in model.modules()]
    try:
        forward(one)  # also makes the first call's one-off allocations
    except Exception:  # noqa: BLE001 - check_forward says what is wrong with the model
        return None
    finally:
        for hook in hooks:
            hook.remove()
    input_bytes = one.element_size() * one.numel()
    floor = input_bytes + 4 * 2 * largest
    fallback = None if scripted else UNMEASURED_FACTOR * floor
    unmeasured = None if fallback is None else (fallback, 1, None, floor)
    try:
        grown = _peak_growth(lambda: forward(one))
    except Exception:  # noqa: BLE001 - it ran once: check_forward says what is wrong
        return unmeasured
    if grown is None:
        return unmeasured
    per_sample = max(floor, grown + input_bytes)
    # A probe batch that needs at most a quarter of the memory, at one sample's rate.
    probe = min(batch_size, PROBE_BATCH, int(available // (4 * per_sample)))
    if probe < 2:
        return per_sample, 1, grown, floor
    samples = timing_input(probe, shape, token_range=token_range)
    try:
        forward(samples[:2])  # the one-off allocations of a batched call
        grown = _peak_growth(lambda: forward(samples))
    except Exception:  # noqa: BLE001 - one sample at a time: check_forward says so
        return per_sample, 1, None, floor
    if grown is None:
        return per_sample, 1, None, floor
    return max(floor, (grown + input_bytes * probe) / probe), probe, grown, floor


def _peak_growth(run) -> int | None:
    """How far this process's resident memory grew above where it was while `run()` ran, its
    memory freed before returned to the system first so that reusing it counts; None where
    that cannot be read (Linux's peak resident size, reset for it)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # glibc's; elsewhere, not needed as much
        ctypes.CDLL(None).malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM, the peak, to the current size
        before = _process_status_bytes("VmRSS")
        run()
        peak = _process_status_bytes("VmHWM")
    except OSError:
        return None
    return None if before is None or peak is None else max(0, peak - before)


def _process_status_bytes(field: str) -> int | None:
    """A size in /proc/self/status (in kB there), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return None


def run_models(args: argparse.Namespace) -> int:
    from search.model_source import describe_builtin_models

    entries = describe_builtin_models()
    names = [f"builtin:{entry['name']}" for entry in entries]
    width = max(len(name) for name in [*names, "name"])
    print(f"{'name':<{width}} {'family':<10} {'params':>10}  description")
    for name, entry in zip(names, entries, strict=True):
        print(
            f"{name:<{width}} {entry['family']:<10} {entry['params']:>10,}  {entry['description']}"
        )
    return 0


DEMO_MODEL = "builtin:resnet"
DEMO_DATA = "builtin:mnist"


def demo_weights(progress=print, device=None) -> Path:
    """A ResNet trained on MNIST (on `device`, the CPU by default), trained once and cached
    under ARCHTREE_HOME (written whole or not at all: a demo stopped while saving them leaves
    none to load next time)."""
    from archtree_cli.training_progress import TrainingProgress
    from search.data_source import load_data
    from search.inputs import load_inputs
    from search.model_source import load_weights, save_weights
    from search.training import accuracy, train

    path = archtree_home() / "demo" / "resnet-mnist.safetensors"
    inputs = load_inputs(DEMO_MODEL, DEMO_DATA)
    if path.is_file():
        try:
            load_weights(inputs.model, path, source=DEMO_MODEL)
            return path
        except ArchtreeError as error:  # damaged, or of an older builtin ResNet
            progress(f"the cached demo model cannot be used ({error}); it is trained again")
            path.unlink(missing_ok=True)
    data = load_data(DEMO_DATA)
    progress("training the demo model (builtin:resnet on builtin:mnist), once; it is cached")
    train(inputs.model, data.train_x, data.train_y, epochs=3, lr=0.05, seed=0,
          progress=TrainingProgress(progress), device=device)  # fmt: skip
    score = accuracy(inputs.model, data.val_x, data.val_y, device=device)
    progress(f"trained: validation accuracy {score:.4f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save_weights(inputs.model, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _holds_a_demo(folder: Path) -> bool:
    """Whether `folder` holds an earlier demo's result, which a demo replaces."""
    import json

    try:
        inputs = json.loads((folder / "report.json").read_text()).get("inputs", {})
    except (OSError, ValueError, AttributeError):
        return False
    return inputs.get("command") == "demo"


# The options of `archtree demo`; the search's advice may name those of prune.
DEMO_OPTIONS = ("--budget", "--out", "--overwrite")


def in_demo_terms(message: str) -> str:
    """The search's `message`, which may advise prune's options (`--min-width`), with a word
    that those are prune's: the demo runs the search with their defaults."""
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", message)) - set(DEMO_OPTIONS)
    if not named:
        return message
    options = ", ".join(sorted(named))
    return (
        f"{message.rstrip('.')} ({options}: options of archtree prune, which runs this search "
        f"on {DEMO_MODEL} with the demo's weights, or on a model of your own)."
    )


def share_text(share: float) -> str:
    """A share as a percentage to one decimal, or two significant digits below 1 %, where
    one decimal would round a share of an unpruned model's budget to 0.0 %."""
    percent = 100 * share
    return f"{percent:.1f}%" if percent >= 1 else f"{percent:.2g}%"


def run_demo(args: argparse.Namespace) -> int:
    from search.budget import parse_budget
    from search.settings import SearchSettings

    def say(text: str) -> None:
        print(f"archtree demo: {text}", file=sys.stderr, flush=True)

    budget = parse_budget(args.budget)
    _check_out_dir(args.out, overwrite=args.overwrite or _holds_a_demo(Path(args.out)))
    # The earlier demo's result found there is replaced; one another command writes there
    # while this demo runs is kept, and this one goes beside it, as prune's does.
    replaces = result_snapshot(Path(args.out))
    _check_writable(archtree_home() / "demo", "ARCHTREE_HOME's", fix=HOME_FIX)
    args.demo_training = True  # what a stop now says (main.interrupted_note)
    device = _train_device("auto")  # a GPU trains the demo model and tunes its candidates
    weights = demo_weights(say, device)
    args.demo_training = False
    settings = replace(SearchSettings(), width=3, branching=3, final_epochs=1.0)
    target = f"{budget.value:g} % of its measured latency" if budget.unit == "%" else str(budget)
    say(f"pruning {DEMO_MODEL} to {target} on this CPU")
    oracle_args = argparse.Namespace(device="local", threads=1, batch_size=1, cache_dir=None)
    try:
        report, folder = prune(
            model=DEMO_MODEL,
            data=DEMO_DATA,
            budget=args.budget,
            out=args.out,
            settings=settings.effective(),
            oracle=_oracle(oracle_args),
            weights=str(weights),
            command="demo",
            train_device=device,
            overwrite=False,  # but what it found at its start (replaces), checked above
            replaces=replaces,
        )
    except ArchtreeError as error:
        raise ArchtreeError(in_demo_terms(str(error))) from None
    print_summary(report, str(folder))
    return 0
