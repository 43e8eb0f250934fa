"""The runtimes an agent times models with: the one list the agent and the API's device
registrations take their names from, so that a runtime is added here alone.

Each names its version and makes timers, which are LatencyOracle objects for one (batch size,
dtype). The torch runtime's timer is a LocalOracle; an ONNX Runtime or TorchScript one would be
another LatencyOracle. Nothing heavy is imported until a runtime is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from search.errors import ArchtreeError

if TYPE_CHECKING:
    from latency.harness import TimingSettings
    from search.interfaces import LatencyOracle


@dataclass(frozen=True)
class Runtime:
    """A way of running models: its version string and a factory of timers."""

    name: str
    version: Callable[[], str]
    make_timer: Callable[[str, int, int, str, TimingSettings | None], LatencyOracle]
    """(device_class, threads, batch_size, dtype, settings) -> timer."""


def _torch_version() -> str:
    import torch

    return torch.__version__


def _torch_timer(
    device_class: str, threads: int, batch_size: int, dtype: str, settings: TimingSettings | None
) -> LatencyOracle:
    from latency.local_oracle import LocalOracle
    from search.arch_spec import build_from_spec

    return LocalOracle(
        build_from_spec,
        device_class=device_class,
        threads=threads,
        batch_size=batch_size,
        dtype=dtype,
        settings=settings,
        fresh_process=True,
    )


RUNTIMES: dict[str, Runtime] = {"torch": Runtime("torch", _torch_version, _torch_timer)}


def get_runtime(name: str) -> Runtime:
    """The runtime called `name`, or ArchtreeError listing the supported ones."""
    try:
        return RUNTIMES[name]
    except KeyError:
        raise ArchtreeError(
            f"unsupported agent runtime {name!r}; supported runtimes: {', '.join(RUNTIMES)}"
        ) from None
