"""Section 3, service overhead: what the distributed service adds around the engine's work.

- Measurement overhead: one measurement's round trip through Redis and a real agent process
  minus the time the agent spent timing (RemoteOracle's `round_trip_s` and `agent_timing_s`),
  over distinct architectures so that nothing is answered from a cache.
- Status polling (metric `polling`, the row the issue's "p99 under 20 ms at 100 clients" target
  is judged on): 100 clients, each polling `GET /v1/jobs/{id}` again 100 ms (on average) after
  its last answer: 20 times as often as the dashboard, which polls every 2 s
  (api/dashboard/app.js, POLL_MS). `wrk` generates it with a Lua script whose `delay()` returns
  the think time, drawn uniformly from 50-150 ms so that the clients do not stay in lockstep
  after starting together. Requests per second, p50 and p99 latency.
- Polling saturation (metric `polling_saturation`): `wrk` with 100 connections and no think time,
  i.e. the API's throughput; its latency is just connections / throughput, not a target.
- Both poll the API as a user starts it: `archtree api --workers N` (`ServiceConfig.api_workers`).
- Submission to first child: `POST /v1/jobs` to the first evaluated child's event, with one
  warm Celery worker and one agent; the job is cancelled after its first child.

`ServiceStack` runs the private processes (redis-server on a free port, agents, workers, the
API) for this section and the others that need them, and stops each by its pid.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench import ROOT
from bench.report import SectionResult, make_row

NAME, TITLE = "service", "Service overhead"
DEVICE_CLASS = "bench-service"
START_TIMEOUT_S = 90.0
SERVICE_MODULES = ("latency.agent", "latency.remote_oracle", "workers.tasks", "api.main")
# API processes of the polling runs: one per core of the 2-core machines this runs on.
API_WORKERS = 2
WARM_UP_S = 1.0
# A client's wait between its answer and its next request: uniform in think_ms * (1 +- JITTER).
THINK_JITTER = 0.5

_AGENT_CODE = """
import json, sys
from latency.agent import agent_main
from latency.harness import TimingSettings
options = json.loads(sys.argv[1])
timing = options["timing"]
sys.exit(agent_main(None, options["device_class"], "torch", 1, options["redis_url"],
                    settings=TimingSettings(**timing) if timing else None))
"""


@dataclass(frozen=True)
class ServiceConfig:
    """Sizes of the service measurements."""

    overhead_samples: int
    polling_s: float
    clients: int
    job: dict[str, Any]
    think_ms: float = 100.0
    api_workers: int = API_WORKERS


FULL = ServiceConfig(
    overhead_samples=20,
    polling_s=10.0,
    clients=100,
    job={"model": "builtin:resnet", "data": "builtin:mnist", "budget": "60%", "search": {}},
)
QUICK = ServiceConfig(
    overhead_samples=3,
    polling_s=2.0,
    clients=100,
    job={
        "model": "builtin:vgg",
        "data": "builtin:digits",
        "budget": "70%",
        "search": {"width": 2, "branching": 2, "planned_steps": 2, "ft_steps": 3},
    },
)


def estimate_s(config: ServiceConfig) -> float:
    """Rough seconds on a quiet machine: process starts, samples, the job's start, polling."""
    return 30 + 0.6 * config.overhead_samples + config.polling_s + 15


def missing_prerequisites(
    executables: Sequence[str] = ("redis-server",), modules: Sequence[str] = SERVICE_MODULES
) -> str | None:
    """None when every executable and module is there; else a note saying what is missing."""
    missing = [name for name in executables if shutil.which(name) is None]
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(name)
    if not missing:
        return None
    return f"{', '.join(missing)} not found (needed to run the distributed service here)"


@dataclass
class ServiceProcess:
    """One child process of the stack, leading its own process group."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM to its group (a Celery worker's pool child too), SIGKILL if it lingers."""
        if self.alive():
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServiceStack:
    """A private redis-server, agents, Celery workers and the API, all stopped on exit."""

    def __init__(self, work_dir: Path, log: Callable[[str], None] = print) -> None:
        self.work_dir = Path(work_dir)
        self.log_dir = self.work_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.processes: list[ServiceProcess] = []
        self.redis_url = ""

    def __enter__(self) -> ServiceStack:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_all()

    def env(self) -> dict[str, str]:
        """The ARCHTREE_* environment of the stack's processes; one torch thread each."""
        return {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "ARCHTREE_HOME": str(self.work_dir / "home"),
            "ARCHTREE_REDIS_URL": self.redis_url,
            "ARCHTREE_ARTIFACTS_URL": str(self.work_dir / "artifacts"),
            "ARCHTREE_WORK_DIR": str(self.work_dir / "work"),
            "ARCHTREE_DEVICE_WAIT_S": "60",
        }

    def _spawn(self, name: str, command: list[str]) -> ServiceProcess:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        child = ServiceProcess(name, process, log_path)
        self.processes.append(child)
        return child

    def _wait(self, child: ServiceProcess, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            if not child.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start:\n{child.tail()}")
            time.sleep(0.05)

    def start_redis(self) -> str:
        """A non-persistent redis-server on a free port; returns its URL."""
        import redis

        port = free_port()
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        directory = self.work_dir / "redis"
        directory.mkdir(parents=True, exist_ok=True)
        command = [
            shutil.which("redis-server") or "redis-server",
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(directory),
        ]  # fmt: skip
        child = self._spawn("redis", command)

        def ready() -> bool:
            try:
                return bool(redis.Redis.from_url(self.redis_url, socket_timeout=1).ping())
            except redis.RedisError:
                return False

        self._wait(child, ready, "redis-server")
        return self.redis_url

    def start_agent(self, device_class: str, timing: dict[str, Any] | None = None) -> None:
        """A real agent process (harness defaults unless `timing` is given), once online."""
        import redis

        from latency.device_registry import DeviceRegistry

        options = {"redis_url": self.redis_url, "device_class": device_class, "timing": timing}
        online = DeviceRegistry(redis.Redis.from_url(self.redis_url)).live_agents(device_class)
        child = self._spawn(
            f"agent-{device_class}-{online}",
            [sys.executable, "-c", _AGENT_CODE, json.dumps(options)],
        )
        registry = DeviceRegistry(redis.Redis.from_url(self.redis_url))
        self._wait(child, lambda: registry.live_agents(device_class) > online, "the agent")

    def start_workers(self, count: int) -> list[ServiceProcess]:
        """`count` Celery workers (`archtree worker`, concurrency 1), once each answers a ping."""
        from archtree_cli.settings import ServiceSettings
        from workers.celery_app import create_app

        first = len([p for p in self.processes if p.name.startswith("worker")])
        names = [f"bench{first + i + 1}@{socket.gethostname()}" for i in range(count)]
        started = [
            self._spawn(
                f"worker-{first + i + 1}",
                [sys.executable, "-m", "archtree_cli.main", "worker", "--name", name],
            )
            for i, name in enumerate(names)
        ]
        app = create_app(ServiceSettings(redis_url=self.redis_url))
        waiting = set(names)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while waiting:
                for child in started:
                    if not child.alive():
                        raise RuntimeError(f"{child.name} exited:\n{child.tail()}")
                replies = app.control.ping(destination=sorted(waiting), timeout=0.5)
                waiting -= {name for reply in replies for name in reply}
                if waiting and time.monotonic() > deadline:
                    raise RuntimeError(f"workers {sorted(waiting)} did not answer a ping")
        finally:
            app.close()
        return started

    def start_api(self, workers: int = 1) -> str:
        """The API as `archtree api --workers N` runs it; returns its URL."""
        import httpx

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        child = self._spawn(
            "api",
            [sys.executable, "-m", "archtree_cli.main", "api", "--host", "127.0.0.1",
             "--port", str(port), "--workers", str(workers)],
        )  # fmt: skip

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        self._wait(child, ready, "the API")
        return url

    def stop(self, names_start: str) -> None:
        """Stop the processes whose name starts with `names_start`."""
        for child in self.processes:
            if child.name.startswith(names_start):
                child.stop()

    def stop_all(self) -> None:
        # Redis last: the others may still be talking to it while they shut down.
        for child in sorted(self.processes, key=lambda c: c.name == "redis"):
            child.stop()


def measure_overhead(
    stack: ServiceStack, config: ServiceConfig, model: str, data: str
) -> dict[str, Any]:
    """Round trip minus agent timing over distinct architectures: one row."""
    import redis

    from bench.measurement_quality import pruned_variant
    from latency.cache import MemoryLatencyCache
    from latency.remote_oracle import RemoteOracle
    from search.arch_spec import spec_of
    from search.inputs import load_inputs

    inputs = load_inputs(model, data)
    shape = tuple(inputs.data.input_shape)
    reference = spec_of(inputs.model, inputs.model_ref, shape)
    client = redis.Redis.from_url(stack.redis_url)
    oracle = RemoteOracle(client, DEVICE_CLASS, cache=MemoryLatencyCache())
    started = time.monotonic()
    oracle.measure_reference(reference)
    seen = {reference.hash}
    for keep in np.linspace(0.95, 0.2, 4 * config.overhead_samples):
        if len(seen) > config.overhead_samples:
            break
        spec = spec_of(pruned_variant(inputs.model, shape, float(keep)), inputs.model_ref, shape)
        if spec.hash not in seen:
            seen.add(spec.hash)
            oracle.measure(spec, reference)
    client.close()
    # The first request (the reference) is left out: the agent builds its timer on it.
    pairs = zip(oracle.round_trip_s[1:], oracle.agent_timing_s[1:], strict=True)
    overhead_ms = [1000 * (round_trip - timing) for round_trip, timing in pairs]
    median = statistics.median(overhead_ms)
    p90 = float(np.percentile(overhead_ms, 90))
    return make_row(
        NAME,
        model,
        latency_ms=median,
        measurements=len(overhead_ms),
        wall_s=time.monotonic() - started,
        metric="measurement_overhead",
        summary=f"round trip - agent timing: median {median:.2f}, p90 {p90:.2f}, "
        f"max {max(overhead_ms):.2f} ms",
        p90_ms=p90,
        max_ms=max(overhead_ms),
        round_trip_median_ms=1000 * statistics.median(oracle.round_trip_s[1:]),
        agent_timing_median_ms=1000 * statistics.median(oracle.agent_timing_s[1:]),
        samples_ms=overhead_ms,
    )


def submission_to_first_child(
    stack: ServiceStack, api_url: str, config: ServiceConfig
) -> tuple[dict[str, Any], str]:
    """Submit a job over HTTP and time it to its first evaluated child; returns (row, job id)."""
    import redis

    from archtree_cli.client import ArchtreeClient
    from workers.job_store import FINAL_STATUSES, JobStore

    spec = {**config.job, "device_class": DEVICE_CLASS}
    jobs = JobStore(redis.Redis.from_url(stack.redis_url))
    with ArchtreeClient(api_url) as client:
        submitted = time.time()
        job_id = client.submit(spec)["id"]
        accepted = time.time()
        firsts: dict[str, float] = {}
        after = "0-0"
        deadline = time.monotonic() + START_TIMEOUT_S
        while "child" not in firsts and time.monotonic() < deadline:
            for event_id, event in jobs.read_events(job_id, after, block_ms=500):
                after = event_id
                kind = "child" if event["kind"] in ("node", "child_skipped") else event["kind"]
                if kind == "status":
                    kind = event.get("status", "status")
                firsts.setdefault(kind, event["time"] - submitted)
            status = jobs.get(job_id)["status"]
            if status in FINAL_STATUSES:
                break
        if jobs.get(job_id)["status"] not in FINAL_STATUSES:
            client.cancel(job_id)
    end = time.monotonic() + START_TIMEOUT_S
    while jobs.get(job_id)["status"] not in FINAL_STATUSES and time.monotonic() < end:
        time.sleep(0.2)
    jobs.client.close()
    first_child_s = firsts.get("child")
    steps = ", ".join(f"{k} {v:.2f} s" for k, v in firsts.items())
    row = make_row(
        NAME,
        config.job["model"],
        latency_ms=None if first_child_s is None else 1000 * first_child_s,
        measurements=1,
        wall_s=first_child_s,
        metric="submission_to_first_child",
        summary=f"POST accepted in {accepted - submitted:.2f} s; events after submit: {steps}",
        accepted_s=accepted - submitted,
        event_times_s=firsts,
    )
    return row, job_id


_WRK_LATENCY = re.compile(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests/s, percentiles (ms), request and error counts from `wrk --latency` output."""
    percentiles = {
        f"p{p}_ms": float(value) * _UNIT_MS[unit] for p, value, unit in _WRK_LATENCY.findall(output)
    }
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors: (.*)", output)
    return {
        **percentiles,
        "requests_per_s": float(rate.group(1)) if rate else None,
        "requests": int(total.group(1)) if total else None,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": errors.group(1).strip() if errors else None,
    }


def think_time_script(think_ms: float, jitter: float = THINK_JITTER) -> str:
    """A wrk Lua script: every connection waits `think_ms` (+- jitter) after each answer.

    wrk starts a request's latency clock when it sends it, so the wait is not counted.
    """
    low, high = round(think_ms * (1 - jitter)), round(think_ms * (1 + jitter))
    return f"function delay()\n  return math.random({low}, {high})\nend\n"


def run_wrk(url: str, config: ServiceConfig, script: str | None = None) -> tuple[str, float]:
    """`wrk --latency` with `clients` connections for `polling_s` (and a Lua script, written
    to a temporary file); returns its output and wall seconds."""
    command = ["wrk", "-t2", f"-c{config.clients}", f"-d{config.polling_s:g}s"]
    command += ["--timeout", "5s", "--latency"]
    with tempfile.TemporaryDirectory(prefix="archtree-wrk-") as folder:
        if script is not None:
            path = Path(folder) / "script.lua"
            path.write_text(script)
            command += ["--script", str(path)]
        started = time.monotonic()
        output = subprocess.run(
            [*command, url],
            capture_output=True,
            text=True,
            timeout=config.polling_s + 60,
            check=True,
        ).stdout
    return output, time.monotonic() - started


def measure_polling(api_url: str, job_id: str, config: ServiceConfig) -> dict[str, Any]:
    """`clients` clients polling GET /v1/jobs/{id}, each `think_ms` after its last answer: the
    row the polling p99 target is judged on."""
    output, wall_s = run_wrk(
        f"{api_url}/v1/jobs/{job_id}", config, think_time_script(config.think_ms)
    )
    return _polling_row(
        "polling",
        output,
        wall_s,
        config,
        f"{config.clients} clients polling every {config.think_ms:g} ms "
        f"(+-{THINK_JITTER:.0%}; the p99 target's row)",
        think_ms=config.think_ms,
        think_jitter=THINK_JITTER,
    )


def measure_polling_saturation(api_url: str, job_id: str, config: ServiceConfig) -> dict[str, Any]:
    """`clients` connections on GET /v1/jobs/{id} with no think time: the API's throughput."""
    output, wall_s = run_wrk(f"{api_url}/v1/jobs/{job_id}", config)
    return _polling_row(
        "polling_saturation",
        output,
        wall_s,
        config,
        f"wrk {config.clients} connections, no think time (throughput; latency = "
        "connections / throughput)",
    )


def _polling_row(
    metric: str, output: str, wall_s: float, config: ServiceConfig, what: str, **details: Any
) -> dict[str, Any]:
    stats = parse_wrk(output)
    p50, p99 = stats.get("p50_ms", float("nan")), stats.get("p99_ms")
    return make_row(
        NAME,
        None,
        latency_ms=p99,
        measurements=stats["requests"],
        wall_s=wall_s,
        metric=metric,
        summary=f"{what}, {config.polling_s:g} s, API `--workers {config.api_workers}`: "
        f"{stats['requests_per_s'] or 0:.0f} req/s, p50 {p50:.1f} ms, "
        f"p99 {p99 if p99 is not None else float('nan'):.1f} ms, {stats['non_2xx']} non-2xx",
        clients=config.clients,
        api_workers=config.api_workers,
        **details,
        **stats,
        wrk_output=output,
    )


def run(
    config: ServiceConfig,
    work_dir: Path,
    log: Callable[[str], None] = print,
) -> SectionResult:
    """Overhead, submission to first child, then polling, on one private stack."""
    started = time.monotonic()
    missing = missing_prerequisites()
    if missing:
        return SectionResult(NAME, TITLE, status="skipped", note=missing)
    result = SectionResult(NAME, TITLE)
    result.settings = {
        "agent timing": "harness defaults",
        "API": f"`archtree api --workers {config.api_workers}`",
        "workers": "1 (`archtree worker`, concurrency 1)",
        "polling clients": config.clients,
        "polling duration s": config.polling_s,
        "polling think time ms": config.think_ms,
    }
    notes = []
    with ServiceStack(work_dir, log) as stack:
        stack.start_redis()
        stack.start_agent(DEVICE_CLASS)
        log("service: measurement overhead ...")
        result.rows.append(measure_overhead(stack, config, config.job["model"], config.job["data"]))
        api_url = stack.start_api(config.api_workers)
        stack.start_workers(1)
        log("service: submission to first child ...")
        row, job_id = submission_to_first_child(stack, api_url, config)
        result.rows.append(row)
        # Polling runs alone: the job was cancelled, the worker and agent are stopped.
        stack.stop("worker")
        stack.stop("agent")
        if shutil.which("wrk") is None:
            notes.append("polling skipped: wrk not found (apt-get install -y wrk)")
        else:
            try:
                # Not measured: the API processes' first requests (connections to Redis, lazy
                # imports), which a running service has long made.
                run_wrk(f"{api_url}/v1/jobs/{job_id}", replace(config, polling_s=WARM_UP_S))
                for measure in (measure_polling, measure_polling_saturation):
                    log(f"service: {measure.__name__} with {config.clients} clients ...")
                    result.rows.append(measure(api_url, job_id, config))
            except subprocess.CalledProcessError as error:
                notes.append(f"polling failed: wrk exited {error.returncode}: {error.stderr}")
    result.note = "; ".join(notes) or None
    result.wall_s = time.monotonic() - started
    return result
