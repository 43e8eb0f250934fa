"""The files a search leaves: arch.json, model.safetensors and report.json, and reloading them."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from search.arch_spec import ArchSpec, build_from_spec
from search.errors import ArchtreeError, first_line
from search.model_source import save_weights
from search.result_files import ARTIFACT_NAMES, check_result_places

__all__ = ["ARTIFACT_NAMES", "check_result_places", "load_pruned", "save_artifacts"]


def save_artifacts(
    out_dir: str | Path, spec: ArchSpec, model: nn.Module, report: dict[str, Any]
) -> Path:
    """Write the pruned model's three files into `out_dir` (created if needed); nothing when
    its weights are not all finite (a model that answers the same to everything)."""
    broken = _first_non_finite(model.state_dict())
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
    check_result_places(out)
    # All three are written beside their places first, and moved in only once all are: a
    # write that fails (a full disk) leaves the folder as it was, an earlier result included.
    staging = Path(tempfile.mkdtemp(prefix=".archtree-saving-", dir=out))
    try:
        try:
            save_weights(model, staging / "model.safetensors")
            text = json.dumps(spec.to_dict(), indent=1, sort_keys=True)
            (staging / "arch.json").write_text(text)
            (staging / "report.json").write_text(json.dumps(report, indent=2, default=float))
        except OSError as error:
            raise ArchtreeError(
                f"cannot write the result into {out} ({error.strerror or error}): nothing there "
                "was changed; free some space, or give another --out, and run again"
            ) from error
        for name in ARTIFACT_NAMES:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def load_pruned(directory: str | Path) -> nn.Module:
    """The pruned model saved in `directory`, ready for inference (eval mode).

    The base model's code must be importable here, as for `module:` sources.
    """
    spec = load_result_spec(directory)
    try:
        model = build_from_spec(spec)
    except ArchtreeError:
        raise
    except Exception as error:  # the model's code, on widths or an input arch.json set
        raise ArchtreeError(
            f"the model {Path(directory) / 'arch.json'} describes cannot be built and run "
            f"({type(error).__name__}: {_shortened(error)}): the file was edited, or the "
            f"model's code changed since; run archtree prune (or fetch) again"
        ) from error
    weights = Path(directory) / "model.safetensors"
    try:
        state = load_file(str(weights))
    except Exception as error:  # safetensors' own error for a damaged or truncated file
        raise ArchtreeError(
            f"{weights} cannot be read ({first_line(error)}): the file is damaged or was cut "
            "short; run archtree prune (or fetch) again"
        ) from error
    broken = _first_non_finite(state)
    if broken is not None:  # a result is saved only with finite weights (save_artifacts)
        raise ArchtreeError(
            f"{weights} holds NaN or infinite values in {broken}: the file is damaged or was "
            "edited; run archtree prune (or fetch) again"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ArchtreeError(
            f"{weights} does not fit the architecture in {Path(directory) / 'arch.json'} "
            f"({_shortened(error)}): the two come from different results; run archtree prune "
            "(or fetch) again"
        ) from error
    return model.eval()


def _first_non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor of `state` holding NaN or infinity."""
    return next(
        (
            name
            for name, value in state.items()
            if value.is_floating_point() and not torch.isfinite(value).all()
        ),
        None,
    )


def _shortened(error: BaseException, limit: int = 300) -> str:
    """An error's message on one line, cut at `limit` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_result_spec(directory: str | Path) -> ArchSpec:
    """The architecture spec (arch.json) of the pruned model saved in `directory`."""
    folder = Path(directory)
    _check_result_files(folder)
    arch_path = folder / "arch.json"
    try:
        return ArchSpec.from_json(arch_path.read_text())
    except (ValueError, KeyError, TypeError, OverflowError, ArchtreeError) as error:
        raise ArchtreeError(
            f"{arch_path} is not a valid architecture spec ({error}): save the result again "
            "with `archtree prune`, or `archtree fetch` for a service job."
        ) from error


def _check_result_files(folder: Path) -> None:
    """ArchtreeError when `folder` lacks a result's arch.json or model.safetensors."""
    if not folder.is_dir():
        what = "a file, not a folder" if folder.exists() else "not there"
        raise ArchtreeError(
            f"{folder} is {what}: point to the folder archtree prune (or fetch) wrote."
        )
    for path in (folder / "arch.json", folder / "model.safetensors"):
        if not path.is_file():
            what = "not a file" if path.exists() else "missing"
            raise ArchtreeError(f"{path} is {what}: point to a folder written by archtree prune.")
