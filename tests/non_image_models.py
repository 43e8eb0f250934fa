"""Models of inputs other than images, as `module:` sources of the tests
(module:tests.non_image_models:NAME): sequences (N,C,L) and feature vectors (N,F)."""

from __future__ import annotations

from torch import nn


def sequence_net() -> nn.Module:
    """1-D convolutions over sequences of 4 channels, 3 classes."""
    return nn.Sequential(
        nn.Conv1d(4, 64, 5, padding=2), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Conv1d(64, 128, 5, padding=2), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Conv1d(128, 128, 3, padding=1), nn.BatchNorm1d(128), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(128, 3),
    )  # fmt: skip


def feature_net() -> nn.Module:
    """A multilayer perceptron on vectors of 12 features, 3 classes."""
    return nn.Sequential(
        nn.Linear(12, 256), nn.BatchNorm1d(256), nn.ReLU(),
        nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 3),
    )  # fmt: skip
