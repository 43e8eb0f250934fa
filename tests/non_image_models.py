"""Models of inputs other than images, as `module:` sources of the tests
(module:tests.non_image_models:NAME): sequences (N,C,L), feature vectors (N,F) and token ids
(N,L), which Archtree cannot time."""

from __future__ import annotations

import torch
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


class TokenNet(nn.Module):
    """A text classifier: 12 token ids of a 100-word vocabulary, embedded and averaged."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(100, 32)
        self.head = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 3))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(tokens).mean(1))


class TokenNetOfFloats(TokenNet):
    """The same, given its token ids as floats: runs on its data, not on random values."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens.long())


def token_net() -> nn.Module:
    return TokenNet()


def token_net_of_floats() -> nn.Module:
    return TokenNetOfFloats()
