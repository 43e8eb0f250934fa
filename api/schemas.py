"""What the API accepts and answers, apart from how jobs and devices are stored."""

from __future__ import annotations

import unicodedata
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from latency.measurement_protocol import DEVICE_CLASS_PATTERN, PACKAGE_NAME
from latency.runtimes import RUNTIMES, get_runtime
from search.errors import ArchtreeError
from search.settings import (
    MAX_BN_SAMPLES,
    MAX_CHANNEL_MULTIPLE,
    MAX_EPOCHS,
    MAX_PROBES,
    MAX_STEPS,
    MAX_TREE_SIZE,
)
from workers.job_store import STATUSES

JobStatus = Literal[STATUSES]  # type: ignore[valid-type]

# Bounds of a device registration: a host name is at most 255 characters (RFC 1035), and so is
# any other text an agent reports.
MAX_DEVICE_TEXT = 255
MAX_DEVICE_THREADS = 1024
# Packages one agent may allow `module:` sources of.
MAX_ALLOWED_MODULES = 100

FAST_SEARCH_EXAMPLE = {"width": 2, "branching": 2, "planned_steps": 2, "ft_steps": 5}


class ErrorMessage(BaseModel):
    """Every error answer: one line saying what is wrong and what to do."""

    detail: str = Field(examples=["cannot read the budget 'fast': give milliseconds like 8ms ..."])


INVALID = {422: {"model": ErrorMessage, "description": "Invalid request (why, in one line)."}}
# Every route that needs Redis: it answers so, with Retry-After, while Redis is unreachable.
UNAVAILABLE = {
    503: {
        "model": ErrorMessage,
        "description": "Redis (or, for a submission, the artifact store) is unreachable; "
        "Retry-After says when to try again.",
    }
}


def as_json(responses: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """`responses` documented as JSON, on a route whose own answer is of another media type
    (FastAPI would give them the route's)."""
    return {
        status: {
            "description": response["description"],
            "content": {
                "application/json": {
                    "schema": {"$ref": f"#/components/schemas/{response['model'].__name__}"}
                }
            },
        }
        for status, response in responses.items()
    }


# A device class's form, documented; the API checks it itself (latency.measurement_protocol)
# to answer with its own message.
DEVICE_CLASS_SCHEMA = {"pattern": f"^{DEVICE_CLASS_PATTERN}$", "maxLength": 64}


class SearchSettingsIn(BaseModel):
    """Search settings of a job; a setting left out takes the engine's default."""

    model_config = ConfigDict(extra="forbid", strict=True)

    strategy: str | None = Field(
        None,
        description="archtree (tree search), greedy (width 1) or uniform",
        examples=["archtree"],
    )
    width: int | None = Field(
        None, le=MAX_TREE_SIZE, description="Candidates kept alive per depth (K)."
    )
    branching: int | None = Field(
        None, le=MAX_TREE_SIZE, description="Moves tried per candidate (B)."
    )
    planned_steps: int | None = Field(
        None, le=MAX_TREE_SIZE, description="Depths planned to reach the budget."
    )
    max_depth: int | None = Field(None, le=MAX_TREE_SIZE, description="Depth limit of the tree.")
    move_kinds: list[str] | None = Field(
        None,
        description="Moves tried on each candidate, in order of preference: global, latency, "
        "uniform, focused.",
        examples=[["global", "latency", "uniform", "focused"]],
    )
    ft_steps: int | None = Field(
        None, le=MAX_STEPS, description="Fine-tuning steps per child before scoring."
    )
    bn_samples: int | None = Field(
        None,
        le=MAX_BN_SAMPLES,
        description="Training inputs on which batch-norm statistics are recomputed after each "
        "fine-tune, before scoring (0 = off).",
    )
    select_top: int | None = Field(
        None,
        le=MAX_TREE_SIZE,
        description="Best candidates under budget fine-tuned further and ranked again.",
    )
    select_steps: int | None = Field(
        None, le=MAX_STEPS, description="Fine-tuning steps of that re-ranking, per candidate."
    )
    fill_probes: int | None = Field(
        None,
        le=MAX_PROBES,
        description="An answer well under the aim is given channels back group by group, "
        "each widening measured: first the groups its last move cut, then any group cut since "
        "the unpruned model, this many measurements at most in each pass (0 = off).",
    )
    final_epochs: float | None = Field(
        None,
        le=MAX_EPOCHS,
        allow_inf_nan=False,  # else NaN would be said to be above the bound
        description="Epochs of final fine-tuning of the answer, with distillation.",
    )
    round_to: int | None = Field(
        None, le=MAX_CHANNEL_MULTIPLE, description="Keep channel counts multiples of N."
    )
    widen_to: int | None = Field(
        None,
        le=MAX_CHANNEL_MULTIPLE,
        description="Try widening each pruned channel group to the next multiple of N; kept "
        "when the measured latency allows, else half of N is tried, down to 8 (0 = off; "
        "default: the device's channel block, 16 on AVX-512 CPUs, 8 elsewhere).",
    )
    min_width_fraction: float | None = Field(
        None, description="Smallest share of each channel group kept, in [0, 1)."
    )
    max_cut: float | None = Field(
        None, description="Largest share of a channel group one step may remove, in (0, 1]."
    )
    margin: float | None = Field(
        None, description="Share under the budget the search aims at, in [0, 0.5)."
    )
    importance: str | None = Field(None, description="Channel importance: l2 or taylor.")
    max_probes: int | None = Field(
        None, le=MAX_PROBES, description="Measured probes of the bisection that sizes each move."
    )
    seed: int | None = Field(None, description="Random seed (data splits, fine-tuning).")

    @field_validator("strategy", "importance", "move_kinds", mode="before")
    @classmethod
    def _as_pasted(cls, names: Any) -> Any:
        """Spaces around a name, as pasted, are not part of it."""
        if isinstance(names, list):
            return [name.strip() if isinstance(name, str) else name for name in names]
        return names.strip() if isinstance(names, str) else names


class JobSpecIn(BaseModel):
    """The `spec` form field of a submission. Files travel as the `weights` and `data` uploads."""

    # Strict: a number is a JSON number and a switch true or false, never "2", true for 1 or
    # "yes" (which would be read as something the user may not have meant).
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "model": "builtin:vgg",
                    "data": "builtin:digits",
                    "budget": "60%",
                    "device_class": "local",
                    "search": FAST_SEARCH_EXAMPLE,
                }
            ]
        },
    )

    model: str = Field(
        description="builtin:NAME (vgg, resnet, mobilenetv2), torchvision:NAME or timm:NAME; "
        "module:package.module:callable only for packages the operator allowed.",
        examples=["builtin:vgg"],
    )
    data: str | None = Field(
        None,
        description="builtin:mnist or builtin:digits; leave out when uploading a `data` file.",
        examples=["builtin:digits"],
    )
    budget: str = Field(
        description="Latency budget: milliseconds (8ms) or a share of the unpruned model's "
        "latency on the device (60%).",
        examples=["60%"],
    )
    device_class: str = Field(
        "local",
        description="Device class whose agents time the candidates.",
        examples=["local"],
        json_schema_extra=DEVICE_CLASS_SCHEMA,
    )
    batch_size: int = Field(1, ge=1, le=4096, description="Batch size timed.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Precision the model is timed in."
    )
    num_classes: int | None = Field(
        None, ge=2, description="Classifier outputs of a builtin model (default: from the data)."
    )
    allow_pickle: bool = Field(
        False,
        description="Accept weights that are a pickled whole module. Refused unless the "
        "operator enabled it: loading a pickle runs arbitrary code.",
    )
    search: SearchSettingsIn = Field(
        default_factory=SearchSettingsIn, description="Search settings (defaults when left out)."
    )

    @model_validator(mode="before")
    @classmethod
    def _files_are_uploads(cls, spec: Any) -> Any:
        if isinstance(spec, dict) and "weights" in spec:
            raise ValueError(
                "`weights` is not a spec field: send the weights file as the `weights` upload "
                "(curl -F weights=@model.safetensors)"
            )
        return spec

    @field_validator("budget", mode="before")
    @classmethod
    def _budget_is_text(cls, budget: Any) -> Any:
        if isinstance(budget, int | float) and not isinstance(budget, bool):
            raise ValueError(f'give the budget as text with its unit: "{budget}ms" or "{budget}%"')
        return budget.strip() if isinstance(budget, str) else budget  # as pasted, spaces around

    @field_validator("model", "data", "device_class", "dtype", mode="before")
    @classmethod
    def _as_pasted(cls, text: Any) -> Any:
        """Spaces around a name, as pasted, are not part of it."""
        return text.strip() if isinstance(text, str) else text


class JobSpec(BaseModel):
    """A job's spec as stored: uploads appear as `artifact:` paths."""

    model: str = Field(examples=["builtin:vgg"])
    data: str = Field(examples=["artifact:jobs/4f1c2a9be07d/inputs/data.npz"])
    weights: str | None = Field(None, examples=[None])
    allow_pickle: bool = False
    num_classes: int | None = None
    budget: str = Field(examples=["60%"])
    device_class: str = Field(examples=["local"])
    batch_size: int = 1
    dtype: str = "float32"
    search: dict[str, Any] = Field(default_factory=dict, examples=[FAST_SEARCH_EXAMPLE])
    upload_names: dict[str, str] = Field(
        default_factory=dict,
        description="The file names the uploads were sent with, by upload (weights, data).",
        examples=[{"data": "digits.npz"}],
    )


class JobLinks(BaseModel):
    """Where to follow a job and fetch its results."""

    job: str = Field(examples=["/v1/jobs/4f1c2a9be07d"])
    events: str = Field(examples=["/v1/jobs/4f1c2a9be07d/events"])
    tree: str = Field(examples=["/v1/jobs/4f1c2a9be07d/tree"])
    cancel: str = Field(examples=["/v1/jobs/4f1c2a9be07d/cancel"])
    artifacts: dict[str, str] = Field(
        description="The result files by name; they exist once the job has succeeded.",
        examples=[{"report.json": "/v1/jobs/4f1c2a9be07d/artifacts/report.json"}],
    )

    @classmethod
    def of(cls, job_id: str) -> JobLinks:
        from search.artifacts import ARTIFACT_NAMES

        base = f"/v1/jobs/{job_id}"
        return cls(
            job=base,
            events=f"{base}/events",
            tree=f"{base}/tree",
            cancel=f"{base}/cancel",
            artifacts={name: f"{base}/artifacts/{name}" for name in ARTIFACT_NAMES},
        )


class JobCreated(BaseModel):
    """The answer to a submission: the job's id, its status and where to follow it."""

    id: str = Field(examples=["4f1c2a9be07d"])
    status: JobStatus = Field(examples=["queued"])
    replayed: bool = Field(
        False,
        description="True when the Idempotency-Key named a job that an earlier submission "
        "created: this answer gives that job, in its status now, and no job was created.",
        examples=[False],
    )
    links: JobLinks


class Candidate(BaseModel):
    """A candidate sub-model in a progress summary."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(examples=["n7"])
    latency_ms: float = Field(examples=[0.412])
    score: float | None = Field(None, examples=[0.93])
    accuracy: float | None = Field(None, examples=[0.95])
    fidelity: float | None = Field(
        None,
        description="Without labels, what stands for accuracy: fidelity to the unpruned "
        "model's outputs on the validation split (0: the same outputs; lower: further).",
        examples=[-0.012],
    )


class JobProgress(BaseModel):
    """How far the search is; fields appear as the job reaches them."""

    model_config = ConfigDict(extra="allow")

    started_at: float | None = Field(
        None,
        description="Unix time a worker started the job's first step; null while the job "
        "is queued, or waits for its device before that step.",
        examples=[1732660000.0],
    )
    device_wait_since: float | None = Field(
        None,
        description="Unix time since which the job has waited for an agent of its device "
        "class (status waiting_for_device); null once one is online again. The job fails once "
        "it has waited ARCHTREE_DEVICE_WAIT_S since then.",
    )
    device_wait_until: float | None = Field(
        None,
        description="Unix time the job fails at if no agent of its device class is online by "
        "then (status waiting_for_device); null once one is.",
    )
    depth: int | None = Field(None, description="Depths of the tree completed.", examples=[2])
    candidates_evaluated: int | None = Field(
        None, description="Children fine-tuned, measured and scored so far.", examples=[8]
    )
    measurements: int | None = Field(None, description="Latency measurements taken on agents.")
    cache_hits: int | None = Field(None, description="Measurements answered by the cache.")
    baseline_ms: float | None = Field(None, description="Latency of the unpruned model.")
    budget_ms: float | None = Field(None, description="The budget resolved in milliseconds.")
    scored_by: Literal["accuracy", "fidelity"] | None = Field(
        None,
        description="What candidates are scored by: calibration accuracy, or, when the data "
        "have no labels, fidelity to the unpruned model's outputs.",
    )
    best: Candidate | None = Field(None, description="Best candidate within budget so far.")
    final: Candidate | None = Field(None, description="The confirmed answer, once succeeded.")
    notes: list[str] | None = Field(
        None,
        description="What the numbers do not say by themselves, one line each: the "
        "submission's notes (settings the strategy overrides), then, while the job runs, the "
        "search's notes so far (e.g. an unpruned model that scores at chance), and once "
        "succeeded report.json's `notes`; settings named as spec fields (`search.width`), as "
        "in `error` and the events.",
        examples=[["the unpruned model already meets the budget: nothing was pruned"]],
    )
    submission_notes: list[str] | None = Field(
        None,
        description="The notes of the submission alone: search settings given that the "
        "strategy overrides, e.g. `search.width 3 is not used: search.strategy greedy runs "
        "with 1`.",
    )


class LostTask(BaseModel):
    """A task of the job whose worker stopped renewing its lease: killed, or its machine lost.
    A live worker hands it back to its queue once it has stayed lost a whole lease (or the
    broker does, once its visibility timeout has passed)."""

    task_id: str = Field(description="The Celery task id.")
    name: str = Field(examples=["archtree.evaluate_child"])
    worker: str = Field(description="The worker that ran it.", examples=["celery@gpu-3"])
    started_at: float = Field(description="Unix time the lost worker started it.")
    silent_s: float = Field(description="Seconds since the worker last renewed its lease.")
    back_by: float = Field(
        description="Unix time by which another worker gets it, if one is alive: about two "
        "leases (ARCHTREE_TASK_LEASE_S) after its worker last renewed its lease, at most "
        "ARCHTREE_VISIBILITY_TIMEOUT_S after it was handed to that worker."
    )


class Job(BaseModel):
    """A job: its spec, status and progress."""

    id: str = Field(examples=["4f1c2a9be07d"])
    status: JobStatus = Field(examples=["running"])
    created_at: float = Field(description="Unix time the job was submitted.")
    updated_at: float = Field(description="Unix time of the job's last change.")
    spec: JobSpec
    progress: JobProgress
    error: str | None = Field(None, description="Why the job failed, in one line.")
    cancel_requested: bool = False
    lost_tasks: list[LostTask] = Field(
        default_factory=list,
        description="Running tasks whose worker was lost, until another worker takes them: "
        "the job is stalled meanwhile. Given by GET /v1/jobs/{id}; empty in the job list.",
    )
    links: JobLinks

    @classmethod
    def of(cls, job: dict[str, Any], lost_tasks: list[dict[str, Any]] | None = None) -> Job:
        """From a JobStore record; its error and notes in spec terms (`search.width`, not
        `--width`), as its events give them."""
        from api.spec_terms import in_spec_terms

        error = job.get("error")
        progress = job.get("progress") or {}
        if progress.get("notes"):
            progress = {**progress, "notes": [in_spec_terms(note) for note in progress["notes"]]}
        return cls(
            **{**job, "error": in_spec_terms(error) if error else error, "progress": progress},
            lost_tasks=lost_tasks or [],
            links=JobLinks.of(job["id"]),
        )


class JobList(BaseModel):
    """A page of jobs, newest first."""

    jobs: list[Job]
    total: int = Field(description="Jobs in all pages.", examples=[42])
    offset: int = Field(examples=[0])
    limit: int = Field(examples=[20])


class TreeNode(BaseModel):
    """A node of the search tree (a candidate sub-model)."""

    id: str = Field(examples=["n3"])
    parent: str | None = Field(examples=["n0"])
    depth: int = Field(examples=[1])
    move: str | None = Field(description="The move that made it from its parent.")
    fraction: float | None = Field(None, description="Share of channels the move removed.")
    widened_to: int | None = Field(
        None,
        description="Its channel groups were then widened to multiples of this, at no latency "
        "cost (search setting widen_to); null when not.",
    )
    filled_from: str | None = Field(
        None,
        description="The answer it was made from by giving channels back, group by group, "
        "to use the budget that answer left (search setting fill_probes); null when not.",
    )
    latency_ms: float
    ratio: float = Field(description="Latency relative to the unpruned model.")
    score: float
    within_budget: bool
    params: int
    macs: float
    arch_hash: str
    widths: dict[str, int] = Field(
        default_factory=dict,
        description="Output channels of each conv and linear layer.",
        examples=[{"features.0": 12, "features.3": 24}],
    )


class JobTree(BaseModel):
    """The search tree so far: nodes, the frontier to expand next, and the budget."""

    job_id: str
    status: JobStatus
    depth: int = Field(0, description="Depths completed.")
    done: bool = False
    baseline_ms: float | None = None
    budget_ms: float | None = None
    root_id: str | None = None
    frontier: list[str] = Field(default_factory=list, examples=[["n3", "n5"]])
    best: str | None = Field(None, description="Id of the best node within budget.")
    nodes: list[TreeNode] = Field(default_factory=list)

    @classmethod
    def of(cls, job: dict[str, Any], state: dict[str, Any] | None) -> JobTree:
        """From a JobStore record and its stored search state (None before the baseline)."""
        if state is None:
            return cls(job_id=job["id"], status=job["status"])
        from search.tree import SearchState

        tree = SearchState.from_dict(state)
        best = tree.best_within_budget()
        return cls(
            job_id=job["id"],
            status=job["status"],
            depth=tree.depth,
            done=tree.done,
            baseline_ms=tree.baseline_ms,
            budget_ms=tree.budget_ms,
            root_id=tree.root_id,
            frontier=tree.frontier,
            best=best.id if best else None,
            nodes=[
                TreeNode(**node.summary(), widths=_out_widths(node.spec.layers))
                for node in tree.nodes.values()
            ],
        )


def _out_widths(layers: dict[str, list[int]]) -> dict[str, int]:
    """Output width of every conv ([in, out, groups]) and linear ([in, out]) layer of a spec."""
    return {name: shape[1] for name, shape in layers.items() if len(shape) in (2, 3)}


class DeviceInfo(BaseModel):
    """What an agent tells about its device when it registers."""

    device_class: str = Field(
        description="Agents of one class are interchangeable.", examples=["rpi4-cpu"]
    )
    host: str = Field(examples=["rpi-07"])
    runtime: str = Field("torch", examples=["torch"])
    runtime_version: str = Field("", examples=["2.13.0+cpu"])
    cpu: str | None = Field(None, examples=["Cortex-A72"])
    gpu: str | None = Field(None, examples=[None])
    threads: int = Field(1, examples=[1])
    allowed_modules: list[str] = Field(
        default_factory=list,
        description="The packages whose `module:` sources the agent builds (--allow-module).",
        examples=[["mynets"]],
    )


class DeviceIn(DeviceInfo):
    """A registration: the device's info, bounded, and nothing else. (Records already stored
    are listed as `Device`, unbounded, so that an old one never breaks the list.)"""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"device_class": "rpi4-cpu", "host": "rpi-07"}]},
    )

    device_class: str = Field(
        description="Agents of one class are interchangeable.",
        examples=["rpi4-cpu"],
        json_schema_extra=DEVICE_CLASS_SCHEMA,
    )
    host: str = Field(min_length=1, max_length=MAX_DEVICE_TEXT, examples=["rpi-07"])
    runtime: str = Field(
        "torch",
        max_length=MAX_DEVICE_TEXT,
        description="What the agent times models with.",
        examples=["torch"],
        json_schema_extra={"enum": list(RUNTIMES)},
    )
    runtime_version: str = Field("", max_length=MAX_DEVICE_TEXT, examples=["2.13.0+cpu"])
    cpu: str | None = Field(None, max_length=MAX_DEVICE_TEXT, examples=["Cortex-A72"])
    gpu: str | None = Field(None, max_length=MAX_DEVICE_TEXT, examples=[None])
    threads: int = Field(1, ge=1, le=MAX_DEVICE_THREADS, strict=True, examples=[1])
    allowed_modules: list[str] = Field(
        default_factory=list,
        max_length=MAX_ALLOWED_MODULES,
        description="The packages whose `module:` sources the agent builds (--allow-module): "
        "dotted Python package names. The agents of a class online at once must allow the same.",
        examples=[["mynets"]],
    )

    @field_validator("allowed_modules")
    @classmethod
    def _package_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not PACKAGE_NAME.fullmatch(name):
                raise ValueError(f"{name[:80]!r} is not a Python package name (like mynets.models)")
        return sorted(set(names))

    @field_validator("runtime")
    @classmethod
    def _runtime_is_supported(cls, runtime: str) -> str:
        try:
            return get_runtime(runtime).name
        except ArchtreeError as error:
            raise ValueError(str(error)) from None

    @field_validator("host", "runtime_version", "cpu", "gpu")
    @classmethod
    def _printable(cls, text: str | None) -> str | None:
        # Shown in listings, logs and the dashboard, one line each: a line break or a control
        # character there would forge or garble a line.
        for position, character in enumerate(text or ""):
            if unicodedata.category(character)[0] == "C" or character in "\u2028\u2029":
                raise ValueError(
                    f"holds the control character U+{ord(character):04X} at character "
                    f"{position + 1}: send one line of printable text"
                )
        return text


class Device(DeviceInfo):
    """A registered device, with its liveness."""

    id: str = Field(examples=["9b2e41c0d7aa"])
    registered_at: float = Field(description="Unix time (Redis clock) of registration.")
    last_seen: float = Field(description="Unix time (Redis clock) of the last heartbeat.")
    online: bool = Field(description="Whether a heartbeat came within the heartbeat TTL.")
    measurements: int = Field(0, description="Measurements this device answered.")


class DeviceRegistered(Device):
    """A new device's record, with the Redis its agent serves requests from."""

    redis_url: str = Field(examples=["redis://redis:6379/0"])


class DeviceList(BaseModel):
    """Registered devices and the requests waiting per device class."""

    devices: list[Device]
    queue_depth: dict[str, int] = Field(
        description="Measurement requests not answered yet, per device class.",
        examples=[{"rpi4-cpu": 3}],
    )
    jobs_waiting: dict[str, int] = Field(
        description="Jobs waiting for an agent of their device class to come online "
        "(status waiting_for_device), per class that has any.",
        examples=[{"jetson-orin": 1}],
    )


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """Whether the service can take jobs, and who serves them."""

    status: Literal["ready", "unavailable"]
    redis: bool = Field(description="Whether Redis answered a ping.")
    workers: list[str] = Field(
        default_factory=list, description="Celery workers that answered a ping."
    )
    agents_online: dict[str, int] = Field(
        default_factory=dict, description="Online agents per device class."
    )
    detail: str | None = Field(
        None,
        description="Why the service is unavailable; when ready, what it lacks to run jobs "
        "(no Celery worker answered, or none takes one of its queues, so jobs wait there).",
    )


def validation_message(errors: list[Any]) -> str:
    """Pydantic's validation errors as one line: `where: what` for the first, and where the
    others are (`(and 2 more: host, threads)`)."""
    first = errors[0]
    where = _where(first)
    others = list(dict.fromkeys(_where(error) for error in errors[1:]))
    more = f" (and {len(errors) - 1} more: {', '.join(others)})" if errors[1:] else ""
    bound = _bound_text(first)
    if bound and where:  # as our own checks say it: search.width must be at least 1
        return f"{where} {bound}{more}"
    # Our own validators' messages say what to do; pydantic prefixes them with their kind.
    what = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{where}: {what}{more}" if where else f"{what}{more}"


# Pydantic's bounds, said as the engine's own checks say theirs.
_BOUND_WORDS = {
    "less_than_equal": ("le", "must be at most"),
    "greater_than_equal": ("ge", "must be at least"),
    "less_than": ("lt", "must be below"),
    "greater_than": ("gt", "must be above"),
}


def _bound_text(error: Any) -> str | None:
    """`must be at most 64` for a value past a bound, None for another error."""
    words = _BOUND_WORDS.get(error.get("type", ""))
    limit = (error.get("ctx") or {}).get(words[0]) if words else None
    if words is None or not isinstance(limit, int | float):
        return None
    whole = isinstance(limit, int) or float(limit).is_integer()
    shown = f"{int(limit):,}" if whole else f"{limit:g}"
    return f"{words[1]} {shown}"


def _where(error: Any) -> str:
    """Where an error is, as a client names it: `search.width`, or `status` for a query
    parameter (not `query.status.0`: the index of a parameter's value is no name)."""
    location = tuple(error.get("loc", ()))
    if location[:1] == ("query",):
        location = tuple(part for part in location[1:] if not isinstance(part, int))
    return ".".join(str(part) for part in location if part != "body")
