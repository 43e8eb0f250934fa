"""The builtin models build, run on small images and can be pruned by torch-pruning."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from search.zoo import BUILTIN_MODELS, builtin_names


def test_registry_lists_the_builtin_models() -> None:
    assert {"vgg", "resnet", "mobilenetv2"} <= set(builtin_names())
    assert builtin_names() == list(BUILTIN_MODELS)
    for name, entry in BUILTIN_MODELS.items():
        assert entry.name == name
        assert entry.family and entry.description


@pytest.mark.parametrize("name", builtin_names())
@pytest.mark.parametrize(("in_channels", "size"), [(1, 28), (3, 28), (1, 8), (3, 8), (3, 32)])
def test_builds_and_forwards(name: str, in_channels: int, size: int) -> None:
    model = BUILTIN_MODELS[name].constructor(7, in_channels).eval()
    with torch.inference_mode():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    assert isinstance(_classifier(model), nn.Linear)


@pytest.mark.parametrize("name", builtin_names())
@pytest.mark.parametrize(("in_channels", "size"), [(1, 28), (3, 8)])
def test_prunable_by_torch_pruning(name: str, in_channels: int, size: int) -> None:
    model = BUILTIN_MODELS[name].constructor(10, in_channels).eval()
    example = torch.randn(1, in_channels, size, size)
    tp.DependencyGraph().build_dependency(model, example_inputs=example)
    params_before = sum(p.numel() for p in model.parameters())
    pruner = tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[_classifier(model)],
    )
    pruner.step()
    params_after = sum(p.numel() for p in model.parameters())
    assert params_after < 0.6 * params_before
    with torch.inference_mode():
        out = model(torch.randn(3, in_channels, size, size))
    assert out.shape == (3, 10)


def test_mobilenet_uses_depthwise_convs_and_residual_adds() -> None:
    model = BUILTIN_MODELS["mobilenetv2"].constructor(10, 1)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert any(c.groups == c.in_channels > 1 for c in convs)
    assert any(getattr(m, "use_residual", False) for m in model.modules())


def test_construction_is_deterministic_under_a_seed() -> None:
    torch.manual_seed(3)
    first = BUILTIN_MODELS["resnet"].constructor(10, 1).state_dict()
    torch.manual_seed(3)
    second = BUILTIN_MODELS["resnet"].constructor(10, 1).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def _classifier(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
