"""Training, distillation and scoring on real digits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from search.data_source import DataSplits, load_data
from search.errors import ArchtreeError
from search.training import accuracy, fidelity, logits, train


def _tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_data("builtin:digits", seed=0)


@pytest.fixture(scope="module")
def teacher(digits: DataSplits) -> nn.Module:
    model = _tiny_cnn()
    train(model, digits.train_x, digits.train_y, steps=300, lr=0.05)
    return model


def test_training_on_digits_beats_80_percent(teacher: nn.Module, digits: DataSplits) -> None:
    assert not teacher.training
    assert accuracy(teacher, digits.val_x, digits.val_y) > 0.8


def test_distillation_without_labels_increases_fidelity(
    teacher: nn.Module, digits: DataSplits
) -> None:
    reference = logits(teacher, digits.val_x)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = _tiny_cnn(seed=1)
    before = fidelity(student, reference, digits.val_x)
    train(student, digits.train_x, None, steps=150, lr=0.05, teacher=teacher)
    after = fidelity(student, reference, digits.val_x)
    assert after > before
    assert after > 0.5 * before
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
    assert fidelity(teacher, reference, digits.val_x) == pytest.approx(0.0, abs=1e-6)


def test_distillation_with_labels_runs(teacher: nn.Module, digits: DataSplits) -> None:
    student = _tiny_cnn(seed=2)
    losses: list[float] = []
    train(
        student,
        digits.train_x,
        digits.train_y,
        steps=60,
        lr=0.05,
        teacher=teacher,
        kd_weight=0.7,
        progress=lambda step, total, loss: losses.append(loss),
    )
    assert len(losses) == 60 and all(loss == loss for loss in losses)
    assert sum(losses[-10:]) < sum(losses[:10])


def test_training_is_deterministic_with_a_seed(digits: DataSplits) -> None:
    def trained(seed: int) -> dict[str, torch.Tensor]:
        model = _tiny_cnn()
        train(model, digits.train_x, digits.train_y, steps=15, seed=seed)
        return model.state_dict()

    first, again, other = trained(3), trained(3), trained(4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_epochs_count_batches_and_progress_reports(digits: DataSplits) -> None:
    calls: list[tuple[int, int]] = []
    x, y = digits.train_x[:100], digits.train_y[:100]
    train(_tiny_cnn(), x, y, epochs=2, batch_size=32, progress=lambda s, t, _: calls.append((s, t)))
    assert calls[-1] == (8, 8) and len(calls) == 8


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({}, ["epochs", "steps"]),
        ({"epochs": 1, "steps": 5}, ["epochs", "steps"]),
        ({"steps": 5, "labels": False}, ["teacher"]),
    ],
)
def test_training_errors(digits: DataSplits, kwargs: dict, words: list[str]) -> None:
    labels = digits.train_y if kwargs.pop("labels", True) else None
    with pytest.raises(ArchtreeError) as excinfo:
        train(_tiny_cnn(), digits.train_x, labels, **kwargs)
    assert all(word in str(excinfo.value) for word in words)


def test_accuracy_and_logits_leave_training_mode_alone(digits: DataSplits) -> None:
    model = _tiny_cnn().train()
    out = logits(model, digits.val_x[:10], batch_size=3)
    assert out.shape == (10, 10) and model.training
    assert 0.0 <= accuracy(model, digits.val_x, digits.val_y) <= 1.0
