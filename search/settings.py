"""Search settings: every number of the method is a setting with a default."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from search.errors import ArchtreeError

STRATEGIES = ("archtree", "greedy", "uniform")
MOVE_KINDS = ("global", "latency", "uniform", "focused")
# The largest multiple of channels widths are rounded or widened to: wider than any
# kernel's block of channels.
MAX_CHANNEL_MULTIPLE = 4096
# Upper bounds of the search settings, the service's and the command line's alike: far above
# any useful search, they keep one search from running for days, or a typo (--width 100000)
# from asking for a tree no machine holds.
MAX_TREE_SIZE = 64
MAX_STEPS = 1_000_000
MAX_EPOCHS = 10_000
MAX_PROBES = 1_000
# Far more inputs than batch-norm statistics need to settle.
MAX_BN_SAMPLES = 1_000_000
# Settings whose `archtree prune` option is not the name in kebab case.
OPTION_NAMES = {"min_width_fraction": "--min-width", "move_kinds": "--moves"}


def option_of(setting: str) -> str:
    """The `archtree prune` option that sets `setting`, e.g. --max-cut for max_cut."""
    return OPTION_NAMES.get(setting, "--" + setting.replace("_", "-"))


# The channel block assumed where the device does not report one (latency/fingerprint.py).
DEFAULT_CHANNEL_BLOCK = 8


@dataclass(frozen=True)
class SearchSettings:
    """How the tree search runs.

    strategy: `archtree` (tree of width K), `greedy` (K = 1, NetAdapt-like) or `uniform` (one
    pruning ratio for every group, bisected on measured latency).
    move_kinds: the moves tried on each node, in order of preference, `branching` of them at
    most (`focused` gives one move per promising region).
    max_cut: the largest share of a group's channels one step of the tree may remove.
    widen_to: once a child is sized, each of its channel groups kept wider than `widen_to` is
    tried widened to the next multiple of it, and the wider child is kept when its measured
    latency is no higher than the child's target allows. Kernels that work in blocks of
    channels take as long for 17 channels as for a whole number of blocks: the extra ones are
    free. Where that costs time, half the multiple is tried, down to `DEFAULT_CHANNEL_BLOCK`
    (search/expansion.py). None (the default) takes the block the device reports (16 on
    AVX-512 CPUs, 8 on AVX2), else `DEFAULT_CHANNEL_BLOCK`; 0 or 1 turns it off.
    margin: the search aims this share under the budget, so that the answer still fits when
    the device is measured again (timings vary by a few percent between runs).
    bn_samples: after every fine-tune, and after pruning when there is none, the running
    statistics of batch-norm layers are recomputed on this many training inputs before the
    model is scored: a few steps move the weights faster than the running averages follow,
    and a child scored with stale statistics can read near chance (search/training.py).
    0 turns it off.
    select_top, select_steps: the best `select_top` feasible nodes are fine-tuned
    `select_steps` more and ranked again before the answer is chosen.
    confirm_candidates: how many of the best feasible nodes are confirmed, best first, before
    the best one is trimmed (`confirm_trims` times at most) to fit.
    fill_probes: an answer confirmed more than `fit_tolerance` under the aim (a latency step
    below it) is given channels back group by group, a block at a time in rounds while it
    stays well under, each widening measured: first the groups its last move cut, then any
    group cut since the root, `fill_probes` measurements at most in each pass; the widened
    answer, rebuilt from the nearest ancestor as wide and tuned as much, replaces it unless
    it scores clearly lower (search/score_gap.py). When every widening confirmed is over the
    budget, the fill is tried once more with its aim lowered by the share they were over.
    When no group's block fits alone, one group is widened while another is narrowed
    (`EXCHANGE_PROBES` trades at most, search/engine.py). 0 turns it off.
    """

    strategy: str = "archtree"
    width: int = 4
    branching: int = 4
    planned_steps: int = 3
    max_depth: int = 6
    move_kinds: tuple[str, ...] = MOVE_KINDS
    importance: str = "l2"
    round_to: int = 1
    widen_to: int | None = None
    min_width_fraction: float = 0.1
    max_cut: float = 0.5
    max_probes: int = 5
    fit_tolerance: float = 0.025
    margin: float = 0.03
    ft_steps: int = 20
    ft_lr: float = 0.01
    ft_batch_size: int = 32
    bn_samples: int = 512
    final_epochs: float = 0.0
    final_lr: float = 0.01
    kd_weight: float = 0.5
    select_top: int = 3
    select_steps: int = 100
    confirm_candidates: int = 3
    confirm_trims: int = 3
    fill_probes: int = 12
    seed: int = 0

    def effective(self) -> SearchSettings:
        """The settings the engine really runs with, once the strategy is applied."""
        self.validate()
        if self.strategy == "greedy":
            return replace(self, width=1)
        if self.strategy == "uniform":
            # Its one child is the whole search: its bisection may take up to 8 probes, which
            # the tree would spend on other children. Its answer is not filled group by
            # group: that would leave one ratio everywhere for the widths of a tree's answer,
            # and the bisection has found the widest uniform cut under the aim already.
            return replace(
                self,
                width=1,
                branching=1,
                planned_steps=1,
                move_kinds=("uniform",),
                max_probes=max(self.max_probes, 8),
                fill_probes=0,
            )
        return self

    def ignored_by_strategy(self, given_names: Collection[str] | None = None) -> list[str]:
        """The settings given that the strategy then overrides, as the options that set them,
        e.g. `--width 8 is not used: --strategy greedy runs with 1`. `given_names`: the settings
        the user gave, even at their default; without it, those that differ from the default."""
        effective, defaults = self.effective(), SearchSettings()
        ignored = []
        for setting in fields(self):
            name = setting.name
            given, used = getattr(self, name), getattr(effective, name)
            if given_names is not None:
                chosen = name in given_names
            else:
                chosen = given != getattr(defaults, name)
            if given != used and chosen:
                option = option_of(name)
                shown = ",".join(given) if isinstance(given, tuple) else given
                used_shown = ",".join(used) if isinstance(used, tuple) else used
                ignored.append(
                    f"{option} {shown} is not used: --strategy {self.strategy} runs with "
                    f"{used_shown}"
                )
        return ignored

    def validate(self) -> None:
        for setting in fields(self):
            value = getattr(self, setting.name)
            if isinstance(value, float) and not math.isfinite(value):
                option = option_of(setting.name)
                raise ArchtreeError(f"{option} must be a finite number, not {value}")
        if self.strategy not in STRATEGIES:
            raise ArchtreeError(
                f"unknown strategy {self.strategy!r}: use one of {', '.join(STRATEGIES)}."
            )
        unknown = [kind for kind in self.move_kinds if kind not in MOVE_KINDS]
        checks = [
            (self.width >= 1, "--width must be at least 1"),
            (self.branching >= 1, "--branching must be at least 1"),
            (self.planned_steps >= 1, "--planned-steps must be at least 1"),
            (
                # The uniform strategy plans one step (`effective`): --planned-steps is unused.
                self.max_depth >= self.planned_steps or self.strategy == "uniform",
                f"--max-depth must be at least --planned-steps ({self.max_depth} is below "
                f"{self.planned_steps}; give both, or a --max-depth of {self.planned_steps} or "
                "more)",
            ),
            (self.ft_steps >= 0, "--ft-steps cannot be negative"),
            (self.bn_samples >= 0, "--bn-samples cannot be negative (0 turns it off)"),
            (self.final_epochs >= 0, "--final-epochs cannot be negative"),
            (self.round_to >= 1, "--round-to must be at least 1"),
            (
                self.round_to <= MAX_CHANNEL_MULTIPLE,
                f"--round-to must be at most {MAX_CHANNEL_MULTIPLE}, wider than any kernel's "
                "block of channels",
            ),
            (0 <= self.seed < 2**32, "--seed must be in [0, 4294967295]"),
            (
                self.widen_to is None or self.widen_to >= 0,
                "--widen-to cannot be negative (0 turns it off)",
            ),
            (
                self.widen_to is None or self.widen_to <= MAX_CHANNEL_MULTIPLE,
                f"--widen-to must be at most {MAX_CHANNEL_MULTIPLE}, wider than any kernel's "
                "block of channels (0 turns it off)",
            ),
            (0.0 <= self.min_width_fraction < 1.0, "--min-width must be in [0, 1)"),
            (self.importance in ("l2", "taylor"), "--importance must be l2 or taylor"),
            (self.max_probes >= 1, "--max-probes must be at least 1"),
            (0.0 <= self.margin < 0.5, "--margin must be in [0, 0.5)"),
            (0.0 < self.max_cut <= 1.0, "--max-cut must be in (0, 1]"),
            (self.select_top >= 1, "--select-top must be at least 1"),
            (self.select_steps >= 0, "--select-steps cannot be negative"),
            (self.fill_probes >= 0, "--fill-probes cannot be negative (0 turns it off)"),
            (self.confirm_candidates >= 1, "confirm_candidates must be at least 1"),
            (bool(self.move_kinds), f"--moves needs at least one of {', '.join(MOVE_KINDS)}"),
            (
                not unknown,
                f"--moves: unknown move {', '.join(map(repr, unknown))}; "
                f"use some of {', '.join(MOVE_KINDS)}",
            ),
            (
                len(set(self.move_kinds)) == len(self.move_kinds),
                "--moves lists a move twice",
            ),
        ]
        checks += [
            (
                getattr(self, name) <= bound,
                f"{option_of(name)} must be at most {bound:,}, {what}",
            )
            for name, bound, what in (
                ("width", MAX_TREE_SIZE, "far wider than any useful tree"),
                ("branching", MAX_TREE_SIZE, "far more moves than a node has"),
                ("planned_steps", MAX_TREE_SIZE, "far deeper than any useful tree"),
                ("max_depth", MAX_TREE_SIZE, "far deeper than any useful tree"),
                ("select_top", MAX_TREE_SIZE, "far more than a search compares"),
                ("ft_steps", MAX_STEPS, "far longer than a child's fine-tune needs"),
                ("select_steps", MAX_STEPS, "far longer than a re-ranking needs"),
                ("final_epochs", MAX_EPOCHS, "far longer than a final fine-tune needs"),
                ("max_probes", MAX_PROBES, "far more than a bisection needs"),
                ("fill_probes", MAX_PROBES, "far more than a fill needs"),
                ("bn_samples", MAX_BN_SAMPLES, "far more than batch-norm statistics need"),
            )
        ]
        for ok, message in checks:
            if not ok:
                raise ArchtreeError(message + ".")

    def widen_multiple(self, device_block: int | None) -> int:
        """The multiple channel groups are widened to: `widen_to` when set, else the device's
        channel block (`DEFAULT_CHANNEL_BLOCK` when the device does not report one)."""
        if self.widen_to is not None:
            return self.widen_to
        return device_block if device_block and device_block > 1 else DEFAULT_CHANNEL_BLOCK

    def aim_ms(self, budget_ms: float) -> float:
        """The latency the search aims at: `margin` under the budget."""
        return budget_ms * (1.0 - self.margin)

    def well_under(self, latency_ms: float, aim_ms: float) -> bool:
        """More than `fit_tolerance` under the aim: below a latency step, slack to fill."""
        return latency_ms < aim_ms * (1.0 - self.fit_tolerance)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["move_kinds"] = list(self.move_kinds)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchSettings:
        data = dict(data)
        if "move_kinds" in data:
            data["move_kinds"] = tuple(data["move_kinds"])
        return cls(**data)
