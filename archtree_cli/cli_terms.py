"""The service's messages in the terms of the command line that sent the request.

The API words its errors for a REST client: spec fields (`search.width`, `num_classes`) and
endpoints (`GET /v1/jobs`); the Python client names its own arguments (`out_dir`).
`archtree submit`, `status`, `fetch`, `cancel`, `delete` and `jobs` show them with the options
and commands a user of the CLI types instead.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import fields

from search.errors import ArchtreeError
from search.settings import SearchSettings, option_of

# A spec's search setting, `search.width`; not a name of the package, `search.load_pruned`.
_SEARCH_FIELD = re.compile(
    r"\bsearch\.(" + "|".join(field.name for field in fields(SearchSettings)) + r")\b(?!\()"
)
_JOB_ID = r"([0-9A-Za-z_-]+)"
# The API's endpoints that a command does the work of, with the command.
_ENDPOINTS = (
    (re.compile(rf"\bGET /v1/jobs/{_JOB_ID}(?![\w/])"), r"`archtree status \1`"),
    (
        re.compile(rf"\bGET /v1/jobs/{_JOB_ID}/artifacts/\{{name\}} \([^)]*\)"),
        r"`archtree fetch \1 --out DIR`",
    ),
    (re.compile(rf"\bDELETE /v1/jobs/{_JOB_ID}(?![\w/])"), r"`archtree delete \1`"),
)
_TERMS = (
    ("`allow_pickle: true` in the spec", "--allow-pickle"),
    ("allow_pickle", "--allow-pickle"),
    ("num_classes", "--num-classes"),
    ("batch_size", "--batch-size"),
    ("device_class", "--device-class"),
    ("the `weights` upload", "--weights"),
    ("`model`", "--model"),
    ("list the jobs with GET /v1/jobs", "list the jobs with `archtree jobs`"),
    ("submit its spec again with POST /v1/jobs", "submit it again with `archtree submit`"),
    ("the Idempotency-Key", "the --idempotency-key"),
    # The arguments of ArchtreeClient.fetch, which `archtree fetch` passes its options as.
    ("another out_dir", "another --out"),
    ("pass overwrite=True", "pass --overwrite"),
    ("send this one with a key of its own", "give this one another --idempotency-key (or none)"),
)


# A command the terms name, in backquotes: the command and its job id, if it takes one.
_COMMAND = re.compile(
    r"`archtree (?:(?:status|fetch|delete) [0-9A-Za-z_-]+|jobs|submit)(?=[ `])(?! --api)"
)


def in_cli_terms(message: str, api: str | None = None) -> str:
    """`message` with the job spec's fields and the API's endpoints as the CLI names them;
    the commands it names take `--api API` where `api` is given (the command's own)."""
    message = _SEARCH_FIELD.sub(lambda field: option_of(field[1]), message)
    for endpoint, command in _ENDPOINTS:
        message = endpoint.sub(command, message)
    for spec_term, cli_term in _TERMS:
        message = re.sub(rf"(?<![\w-]){re.escape(spec_term)}(?![\w-])", cli_term, message)
    if api:
        message = _COMMAND.sub(lambda command: f"{command[0]} --api {api}", message)
    return message


@contextlib.contextmanager
def errors_in_cli_terms(api: str | None = None) -> Iterator[None]:
    """Re-raise an ArchtreeError from the service in CLI terms, its commands at `api`."""
    try:
        yield
    except ArchtreeError as error:
        raise ArchtreeError(in_cli_terms(str(error), api)) from None
