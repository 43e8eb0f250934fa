"""Engine messages in a REST client's terms: the CLI options they name, as job spec fields.

The engine (search/) words its checks for `archtree prune`, e.g. "--width must be at least 1";
over the API the same setting is the spec field `search.width`.
"""

from __future__ import annotations

import re

from api.schemas import SearchSettingsIn
from search.settings import option_of

SPEC_FIELD_OF_OPTION = {
    **{option_of(name): f"search.{name}" for name in SearchSettingsIn.model_fields},
    "--num-classes": "num_classes",
    "--allow-pickle": "`allow_pickle: true` in the spec (the operator must also enable "
    "ARCHTREE_ALLOW_PICKLE)",
}

_OPTION = re.compile(r"--[a-z][a-z0-9-]*")


def in_spec_terms(message: str) -> str:
    """`message` with each CLI option that is a job spec setting replaced by its spec field."""
    return _OPTION.sub(lambda option: SPEC_FIELD_OF_OPTION.get(option[0], option[0]), message)
