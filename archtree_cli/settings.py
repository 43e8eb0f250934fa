"""Service settings, read from ARCHTREE_* environment variables (pydantic-settings)."""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from archtree_cli.paths import archtree_home
from latency.device_registry import AGENT_HEARTBEAT_S, MIN_HEARTBEAT_TTL_S
from latency.measurement_protocol import PACKAGE_NAME
from latency.redis_connection import check_redis_url, redacted
from search.device_names import TRAIN_DEVICE_FORMS, train_device_name
from search.errors import ArchtreeError

# Bounds on what the settings take: past them a value is a typo (an exponent, extra zeros),
# and some would hang or exhaust the machine (thousands of API processes, each ~300 MB).
MAX_API_WORKERS = 64
MAX_UPLOAD_BYTES = 1024**4  # 1 TiB
MAX_WAIT_S = 30 * 86400.0  # a month
MAX_HEARTBEAT_TTL_S = 86400.0  # a day: longer, an agent gone is shown online for that long
MIN_TASK_LEASE_S = 1.0  # renewed three times a lease: shorter, running tasks read as lost
QUEUE_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")


class ServiceSettings(BaseSettings):
    """Configuration shared by the API, the Celery workers and the agents.

    Every field can be set from the environment: `redis_url` from ARCHTREE_REDIS_URL (or
    REDIS_URL), `artifacts_url` from ARCHTREE_ARTIFACTS_URL, and so on.
    """

    model_config = SettingsConfigDict(env_prefix="ARCHTREE_", extra="ignore")

    redis_url: str = Field(
        default="",
        description="Redis for jobs, Celery broker and results, agents. Also read from REDIS_URL.",
    )
    artifacts_url: str = Field(
        default_factory=lambda: str(archtree_home() / "artifacts"),
        description="Folder or fsspec URL (s3://...) for uploads, candidate weights and results.",
    )
    max_weights_bytes: int = Field(
        default=200 * 1024 * 1024,
        gt=0,
        le=MAX_UPLOAD_BYTES,
        description="Largest weights upload accepted (413 beyond).",
    )
    max_data_bytes: int = Field(
        default=500 * 1024 * 1024,
        gt=0,
        le=MAX_UPLOAD_BYTES,
        description="Largest data upload accepted (413 beyond).",
    )
    device_wait_s: float = Field(
        default=600.0,
        gt=0,
        le=MAX_WAIT_S,
        allow_inf_nan=False,
        description="How long a job waits for a live agent of its device class before failing.",
    )
    measurement_timeout_s: float = Field(
        default=120.0,
        gt=0,
        le=MAX_WAIT_S,
        allow_inf_nan=False,
        description="How long a worker waits for one measurement's reply.",
    )
    heartbeat_ttl_s: float = Field(
        default=15.0,
        gt=0,
        le=MAX_HEARTBEAT_TTL_S,
        allow_inf_nan=False,
        description="An agent without a heartbeat for this long is offline. Agents beat every "
        f"{AGENT_HEARTBEAT_S:g} s; at least {MIN_HEARTBEAT_TTL_S:g} s.",
    )
    visibility_timeout_s: float = Field(
        default=300.0,
        gt=0,
        le=MAX_WAIT_S,
        allow_inf_nan=False,
        description="Seconds after which a task not acknowledged (its worker died) is handed to "
        "another worker (Redis visibility timeout). Keep it above the longest task: a task "
        "still running then is started a second time (harmless, but wasted work).",
    )
    task_lease_s: float = Field(
        default=15.0,
        ge=MIN_TASK_LEASE_S,
        allow_inf_nan=False,
        description="A worker renews a lease on each task it runs; a task whose lease is this "
        "old is shown as lost (its worker died) until it is handed to another worker.",
    )
    api_workers: int = Field(
        default=1,
        ge=1,
        le=MAX_API_WORKERS,
        description="API processes `archtree api` starts (its --workers default). Each is a "
        "whole copy of the API, about 300 MB as it imports torch: use about one per free core.",
    )
    search_queue: str = Field(default="search", description="Celery queue of the orchestration.")
    evaluate_queue: str = Field(
        default="evaluate", description="Celery queue of child evaluations (e.g. GPU workers)."
    )
    agent_redis_url: str = Field(
        default="",
        description="Redis URL handed to agents that register through the API, when they reach "
        "Redis by another address than the API does (default: redis_url).",
    )
    allow_pickle: bool = Field(
        default=False,
        description="Accept jobs with allow_pickle (weights that are pickled whole modules). "
        "Loading a pickle runs arbitrary code in the API and the workers: only for trusted users.",
    )
    allowed_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Packages whose `module:` model sources jobs may use, comma-separated or a "
        "JSON list. Building one imports and calls code on the API and the workers; none by "
        "default.",
    )
    train_device: str = Field(
        default="auto",
        description="Where workers fine-tune and score candidates: auto (the first CUDA GPU "
        "torch sees, else the CPU), cpu, cuda or cuda:N (`archtree worker --train-device`).",
    )
    work_dir: Path = Field(
        default_factory=lambda: archtree_home() / "work",
        description="Local scratch space of workers (copies of remote artifacts).",
    )

    @field_validator("redis_url", "agent_redis_url")
    @classmethod
    def _redis_url_form(cls, value: str) -> str:
        check_redis_url(value)
        return value

    @field_validator("artifacts_url", "work_dir", mode="before")
    @classmethod
    def _not_blank(cls, value: Any) -> Any:
        """Empty, fsspec and Path read it as the folder each process starts in."""
        if isinstance(value, str) and value != value.strip():
            raise ValueError("give it without spaces around it")
        if isinstance(value, str) and not value:
            raise ValueError("give a folder (or URL), or leave the variable unset for the default")
        return value

    @field_validator("task_lease_s")
    @classmethod
    def _lease_below_visibility(cls, lease_s: float, info: ValidationInfo) -> float:
        """A task not acknowledged by the visibility timeout goes to another worker even while
        it runs: a lease as long is never seen lost first, and a shorter timeout than a task
        runs it twice at once."""
        visibility_s = info.data.get("visibility_timeout_s")
        if visibility_s is not None and lease_s >= visibility_s:
            raise ValueError(
                f"the task lease must be below ARCHTREE_VISIBILITY_TIMEOUT_S ({visibility_s:g} "
                "s), which should be above the longest task (default 300 s): raise that, or "
                "lower this (default 15 s)"
            )
        return lease_s

    @field_validator("heartbeat_ttl_s")
    @classmethod
    def _ttl_spans_two_beats(cls, ttl_s: float) -> float:
        if ttl_s < MIN_HEARTBEAT_TTL_S:
            raise ValueError(
                f"agents beat every {AGENT_HEARTBEAT_S:g} s, so a TTL under "
                f"{MIN_HEARTBEAT_TTL_S:g} s shows live agents offline between beats: give at "
                "least that (default 15 s)"
            )
        return ttl_s

    @field_validator("search_queue", "evaluate_queue")
    @classmethod
    def _queue_name(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("give a queue name, or leave the variable unset for the default")
        if not QUEUE_NAME.fullmatch(name.strip()):
            raise ValueError(
                "a queue name is letters, digits, '.', '_' and '-' (a worker's --queues "
                "splits its list at commas)"
            )
        return name.strip()

    @field_validator("train_device")
    @classmethod
    def _train_device_form(cls, value: str) -> str:
        """Its form only: whether the GPU is there is asked where the tasks run."""
        name = train_device_name(value)
        if name is None:
            raise ValueError(f"give {TRAIN_DEVICE_FORMS}")
        return name

    @field_validator("allowed_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: Any) -> Any:
        """`a,b` or `["a", "b"]` from the environment; a list as it is."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            try:
                names = json.loads(text)
            except json.JSONDecodeError:
                raise ValueError(
                    'give package names separated by commas (a,b) or as a JSON list (["a", "b"])'
                ) from None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError('give a JSON list of package names, each a string (["a", "b"])')
        else:
            names = [name.strip() for name in text.split(",") if name.strip()]
        for name in names:
            if isinstance(name, str) and not PACKAGE_NAME.fullmatch(name):
                raise ValueError(f"{name[:80]!r} is not a Python package name (like mynets.models)")
        return names

    def resolved_redis_url(self) -> str:
        """The Redis URL as redis-py takes it (a unix socket as unix://PATH)."""
        import os

        url = self.redis_url or os.environ.get("REDIS_URL", "")
        return _swap_scheme(url, "redis+socket://", "unix://")

    def celery_redis_url(self) -> str:
        """The Redis URL as Celery takes it: kombu names a unix socket redis+socket://PATH,
        and refuses a rediss:// URL that does not say how to check the server's certificate,
        which redis-py checks by default (ssl_cert_reqs=required) and Celery is told to."""
        url = _swap_scheme(self.resolved_redis_url(), "unix://", "redis+socket://")
        if url.startswith("rediss://") and "ssl_cert_reqs=" not in url:
            url += ("&" if "?" in url else "?") + "ssl_cert_reqs=required"
        return url


def _swap_scheme(url: str, old: str, new: str) -> str:
    return new + url.removeprefix(old) if url.startswith(old) else url


def load_service_settings() -> ServiceSettings:
    """The settings from the environment; a bad value is an ArchtreeError that names its
    variable and says what it should be."""
    try:
        settings = ServiceSettings()
    except ValidationError as error:
        problems = "; ".join(
            f"{_variable(problem['loc'])}={_shown(problem.get('input'))!r}: "
            # A validator's own message, without pydantic's "Value error, " before it.
            f"{problem['msg'].removeprefix('Value error, ')}"
            for problem in error.errors()
        )
        raise ArchtreeError(f"bad setting in the environment: {problems}") from None
    except SettingsError as error:
        # Raised before validation, when a value cannot be decoded at all (malformed JSON).
        raise ArchtreeError(
            f"bad setting in the environment: {error}; see README.md, Settings (environment)"
        ) from None
    fallback = "" if settings.redis_url else os.environ.get("REDIS_URL", "")
    try:
        check_redis_url(fallback)
    except ValueError as error:
        raise ArchtreeError(f"bad setting in the environment: REDIS_URL: {error}") from None
    return settings


def _shown(value: Any) -> Any:
    """A setting's value as an error shows it: a URL without its password."""
    return redacted(value) if isinstance(value, str) else value


def _variable(location: tuple[Any, ...]) -> str:
    """The environment variable a field is read from, e.g. ARCHTREE_MAX_DATA_BYTES."""
    field = str(location[0]) if location else "?"
    return f"ARCHTREE_{field.upper()}"


@lru_cache
def service_settings() -> ServiceSettings:
    return load_service_settings()
