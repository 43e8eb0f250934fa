"""What a search needs around the algorithm: the model, data, device oracle and stores."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from search.arch_spec import ArchSpec, build_from_spec, spec_of
from search.compute_device import CPU
from search.data_source import DataSplits
from search.errors import SearchCancelled
from search.interfaces import EventSink, LatencyOracle, ListEventSink, MemoryNodeStore, NodeStore
from search.model_source import ModelRef
from search.prunability import groups_kept_whole
from search.pruning import output_positions
from search.settings import SearchSettings
from search.training import (
    accuracy,
    correct,
    fidelity,
    logits,
    recalibrate_batch_norm,
    sample_fidelity,
    train,
)

# How often a fine-tune, or the reference outputs' computation, asks whether its job was
# cancelled.
CANCEL_CHECK_S = 1.0
# The unpruned model's outputs on a split of this many samples or more are said in the
# progress as they are computed (minutes on a CPU for a large dataset), and how far they have
# got every PREPARE_PROGRESS_S.
PREPARE_SAID_SAMPLES = 20_000
PREPARE_PROGRESS_S = 10.0


@dataclass
class SearchContext:
    """One job's fixed inputs. The engine and child evaluation read it, never change it."""

    model_ref: ModelRef
    base_model: nn.Module
    data: DataSplits
    oracle: LatencyOracle
    settings: SearchSettings
    store: NodeStore = field(default_factory=MemoryNodeStore)
    sink: EventSink = field(default_factory=ListEventSink)
    # Whether the job was cancelled: asked every CANCEL_CHECK_S while fine-tuning, which can
    # run for long (many steps, a large dataset), so that a cancel stops it there.
    cancelled: Callable[[], bool] | None = None
    # Where candidates are fine-tuned and scored (search.compute_device): the CPU, or a GPU
    # of this machine whatever device the latency is measured on.
    train_device: torch.device = CPU

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.data.input_shape)

    @cached_property
    def root_spec(self) -> ArchSpec:
        return spec_of(self.base_model, self.model_ref, self.input_shape, self.data.token_range)

    @cached_property
    def example_input(self) -> torch.Tensor:
        return self.data.calib_x[:1].clone()

    @cached_property
    def positions(self) -> dict[str, int]:
        """Output positions of every conv and linear layer (the same for all pruned variants)."""
        return output_positions(self.base_model, self.example_input)

    @cached_property
    def kept_whole(self) -> dict[str, str]:
        """The channel groups never narrowed, by name, with why (search.prunability)."""
        return groups_kept_whole(
            self.base_model,
            self.example_input,
            self.positions,
            self.settings.round_to,
            self.settings.min_width_fraction,
            self.model_ref.source,
        )

    @cached_property
    def calib_reference_logits(self) -> torch.Tensor:
        """The unpruned model's outputs on the calibration split: what candidates are scored
        against without labels."""
        return self._reference_logits(self.data.calib_x, "calibration")

    @cached_property
    def train_reference_logits(self) -> torch.Tensor:
        """The unpruned model's outputs on the training split: distillation targets."""
        return self._reference_logits(self.data.train_x, "train")

    def _reference_logits(self, x: torch.Tensor, split: str) -> torch.Tensor:
        """The unpruned model's outputs on one split. On a large split, said as a `preparing`
        event when it starts and every PREPARE_PROGRESS_S (`done` of `samples`); a cancel is
        honoured within CANCEL_CHECK_S."""
        said = len(x) >= PREPARE_SAID_SAMPLES
        if said:
            self.sink.emit("preparing", split=split, samples=len(x), done=0)
        last_check = last_said = time.monotonic()

        def progress(done: int) -> None:
            nonlocal last_check, last_said
            now = time.monotonic()
            if now - last_check >= CANCEL_CHECK_S:
                last_check = now
                self.check_cancelled(
                    f"while computing the unpruned model's outputs on the {split} split "
                    f"({done:,} of {len(x):,} samples done)"
                )
            if said and now - last_said >= PREPARE_PROGRESS_S and done < len(x):
                last_said = now
                self.sink.emit("preparing", split=split, samples=len(x), done=done)

        return logits(self.base_model, x, progress=progress, device=self.train_device)

    def prepare(self) -> None:
        """Compute the shared reference outputs once, before children run in parallel; a
        cancel is honoured while they are computed (on a large dataset, minutes)."""
        self.check_cancelled("before the search started")
        _ = self.positions
        _ = self.kept_whole
        self.check_cancelled("before the search started")
        if not self.data.labelled:
            _ = self.calib_reference_logits
        if self.settings.ft_steps > 0 or self.settings.final_epochs > 0:
            _ = self.train_reference_logits
        self.check_cancelled("before the search started")

    def check_cancelled(self, when: str) -> None:
        """SearchCancelled if the job was cancelled; `when` says where the search stood."""
        if self.cancelled is not None and self.cancelled():
            raise SearchCancelled(f"cancelled {when}")

    def build(self, spec: ArchSpec, state_dict: dict | None = None) -> nn.Module:
        model = build_from_spec(spec)
        if state_dict is not None:
            model.load_state_dict(state_dict)
        return model.eval()

    def score(self, model: nn.Module) -> float:
        """Accuracy on the calibration split, or fidelity to the unpruned model without labels."""
        return float(self.sample_scores(model).mean())

    def sample_scores(self, model: nn.Module) -> torch.Tensor:
        """The score of each calibration sample (correct or not, or minus its divergence from
        the unpruned model without labels): `score` is their mean."""
        if self.data.labelled:
            return correct(model, self.data.calib_x, self.data.calib_y, device=self.train_device)
        return sample_fidelity(
            model, self.calib_reference_logits, self.data.calib_x, device=self.train_device
        )

    def validation_accuracy(self, model: nn.Module) -> float | None:
        if not self.data.labelled:
            return None
        return accuracy(model, self.data.val_x, self.data.val_y, device=self.train_device)

    def validation_fidelity(self, model: nn.Module) -> float | None:
        """Without labels, the model's fidelity to the unpruned model on the validation split
        (the measure candidates are scored by: 0 is the same outputs, lower is further)."""
        if self.data.labelled:
            return None
        device = self.train_device
        reference = logits(self.base_model, self.data.val_x, device=device)
        return fidelity(model, reference, self.data.val_x, device=device)

    def _stop_when_cancelled(self) -> Callable[[int, int, float], None] | None:
        """A training progress callback that raises SearchCancelled once the job is
        cancelled, asking at most every CANCEL_CHECK_S."""
        cancelled = self.cancelled
        if cancelled is None:
            return None
        last = time.monotonic()

        def check(step: int, total: int, loss: float) -> None:
            nonlocal last
            if time.monotonic() - last < CANCEL_CHECK_S:
                return
            last = time.monotonic()
            self.check_cancelled(f"while fine-tuning, at step {step} of {total}")

        return check

    def finetune(self, model: nn.Module, *, steps: int = 0, epochs: float = 0.0, seed: int) -> None:
        """Short fine-tune with distillation from the unpruned model, then batch-norm
        statistics recomputed on `bn_samples` training inputs (also with no fine-tuning)."""
        settings = self.settings
        if steps > 0 or epochs > 0:
            train(
                model,
                self.data.train_x,
                self.data.train_y,
                steps=steps if steps > 0 else None,
                epochs=epochs if steps <= 0 else None,
                batch_size=settings.ft_batch_size,
                lr=settings.ft_lr if steps > 0 else settings.final_lr,
                seed=seed,
                teacher_logits=self.train_reference_logits,
                kd_weight=settings.kd_weight if self.data.labelled else 1.0,
                progress=self._stop_when_cancelled(),
                device=self.train_device,
            )
        recalibrate_batch_norm(
            model,
            self.data.train_x,
            samples=settings.bn_samples,
            seed=seed,
            device=self.train_device,
        )
