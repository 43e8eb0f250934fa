"""Device fingerprint: what a latency measurement is valid for."""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from latency.allocator import steady_allocator
from latency.cache import cache_key
from search.code_identity import code_identity

if TYPE_CHECKING:
    from search.arch_spec import ArchSpec


def device_fingerprint(
    device: str,
    threads: int,
    batch_size: int,
    dtype: str,
    input_shape: tuple[int, ...] | None,
    device_class: str | None = None,
    fresh_process: bool = False,
) -> dict[str, Any]:
    """Device class, host, hardware, runtime and versions, threads, allocator, batch, dtype,
    input shape, the channel block of the device's kernels (`channel_block`) and whether
    each timing ran in a fresh process (`process`: "fresh" or "shared").

    `device` is a torch device string ("cpu", "cuda"); `device_class` names the target
    (defaults to "local" for the CPU and "local:<device>" otherwise).
    """
    if device_class is None:
        device_class = "local" if device == "cpu" else f"local:{device}"
    fingerprint: dict[str, Any] = {
        "device_class": device_class,
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "runtime": "torch",
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "threads": threads,
        "allocator": steady_allocator(),
        "batch_size": batch_size,
        "dtype": dtype,
        "input_shape": list(input_shape) if input_shape is not None else None,
        "channel_block": channel_block(device),
        "process": "fresh" if fresh_process else "shared",
    }
    if device.startswith("cuda"):
        fingerprint["gpu"] = torch.cuda.get_device_name(device)
    return fingerprint


def fingerprint_key(fingerprint: dict[str, Any]) -> str:
    """A stable 16-hex-digit key for a fingerprint (sha256 of its canonical JSON)."""
    canonical = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def timing_key(
    fingerprint: dict[str, Any], candidate: ArchSpec, reference: ArchSpec, kind: str, confirm: bool
) -> str | None:
    """The latency cache's key of one timing of `candidate` against `reference` on the device
    of `fingerprint`. It holds the model's code too (as this process has it): a spec names
    the layers' widths, not what the forward does. None where that code cannot be read (a
    module imported from a zip archive): such a timing is neither kept nor reused, as it
    could not be told from one of other code. Confirmations are kept apart, so that a
    confirm request always gets the longer timing."""
    code = code_identity(reference.model.source)
    if code is None:
        return None
    device = {**fingerprint, "code": code}
    full_kind = f"{kind}-confirm" if confirm else kind
    return cache_key(fingerprint_key(device), candidate.hash, reference.hash, full_kind)


# Channels a CPU convolution kernel computes together, by the vector extension torch dispatches
# to: one 512-bit or 256-bit register of float32 (oneDNN's nChw16c and nChw8c layouts).
_CPU_CHANNEL_BLOCKS = {"AVX512": 16, "AVX2": 8}


def channel_block(device: str) -> int | None:
    """How many channels the device's convolution kernels compute at once, where known: a
    group of 17 channels then takes as long as one of 32 on an AVX-512 CPU. None for GPUs
    and CPUs without a known block (the search then assumes 8)."""
    if device != "cpu":
        return None
    return _CPU_CHANNEL_BLOCKS.get(torch.backends.cpu.get_cpu_capability())


@functools.cache
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
