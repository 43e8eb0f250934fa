"""Rebuilding a node's architecture at other widths from its ancestors.

A node's channels can only be given back by pruning one of its ancestors again, less: the
parent when the widened groups are ones the node's last move cut, an older ancestor when they
were cut before. The nearest ancestor at least as wide in every group keeps the most of the
fine-tuning along the path; the root, the unpruned model, is at least as wide as anything.
"""

from __future__ import annotations

from search.context import SearchContext
from search.expansion import MoveApplier, Pruned
from search.latency_estimate import LatencyEstimate
from search.moves import Move
from search.pruning import least_important
from search.tree import Node, SearchState

Widths = dict[str, int]


class AncestorRebuilds:
    """The ancestors of one node, nearest first, each ready to be pruned to given widths."""

    def __init__(
        self, context: SearchContext, state: SearchState, node: Node, estimate: LatencyEstimate
    ) -> None:
        self.context = context
        self.estimate = estimate
        self.ancestors: list[Node] = []
        parent = node.parent
        while parent is not None:
            self.ancestors.append(state.nodes[parent])
            parent = state.nodes[parent].parent
        self._appliers: dict[str, MoveApplier] = {}

    def applier(self, ancestor: Node) -> MoveApplier:
        """The ancestor's model ready to prune (its importance computed once)."""
        if ancestor.id not in self._appliers:
            model = self.context.build(ancestor.spec, self.context.store.get(ancestor.id))
            self._appliers[ancestor.id] = MoveApplier(
                self.context, model, Move("global"), self.estimate
            )
        return self._appliers[ancestor.id]

    def sizes(self, ancestor: Node) -> Widths:
        """The width of every channel group in the ancestor."""
        groups = self.applier(ancestor).pruner.groups_by_name
        return {name: group.size for name, group in groups.items()}

    def widths_after(self, ancestor: Node, removed: dict[str, int]) -> Widths:
        """The ancestor's widths with `removed` channels taken off each group named there."""
        return {name: size - removed.get(name, 0) for name, size in self.sizes(ancestor).items()}

    def covering(self, widths: Widths) -> Node:
        """The nearest ancestor at least as wide as `widths` in every group."""
        for ancestor in self.ancestors:
            if all(ancestor.spec.width(name) >= width for name, width in widths.items()):
                return ancestor
        raise ValueError("no ancestor is as wide as the widths asked for")

    def build(self, ancestor: Node, widths: Widths) -> Pruned:
        """The ancestor pruned to `widths`, its least important channels removed."""
        applier = self.applier(ancestor)
        groups = applier.pruner.groups_by_name
        return applier.build(
            {
                name: least_important(
                    applier.importance[name], size - widths[name], groups[name].multiple
                )
                for name, size in self.sizes(ancestor).items()
                if size > widths.get(name, size)
            }
        )
