"""Paired score gaps: two models scored on the same samples, judged sample by sample."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from search.context import SearchContext
from search.inputs import load_inputs
from search.interfaces import ListEventSink
from search.score_gap import ScoreGap, paired_gap
from search.settings import SearchSettings
from search.training import fidelity, train
from tests.cost_model_device import BlockedConvDevice


def test_the_gap_is_the_mean_difference_and_its_error_shrinks_with_agreement():
    # Two models right on 8 of 10 samples each. Wrong on the same two: no doubt they are
    # equal. Wrong on different ones: a gap of 0 too, but from four disagreements.
    a = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 0, 0.0])
    same = paired_gap(a, a.clone())
    assert (same.difference, same.standard_error, same.samples) == (0.0, 0.0, 10)
    b = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 1, 1.0])
    crossed = paired_gap(a, b)
    assert crossed.difference == 0.0
    # Differences -1, -1, 0 x 6, +1, +1: sample sd sqrt(4 / 9), over sqrt(10).
    assert crossed.standard_error == pytest.approx(math.sqrt(4 / 9) / math.sqrt(10))
    # a right where c is wrong on three samples: +0.3.
    c = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0, 0, 0.0])
    assert paired_gap(a, c).difference == pytest.approx(0.3)
    assert paired_gap(c, a).difference == pytest.approx(-0.3)
    with pytest.raises(ValueError, match="1-D score vectors of one length"):
        paired_gap(a, a[:5])
    assert paired_gap(a[:0], a[:0]).standard_error == math.inf


def test_clearly_below_needs_both_the_slack_and_z_standard_errors():
    # A point lower with a standard error of a point: chance explains it.
    assert not ScoreGap(-0.01, 0.01, 500).clearly_below(slack=0.005, z=2.0)
    # Three points lower with the same error: not chance.
    assert ScoreGap(-0.03, 0.01, 500).clearly_below(slack=0.005, z=2.0)
    # Certain but tiny: within the slack.
    assert not ScoreGap(-0.004, 0.0, 500).clearly_below(slack=0.005, z=2.0)
    assert ScoreGap(-0.006, 0.0, 500).clearly_below(slack=0.005, z=2.0)
    # Higher is never below.
    assert not ScoreGap(0.05, 0.0, 500).clearly_below(slack=0.005, z=2.0)


@pytest.mark.parametrize("labelled", [True, False])
def test_a_context_scores_each_calibration_sample_and_the_score_is_their_mean(labelled: bool):
    inputs = load_inputs("builtin:vgg", "builtin:digits")
    data = inputs.data
    if not labelled:
        data = replace(data, train_y=None, calib_y=None, val_y=None)
    context = SearchContext(
        model_ref=inputs.model_ref,
        base_model=inputs.model,
        data=data,
        oracle=BlockedConvDevice(8),
        settings=SearchSettings(),
        sink=ListEventSink(),
    )
    # The unpruned architecture, briefly trained from fresh weights: right on some samples.
    student = context.build(context.root_spec)
    train(student, inputs.data.train_x, inputs.data.train_y, steps=5, lr=0.05, seed=1)
    scores = context.sample_scores(student)
    assert scores.shape == (len(data.calib_x),)
    assert context.score(student) == pytest.approx(float(scores.mean()), abs=1e-6)
    if labelled:
        assert set(scores.unique().tolist()) <= {0.0, 1.0}
    else:
        # Minus each sample's divergence: never positive, and the mean is the fidelity.
        assert float(scores.max()) <= 1e-6
        reference = context.calib_reference_logits
        assert float(scores.mean()) == pytest.approx(
            fidelity(student, reference, data.calib_x), rel=1e-4
        )
        assert float(context.sample_scores(context.base_model).abs().max()) < 1e-5
