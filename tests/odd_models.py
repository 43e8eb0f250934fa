"""Models whose channels torch-pruning alone cannot narrow soundly, as `module:` sources of the
tests (module:tests.odd_models:NAME): grouped convolutions, GroupNorm, and forward passes that
depend on channel counts; and a model whose weights pruning would lay out differently."""

from __future__ import annotations

import torch
from torch import nn


def grouped() -> nn.Module:
    """A convolution in 4 groups between two prunable ones."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


def group_norm_only() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


def group_norm_per_channel() -> nn.Module:
    """A GroupNorm with a group per channel: its channels can only all stay."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.GroupNorm(32, 32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


def group_norm_net() -> nn.Module:
    """Two convolutions, each normalised by a GroupNorm of its own number of groups."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
        nn.Conv2d(32, 48, 3, padding=1), nn.GroupNorm(4, 48), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10),
    )  # fmt: skip


class PatchAttention(nn.Module):
    """A tiny vision transformer: 2x2 patches of width `dim`, one attention of `heads` heads
    and an MLP, both residual, a mean over the patches and a linear head."""

    def __init__(self, dim: int = 40, heads: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 2, 2)
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        h = self.norm1(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


def patch_attention() -> nn.Module:
    return PatchAttention()


def attention_head_per_channel() -> nn.Module:
    return PatchAttention(dim=8, heads=8)


def tied_weights() -> nn.Module:
    """Two convolutions sharing one weight tensor, between two that share nothing."""
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(),
        nn.Conv2d(24, 24, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10),
    )  # fmt: skip
    model[4].weight = model[2].weight
    return model


class ConcatenationAdded(nn.Module):
    """Two convolutions' outputs concatenated and added to a third's, which a head follows:
    the sum's channels come from the concatenation's parts, each of which must keep some."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 16, 3, padding=1)
        self.b = nn.Conv2d(1, 8, 3, padding=1)
        self.residual = nn.Conv2d(24, 24, 3, padding=1)
        self.head = nn.Sequential(
            nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.a(x), self.b(x)], 1)
        return self.head(x + torch.relu(self.residual(x)))


def concatenation_added() -> nn.Module:
    return ConcatenationAdded()


class FixedView(nn.Module):
    """Reshapes with a fixed size: its second convolution's channels cannot change."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b(torch.relu(self.a(x))))
        return self.head(x.view(x.size(0), 32 * 8 * 8))


def fixed_view() -> nn.Module:
    return FixedView()


class ChecksEveryWidth(nn.Module):
    """Asserts its channel counts: nothing in it can be narrowed."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.a(x))
        b = torch.relu(self.b(a))
        assert a.shape[1] == 32 and b.shape[1] == 32, "unexpected width"
        return self.head(b.mean((2, 3)))


def checks_every_width() -> nn.Module:
    return ChecksEveryWidth()


class NeedsSomeWidth(ChecksEveryWidth):
    """Works with either convolution narrowed, not with both."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.a(x))
        b = torch.relu(self.b(a))
        assert a.shape[1] + b.shape[1] > 30, "too narrow"
        return self.head(b.mean((2, 3)))


def needs_some_width() -> nn.Module:
    return NeedsSomeWidth()


class EvenWidthsOnly(ChecksEveryWidth):
    """Runs at its narrowest (4 channels), not at an odd width."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.a(x))
        assert a.shape[1] % 2 == 0, "odd width"
        return self.head(torch.relu(self.b(a)).mean((2, 3)))


def even_widths_only() -> nn.Module:
    return EvenWidthsOnly()


def channels_last_mobilenetv2() -> nn.Module:
    """The builtin MobileNetV2 converted to the channels-last layout, as users speed it up."""
    from search.zoo import mobilenetv2

    return mobilenetv2().to(memory_format=torch.channels_last)


def scripted_vgg() -> nn.Module:
    """The builtin VGG as TorchScript: timed as it is, never pruned."""
    from search.zoo import vgg

    return torch.jit.script(vgg())


class FusedQkvAttention(nn.Module):
    """A tiny vision transformer whose attention is written as timm writes it: one linear layer
    for queries, keys and values, reshaped into heads by fixed sizes."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.head_width = heads, dim // heads
        self.patch = nn.Conv2d(1, dim, 2, 2)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_width)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, tokens, width))
        x = x + self.mlp(x)
        return self.head(x.mean(1))


def fused_qkv_attention() -> nn.Module:
    return FusedQkvAttention()


class FeatureMapLayerNorm(nn.Module):
    """A LayerNorm over a whole feature map (channels, height, width) after a convolution:
    torch-pruning narrows its last dimension, the width, as if it were the channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 32, 3, padding=1)
        self.norm = nn.LayerNorm([32, 8, 8])
        self.mix = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.mix(torch.relu(self.norm(self.conv(x)))))
        return self.head(x.mean((2, 3)))


def feature_map_layer_norm() -> nn.Module:
    return FeatureMapLayerNorm()


class LengthLayerNorm(nn.Module):
    """A LayerNorm over a sequence's length (8, the rows of an 8x8 image read as a sequence)
    after a 1-d convolution of 16 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, 16, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.mix = nn.Conv1d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.mix(torch.relu(self.norm(self.conv(x.flatten(1, 2))))))
        return self.head(x.mean(2))


def length_layer_norm() -> nn.Module:
    return LengthLayerNorm()


class NanForBrightPixels(nn.Module):
    """Finite weights, and a forward that makes NaN where an input's centre pixel is bright."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.features(x))
        return torch.where(x[:, :1, 4, 4] > 0.5, torch.full_like(out, float("nan")), out)


def nan_for_bright_pixels() -> nn.Module:
    return NanForBrightPixels()
