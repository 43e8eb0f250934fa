"""The architecture spec: a compact, pickle-free description of a pruned model.

A spec names the base model (its source, classes, input channels), the input shape, and the
shape of every layer whose width pruning can change. From it, any process that can build the
base model rebuilds the pruned architecture; a plain state dict then gives identical outputs.
Its hash keys the latency cache, and device agents receive candidates as specs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import nn

from search.errors import ArchtreeError
from search.model_source import ModelRef, build_model

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def layer_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Width-bearing shape of every conv, linear and normalisation layer."""
    shapes: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            shapes[name] = [module.in_channels, module.out_channels, module.groups]
        elif isinstance(module, nn.Linear):
            shapes[name] = [module.in_features, module.out_features]
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            shapes[name] = [module.num_features]
        elif isinstance(module, nn.GroupNorm):
            shapes[name] = [module.num_channels]
        elif isinstance(module, nn.LayerNorm):
            shapes[name] = list(module.normalized_shape)
    return shapes


@dataclass(frozen=True)
class ArchSpec:
    """Base model reference plus per-layer widths."""

    model: ModelRef
    input_shape: tuple[int, ...]
    layers: dict[str, list[int]]
    # A model that takes token ids: it is timed on ids below this (search.timing_input).
    token_range: int | None = None

    def to_dict(self) -> dict[str, Any]:
        spec = {
            "model": self.model.to_dict(),
            "input_shape": list(self.input_shape),
            "layers": self.layers,
        }
        if self.token_range is not None:  # left out otherwise: the hashes of float models stay
            spec["token_range"] = self.token_range
        return spec

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchSpec:
        """The spec `data` describes; ValueError saying what is wrong with it, where it is not
        an object of a model, an input shape and layers of positive sizes."""
        if not isinstance(data, dict):
            raise ValueError(f"it holds a JSON {_json_kind(data)}, not an object")
        if not isinstance(data.get("model"), dict):
            raise ValueError("its `model` is not an object of source, num_classes, in_channels")
        layers = data.get("layers")
        if not isinstance(layers, dict):
            raise ValueError(f"its `layers` is a JSON {_json_kind(layers)}, not an object")
        token_range = data.get("token_range")
        return cls(
            model=ModelRef.from_dict(data["model"]),
            input_shape=_sizes(data.get("input_shape"), "its `input_shape`"),
            layers={
                str(k): list(_sizes(shape, f"the shape of layer {k!r}"))
                for k, shape in layers.items()
            },
            token_range=None if token_range is None else int(token_range),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ArchSpec:
        return cls.from_dict(json.loads(text))

    @cached_property
    def hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def width(self, layer: str) -> int:
        """Output width of a conv or linear layer."""
        return self.layers[layer][1]

    def __hash__(self) -> int:
        return hash(self.hash)


def _json_kind(value: Any) -> str:
    kinds = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(value), "number")


def _sizes(value: Any, what: str) -> tuple[int, ...]:
    """`value` as sizes: a list of whole numbers of 1 or more; ValueError naming `what`."""
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value
    ):
        raise ValueError(f"{what} is {json.dumps(value)[:60]}, not a list of sizes of 1 or more")
    return tuple(value)


def spec_of(
    model: nn.Module,
    ref: ModelRef,
    input_shape: tuple[int, ...],
    token_range: int | None = None,
) -> ArchSpec:
    return ArchSpec(
        model=ref,
        input_shape=tuple(input_shape),
        layers=layer_shapes(model),
        token_range=token_range,
    )


def build_from_spec(spec: ArchSpec) -> nn.Module:
    """Rebuild the architecture a spec describes (random weights), through torch-pruning."""
    from search.pruning import PrunableModel

    model = build_model(spec.model)
    example = torch.zeros(1, *spec.input_shape, dtype=torch.long if spec.token_range else None)
    pruner = PrunableModel(model, example, min_width_fraction=0.0)
    removals = {}
    for group in pruner.groups:
        if group.name not in spec.layers:
            continue
        wanted = spec.width(group.name)
        if wanted < group.size:
            removals[group.name] = range(wanted, group.size)
    pruner.remove(removals)
    rebuilt = layer_shapes(model)
    if rebuilt != spec.layers:
        different = [k for k in spec.layers if rebuilt.get(k) != spec.layers[k]][:3]
        raise ArchtreeError(
            f"the architecture spec does not match the code of {spec.model.source} "
            f"(layers {', '.join(different) or 'names'} differ): rebuild it with the same "
            "model code that produced it."
        )
    return model.eval()
