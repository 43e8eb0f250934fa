"""Coupled channel groups of a model, their importance, and channel removal.

All channel surgery goes through torch-pruning's dependency graph: removing channels of one
group also removes the coupled channels of every layer that depends on them (batch norms,
depthwise convs, residual adds, the next layer's inputs).
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from search.errors import ArchtreeError

PRUNABLE_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
# What taylor importance without labels is told (also before any timing: search.preflight).
TAYLOR_NEEDS_LABELS = (
    "taylor importance needs labelled data: use --importance l2, or give data with labels (y)."
)


@dataclass
class ChannelGroup:
    """One set of coupled channels, named after the layer whose output channels it roots."""

    name: str
    size: int
    min_size: int
    region: str
    macs_per_channel: float
    # Widths must stay multiples of this, with as many channels kept in each of as many equal
    # runs of channels: the groups of a GroupNorm the channels pass through (1: any width).
    multiple: int = 1

    @property
    def removable(self) -> int:
        return max(0, self.size - self.min_size)


def output_layer_names(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Names of the conv/linear layers that produce the model's output (never pruned): the
    last to run of those the output depends on. A layer run after it whose outputs the model
    drops (an auxiliary head a wrapper leaves out) is not one: taken for the output layer, it
    left the real classifier to be pruned, to fewer classes.

    What the output depends on is read from the autograd graph of one forward pass, walked
    from the output, never run backwards (an operation without a backward formula, as many
    inference kernels are, would fail); the weights are made to require grad meanwhile, so
    that frozen ones and integer inputs are followed too."""
    ran: list[tuple[str, object]] = []

    def record(name: str, output: object) -> None:
        # Its node now: an in-place operation after it gives the tensor another.
        ran.append((name, output.grad_fn if isinstance(output, torch.Tensor) else None))

    hooks = [
        module.register_forward_hook(lambda _m, _i, out, name=name: record(name, out))
        for name, module in model.named_modules()
        if isinstance(module, PRUNABLE_TYPES)
    ]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    try:
        for parameter in frozen:
            parameter.requires_grad_(True)
        with torch.inference_mode(False), torch.enable_grad():
            output = model(example_input.clone())
    finally:
        for hook in hooks:
            hook.remove()
        for parameter in frozen:
            parameter.requires_grad_(False)
    last = [name for name, _ in ran[-1:]]
    if not isinstance(output, torch.Tensor) or output.grad_fn is None:
        return last
    reached = _graph_nodes(output.grad_fn)
    used = [name for name, node in ran if node is not None and node in reached]
    return used[-1:] or last


def _graph_nodes(root: object) -> set[object]:
    """Every node of the autograd graph that leads to `root`, itself included."""
    seen, stack = {root}, [root]
    while stack:
        for parent, _ in stack.pop().next_functions:
            if parent is not None and parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def output_positions(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Output positions per sample (spatial size) of every conv and linear layer (input
    positions of a transposed convolution), and the tokens per sample of every attention, by
    name.

    Pruning changes channel counts, never positions, so one forward pass of the unpruned
    model gives what every pruned variant's MACs need.
    """
    positions: dict[str, int] = {}

    def record(name: str, module: nn.Module, inputs: tuple, output: torch.Tensor | tuple) -> None:
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            # Each input position is spread over the kernel: its MACs count by inputs.
            positions[name] = int(inputs[0].numel() // inputs[0].shape[0] // module.in_channels)
            return
        if isinstance(module, nn.MultiheadAttention):
            output = output[0]  # (tokens, batch, E), or (batch, tokens, E) with batch_first
            positions[name] = int(output.shape[-2] if module.batch_first else output.shape[0])
            return
        channels = module.out_channels if hasattr(module, "out_channels") else module.out_features
        positions[name] = int(output.numel() // output.shape[0] // channels)

    hooks = [
        module.register_forward_hook(lambda m, i, o, name=name: record(name, m, i, o))
        for name, module in model.named_modules()
        if isinstance(module, (*PRUNABLE_TYPES, nn.MultiheadAttention))
    ]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    return positions


def layer_macs(model: nn.Module, positions: Mapping[str, int]) -> dict[nn.Module, float]:
    """Multiply-accumulates per sample of every conv and linear layer, and of every attention
    (its input and output projections, which it runs without calling them as modules, and
    its products of queries with keys and of weights with values)."""
    macs: dict[nn.Module, float] = {}
    for name, module in model.named_modules():
        if name not in positions:
            continue
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            per_input = module.out_channels / module.groups * math.prod(module.kernel_size)
            macs[module] = positions[name] * module.in_channels * per_input
        elif isinstance(module, nn.modules.conv._ConvNd):
            per_output = module.in_channels / module.groups * math.prod(module.kernel_size)
            macs[module] = positions[name] * module.out_channels * per_output
        elif isinstance(module, nn.Linear):
            macs[module] = positions[name] * module.out_features * module.in_features
        elif isinstance(module, nn.MultiheadAttention):
            tokens, width = positions[name], module.embed_dim
            projections = tokens * width * (module.kdim + module.vdim + 2 * width)
            macs[module] = projections + 2 * tokens * tokens * width
    return macs


_FAST_PATH_SWITCH = threading.Lock()


def total_macs(model: nn.Module, example_input: torch.Tensor) -> float:
    """Multiply-accumulates per sample of one forward pass on `example_input`: of every
    convolution and matrix product torch runs (torch's FlopCounterMode counts them as they
    run), so that a hand-written attention's products of queries with keys and of weights
    with values count as an `nn.MultiheadAttention`'s do. Elementwise operations,
    normalisation and pooling are not counted. For the layers `layer_macs` knows it gives
    the same numbers."""
    # In inference torch runs `nn.MultiheadAttention`, and a whole `nn.TransformerEncoderLayer`,
    # as fused kernels, which FlopCounterMode has no formula for: counted on the path of their
    # separate products.
    # The switch is global: counts in threads at once (children evaluated in threads) take
    # turns, or one would restore the other's False and leave it off for good.
    with _FAST_PATH_SWITCH:
        fast_path = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with (
                torch.no_grad(),
                FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter,
            ):
                model(example_input)
        finally:
            torch.backends.mha.set_fastpath_enabled(fast_path)
    # A multiply-accumulate is two floating-point operations.
    return counter.get_total_flops() / 2 / max(1, len(example_input))


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *_args, **_kwargs) -> int:
    """Of scaled dot-product attention's CPU kernel, which FlopCounterMode has no formula
    for (its CUDA kernels' it has): the products of queries with keys and of weights with
    values, over (batch, heads, tokens, head width) shapes."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# What torch runs for attention on the CPU, counted as its other kernels are.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
}


def _out_width(module: nn.Module) -> int:
    return module.out_channels if hasattr(module, "out_channels") else module.out_features


def region_of(names: Sequence[str]) -> dict[str, str]:
    """Map each layer name to its network region (a stage or a block).

    Uses the coarsest level of the module hierarchy that splits the layers into at least
    three regions, none holding more than half of them, so `layer1.0.conv1` lands in `layer1`
    for a ResNet, `features.3.conv.0` in `features.3` for a net that keeps all its blocks in
    one `features` container, and `layers.3.conv1` in `layers.3` for one that keeps them in
    `layers` beside a `stem` and a `head`. Where no level spreads them so, the coarsest that
    gives three regions.
    """
    depth = max((len(n.split(".")) for n in names), default=1)
    levels = [{n: ".".join(n.split(".")[:level]) for n in names} for level in range(1, depth + 1)]
    split = [regions for regions in levels if len(set(regions.values())) >= 3]
    for regions in split:
        if max(Counter(regions.values()).values()) * 2 <= len(names):
            return regions
    if split:
        return split[0]
    return {n: ".".join(n.split(".")[:-1]) or n for n in names}


class PrunableModel:
    """A model with its dependency graph and coupled channel groups.

    The model is modified in place by `remove`; callers pass a copy when they need the
    original intact.
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: torch.Tensor,
        *,
        round_to: int = 1,
        min_width_fraction: float = 0.1,
        ignored_layers: Sequence[str] | None = None,
        positions: Mapping[str, int] | None = None,
        kept_whole: Collection[str] = (),
    ) -> None:
        """`kept_whole`: groups (by name) never narrowed, besides those `whole_reasons` finds:
        groups found to break the model's forward when narrowed (search.prunability)."""
        self.model = model
        self.example_input = example_input
        self.round_to = max(1, int(round_to))
        names = {module: name for name, module in model.named_modules()}
        self._names = names
        self._modules_by_name = {name: module for module, name in names.items()}
        ignored_names = list(ignored_layers or output_layer_names(model, example_input))
        self.ignored_layers = ignored_names
        ignored = [self._modules_by_name[n] for n in ignored_names]
        with torch.enable_grad():
            self.graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input, verbose=False
            )
        self.positions = dict(positions or output_positions(model, example_input))
        macs = layer_macs(model, self.positions)
        self._handlers: dict[str, object] = {}
        raw_groups = []
        shared = _shared_weights(model)
        # Groups torch-pruning cannot narrow soundly, by name, with why.
        self.whole_reasons: dict[str, str] = {}
        for group in self.graph.get_all_groups(
            ignored_layers=ignored, root_module_types=PRUNABLE_TYPES
        ):
            root = group[0].dep.target.module
            name = names[root]
            self._handlers[name] = group[0].dep.handler
            size = _out_width(root)
            reason, multiple = _width_constraint(group, names, size)
            sharing = next(
                (shared[i.dep.target.module] for i in group if i.dep.target.module in shared), None
            )
            reason = reason or sharing or _concatenation_joined(group, self.graph, names, size)
            raw_groups.append((name, size, self._macs_per_channel(group, macs), multiple))
            if reason:
                self.whole_reasons[name] = reason
        regions = region_of([name for name, *_ in raw_groups])
        whole = set(kept_whole) | set(self.whole_reasons)
        self.groups: list[ChannelGroup] = []
        for name, size, per_channel, multiple in raw_groups:
            floor = max(self.round_to, math.ceil(size * min_width_fraction), 1)
            floor = math.ceil(floor / multiple) * multiple
            self.groups.append(
                ChannelGroup(
                    name=name,
                    size=size,
                    min_size=size if name in whole else min(size, floor),
                    region=regions[name],
                    macs_per_channel=per_channel,
                    multiple=multiple,
                )
            )
        self.groups_by_name = {g.name: g for g in self.groups}
        self._channels_last = _channels_last_weights(model)

    def _macs_per_channel(self, group: tp.Group, macs: Mapping[nn.Module, float]) -> float:
        saved: dict[nn.Module, float] = {}
        for item in group:
            module = item.dep.target.module
            if module not in macs:
                continue
            if isinstance(module, nn.MultiheadAttention):
                width = module.embed_dim
            elif self.graph.is_out_channel_pruning_fn(item.dep.handler):
                width = _out_width(module)
            else:
                width = module.in_channels if hasattr(module, "in_channels") else module.in_features
            saved[module] = max(saved.get(module, 0.0), macs[module] / max(1, width))
        return float(sum(saved.values()))

    @property
    def regions(self) -> list[str]:
        return sorted({g.region for g in self.groups})

    def importance(
        self,
        criterion: str = "l2",
        calib: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, np.ndarray]:
        """Per-channel importance of every group, normalised to mean 1 within each group."""
        if criterion == "l2":
            scorer = tp.importance.GroupMagnitudeImportance(p=2)
        elif criterion == "taylor":
            if calib is None:
                raise ArchtreeError(TAYLOR_NEEDS_LABELS)
            scorer = tp.importance.GroupTaylorImportance()
            x, y = calib
            self.model.zero_grad()
            with torch.enable_grad():
                loss = nn.functional.cross_entropy(self.model(x), y)
                loss.backward()
        else:
            raise ArchtreeError(f"unknown importance criterion {criterion!r}: use l2 or taylor.")
        scores: dict[str, np.ndarray] = {}
        for group in self.graph.get_all_groups(
            ignored_layers=[self._modules_by_name[n] for n in self.ignored_layers],
            root_module_types=PRUNABLE_TYPES,
        ):
            name = self._names[group[0].dep.target.module]
            info = self.groups_by_name[name]
            if info.min_size >= info.size:  # never narrowed: nothing to rank
                scores[name] = np.ones(info.size)
                continue
            values = scorer(group)
            if values is None:
                values = torch.ones(len(group[0].idxs))
            values = values.detach().double().abs().cpu().numpy()
            mean = values.mean()
            scores[name] = values / mean if mean > 0 else np.ones_like(values)
        if criterion == "taylor":
            self.model.zero_grad(set_to_none=True)
        return scores

    def remove(self, removals: Mapping[str, Sequence[int]]) -> None:
        """Remove the given channel indices of each named group, with all coupled channels."""
        for name, indices in removals.items():
            indices = sorted({int(i) for i in indices})
            if not indices:
                continue
            group_info = self.groups_by_name[name]
            if len(indices) >= group_info.size:
                raise ValueError(f"cannot remove all {group_info.size} channels of {name}")
            if len(indices) % group_info.multiple:
                raise ValueError(
                    f"{name} keeps widths in multiples of {group_info.multiple}, not "
                    f"{group_info.size - len(indices)}"
                )
            module = self._modules_by_name[name]
            group = self.graph.get_pruning_group(module, self._handlers[name], indices)
            if not self.graph.check_pruning_group(group):
                emptied = self._emptied(group)
                if emptied == name:  # its own channels, mapped onto more than it has
                    raise CoupledLayerEmptied(
                        "torch-pruning maps its channels through the model's reshapes onto "
                        "more than it has (a layer whose outputs are split into heads of fixed "
                        "sizes, as an attention's fused queries, keys and values, keeps them)"
                    )
                layer = f"the layer {emptied!r}" if emptied else "a layer"
                raise CoupledLayerEmptied(
                    f"removing {len(indices)} of its channels would leave {layer} coupled with "
                    "it without any"
                )
            group.prune()
            group_info.size -= len(indices)
        _restore_channels_last(self._channels_last)

    def _emptied(self, group: tp.Group) -> str | None:
        """The name of the layer of `group` that its removal leaves without channels."""
        for item in group:
            module, handler = item.dep.target.module, item.dep.handler
            if self.graph.is_out_channel_pruning_fn(handler):
                width = self.graph.get_out_channels(module)
            elif self.graph.is_in_channel_pruning_fn(handler):
                width = self.graph.get_in_channels(module)
            else:
                continue
            if width is not None and width <= len(item.idxs):
                return self._names.get(module, type(module).__name__)
        return None


class CoupledLayerEmptied(ValueError):
    """A removal torch-pruning refuses: its channels, mapped through the model's reshapes and
    concatenations, would take every channel of a layer coupled with them (an attention's
    fused query-key-value layer reshaped into heads of fixed sizes does so)."""


def _channels_last_weights(model: nn.Module) -> list[tuple[nn.Module, str, torch.memory_format]]:
    """Every 4-d and 5-d parameter of `model` laid out channels-last, by layer and name.

    torch-pruning's narrowed copies of a weight are laid out channels-first, so a model
    converted with `model.to(memory_format=torch.channels_last)` (faster on many CPUs and
    GPUs) would come out of pruning in a mix of both layouts, and be timed so. The strides
    tell the layout: a 1x1 or depthwise kernel counts as contiguous in both, yet the kernels
    chosen follow its strides.
    """
    found = []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(param.dim())
            if layout is None:
                continue
            laid_out = _strides(param, layout)
            if laid_out != _strides(param) and param.stride() == laid_out:
                found.append((module, name, layout))
    return found


def _strides(
    tensor: torch.Tensor, layout: torch.memory_format = torch.contiguous_format
) -> tuple[int, ...]:
    return torch.empty(tensor.shape, memory_format=layout, device="meta").stride()


def _restore_channels_last(weights: Sequence[tuple[nn.Module, str, torch.memory_format]]) -> None:
    """Lay the parameters `_channels_last_weights` found out channels-last again."""
    for module, name, layout in weights:
        param = getattr(module, name)
        if param.stride() != _strides(param, layout):
            param.data = torch.empty_like(param.data, memory_format=layout).copy_(param.data)


def _shared_weights(model: nn.Module) -> dict[nn.Module, str]:
    """The layers holding a parameter another layer holds too (tied weights), with why they
    are kept whole: narrowing one layer would give it a copy of its own, untying them."""
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        for parameter in module.parameters(recurse=False):
            holders.setdefault(id(parameter), []).append((name, module))
    shared: dict[nn.Module, str] = {}
    for layers in holders.values():
        for name, module in layers:
            others = [other for other, _ in layers if other != name]
            if others:
                shared[module] = f"the layer {name!r} shares its weights with {others[0]!r}"
    return shared


def _width_constraint(
    group: tp.Group, names: Mapping[nn.Module, str], size: int
) -> tuple[str | None, int]:
    """Why the group of `size` channels must keep them all, if it must, and the multiple its
    widths must keep. A grouped convolution (other than depthwise) that it feeds or is must
    keep its groups of equal width: the group stays whole. A GroupNorm over its channels
    alone keeps its number of groups, which must divide the width: the width steps by that
    number. One over more channels than the group's (after a concatenation) keeps it whole.
    A MultiheadAttention over the group's channels splits them into its heads, which keep
    equal widths: the width steps by its number of heads, as for a GroupNorm. A LayerNorm
    over more than the group's channels (a feature map's, or a sequence's length) keeps it
    whole."""
    multiple = 1
    for item in group:
        module = item.dep.target.module
        if isinstance(module, nn.MultiheadAttention):
            name, heads = names[module], module.num_heads
            if module.embed_dim != size or not module._qkv_same_embed_dim:
                return f"the attention {name!r} works on other channels too", 1
            multiple = math.lcm(multiple, heads)
            if multiple >= size:
                return f"the attention {name!r} has {heads} heads of one channel each", 1
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
            depthwise = module.groups == module.in_channels == module.out_channels
            if not depthwise:
                return f"the convolution {names[module]!r} runs in {module.groups} groups", 1
        if isinstance(module, nn.LayerNorm) and tuple(module.normalized_shape) != (size,):
            # torch-pruning narrows a LayerNorm's last normalised dimension as the channels:
            # sound only for one over the channels alone (channels last, a transformer's).
            shape = "x".join(str(d) for d in module.normalized_shape)
            return f"the LayerNorm {names[module]!r} normalises over {shape}, not its channels", 1
        if isinstance(module, nn.GroupNorm):
            name, groups = names[module], module.num_groups
            if module.num_channels != size:
                return f"the GroupNorm {name!r} has {groups} groups over other channels too", 1
            multiple = math.lcm(multiple, groups)
            if multiple >= size:
                return f"the GroupNorm {name!r} has {groups} groups, one per channel", 1
    return None, multiple


def _concatenation_joined(
    group: tp.Group, graph: tp.DependencyGraph, names: Mapping[nn.Module, str], size: int
) -> str | None:
    """Why a group that joins a concatenation's channels to others' must stay whole, if it
    does. Layers whose outputs are concatenated into the group's channels (a concatenation
    added to other channels, as a residual) each need a share of every removal, kept above
    none, which the group's one width cannot say."""
    parts = [
        names[item.dep.target.module]
        for item in group
        if isinstance(item.dep.target.module, PRUNABLE_TYPES)
        and graph.is_out_channel_pruning_fn(item.dep.handler)
        and len(set(item.root_idxs)) < size
    ]
    if not parts:
        return None
    joined = ", ".join(repr(part) for part in parts[:3]) + (", ..." if len(parts) > 3 else "")
    return f"it joins the concatenated outputs of {joined} to other channels"


def least_important(importance: np.ndarray, count: int, multiple: int = 1) -> list[int]:
    """Indices of the `count` least important channels of a group, in channel order. With a
    `multiple` (ChannelGroup.multiple), as many from each of that many equal runs of
    channels, the least important of each: a GroupNorm's groups and an attention's heads keep
    equal widths, each its own channels. `count` is then rounded down to a multiple of it."""
    if multiple <= 1:
        order = np.argsort(importance, kind="stable")
        return sorted(int(i) for i in order[:count])
    run = len(importance) // multiple
    per_run = count // multiple
    return sorted(
        start + int(i)
        for start in range(0, run * multiple, run)
        for i in np.argsort(importance[start : start + run], kind="stable")[:per_run]
    )


def keep_rounded(size: int, remove: int, round_to: int, min_size: int) -> int:
    """Adjust a removal count so the kept width is a multiple of `round_to` (when possible)."""
    remove = max(0, min(remove, size - min_size))
    if round_to <= 1 or remove == 0:
        return remove
    keep = size - remove
    rounded_keep = max(min_size, int(math.ceil(keep / round_to) * round_to))
    return max(0, size - min(size, rounded_keep))
