"""A job's inputs, loaded and checked together: the data, the model, its weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from search.data_source import DataSplits, load_data
from search.errors import ArchtreeError
from search.model_source import ModelRef, build_model, load_weights


@dataclass
class JobInputs:
    model_ref: ModelRef
    model: nn.Module
    data: DataSplits


def load_inputs(
    model_source: str,
    data_source: str,
    *,
    weights: str | None = None,
    allow_pickle: bool = False,
    num_classes: int | None = None,
    seed: int = 0,
) -> JobInputs:
    """Load data and model, apply the weights, and check one sample runs forward."""
    data = load_data(data_source, seed=seed)
    classes = num_classes or data.num_classes or 10
    ref = ModelRef(source=model_source, num_classes=classes, in_channels=data.input_shape[0])
    torch.manual_seed(seed)
    model = build_model(ref)
    if weights:
        load_weights(model, weights, allow_pickle=allow_pickle)
    model.eval()
    check_forward(model, data, model_source, data_source)
    return JobInputs(model_ref=ref, model=model, data=data)


def check_forward(model: nn.Module, data: DataSplits, model_source: str, data_source: str) -> None:
    sample = data.calib_x[:2]
    try:
        with torch.inference_mode():
            output = model(sample)
    except Exception as error:  # any failure here means the model rejects this input
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ArchtreeError(
            f"The model {model_source} rejects inputs of shape {tuple(sample.shape[1:])} from "
            f"{data_source} ({detail}): give data of the shape the model expects."
        ) from None
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        raise ArchtreeError(
            f"The model {model_source} must return a (batch, classes) tensor of logits; it "
            f"returned {type(output).__name__} {tuple(getattr(output, 'shape', ()))}."
        )
    if data.labelled and output.shape[1] < (data.num_classes or 0):
        raise ArchtreeError(
            f"{data_source} has {data.num_classes} classes but the model {model_source} outputs "
            f"{output.shape[1]}: give weights for a model with {data.num_classes} outputs."
        )
