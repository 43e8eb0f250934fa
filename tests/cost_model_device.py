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
    `reported_block` as its channel block, as a real device reports its own (none by default)."""

    def __init__(self, block: int, reported_block: int | None = None) -> None:
        self.block = block
        self.reported_block = reported_block

    def cost_ms(self, spec: ArchSpec) -> float:
        def blocks(channels: int) -> int:
            return math.ceil(channels / self.block) * self.block

        convs = [shape for shape in spec.layers.values() if len(shape) == 3]
        return sum(blocks(c_in) * blocks(c_out) for c_in, c_out, _ in convs) / 1000.0

    def _stats(self, spec: ArchSpec) -> TimingStats:
        ms = self.cost_ms(spec)
        return TimingStats(median_ms=ms, p90_ms=ms, iqr_ms=0.0, cv=0.0, n=1, mean_ms=ms)

    def fingerprint(self) -> dict[str, Any]:
        return {"device_class": f"blocked-conv-{self.block}", "channel_block": self.reported_block}

    def measure_reference(self, reference: ArchSpec, *, confirm: bool = False) -> TimingStats:
        return self._stats(reference)

    def offer_model(self, spec: ArchSpec, model: Any) -> None:
        pass

    def measure(
        self, candidate: ArchSpec, reference: ArchSpec, *, confirm: bool = False
    ) -> LatencyMeasurement:
        return LatencyMeasurement(
            arch_hash=candidate.hash,
            ratio=self.cost_ms(candidate) / self.cost_ms(reference),
            candidate=self._stats(candidate),
            reference=self._stats(reference),
            fingerprint=self.fingerprint(),
        )
