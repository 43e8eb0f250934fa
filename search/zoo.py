"""Builtin models for small images (8 to 32 px), sized to train in about a minute on a CPU.

Every model uses plain `nn` modules and `x + y` residuals so that torch-pruning can trace and
prune it, ends with adaptive average pooling and an `nn.Linear` classifier, and accepts any
number of input channels and classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class VGG(nn.Module):
    """Plain VGG-like CNN: conv-bn-relu stacks separated by max-pools."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, 32),
            nn.MaxPool2d(2),
            _conv_bn_relu(32, 64),
            nn.MaxPool2d(2),
            _conv_bn_relu(64, 128),
            _conv_bn_relu(128, 128),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual add; a 1x1 conv shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """Small ResNet: a 3x3 stem and three stages of BasicBlocks; stages 2 and 3 downsample."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        blocks_per_stage: tuple[int, int, int] = (1, 1, 1),
        widths: tuple[int, int, int] = (24, 48, 96),
    ) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(in_channels, widths[0])
        stages = []
        previous = widths[0]
        for index, (width, repeats) in enumerate(zip(widths, blocks_per_stage, strict=True)):
            blocks = []
            for block in range(repeats):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(previous, width, stride))
                previous = width
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.classifier(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion, 3x3 depthwise, linear 1x1 projection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [
                nn.Conv2d(in_channels, hidden, 1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU6(inplace=True),
            ]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.block(x)
        return self.block(x)


class MobileNetV2(nn.Module):
    """MobileNetV2-like network scaled down for small images."""

    # (expansion, out_channels, repeats, first stride)
    # Few, wide blocks at full resolution: at batch 1 on small images every extra layer adds
    # fixed per-op time that no channel pruning can remove.
    SETTINGS: tuple[tuple[int, int, int, int], ...] = (
        (1, 16, 1, 1),
        (6, 32, 2, 2),
        (6, 64, 2, 1),
    )

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        stem_width, head_width = 16, 128
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_width, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU6(inplace=True),
        )
        blocks: list[nn.Module] = []
        previous = stem_width
        for expansion, width, repeats, first_stride in self.SETTINGS:
            for repeat in range(repeats):
                stride = first_stride if repeat == 0 else 1
                blocks.append(InvertedResidual(previous, width, stride, expansion))
                previous = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Conv2d(previous, head_width, 1, bias=False),
            nn.BatchNorm2d(head_width),
            nn.ReLU6(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head_width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


def vgg(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """VGG-like CNN, widths 32-64-128."""
    return VGG(num_classes, in_channels)


def resnet(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """ResNet with one BasicBlock in each of its three stages, widths 24-48-96."""
    return ResNet(num_classes, in_channels)


def mobilenetv2(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """MobileNetV2-like network with inverted residual blocks."""
    return MobileNetV2(num_classes, in_channels)


@dataclass(frozen=True)
class BuiltinModel:
    """A builtin model: its registry name, family, one-line description and constructor."""

    name: str
    family: str
    description: str
    constructor: Callable[[int, int], nn.Module]


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        BuiltinModel(
            "vgg",
            "vgg",
            "plain CNN, conv-bn-relu stacks with max-pools, widths 32-64-128",
            vgg,
        ),
        BuiltinModel(
            "resnet",
            "resnet",
            "ResNet, 3 stages of one BasicBlock with residual adds, widths 24-48-96",
            resnet,
        ),
        BuiltinModel(
            "mobilenetv2",
            "mobilenet",
            "MobileNetV2-like, inverted residuals (expansion 6) with depthwise 3x3 convs, "
            "widths 16-64",
            mobilenetv2,
        ),
    )
}


def builtin_names() -> list[str]:
    """Names of the builtin models, in registry order."""
    return list(BUILTIN_MODELS)
