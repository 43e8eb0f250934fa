"""Engine messages in a REST client's terms: the CLI options they name, as job spec fields.

The engine (search/) words its checks for `archtree prune`, e.g. "--width must be at least 1";
over the API the same setting is the spec field `search.width`.
"""

from __future__ import annotations

import re
from typing import Any

from api.schemas import SearchSettingsIn
from search.settings import option_of

SPEC_FIELD_OF_OPTION = {
    **{option_of(name): f"search.{name}" for name in SearchSettingsIn.model_fields},
    "--num-classes": "num_classes",
    "--batch-size": "batch_size",
    "--model": "`model`",
    "--weights": "the `weights` upload",
    "--allow-pickle": "`allow_pickle: true` in the spec (the operator must also enable "
    "ARCHTREE_ALLOW_PICKLE)",
}

_OPTION = re.compile(r"--[a-z][a-z0-9-]*")

# Engine advice that names what a submission has not got, said as a submitter acts on it:
# data that is not builtin is an upload, and the service's environment is its operator's.
SUBMISSION_WORDING = [
    (
        re.compile(r"your own copy of it saved as a file, e\.g\. "),
        "your own copy of it sent as the `data` upload, a file saved e.g. by ",
    ),
    (
        re.compile(r"install (\S+) into this environment"),
        r"the service's operator can install \1 into its environment",
    ),
]


def in_spec_terms(message: str) -> str:
    """`message` with each CLI option that is a job spec setting replaced by its spec field,
    and engine advice that a submission cannot follow said in its terms."""
    for words, wording in SUBMISSION_WORDING:
        message = words.sub(wording, message)
    return _OPTION.sub(lambda option: SPEC_FIELD_OF_OPTION.get(option[0], option[0]), message)


def event_in_spec_terms(event: dict[str, Any]) -> dict[str, Any]:
    """A job event with its texts (a `status` event's error, a `note`'s message) in spec
    terms, as GET /v1/jobs/{id} gives the job's error."""
    texts = {
        field: in_spec_terms(event[field])
        for field in ("error", "message")
        if isinstance(event.get(field), str)
    }
    return {**event, **texts} if texts else event
