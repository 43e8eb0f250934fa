"""Latency oracle that times models on this machine's CPU or GPU."""

from __future__ import annotations

import copy
import functools
import pickle
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from latency.cache import LatencyCache, MemoryLatencyCache, decoded
from latency.fingerprint import device_fingerprint, timing_key
from latency.fresh_process import DTYPES, FreshProcessTimer, TimingJob
from latency.harness import (
    RunCounter,
    RunsReport,
    TimingSettings,
    planned_runs,
    time_interleaved,
    time_model,
)
from search.errors import ArchtreeError
from search.interfaces import LatencyMeasurement, TimingStats
from search.quiet import QuietGate
from search.timing_input import timing_input

if TYPE_CHECKING:
    from search.arch_spec import ArchSpec

CONFIRM_FACTOR = 4.0
# The most torch threads a timing may use (far above any machine's cores).
MAX_THREADS = 1024


def check_threads(threads: int) -> None:
    """ArchtreeError unless `threads` (--threads) is from 1 to MAX_THREADS."""
    if not 1 <= threads <= MAX_THREADS:
        raise ArchtreeError(f"--threads must be between 1 and {MAX_THREADS}, got {threads}")


_DEVICES = {
    "local": ("cpu", "local"),
    "local:cpu": ("cpu", "local"),
    "local:cuda": ("cuda", "local:cuda"),
}


def parse_device(text: str) -> tuple[str, str]:
    """Map a `--device` value to (torch device, device class)."""
    try:
        return _DEVICES[text.strip()]
    except KeyError:
        raise ArchtreeError(
            f"unknown --device {text!r}; use 'local' (this machine's CPU) "
            "or 'local:cuda' (this machine's GPU)"
        ) from None


class LocalOracle:
    """Times candidates interleaved with the reference on this machine; results are cached.

    `build` turns an architecture spec into a model. `threads` overrides `settings.threads`.
    With `fresh_process` (CPU only), every timing runs in a new child process that builds the
    models with `build`, which must then be picklable (latency/fresh_process.py says why).
    Counters: `measurements` (timings actually run) and `cache_hits`. `on_runs` is told how
    far each timing has got, every `on_runs.every_s` seconds while it runs.
    """

    def __init__(
        self,
        build: Callable[[ArchSpec], nn.Module],
        *,
        device: str = "cpu",
        device_class: str = "local",
        threads: int = 1,
        batch_size: int = 1,
        dtype: str = "float32",
        cache: LatencyCache | None = None,
        settings: TimingSettings | None = None,
        models_kept: int = 8,
        fresh_process: bool = False,
        on_runs: RunsReport | None = None,
    ) -> None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ArchtreeError(
                "--device local:cuda needs a CUDA GPU; none is visible to torch "
                f"{torch.__version__} (CUDA build: {torch.version.cuda or 'none'}); "
                "use --device local"
            )
        if device != "cpu" and not device.startswith("cuda"):
            raise ArchtreeError(f"unsupported torch device {device!r}; use 'cpu' or 'cuda'")
        if dtype not in DTYPES:
            raise ArchtreeError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        if threads < 1 or batch_size < 1:
            raise ArchtreeError(
                f"threads and batch size must be >= 1, got {threads} and {batch_size}"
            )
        self.build = build
        self.device = device
        self.device_class = device_class
        self.threads = threads
        self.batch_size = batch_size
        self.dtype = dtype
        self.cache: LatencyCache = cache if cache is not None else MemoryLatencyCache()
        self.settings = replace(settings or TimingSettings(), threads=threads)
        self.confirm_settings = self.settings.scaled(CONFIRM_FACTOR)
        self.measurements = 0
        self.cache_hits = 0
        self.on_runs = on_runs
        self._models_kept = models_kept
        self._models: OrderedDict[str, nn.Module] = OrderedDict()
        self._fingerprints: dict[tuple[int, ...] | None, dict[str, Any]] = {}
        self._last_input_shape: tuple[int, ...] | None = None
        # One timing at a time, alone on this machine: two at once would slow each other down,
        # and the search's work in other threads waits meanwhile (install the gate with
        # search.quiet.quiet_gate for the search's run).
        self.gate = QuietGate()
        self._fresh: FreshProcessTimer | None = None
        if fresh_process and device == "cpu":
            try:
                pickle.dumps(build)
            except (pickle.PicklingError, AttributeError, TypeError) as error:
                raise ArchtreeError(
                    f"timing in a fresh process needs a picklable model builder, got {build!r}"
                ) from error
            self._fresh = FreshProcessTimer()

    @property
    def fresh_process(self) -> bool:
        """Whether timings run in a new child process each (CPU only)."""
        return self._fresh is not None

    def fingerprint(self) -> dict[str, Any]:
        """The fingerprint of this device, for the input shape measured last (None before)."""
        return dict(self._fingerprint(self._last_input_shape))

    def measure_reference(
        self,
        reference: ArchSpec,
        *,
        confirm: bool = False,
        refresh: bool = False,
        on_timing: Callable[[], None] | None = None,
    ) -> TimingStats:
        """Time the unpruned model alone: the job's baseline L(M0). A timing in the cache is
        used unless `refresh`, which times it again and caches the new timing. `on_timing` is
        called when it is timed (not taken from the cache), before the timing starts."""
        input_shape = tuple(reference.input_shape)
        self._last_input_shape = input_shape
        key = self._key(reference, reference, "ref", confirm)
        cached = None if refresh or key is None else self.cache.get(key)
        stats = decoded(cached, lambda entry: TimingStats(**entry))
        if stats is not None:
            self.cache_hits += 1
            return replace(stats, cached=True)
        if on_timing is not None:
            on_timing()
        with self.gate.timing():
            stats = self._time(reference, None, input_shape, confirm)[0]
            self.measurements += 1
        if key is not None:
            self.cache.put(key, stats.to_dict())
        return stats

    def offer_model(self, spec: ArchSpec, model: nn.Module) -> None:
        """Keep a copy of an already built model for `spec`, so timing it needs no rebuild
        (not kept when timings run in a fresh process, which builds its own)."""
        if self._fresh is None and spec.hash not in self._models:
            self._models[spec.hash] = self._on_device(copy.deepcopy(model))
            if len(self._models) > self._models_kept:
                self._models.popitem(last=False)

    def _on_device(self, model: nn.Module) -> nn.Module:
        return model.to(device=self.device, dtype=DTYPES[self.dtype]).eval()

    def measure(
        self, candidate: ArchSpec, reference: ArchSpec, *, confirm: bool = False
    ) -> LatencyMeasurement:
        """Time `candidate` interleaved with `reference`; cached results have `cached=True`."""
        input_shape = tuple(reference.input_shape)
        if tuple(candidate.input_shape) != input_shape:
            raise ValueError(
                f"candidate input shape {candidate.input_shape} differs from the reference's "
                f"{reference.input_shape}"
            )
        self._last_input_shape = input_shape
        key = self._key(candidate, reference, "pair", confirm)
        hit = None if key is None else decoded(self.cache.get(key), LatencyMeasurement.from_dict)
        if hit is not None:
            self.cache_hits += 1
            return replace(hit, cached=True)
        with self.gate.timing():
            candidate_stats, reference_stats, ratio = self._time(  # type: ignore[assignment]
                candidate, reference, input_shape, confirm
            )
            self.measurements += 1
        result = LatencyMeasurement(
            arch_hash=candidate.hash,
            ratio=ratio,
            candidate=candidate_stats,
            reference=reference_stats,
            fingerprint=dict(self._fingerprint(input_shape)),
        )
        if key is not None:
            self.cache.put(key, result.to_dict())
        return result

    def _time(
        self,
        candidate: ArchSpec,
        reference: ArchSpec | None,
        input_shape: tuple[int, ...],
        confirm: bool,
    ) -> tuple[TimingStats, TimingStats | None, float | None]:
        """Time `candidate` (interleaved with `reference`, when given) in a fresh process or
        in this one, telling `on_runs` how far it has got."""
        settings, on_runs = self._settings(confirm), self.on_runs
        planned = planned_runs(settings, interleaved=reference is not None)
        started = time.monotonic()

        def report(runs: int) -> None:
            assert on_runs is not None
            on_runs(runs, planned, time.monotonic() - started)

        if self._fresh is not None:
            job = self._job(candidate, reference, input_shape, confirm)
            if on_runs is None:
                return self._fresh.run(job)
            return self._fresh.run(replace(job, report_every_s=on_runs.every_s), report)
        example = self._input(candidate)
        counter = None if on_runs is None else RunCounter(report, on_runs.every_s)
        if reference is None:
            return time_model(self._model(candidate), example, settings, counter), None, None
        return time_interleaved(
            self._model(candidate), self._model(reference), example, settings, counter
        )

    def _job(
        self,
        candidate: ArchSpec,
        reference: ArchSpec | None,
        input_shape: tuple[int, ...],
        confirm: bool,
    ) -> TimingJob:
        return TimingJob(
            candidate=functools.partial(self.build, candidate),
            reference=None if reference is None else functools.partial(self.build, reference),
            input_shape=input_shape,
            batch_size=self.batch_size,
            dtype=self.dtype,
            settings=self._settings(confirm),
            token_range=candidate.token_range,
        )

    def _settings(self, confirm: bool) -> TimingSettings:
        return self.confirm_settings if confirm else self.settings

    def _key(
        self, candidate: ArchSpec, reference: ArchSpec, kind: str, confirm: bool
    ) -> str | None:
        device = self._fingerprint(tuple(reference.input_shape))
        return timing_key(device, candidate, reference, kind, confirm)

    def _fingerprint(self, input_shape: tuple[int, ...] | None) -> dict[str, Any]:
        if input_shape not in self._fingerprints:
            self._fingerprints[input_shape] = device_fingerprint(
                self.device,
                self.threads,
                self.batch_size,
                self.dtype,
                input_shape,
                device_class=self.device_class,
                fresh_process=self.fresh_process,
            )
        return self._fingerprints[input_shape]

    def _model(self, spec: ArchSpec) -> nn.Module:
        """The built model for `spec`, from a small LRU so the reference is built once."""
        model = self._models.get(spec.hash)
        if model is None:
            model = self._on_device(self.build(spec))
            self._models[spec.hash] = model
            if len(self._models) > self._models_kept:
                self._models.popitem(last=False)
        else:
            self._models.move_to_end(spec.hash)
        return model

    def _input(self, spec: ArchSpec) -> torch.Tensor:
        return timing_input(
            self.batch_size,
            spec.input_shape,
            dtype=DTYPES[self.dtype],
            device=self.device,
            token_range=spec.token_range,
        )
