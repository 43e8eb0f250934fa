"""Submitting a job: check all it needs, then store its uploads and queue it.

Everything a worker would trip over is checked here, on local copies of the uploads: the
budget, the search settings, the device class, that the model builds, its weights load and
one sample runs forward, and the search's own checks before any timing (search.preflight:
something in the model can be pruned with these settings). A job that fails a check is never
created and its uploads never reach the artifact store.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import shutil
import tempfile
import uuid
import zipfile
from pathlib import Path

from pydantic import ValidationError
from starlette.datastructures import UploadFile

from api.deps import Services
from api.repeated_names import refuse_repeated_names
from api.schemas import JobSpecIn, validation_message
from api.spec_terms import in_spec_terms
from api.uploads import Submission
from archtree_cli.settings import ServiceSettings
from latency.device_registry import DeviceRegistry
from latency.measurement_protocol import module_package, package_allowed, validate_device_class
from search.budget import parse_budget
from search.data_names import BUILTIN_DATASETS
from search.errors import ArchtreeError
from search.inputs import JobInputs, load_inputs
from search.preflight import check_before_timing
from search.settings import SearchSettings
from workers.job_context import ARTIFACT_PREFIX
from workers.tasks import submit_job

DATA_SUFFIXES = (".npz", ".pt")

# The API server's log, where its other failures go (api.error_handlers).
log = logging.getLogger("uvicorn.error")


class SubmissionInProgress(Exception):
    """A submission with the same Idempotency-Key is still being checked."""


def submit(
    services: Services,
    submission: Submission,
    api_url: str | None = None,
    idempotency_key: str | None = None,
) -> tuple[str, str, bool]:
    """Check the submission, store its uploads under the new job, queue it; return its id,
    its status and whether an earlier submission created it (its Idempotency-Key named it,
    and nothing was created now). `api_url`: the API's address as the client reached it,
    which the job's messages name. `idempotency_key`: the client's name for this
    submission; one sent again with it gets the job the first created, in the status it has
    now, and creates nothing.

    Raises ArchtreeError (one line) for anything wrong with the submission, and
    SubmissionInProgress while the first submission with its key is still being checked.
    """
    job_id = uuid.uuid4().hex[:12]
    if idempotency_key is None:
        return _submit(services, submission, api_url, job_id), "queued", False
    fingerprint = submission_fingerprint(submission)
    claimed = services.jobs.claim_submission(idempotency_key, job_id, fingerprint)
    if claimed is not None:
        earlier, earlier_fingerprint = claimed
        if earlier_fingerprint not in ("", fingerprint):
            raise ArchtreeError(
                f"the Idempotency-Key {idempotency_key!r} came with another submission within "
                f"the last day (job {earlier}): a key names one submission; send this one with "
                "a key of its own"
            )
        job = services.jobs.get(earlier)
        if job is None:
            raise SubmissionInProgress(earlier)
        return earlier, job["status"], True
    try:
        return _submit(services, submission, api_url, job_id), "queued", False
    except BaseException:
        services.jobs.release_submission(idempotency_key, job_id)
        raise


def submission_fingerprint(submission: Submission) -> str:
    """What tells one submission from another sent with the same Idempotency-Key: its spec
    as the service reads it (whatever the order of its keys, the spaces around its names and
    budget that are dropped), and its uploads' field names, file names and contents (retrained
    weights are a file of the same name and size)."""
    try:
        spec = parse_spec(submission.spec or "").model_dump_json()
    except ArchtreeError:  # refused by its checks later; its text tells it apart meanwhile
        spec = submission.spec or ""
    digest = hashlib.sha256(spec.encode())
    for name in sorted(submission.files):
        upload = submission.files[name]
        upload.file.seek(0)
        content = hashlib.file_digest(upload.file, "sha256").hexdigest()  # type: ignore[arg-type]
        upload.file.seek(0)
        digest.update(f"\0{name}\0{upload.filename}\0{content}".encode())
    return digest.hexdigest()[:32]


def _submit(services: Services, submission: Submission, api_url: str | None, job_id: str) -> str:
    spec = parse_spec(submission.spec or "")  # never None: the upload checks refused that
    search = check_spec(spec, services.settings)
    check_agents_build(spec, services.registry)
    names = upload_names(spec, submission)
    work_dir = Path(services.settings.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="submission-") as folder:
        local = {name: Path(folder) / stored_name for name, stored_name in names.items()}
        for name, path in local.items():
            upload = submission.files[name].file
            upload.seek(0)
            with path.open("wb") as copy:
                shutil.copyfileobj(upload, copy)
        try:
            inputs = load_inputs(
                spec.model,
                str(local.get("data") or spec.data),
                weights=str(local["weights"]) if "weights" in local else None,
                allow_pickle=spec.allow_pickle,
                num_classes=spec.num_classes,
                seed=search.seed,
            )
            checked_before_timing(inputs, search, spec.model)
        except ArchtreeError as error:
            raise ArchtreeError(_name_uploads(str(error), local, submission)) from None
        sent_names = {name: _sent_name(submission.files[name]) for name in local}
        return _store_and_queue(services, spec, local, sent_names, api_url, job_id)


def _store_and_queue(
    services: Services,
    spec: JobSpecIn,
    local: dict[str, Path],
    sent_names: dict[str, str],
    api_url: str | None,
    job_id: str,
) -> str:
    """Put the checked uploads in the artifact store under the new job's id, and queue the
    job; `sent_names`: the file names the uploads came with, which the job keeps to show them."""
    stored = {name: f"jobs/{job_id}/inputs/{path.name}" for name, path in local.items()}
    # Written whatever the uploads: it checks the store takes files, and the job's first step
    # that the workers' store is this one.
    marker = f"jobs/{job_id}/submitted"
    job_spec = {
        **spec.model_dump(exclude={"search"}),
        "data": ARTIFACT_PREFIX + stored["data"] if "data" in stored else spec.data,
        "weights": ARTIFACT_PREFIX + stored["weights"] if "weights" in stored else None,
        "search": spec.search.model_dump(exclude_none=True),
        "upload_names": {name: sent for name, sent in sent_names.items() if sent},
    }
    try:
        services.artifacts.put_bytes(marker, b"")
        for name, path in local.items():
            services.artifacts.put_file(stored[name], path)
        submit_job(
            services.jobs,
            job_spec,
            celery=services.celery,
            job_id=job_id,
            notes=strategy_notes(spec),
            api_url=api_url,
            store_marker=marker,
        )
    except BaseException:
        for name in [*stored.values(), marker]:
            services.artifacts.delete(name)
        raise
    return job_id


# The longest upload file name a job keeps; a longer one is cut short.
MAX_SENT_NAME_CHARS = 200


def checked_before_timing(inputs: JobInputs, search: SearchSettings, model: str) -> None:
    """The search's checks before its first timing (search.preflight): an ArchtreeError
    refuses the submission. Any other failure is the worker's to report, as the job's error,
    where the search meets it: the job is queued."""
    try:
        check_before_timing(inputs, search)
    except ArchtreeError:
        raise
    except Exception:  # noqa: BLE001 - said by the worker, with the job, as an internal error
        log.exception("the checks before timing failed on %s; the job is queued", model)


def _sent_name(upload: UploadFile) -> str:
    """The upload's file name without any folders, for showing; empty when it has none, or
    holds characters that do not print."""
    name = Path(upload.filename or "").name
    return name[:MAX_SENT_NAME_CHARS] if name.isprintable() else ""


def _name_uploads(message: str, local: dict[str, Path], submission: Submission) -> str:
    """`message` with the uploads' temporary paths replaced by what the client sent."""
    for name, path in local.items():
        sent = f"the {name} upload ({submission.files[name].filename or 'no file name'})"
        for said in (f"{name} file {str(path)!r}", repr(str(path)), str(path)):
            message = message.replace(said, sent)
    return message


def parse_spec(text: str) -> JobSpecIn:
    """The `spec` field as a JobSpecIn; ArchtreeError naming the first problem."""
    refuse_repeated_names(text, "the job spec")
    try:
        return JobSpecIn.model_validate_json(text)
    except ValidationError as error:
        first = error.errors()[0]
        # Not JSON, or not an object (the spec's own checks of an object also have no `loc`;
        # a field that is not an object, `search`, has its own).
        if first["type"] == "json_invalid" or (first["type"] == "model_type" and not first["loc"]):
            reason = first.get("ctx", {}).get("error") or first["msg"]
            example = json.dumps(JobSpecIn.model_config["json_schema_extra"]["examples"][0])
            raise ArchtreeError(
                f"the job spec is not a JSON object ({reason}): give one like {example}"
            ) from None
        raise ArchtreeError(
            f"the job spec is not valid: {validation_message(error.errors())}"
        ) from None


def strategy_notes(spec: JobSpecIn) -> list[str]:
    """The search settings given that the strategy overrides, said as the spec names them."""
    named = spec.search.model_dump(exclude_none=True)
    given = SearchSettings.from_dict(named)
    # The fields the spec names, even at their default, are the user's choice.
    return [in_spec_terms(note) for note in given.ignored_by_strategy(named)]


def check_spec(spec: JobSpecIn, settings: ServiceSettings) -> SearchSettings:
    """Check what needs no model or data; return the effective search settings."""
    parse_budget(spec.budget)
    validate_device_class(spec.device_class)
    search = SearchSettings.from_dict(spec.search.model_dump(exclude_none=True)).effective()
    if spec.allow_pickle and not settings.allow_pickle:
        raise ArchtreeError(
            "this service does not load pickled weights (they run arbitrary code): save the "
            "weights as a state dict or .safetensors file"
        )
    package = module_package(spec.model)
    if package is not None and not package_allowed(package, settings.allowed_modules):
        raise ArchtreeError(
            f"this service does not build {spec.model!r}: module: sources run code on the "
            "service, and the operator has not allowed that package (ARCHTREE_ALLOWED_MODULES)"
        )
    return search


def check_agents_build(spec: JobSpecIn, registry: DeviceRegistry) -> None:
    """Refuse a `module:` model that the agents of its class online do not build (their
    --allow-module): its first measurement would fail the job. With none online, the agents
    that come are not known yet: the job waits for them."""
    package = module_package(spec.model)
    if package is None:
        return
    online = [
        record
        for record in registry.list()
        if record["online"] and record.get("device_class") == spec.device_class
    ]
    if online and not any(
        package_allowed(package, record.get("allowed_modules") or []) for record in online
    ):
        raise ArchtreeError(
            f"the agents of device class {spec.device_class} online do not build "
            f"{spec.model!r}: module: sources run code on the agents, so they build only the "
            f"packages they allow; start them with --allow-module {package.split('.')[0]}"
        )


def upload_names(spec: JobSpecIn, submission: Submission) -> dict[str, str]:
    """The file name each upload is stored under: its field and a suffix the loaders know."""
    if "data" not in submission.files and not (spec.data or "").startswith("builtin:"):
        raise ArchtreeError(data_not_given(spec.data or ""))
    if "data" in submission.files and spec.data:
        raise ArchtreeError("give the data either as spec.data or as a `data` upload, not both")
    names = {}
    for field, upload in submission.files.items():
        suffix = Path(upload.filename or "").suffix.lower()
        if field == "data":
            suffix = data_suffix(upload)
        if field == "weights":
            suffix = ".safetensors" if suffix == ".safetensors" else ".pt"
        names[field] = field + suffix
    return names


def data_not_given(data: str) -> str:
    """What to send when a submission has no data: spec.data `data` names no builtin dataset,
    and nothing was uploaded. The service reads no path of a client's."""
    builtins = " or ".join(f"builtin:{name}" for name in BUILTIN_DATASETS)
    ask = f"give the data as spec.data ({builtins}) or upload a .npz/.pt file as `data`"
    if not data.strip():
        return ask
    name = data.strip()
    if "/" in name or "\\" in name or Path(name).suffix.lower() in (*DATA_SUFFIXES, ".npy"):
        return (
            f"spec.data {data!r} is a file path, and the service reads no path of yours: "
            f"upload the file as `data` (curl -F data=@{Path(name).name})"
        )
    name = name.lower().removeprefix("builtin:")
    close = difflib.get_close_matches(name, BUILTIN_DATASETS, n=1, cutoff=0.7)
    if close:
        return f"spec.data {data!r} is not a data source: did you mean 'builtin:{close[0]}'? {ask}"
    return f"spec.data {data!r} is not a data source: {ask}"


def data_suffix(upload: UploadFile) -> str:
    """The suffix a data upload is stored under, for the loader: the client's own .npz or .pt,
    else the one its content has (files are read by content, whatever their name): .npz for a
    numpy archive (a zip of .npy members), .pt for torch's zip format, and .data for a file
    of another name that is no zip (a .npy array, a torch file of the older format, or no
    data at all), which the loader reads by its content and, failing, says is neither."""
    suffix = Path(upload.filename or "").suffix.lower()
    if suffix in DATA_SUFFIXES:
        return suffix
    upload.file.seek(0)
    try:
        with zipfile.ZipFile(upload.file) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return ".data"
    finally:
        upload.file.seek(0)
    pickled = any(name.endswith("data.pkl") for name in names)  # torch.save's zip format
    return ".npz" if not pickled and any(name.endswith(".npy") for name in names) else ".pt"
