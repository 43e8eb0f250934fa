"""Notes for the user: the unpruned or the pruned model scoring no better than guessing."""

from __future__ import annotations

import torch

from search.notes import majority_rate, near_chance, pruned_near_chance

BALANCED = torch.arange(500) % 10  # ten classes, 50 samples each
SKEWED = torch.cat([torch.zeros(450, dtype=torch.long), torch.arange(50) % 5 + 1])  # 90 % zeros


def test_a_model_at_chance_on_balanced_labels_gets_a_note_naming_the_split():
    note = near_chance(0.11, BALANCED, "calibration")
    assert note is not None
    assert "11.0% on the calibration split" in note and "(10.0%)" in note
    assert "weights missing" in note


def test_a_trained_model_gets_none():
    assert near_chance(0.9, BALANCED, "validation") is None
    # Three standard errors above the majority rate (0.1 + 3 * 0.0134 = 0.140) is enough.
    assert near_chance(0.15, BALANCED, "validation") is None
    assert near_chance(0.13, BALANCED, "validation") is not None


def test_chance_is_the_most_common_class_not_one_over_the_classes():
    assert majority_rate(SKEWED) == 0.9
    # 85 % looks good for six classes, but answering 0 always scores 90 %.
    note = near_chance(0.85, SKEWED, "validation")
    assert note is not None and "(90.0%)" in note
    assert near_chance(0.97, SKEWED, "validation") is None


def test_no_labels_no_note():
    assert near_chance(0.0, torch.zeros(0, dtype=torch.long), "validation") is None


def test_a_pruned_model_at_chance_is_told_to_fine_tune_longer_unless_the_unpruned_was_too():
    note = pruned_near_chance(0.12, 0.95, BALANCED)
    assert note is not None and "pruned model scores 12.0% on the validation split" in note
    assert "unpruned model scores 95.0%" in note
    assert "--ft-steps, --select-steps or --final-epochs" in note
    assert pruned_near_chance(0.8, 0.95, BALANCED) is None
    # An unpruned model at chance has its own note, which says what is wrong.
    assert pruned_near_chance(0.11, 0.11, BALANCED) is None
