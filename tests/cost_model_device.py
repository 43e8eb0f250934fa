"""A device as a cost model: latency known exactly for every width, for tests of the engine's
logic that must not depend on how noisy this machine's timing is."""

from __future__ import annotations

import math
from typing import Any

from search.arch_spec import ArchSpec
from search.interfaces import LatencyMeasurement, TimingStats


class BlockedConvDevice:
    """A latency oracle for a device whose convolutions take time in proportion to their input
    and output channels, each rounded up to a multiple of `block` (1: no blocks). It reports
    `reported_block` as its channel block, as a real device reports its own (none by default).

    With `launch_share`, it is a GPU whose host takes that share of the unpruned model's time
    to launch any model's kernels: a run takes the longer of its launches and its kernels.
    `gpu` names the GPU in its fingerprint, as a local GPU's does."""

    def __init__(
        self,
        block: int,
        reported_block: int | None = None,
        launch_share: float | None = None,
        gpu: str | None = None,
    ) -> None:
        self.block = block
        self.reported_block = reported_block
        self.launch_share = launch_share
        self.gpu = gpu

    def cost_ms(self, spec: ArchSpec) -> float:
        def blocks(channels: int) -> int:
            return math.ceil(channels / self.block) * self.block

        convs = [shape for shape in spec.layers.values() if len(shape) == 3]
        return sum(blocks(c_in) * blocks(c_out) for c_in, c_out, _ in convs) / 1000.0

    def _stats(self, spec: ArchSpec, reference: ArchSpec) -> TimingStats:
        ms, launch_ms = self.cost_ms(spec), None
        if self.launch_share is not None:
            launch_ms = self.launch_share * self.cost_ms(reference)
            ms = max(ms, launch_ms)
        return TimingStats(
            median_ms=ms, p90_ms=ms, iqr_ms=0.0, cv=0.0, n=1, mean_ms=ms, launch_ms=launch_ms
        )

    def fingerprint(self) -> dict[str, Any]:
        fingerprint = {
            "device_class": f"blocked-conv-{self.block}",
            "channel_block": self.reported_block,
        }
        return {**fingerprint, "gpu": self.gpu} if self.gpu else fingerprint

    def measure_reference(
        self, reference: ArchSpec, *, confirm: bool = False, refresh: bool = False
    ) -> TimingStats:
        return self._stats(reference, reference)

    def offer_model(self, spec: ArchSpec, model: Any) -> None:
        pass

    def measure(
        self, candidate: ArchSpec, reference: ArchSpec, *, confirm: bool = False
    ) -> LatencyMeasurement:
        candidate_stats = self._stats(candidate, reference)
        reference_stats = self._stats(reference, reference)
        return LatencyMeasurement(
            arch_hash=candidate.hash,
            ratio=candidate_stats.median_ms / reference_stats.median_ms,
            candidate=candidate_stats,
            reference=reference_stats,
            fingerprint=self.fingerprint(),
        )
