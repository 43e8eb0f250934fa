"""A search's context: the unpruned model's outputs on a large split are said as they are
computed, and a cancel stops their computation."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

import search.context
import search.training
from archtree_cli.progress import ConsoleProgress
from latency.local_oracle import LocalOracle
from search.arch_spec import build_from_spec
from search.context import PREPARE_SAID_SAMPLES, SearchContext
from search.errors import SearchCancelled
from search.inputs import load_inputs
from search.interfaces import ListEventSink
from search.settings import SearchSettings
from tests.conftest import fast_timing

BATCH = 256  # the batch the reference outputs are computed in (search.training.logits)


def large_context(tmp_path: Path, *, labelled: bool = True, cancelled=None) -> SearchContext:
    """The builtin VGG on digits-shaped data with a training split just over the size whose
    reference outputs are said."""
    samples = PREPARE_SAID_SAMPLES + 1500 + 500  # calibration 500 and validation 1000 aside
    rng = np.random.default_rng(0)
    arrays = {"x": rng.standard_normal((samples, 1, 8, 8), dtype=np.float32)}
    if labelled:
        arrays["y"] = rng.integers(0, 10, samples)
    np.savez(tmp_path / "large.npz", **arrays)
    inputs = load_inputs("builtin:vgg", str(tmp_path / "large.npz"))
    assert len(inputs.data.train_x) >= PREPARE_SAID_SAMPLES
    return context_of(inputs, cancelled)


def context_of(inputs, cancelled=None) -> SearchContext:
    """A search context on loaded inputs, timed locally, collecting its events."""
    return SearchContext(
        model_ref=inputs.model_ref,
        base_model=inputs.model,
        data=inputs.data,
        oracle=LocalOracle(build_from_spec, settings=fast_timing()),
        settings=SearchSettings(ft_steps=5).effective(),
        sink=ListEventSink(),
        cancelled=cancelled,
    )


def test_the_outputs_on_a_large_training_split_are_said_as_they_are_computed(tmp_path, monkeypatch):
    monkeypatch.setattr(search.context, "PREPARE_PROGRESS_S", 0.0)  # a line after every batch
    context = large_context(tmp_path)
    context.prepare()

    said = [e for e in context.sink.events if e["kind"] == "preparing"]
    samples = len(context.data.train_x)
    assert said[0] == {"kind": "preparing", "split": "train", "samples": samples, "done": 0}
    done = [e["done"] for e in said[1:]]
    assert done == list(range(BATCH, samples, BATCH))  # every batch but the last, in order
    assert context.train_reference_logits.shape == (samples, 10)

    printed = io.StringIO()
    progress = ConsoleProgress(stream=printed)
    for event in said[:2]:
        progress.emit(**event)
    first, second = [line.split("] ", 1)[1] for line in printed.getvalue().splitlines()]
    assert first == (
        f"computing the unpruned model's outputs on its {samples:,} train samples (the "
        "targets its pruned copies are fine-tuned towards)"
    )
    assert second == f"unpruned model's outputs: 256 of {samples:,} train samples (1%)"


def test_small_splits_are_computed_without_a_word(monkeypatch):
    monkeypatch.setattr(search.context, "PREPARE_PROGRESS_S", 0.0)
    inputs = load_inputs("builtin:vgg", "builtin:digits")
    context = context_of(inputs)
    context.prepare()
    assert not [e for e in context.sink.events if e["kind"] == "preparing"]
    assert len(context.train_reference_logits) == len(inputs.data.train_x)


def test_a_cancel_stops_the_reference_outputs_where_they_are(tmp_path, monkeypatch):
    """A job cancelled while the unpruned model's outputs on its large training split are
    computed stops there, not once they are all computed (minutes on a large dataset)."""
    monkeypatch.setattr(search.context, "CANCEL_CHECK_S", 0.0)  # asked after every batch
    batches: list[int] = []
    context = large_context(tmp_path, cancelled=lambda: bool(batches))

    def count_batches(module, args):
        if len(args[0]) == BATCH:
            batches.append(len(args[0]))  # the first full batch cancels the job

    context.base_model.register_forward_pre_hook(count_batches)
    with pytest.raises(SearchCancelled) as cancelled:
        context.prepare()

    assert batches == [BATCH]
    assert str(cancelled.value) == (
        "cancelled while computing the unpruned model's outputs on the train split "
        f"(256 of {len(context.data.train_x):,} samples done)"
    )
    assert not context.base_model.training
    assert "train_reference_logits" not in vars(context)  # not kept half done


def test_without_labels_the_calibration_outputs_are_computed_before_the_training_ones(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(search.context, "CANCEL_CHECK_S", 0.0)
    asked: list[int] = []

    def cancelled() -> bool:
        asked.append(1)
        return False

    context = large_context(tmp_path, labelled=False, cancelled=cancelled)
    context.prepare()
    calib, train = len(context.data.calib_x), len(context.data.train_x)
    # Asked before and between the steps, and after every batch of both splits.
    assert len(asked) == 3 + -(-calib // BATCH) + -(-train // BATCH)
    assert torch.equal(
        context.calib_reference_logits,
        search.training.logits(context.base_model, context.data.calib_x),
    )
