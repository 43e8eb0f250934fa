"""Milliseconds saved per channel, estimated from the measurements made so far in a job.

Each measured probe tells how many MACs a move removed and how many ms that saved. The
ratio ms/MAC is fitted per network region (from focused moves) and over the whole network
(from every move); where a region has no measurement yet, the network-wide ratio stands in,
and before any measurement the baseline's own ms/MAC does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from search.pruning import ChannelGroup


@dataclass(frozen=True)
class Observation:
    """One measured pruning step: a parent and a probe child of it."""

    region: str | None
    macs_removed: float
    ms_saved: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LatencyEstimate:
    """ms saved per MAC removed, by region."""

    def __init__(
        self, baseline_ms: float, baseline_macs: float, observations: Iterable[Observation] = ()
    ) -> None:
        useful = [o for o in observations if o.macs_removed > 0]
        prior = baseline_ms / max(baseline_macs, 1.0)
        self.network_ms_per_mac = _ratio(useful, prior)
        by_region: dict[str, list[Observation]] = {}
        for observation in useful:
            if observation.region is not None:
                by_region.setdefault(observation.region, []).append(observation)
        self._region_ms_per_mac = {
            region: _ratio(items, self.network_ms_per_mac) for region, items in by_region.items()
        }

    def ms_per_mac(self, region: str | None) -> float:
        if region is None:
            return self.network_ms_per_mac
        return self._region_ms_per_mac.get(region, self.network_ms_per_mac)

    def ms_per_channel(self, group: ChannelGroup) -> float:
        """Predicted ms one channel of `group` costs."""
        return group.macs_per_channel * self.ms_per_mac(group.region)


def _ratio(observations: list[Observation], prior: float) -> float:
    """Pooled ms/MAC, shrunk toward the prior by one pseudo-observation; never below 1 % of it."""
    if not observations:
        return prior
    macs = sum(o.macs_removed for o in observations)
    ms = sum(o.ms_saved for o in observations)
    pseudo_macs = macs / (len(observations) + 1)
    estimate = (ms + prior * pseudo_macs) / (macs + pseudo_macs)
    return max(estimate, prior * 0.01)
