"""The checks a search makes before any timing, for those that must refuse a job before it
runs: the API checks a submission with them, so that a job the search would refuse at once
(nothing in the model can be pruned, taylor importance without labels) is never queued."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from search.arch_spec import ArchSpec
from search.context import SearchContext
from search.engine import smallest_spec
from search.errors import ArchtreeError
from search.inputs import JobInputs
from search.pruning import TAYLOR_NEEDS_LABELS
from search.settings import SearchSettings


class UntimedOracle:
    """The oracle of checks made before any timing: models offered to it are not kept, and
    it times nothing (a search's first measurement comes after these checks)."""

    def fingerprint(self) -> dict[str, Any]:
        return {}

    def offer_model(self, spec: ArchSpec, model: Any) -> None:
        pass

    def measure_reference(self, reference: ArchSpec, **_: Any) -> Any:
        raise RuntimeError("the checks before timing time nothing")

    def measure(self, candidate: ArchSpec, reference: ArchSpec, **_: Any) -> Any:
        raise RuntimeError("the checks before timing time nothing")


def check_before_timing(inputs: JobInputs, settings: SearchSettings) -> None:
    """Raise the ArchtreeError the search would raise before its first measurement: taylor
    importance needs labels, and the model's smallest pruned form is built as the search
    builds it, with these settings (by l2 importance: the smallest widths do not depend on
    which channels are kept, and taylor's would take a backward pass)."""
    if settings.importance == "taylor" and not inputs.data.labelled:
        raise ArchtreeError(TAYLOR_NEEDS_LABELS)
    context = SearchContext(
        model_ref=inputs.model_ref,
        base_model=inputs.model,
        data=inputs.data,
        oracle=UntimedOracle(),
        settings=replace(settings, importance="l2"),
    )
    smallest_spec(context)
