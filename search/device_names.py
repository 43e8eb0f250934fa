"""The names a training device may be given by, without torch (the settings read them)."""

from __future__ import annotations

import re

# What a training device may be given as.
TRAIN_DEVICE_FORMS = "auto, cpu, cuda or cuda:N"
_FORM = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def train_device_name(value: str) -> str | None:
    """`value` stripped and lower-cased when it is one of TRAIN_DEVICE_FORMS, else None."""
    text = value.strip().lower()
    return text if _FORM.fullmatch(text) else None
