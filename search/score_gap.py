"""How far apart two models' scores on the same samples are, and how sure that is.

Both models are scored on the same calibration samples, so their difference is judged on the
per-sample differences (a paired comparison): two models that err on the same hard images
differ by little noise, two that err on different ones by more. On 500 images, two accuracies
a point apart are often within chance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScoreGap:
    """Mean score of `a` minus that of `b` over the same samples, and its standard error."""

    difference: float
    standard_error: float
    samples: int

    def clearly_below(self, slack: float, z: float) -> bool:
        """Whether `a` scores lower than `b` by more than `slack` and by more than `z`
        standard errors: a shortfall that chance on these samples does not explain."""
        return -self.difference > max(slack, z * self.standard_error)


def paired_gap(a: torch.Tensor, b: torch.Tensor) -> ScoreGap:
    """The gap between per-sample scores `a` and `b` (1-D, same samples, same order).

    Per-sample scores are 0/1 correctness for accuracy, or minus each sample's divergence
    from the unpruned model for fidelity; the score is their mean either way.
    """
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"need two 1-D score vectors of one length, got {a.shape}, {b.shape}")
    n = a.numel()
    if n == 0:
        return ScoreGap(0.0, math.inf, 0)
    differences = a.double() - b.double()
    spread = float(differences.std()) if n > 1 else math.inf
    return ScoreGap(float(differences.mean()), spread / math.sqrt(n), n)
