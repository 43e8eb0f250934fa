import copy

import pytest
import torch

from search.arch_spec import build_from_spec, spec_of
from search.model_source import ModelRef, build_model
from search.pruning import PrunableModel, keep_rounded, region_of
from search.zoo import BUILTIN_MODELS


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_groups_cover_every_prunable_width_and_removal_keeps_the_model_working(name, example_input):
    model = BUILTIN_MODELS[name].constructor(num_classes=10, in_channels=1).eval()
    pruner = PrunableModel(model, example_input)
    assert len(pruner.groups) >= 3
    assert pruner.ignored_layers == ["classifier"]
    importance = pruner.importance()
    for group in pruner.groups:
        assert importance[group.name].shape == (group.size,)
        assert importance[group.name].mean() == pytest.approx(1.0)
        assert group.macs_per_channel > 0
    # Remove the least important half of every group through torch-pruning.
    removals = {
        g.name: list(importance[g.name].argsort()[: g.removable // 2]) for g in pruner.groups
    }
    pruner.remove(removals)
    output = model(example_input)
    assert output.shape == (1, 10)
    rebuilt = PrunableModel(model, example_input)
    for group in rebuilt.groups:
        original = next(g for g in pruner.groups if g.name == group.name)
        assert group.size == original.size


def test_a_channels_last_model_stays_channels_last_when_pruned_and_rebuilt(example_input):
    ref = ModelRef("module:tests.odd_models:channels_last_mobilenetv2", 10, 1)
    model = build_model(ref).eval()

    def layouts(net):  # a 1x1 or depthwise kernel is contiguous in both: read the strides
        return [
            w.stride() == torch.empty(w.shape, memory_format=torch.channels_last).stride()
            for w in net.parameters()
            if w.dim() == 4 and w.shape[1] * w.shape[2] * w.shape[3] > 1
        ]

    channels_last = layouts(model)
    assert len(channels_last) > 10 and all(channels_last)
    pruner = PrunableModel(model, example_input)
    pruner.remove({g.name: range(g.removable // 2) for g in pruner.groups if g.removable > 1})
    assert layouts(model) == channels_last  # torch-pruning's copies are channels-first
    rebuilt = build_from_spec(spec_of(model, ref, (1, 28, 28)))
    assert layouts(rebuilt) == channels_last
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(rebuilt(example_input), model(example_input), atol=1e-5)


def test_removal_refuses_to_empty_a_group(example_input):
    model = BUILTIN_MODELS["vgg"].constructor().eval()
    pruner = PrunableModel(model, example_input)
    group = pruner.groups[0]
    with pytest.raises(ValueError):
        pruner.remove({group.name: list(range(group.size))})


def test_min_width_and_round_to(example_input):
    model = BUILTIN_MODELS["vgg"].constructor().eval()
    pruner = PrunableModel(copy.deepcopy(model), example_input, round_to=8, min_width_fraction=0.25)
    for group in pruner.groups:
        assert group.min_size >= 8
        assert group.min_size >= group.size * 0.25
    assert keep_rounded(64, 10, 8, 8) == 8  # keeps 56, a multiple of 8
    assert keep_rounded(64, 60, 8, 16) == 48  # never below the minimum width
    assert keep_rounded(64, 0, 8, 8) == 0


def test_regions_split_a_network_into_stages():
    names = ["stem.0", "stage1.0.conv1", "stage1.1.conv1", "stage2.0.conv1", "classifier"]
    regions = region_of(names)
    assert regions["stage1.0.conv1"] == regions["stage1.1.conv1"] == "stage1"
    assert len(set(regions.values())) == 4
    nested = region_of(["features.0.0", "features.1.conv.0", "features.2.conv.3"])
    assert nested["features.1.conv.0"] == "features.1"
    # Blocks kept in one container beside a stem and a head: each block its own region.
    blocks = [f"layers.{b}.conv{c}" for b in range(4) for c in (1, 2)]
    regions = region_of(["stem.0", *blocks, "head.0"])
    assert regions["layers.0.conv2"] == "layers.0" and regions["layers.3.conv1"] == "layers.3"
    assert len(set(regions.values())) == 6


def test_pruned_model_is_not_much_slower(example_input):
    import time

    model = BUILTIN_MODELS["resnet"].constructor().eval()
    pruned = copy.deepcopy(model)
    pruner = PrunableModel(pruned, example_input)
    importance = pruner.importance()
    pruner.remove(
        {g.name: list(importance[g.name].argsort()[: g.removable]) for g in pruner.groups}
    )

    def cost(m):
        with torch.inference_mode():
            for _ in range(5):
                m(example_input)
            start = time.perf_counter()
            for _ in range(30):
                m(example_input)
            return time.perf_counter() - start

    # A generous bound: timing here is noisy, but a model at minimum width is never 2x slower.
    assert cost(pruned) < 2.0 * cost(model)


@pytest.mark.parametrize("batch_first", [True, False])
def test_an_attentions_multiply_accumulates_are_counted_and_shrink_with_its_width(batch_first):
    """Its projections run without being called as modules, which hooks on them miss."""
    from search.pruning import least_important, output_positions, total_macs

    class Attending(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Linear(6, 32)
            self.attention = torch.nn.MultiheadAttention(32, 4, batch_first=batch_first)
            self.head = torch.nn.Linear(32, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 10 tokens, 6)
            tokens = self.embed(x) if batch_first else self.embed(x).transpose(0, 1)
            attended = tokens + self.attention(tokens, tokens, tokens, need_weights=False)[0]
            return self.head(attended.mean(1 if batch_first else 0))

    model, example = Attending().eval(), torch.zeros(1, 10, 6)
    positions = output_positions(model, example)
    assert positions["attention"] == 10
    # Per token: the embedding and head, 4 projections of 32x32, and 2 products over 10 tokens.
    assert total_macs(model, example) == 10 * 6 * 32 + 3 * 32 + 10 * 4 * 32 * 32 + 2 * 10 * 10 * 32
    pruner = PrunableModel(model, example, positions=positions)
    stream = next(g for g in pruner.groups if g.size == 32)
    assert stream.macs_per_channel > 10 * 4 * 32  # the attention's share counted in
    pruner.remove({stream.name: least_important(pruner.importance()[stream.name], 8, 4)})
    assert model.attention.embed_dim == 24
    assert total_macs(model, example) == 10 * 6 * 24 + 3 * 24 + 10 * 4 * 24 * 24 + 2 * 10 * 10 * 24


def test_a_transformer_encoder_layers_multiply_accumulates_are_counted():
    """In inference torch runs the whole layer as one fused kernel, which counted as nothing:
    a transformer's MACs were those of its embedding and head alone."""
    from search.pruning import total_macs

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Linear(6, 32)
            layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
            self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = torch.nn.Linear(32, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 10 tokens, 6)
            return self.head(self.encoder(self.embed(x)).mean(1))

    model, example = Encoder().eval(), torch.zeros(2, 10, 6)
    # Per layer and token: 4 projections of 32x32, 2 products over 10 tokens, the MLP's two.
    per_layer = 10 * 4 * 32 * 32 + 2 * 10 * 10 * 32 + 10 * 2 * 32 * 64
    assert total_macs(model, example) == 10 * 6 * 32 + 2 * per_layer + 3 * 32
    assert torch.backends.mha.get_fastpath_enabled()  # left as it was


class HandWrittenAttention(torch.nn.Module):
    """One head of attention over 10 tokens of 6 features, written out as timm's and many
    users' models write it: its products are matrix products, no module's."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        self.embed = torch.nn.Linear(6, 32)
        self.qkv = torch.nn.Linear(32, 96)
        self.head = torch.nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 10 tokens, 6)
        q, k, v = self.qkv(self.embed(x)).chunk(3, dim=-1)
        if self.fused:
            attended = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            attended = (q @ k.transpose(-2, -1) / 32**0.5).softmax(dim=-1) @ v
        return self.head(attended.mean(1))


@pytest.mark.parametrize("fused", [False, True])
def test_a_hand_written_attentions_products_are_counted(fused):
    from search.pruning import layer_macs, output_positions, total_macs

    model, example = HandWrittenAttention(fused).eval(), torch.zeros(2, 10, 6)
    layers = 10 * 6 * 32 + 10 * 32 * 96 + 3 * 32
    assert sum(layer_macs(model, output_positions(model, example)).values()) == layers
    # Per sample: the layers, then queries by keys and weights by values over 10 tokens.
    assert total_macs(model, example) == layers + 2 * 10 * 10 * 32


class TwoHeads(torch.nn.Module):
    """A classifier with an auxiliary head run after it, as users write them."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        )  # fmt: skip
        self.head = torch.nn.Linear(16, 10)
        self.aux = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return self.head(features), self.aux(features)


class MainLogits(torch.nn.Module):
    """The wrapper the tool's own message asks for: the main logits alone."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = TwoHeads()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)[0]


@pytest.mark.parametrize("frozen", [False, True])
def test_the_layer_the_output_comes_from_is_kept_not_the_last_to_run(frozen):
    """The auxiliary head, run last but dropped by the wrapper, was taken for the output
    layer, and the classifier was pruned to fewer classes."""
    from search.prunability import groups_kept_whole
    from search.pruning import least_important, output_layer_names, output_positions

    model, example = MainLogits().eval(), torch.zeros(1, 3, 8, 8)
    for parameter in model.parameters():
        parameter.requires_grad_(not frozen)
    assert output_layer_names(model, example) == ["inner.head"]
    positions = output_positions(model, example)
    # As a search prunes it: groups whose narrowing breaks the forward pass kept whole.
    kept = groups_kept_whole(model, example, positions, 1, 0.1, "module:two_heads")
    pruner = PrunableModel(model, example, min_width_fraction=0.1, kept_whole=kept)
    importance = pruner.importance()
    pruner.remove({g.name: least_important(importance[g.name], g.removable) for g in pruner.groups})
    assert model(example).shape == (1, 10)
    assert model.inner.head.out_features == 10


class NoBackward(torch.autograd.Function):
    """An inference-only kernel: it has no backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("inference only")


class TokensTwoHeads(torch.nn.Module):
    """Token ids in, an inference-only kernel inside, an auxiliary head run last and dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.body = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 10)
        self.aux = torch.nn.Linear(16, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        features = NoBackward.apply(self.body(self.embed(tokens))).mean(1)
        logits, _ = self.head(features), self.aux(features)
        return logits


def test_the_output_layer_is_found_without_running_backwards_whatever_requires_grad():
    """Found by running the output backwards, it failed on an operation without a backward
    and fell back to the last layer to run for integer inputs with frozen weights."""
    from search.pruning import output_layer_names

    model, tokens = TokensTwoHeads().eval(), torch.zeros(1, 6, dtype=torch.long)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    assert output_layer_names(model, tokens) == ["head"]
    with torch.inference_mode():
        assert output_layer_names(model, tokens) == ["head"]
    assert not any(p.requires_grad for p in model.parameters())  # left as they were


def test_the_two_counts_of_multiply_accumulates_agree_for_a_transposed_convolution():
    """Groups' shares came from positions of its outputs, four times its inputs at stride 2,
    while the nodes' counts (the latency estimate's other side) came from what ran."""
    from search.pruning import layer_macs, output_positions, total_macs

    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ConvTranspose2d(8, 4, 3, stride=2),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10),
    ).eval()  # fmt: skip
    example = torch.zeros(1, 1, 8, 8)
    per_layer = layer_macs(model, output_positions(model, example))
    assert per_layer[model[1]] == 8 * 8 * 8 * 4 * 9  # input positions x in x out x kernel
    assert sum(per_layer.values()) == total_macs(model, example)
