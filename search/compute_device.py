"""Where fine-tuning and scoring run: this machine's CPU or one of its CUDA GPUs.

Latency is measured wherever the oracle measures it; this is only where candidates are
trained and scored. Models and data stay on the CPU between those steps (pruning, timing and
saving work on CPU tensors): a fine-tune moves its model to the device and back, and scoring
runs a copy there, batch by batch.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from search.device_names import TRAIN_DEVICE_FORMS, train_device_name

CPU = torch.device("cpu")


class UnknownDevice(ValueError):
    """A training device that is malformed or absent here; the message says what to give."""


def check_train_device_form(value: str) -> str:
    """`value` stripped and lower-cased if it is one of TRAIN_DEVICE_FORMS, without asking
    torch whether the device is there (a worker's main process must not start CUDA before
    its pool forks)."""
    text = train_device_name(value)
    if text is None:
        raise UnknownDevice(f"{value!r} is not a training device: give {TRAIN_DEVICE_FORMS}")
    if text.startswith("cuda") and not torch.backends.cuda.is_built():
        raise UnknownDevice(
            f"{text}: this torch is a CPU-only build ({torch.__version__}); install a CUDA build "
            "of torch to fine-tune on a GPU, or give cpu"
        )
    return text


def resolve_train_device(value: str) -> torch.device:
    """The device `value` names: `auto` is the first CUDA GPU when torch sees one, else the
    CPU. UnknownDevice when a GPU is named that torch does not see."""
    text = check_train_device_form(value)
    if text == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else CPU
    if text == "cpu":
        return CPU
    device = torch.device(text if ":" in text else "cuda:0")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.index >= count:
        seen = f"it sees {count} (cuda:0 to cuda:{count - 1})" if count else "it sees none"
        raise UnknownDevice(f"{text}: torch sees no such CUDA GPU here, {seen}; or give cpu")
    return device


def describe_device(device: torch.device) -> str:
    """`cpu`, or `cuda:0 (NVIDIA H100 80GB HBM3)`."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def on_cpu(device: torch.device | None) -> bool:
    return device is None or device.type == "cpu"


@contextlib.contextmanager
def moved_to(model: nn.Module, device: torch.device | None) -> Iterator[nn.Module]:
    """`model` itself on `device` while the block runs (it is trained there), back on the CPU
    after, whatever happens."""
    if on_cpu(device):
        yield model
        return
    try:
        yield model.to(device)
    finally:
        model.to(CPU)


def copy_on(model: nn.Module, device: torch.device | None) -> nn.Module:
    """`model` itself on the CPU, else a copy of it on `device`: scoring a model shared by
    threads (the unpruned one) never moves it under them."""
    if on_cpu(device):
        return model
    return copy.deepcopy(model).to(device)
