"""The input every model is timed on.

A timing needs an input of the model's shape, not data: a device agent has only the
architecture spec. So models are timed on standard normal values, the same ones on every run
and device (seed 0), and a model must run on them as well as on its data, which loading
checks (`search.inputs.check_forward`).
"""

from __future__ import annotations

import torch

# How a timing's input is described to a user whose model fails on it.
DESCRIPTION = "random standard normal values, which latency is timed on"


def timing_input(
    batch_size: int,
    input_shape: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """A batch of `batch_size` inputs of `input_shape` as every timing feeds them."""
    values = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0))
    return values.to(dtype=dtype, device=device)
