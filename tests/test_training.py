"""Training, distillation and scoring on real digits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from search.data_source import DataSplits, load_data
from search.errors import ArchtreeError
from search.training import accuracy, fidelity, logits, recalibrate_batch_norm, train


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


def _first_layer_activations(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model[0](x)


def test_recalibration_sets_running_statistics_to_those_of_the_chosen_samples(
    digits: DataSplits,
) -> None:
    model = _tiny_cnn(seed=1)
    norm = model[1]
    norm.running_mean.fill_(5.0)
    norm.running_var.fill_(9.0)
    recalibrate_batch_norm(model, digits.train_x, samples=len(digits.train_x), batch_size=4096)
    # One batch holding every sample: the running statistics are that batch's statistics.
    activations = _first_layer_activations(model, digits.train_x)
    assert torch.allclose(norm.running_mean, activations.mean(dim=(0, 2, 3)), atol=1e-4)
    assert torch.allclose(
        norm.running_var, activations.var(dim=(0, 2, 3), unbiased=True), rtol=1e-3
    )
    assert norm.momentum == 0.1, "the layer's momentum is put back"
    assert not model.training


def test_recalibration_averages_over_batches_and_uses_the_requested_sample_count(
    digits: DataSplits,
) -> None:
    model = _tiny_cnn(seed=2)
    recalibrate_batch_norm(model, digits.train_x, samples=256, batch_size=64, seed=3)
    chosen = torch.randperm(len(digits.train_x), generator=torch.Generator().manual_seed(3))[:256]
    activations = _first_layer_activations(model, digits.train_x[chosen])
    # Equal batches: the cumulative average of batch means is the mean of the 256 samples.
    assert torch.allclose(model[1].running_mean, activations.mean(dim=(0, 2, 3)), atol=1e-4)
    everything = _first_layer_activations(model, digits.train_x).mean(dim=(0, 2, 3))
    assert not torch.allclose(model[1].running_mean, everything, atol=1e-4)


def test_recalibration_off_or_without_batch_norm_changes_nothing(digits: DataSplits) -> None:
    model = _tiny_cnn(seed=1)
    model[1].running_mean.fill_(5.0)
    recalibrate_batch_norm(model, digits.train_x, samples=0)
    assert torch.equal(model[1].running_mean, torch.full((8,), 5.0))
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    plain.train()
    recalibrate_batch_norm(plain, digits.train_x, samples=64)
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())
    assert not plain.training


def test_recalibration_repairs_statistics_left_stale_by_a_few_large_steps(
    teacher: nn.Module, digits: DataSplits
) -> None:
    # A few steps at a large learning rate move the weights faster than the running
    # averages (momentum 0.1) follow: scored in eval mode the model reads worse than it is.
    stale = _tiny_cnn()
    stale.load_state_dict(teacher.state_dict())
    train(stale, digits.train_x, digits.train_y, steps=3, lr=0.5, seed=4)
    stale_score = accuracy(stale, digits.val_x, digits.val_y)
    recalibrate_batch_norm(stale, digits.train_x, samples=512)
    assert accuracy(stale, digits.val_x, digits.val_y) > stale_score


class RunsOutOfMemory(nn.Module):
    """What a model too large for its device's memory raises, on its first batch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("work", ["fine-tuning", "scoring"])
def test_running_out_of_memory_is_said_with_what_to_do(work):
    """It was an internal error: a model that fits the CPU's memory may not fit a GPU's, which
    --train-device auto now fine-tunes on."""
    x, y = torch.zeros(8, 4), torch.zeros(8, dtype=torch.long)
    with pytest.raises(ArchtreeError) as said:
        if work == "fine-tuning":
            train(RunsOutOfMemory(), x, y, steps=2)
        else:
            logits(RunsOutOfMemory(), x)
    assert str(said.value) == (
        f"the CPU ran out of memory {work} (CUDA out of memory. Tried to allocate 2.00 GiB): "
        "fine-tune with a smaller fine-tuning batch, or on a larger machine"
    )
