"""The input every model is timed on.

A timing needs an input of the model's shape, not data: a device agent has only the
architecture spec. So models are timed on standard normal values, the same ones on every run
and device (seed 0), and a model must run on them as well as on its data, which loading
checks (`search.inputs.check_forward`). A model that looks its inputs up in an embedding
takes token ids instead: it is timed on ids drawn uniformly below its `token_range`, which
its spec carries to agents.
"""

from __future__ import annotations

import torch
from torch import nn

# How a timing's input is described to a user whose model fails on it.
DESCRIPTION = "random standard normal values, which latency is timed on"
TOKEN_DESCRIPTION = "random token ids below {}, which latency is timed on"


def timing_input(
    batch_size: int,
    input_shape: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    token_range: int | None = None,
) -> torch.Tensor:
    """A batch of `batch_size` inputs of `input_shape` as every timing feeds them: floats of
    `dtype`, or with `token_range`, int64 token ids in [0, token_range) whatever `dtype`."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch_size, *input_shape)
    if token_range is not None:
        return torch.randint(0, token_range, shape, generator=generator).to(device=device)
    return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)


def embedding_sizes(model: nn.Module) -> list[int]:
    """How many entries each embedding of `model` has; none: it takes no token ids."""
    return [
        module.num_embeddings
        for module in model.modules()
        if isinstance(module, nn.Embedding | nn.EmbeddingBag)
    ]


def token_range_of(model: nn.Module) -> int:
    """The ids every embedding of `model` can look up: below the smallest one's size."""
    return min(embedding_sizes(model))


def embeds_inputs(model: nn.Module) -> bool:
    """Whether `model` has an embedding, and may take token ids."""
    return bool(embedding_sizes(model))
