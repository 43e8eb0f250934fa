"""Models of inputs other than images, as `module:` sources of the tests
(module:tests.non_image_models:NAME): sequences (N,C,L), feature vectors (N,F) and token ids
(N,L)."""

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


class TokenConvNet(nn.Module):
    """A text classifier: token ids of a 100-word vocabulary, embedded, then 1-D convolutions
    over the sequence, 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(100, 32)
        self.convs = nn.Sequential(
            nn.Conv1d(32, 192, 3, padding=1), nn.BatchNorm1d(192), nn.ReLU(),
            nn.Conv1d(192, 192, 3, padding=1), nn.BatchNorm1d(192), nn.ReLU(),
            nn.AdaptiveMaxPool1d(1), nn.Flatten(), nn.Linear(192, 3),
        )  # fmt: skip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.convs(self.embedding(tokens).transpose(1, 2))


def token_conv_net() -> nn.Module:
    return TokenConvNet()


def token_data(samples: int = 900, length: int = 64, seed: int = 0) -> tuple:
    """Token ids (N, length) below 100 and labels 0..2: a sample's class is the one of the
    three keywords (ids 1, 2 and 3) it holds, among random words 10..99."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(10, 100, (samples, length), generator=generator)
    y = torch.arange(samples) % 3
    places = torch.randint(0, length, (samples,), generator=generator)
    x[torch.arange(samples), places] = y + 1
    return x, y


def trained_token_conv_net(steps: int = 150) -> nn.Module:
    """TokenConvNet trained on `token_data`."""
    torch.manual_seed(0)
    model = TokenConvNet()
    x, y = token_data()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = torch.arange(step * 64, step * 64 + 64) % len(x)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


class FeaturesWithEmbeddedPositions(nn.Module):
    """Feature vectors of 12 values (pixel counts, say: whole numbers), with an embedding of
    its own for the 4 positions it splits them into: it takes floats, not token ids."""

    def __init__(self) -> None:
        super().__init__()
        self.positions = nn.Embedding(4, 3)
        self.head = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        placed = x.view(-1, 4, 3) + self.positions(torch.arange(4, device=x.device))
        return self.head(placed.flatten(1))


def features_with_embedded_positions() -> nn.Module:
    return FeaturesWithEmbeddedPositions()


class TokenTransformer(nn.Module):
    """A text classifier: token ids of a 100-word vocabulary, embedded, one transformer
    encoder layer (its residual stream the embedding's width), averaged, 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(100, 64)
        self.encoder = nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, batch_first=True)
        self.head = nn.Linear(64, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embedding(tokens)).mean(1))


def token_transformer() -> nn.Module:
    return TokenTransformer()
