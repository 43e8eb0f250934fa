"""The files a search leaves: arch.json, model.safetensors and report.json, and reloading them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from search.arch_spec import ArchSpec, build_from_spec
from search.errors import ArchtreeError
from search.model_source import save_weights

ARTIFACT_NAMES = ("arch.json", "model.safetensors", "report.json")


def _write_text(path: Path, text: str) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def save_artifacts(
    out_dir: str | Path, spec: ArchSpec, model: nn.Module, report: dict[str, Any]
) -> Path:
    """Write the pruned model's three files into `out_dir` (created if needed); nothing when
    its weights are not all finite (a model that answers the same to everything)."""
    broken = next(
        (
            name
            for name, value in model.state_dict().items()
            if value.is_floating_point() and not torch.isfinite(value).all()
        ),
        None,
    )
    if broken is not None:
        raise ArchtreeError(
            f"the pruned model's {broken} holds NaN or infinite values, so no result was saved: "
            "the data's values are probably too large for float32 arithmetic (batch-norm "
            "statistics overflow); scale them, e.g. to [0, 1] or to zero mean and unit variance."
        )
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ArchtreeError(f"cannot create the output folder {out}: {error.strerror}.") from error
    save_weights(model, out / "model.safetensors")
    _write_text(out / "arch.json", json.dumps(spec.to_dict(), indent=1, sort_keys=True))
    _write_text(out / "report.json", json.dumps(report, indent=2, default=float))
    return out


def load_pruned(directory: str | Path) -> nn.Module:
    """The pruned model saved in `directory`, ready for inference (eval mode).

    The base model's code must be importable here, as for `module:` sources.
    """
    model = build_from_spec(load_result_spec(directory))
    model.load_state_dict(load_file(str(Path(directory) / "model.safetensors")))
    return model.eval()


def load_result_spec(directory: str | Path) -> ArchSpec:
    """The architecture spec (arch.json) of the pruned model saved in `directory`."""
    folder = Path(directory)
    _check_result_files(folder)
    arch_path = folder / "arch.json"
    try:
        return ArchSpec.from_json(arch_path.read_text())
    except (ValueError, KeyError, TypeError) as error:
        raise ArchtreeError(f"{arch_path} is not a valid architecture spec ({error}).") from error


def _check_result_files(folder: Path) -> None:
    """ArchtreeError when `folder` lacks a result's arch.json or model.safetensors."""
    for path in (folder / "arch.json", folder / "model.safetensors"):
        if not path.is_file():
            raise ArchtreeError(f"{path} is missing: point to a folder written by archtree prune.")
