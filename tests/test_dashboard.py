"""The dashboard in a real headless Chromium, against a real stack: a private Redis, a Celery
worker, a measurement agent and the API serving the page. Screenshots go to
test-artifacts/screenshots/."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import torch

from search.inputs import load_inputs
from search.notes import NOTHING_PRUNED, NOTHING_PRUNED_DATA_FREE
from tests.api_fixtures import ApiProcess, api_env, free_port, start_api
from tests.browser_fixtures import console_errors, screenshot, wait_for
from tests.redis_fixtures import AgentProcess, redis_server_executable, start_agent, wait_until
from tests.worker_fixtures import WorkerPool
from workers.job_store import FINAL_STATUSES

pytest_plugins = [
    "tests.redis_fixtures",
    "tests.worker_fixtures",
    "tests.api_fixtures",
    "tests.browser_fixtures",
]

DEVICE_CLASS = "dashboard-cpu"
# As in test_service: a job of a few depths that ends in well under a minute here.
FAST_SEARCH = {"width": 2, "branching": 2, "ft_steps": 5, "planned_steps": 2, "max_probes": 3,
               "select_steps": 10, "fill_probes": 2}  # fmt: skip
BUDGET = "75%"
JOB_S = 180.0
AGENT_START_S = 60.0
PAGE_S = 15.0


def job_spec(**search: Any) -> dict[str, Any]:
    return {
        "model": "builtin:vgg",
        "data": "builtin:digits",
        "budget": BUDGET,
        "device_class": DEVICE_CLASS,
        "search": {**FAST_SEARCH, **search},
    }


def job_events(stack: ApiProcess, job_id: str) -> list[dict[str, Any]]:
    """The ended job's events, as its event stream replays them."""
    with stack.client() as client, client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        return [
            json.loads(line.removeprefix("data:"))
            for line in stream.iter_lines()
            if line.startswith("data:")
        ]


@pytest.fixture(scope="module")
def stack(
    redis_url: str, worker_pool: WorkerPool, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiProcess]:
    """The API (serving the dashboard) with one worker and one agent of DEVICE_CLASS."""
    redis.Redis.from_url(redis_url).flushdb()
    worker_pool.ensure(1)
    base = tmp_path_factory.mktemp("dashboard")
    env = api_env(redis_url, base, **worker_pool.api_settings())
    api = start_api(env, base / "logs")
    agent: AgentProcess = start_agent(redis_url, DEVICE_CLASS, base / "agents")
    try:
        with api.client() as client:
            wait_until(
                lambda: any(d["online"] for d in client.get("/v1/devices").json()["devices"]),
                AGENT_START_S,
                "the agent online",
            )
        yield api
    finally:
        agent.stop()
        api.stop()


@pytest.fixture(scope="module")
def quiet_api_process(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiProcess]:
    """An API on a database of the module's Redis of its own, with no worker or agent."""
    url = f"{redis_url.rsplit('/', 1)[0]}/3"
    base = tmp_path_factory.mktemp("quiet-api")
    api = start_api(api_env(url, base), base / "logs")
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture
def quiet_api(redis_url: str, quiet_api_process: ApiProcess) -> ApiProcess:
    """An API whose jobs are the test's alone and stay queued (no worker takes them); emptied
    before each test."""
    redis.Redis.from_url(f"{redis_url.rsplit('/', 1)[0]}/3").flushdb()
    return quiet_api_process


def submit(client: httpx.Client, spec: dict[str, Any], **files: tuple[str, bytes]) -> str:
    """Submit `spec` (with uploads by field) and return the new job's id."""
    answer = client.post("/v1/jobs", data={"spec": json.dumps(spec)}, files=files or None)
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def start_redis(directory: Path, port: int) -> subprocess.Popen[bytes]:
    """A redis-server of the test's own on `port`, which it can stop and start again (empty)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "redis.log", "ab") as log:
        server = subprocess.Popen(
            [redis_server_executable(), "--port", str(port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(directory)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    def answers() -> bool:
        try:
            return bool(redis.Redis(port=port, socket_timeout=1).ping())
        except redis.ConnectionError:
            return False

    wait_until(answers, 10, "the test's redis-server")
    return server


def stop_redis(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.terminate()
    server.wait(timeout=10)


@pytest.fixture
def page(browser: Any, stack: ApiProcess) -> Iterator[Any]:
    """The browser; the test fails if the page logged errors in its console."""
    console_errors(browser)
    yield browser
    assert console_errors(browser) == []


def js(driver: Any, expression: str) -> Any:
    return driver.execute_script(f"return {expression};")


def text(driver: Any, selector: str) -> str:
    return js(driver, f"document.querySelector({json.dumps(selector)})?.innerText ?? ''")


def visible(driver: Any, selector: str) -> bool:
    found = js(driver, f"document.querySelector({json.dumps(selector)})")
    return bool(found) and found.is_displayed()


def fill(driver: Any, values: dict[str, str]) -> None:
    """Type into the submission form's fields by name (selects take an option's value)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    form = driver.find_element(By.ID, "submit-form")
    for name, value in values.items():
        field = form.find_element(By.NAME, name)
        if field.tag_name == "select":
            Select(field).select_by_value(value)
        else:
            field.clear()
            field.send_keys(value)


def named_score(shown: str) -> bool:
    """Whether a text names a score (not "scored by")."""
    return re.search(r"\bscores?\b", shown, re.IGNORECASE) is not None


def tree_tooltip(driver: Any, node_id: str) -> str:
    """The tooltip of a node of the search tree, as hovering it shows it."""
    return js(
        driver,
        "(() => { const chart = echarts.getInstanceByDom(document.querySelector('#tree-chart'));"
        f" chart.dispatchAction({{type: 'showTip', seriesIndex: 0, name: '{node_id}'}});"
        " return chart.getDom().innerText; })()",
    )


def open_jobs_page(driver: Any, api: ApiProcess) -> None:
    """The jobs list from its first page, all jobs (not as an earlier test in the same browser
    tab left it: the tab keeps its page and filter)."""
    driver.get(f"{api.url}/")
    driver.execute_script("sessionStorage.clear(); history.replaceState(null, '');")
    driver.get(f"{api.url}/")
    wait_for(driver, lambda: js(driver, "window.archtree?.view") == "jobs", PAGE_S, "jobs page")


def test_the_page_listens_for_every_event_kind_the_service_emits():
    """EventSource delivers named events only to listeners of their kind: a kind missing from
    the page's list never reaches its log."""
    root = Path(__file__).resolve().parents[1]
    emitted = set()
    for folder in ("search", "workers"):
        for source in (root / folder).glob("*.py"):
            code = source.read_text()
            emitted |= set(re.findall(r'emit\(\s*"([a-z_]+)"', code))
            emitted |= set(re.findall(r'append_event\([^,]+,\s*"([a-z_]+)"', code))
    script = (root / "api" / "dashboard" / "app.js").read_text()
    listed = re.search(r"const EVENT_KINDS = \[(.*?)\];", script, re.DOTALL).group(1)
    assert emitted and emitted <= set(re.findall(r'"([a-z_]+)"', listed)), emitted


def test_the_page_and_its_scripts_are_served_by_the_api(stack: ApiProcess):
    with stack.client() as client:
        index = client.get("/")
        script = client.get("/dashboard/vendor/echarts.min.js")
        app = client.get("/dashboard/app.js")
    assert index.status_code == 200 and "text/html" in index.headers["content-type"]
    assert "http://" not in index.text and "https://" not in index.text  # nothing from outside
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert app.status_code == 200 and "echarts" in app.text


@pytest.mark.parametrize("address", ["docs", "redoc"])
def test_the_api_docs_show_their_endpoints_with_nothing_from_another_host(
    page: Any, quiet_api: ApiProcess, address: str
):
    with quiet_api.client() as client:
        served = client.get("/docs")
        paths = client.get("/openapi.json").json()["paths"]
    assert served.status_code == 200
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", served.text), served.text
    page.get(f"{quiet_api.url}/{address}")
    shown = "document.querySelectorAll('.swagger-ui .opblock').length"
    wait_for(page, lambda: js(page, shown) >= len(paths), PAGE_S, "the endpoints listed")
    assert js(page, "location.pathname") == "/docs"
    assert "/v1/jobs" in text(page, ".swagger-ui")
    loaded = js(page, "performance.getEntriesByType('resource').map(r => r.name)")
    assert loaded and all(
        name.startswith(f"{quiet_api.url}/") or name.startswith("data:") for name in loaded
    ), loaded


def test_the_devices_page_lists_the_running_agent(page: Any, stack: ApiProcess):
    page.get(f"{stack.url}/#/devices")
    row = f'#devices-table tr[data-device-class="{DEVICE_CLASS}"]'
    wait_for(page, lambda: "online" in text(page, row), PAGE_S, "the agent listed online")
    with stack.client() as client:
        (device,) = client.get("/v1/devices").json()["devices"]
    shown = text(page, row)
    assert device["host"] in shown and device["id"] in shown
    assert device["runtime_version"] in shown
    classes = text(page, f'#classes-table tr[data-device-class="{DEVICE_CLASS}"]').split()
    assert classes[:2] == [DEVICE_CLASS, "1"]  # one agent online
    screenshot(page, "devices")


def test_a_bad_budget_in_the_form_shows_the_api_message(page: Any, stack: ApiProcess):
    spec = {**job_spec(), "budget": "fast", "search": {"strategy": "archtree"}}
    with stack.client() as client:
        expected = client.post("/v1/jobs", data={"spec": json.dumps(spec)})
        jobs_before = client.get("/v1/jobs").json()["total"]
    assert expected.status_code == 422

    open_jobs_page(page, stack)
    fill(page, {"budget": "fast", "device_class": DEVICE_CLASS})
    page.find_element("id", "submit-button").click()

    wait_for(page, lambda: visible(page, "#submit-error"), PAGE_S, "the form's error")
    assert text(page, "#submit-error") == expected.json()["detail"]
    assert invalid_fields(page) == [("budget", expected.json()["detail"])]
    assert js(page, "location.hash") in ("", "#/")
    with stack.client() as client:
        assert client.get("/v1/jobs").json()["total"] == jobs_before
    screenshot(page, "bad-budget")


def invalid_fields(page: Any) -> list[tuple[str, str]]:
    """The form's fields marked invalid, each with the message shown beside it."""
    return [
        tuple(pair)
        for pair in js(
            page,
            "[...document.querySelectorAll('#submit-form [aria-invalid=true]')]"
            ".map(i => [i.name, i.closest('label').querySelector('.field-error').innerText])",
        )
    ]


@pytest.mark.parametrize(
    ("values", "expected", "field"),
    [
        (
            {"width": "1e400"},
            "Width: not a number; give one, or leave it empty for the default",
            "width",
        ),
        ({"width": "100"}, "Width must be at most 64", "width"),
        (
            {"planned_steps": "2", "max_depth": "1"},
            "Max depth must be at least Planned steps (1 is below 2; give both, or a Max depth "
            "of 2 or more).",
            "max_depth",
        ),
    ],
)
def test_a_bad_search_setting_in_the_form_is_named_by_its_label_and_marked_beside_it(
    page: Any, stack: ApiProcess, values: dict[str, str], expected: str, field: str
):
    with stack.client() as client:
        jobs_before = client.get("/v1/jobs").json()["total"]
    open_jobs_page(page, stack)
    js(page, "document.querySelector('#submit-form details').open = true")
    fill(page, {"device_class": DEVICE_CLASS, **values})
    page.find_element("id", "submit-button").click()

    wait_for(page, lambda: visible(page, "#submit-error"), PAGE_S, "the form's error")
    assert text(page, "#submit-error") == expected
    assert invalid_fields(page) == [(field, expected)]
    with stack.client() as client:
        assert client.get("/v1/jobs").json()["total"] == jobs_before
        # Each search field's help is the API's own description of the setting.
        schema = client.get("/openapi.json").json()["components"]["schemas"]["SearchSettingsIn"]
    helps = js(
        page,
        "Object.fromEntries([...document.querySelectorAll('#submit-form details input')]"
        ".map(i => [i.name, i.title]))",
    )
    described = {"min_width_fraction", "margin"}  # the form's own words
    assert {n: h for n, h in helps.items() if n not in described} == {
        n: schema["properties"][n]["description"] for n in helps if n not in described
    }
    # Corrected and sent again, the field is no longer marked.
    fill(page, {name: "" for name in values})
    fill(page, {"budget": "nonsense"})
    page.find_element("id", "submit-button").click()
    wait_for(
        page,
        lambda: invalid_fields(page) and invalid_fields(page)[0][0] == "budget",
        PAGE_S,
        "budget",
    )
    assert [name for name, _ in invalid_fields(page)] == ["budget"]


def test_a_job_from_the_form_grows_its_tree_live_and_ends_with_its_results(
    page: Any, stack: ApiProcess, tmp_path: Path
):
    # Children tuned long enough for the page to see the tree grow while the job runs: a job
    # of 5 steps a child has ended within its first depth, between two of the page's polls.
    search = {**FAST_SEARCH, "ft_steps": 60}
    open_jobs_page(page, stack)
    page.find_element("css selector", "#submit-form details summary").click()
    fill(
        page,
        {
            "model": "builtin:vgg",
            "data": "builtin:digits",
            "budget": BUDGET,
            "device_class": DEVICE_CLASS,
            "strategy": "archtree",
            **{name: str(value) for name, value in search.items()},
        },
    )
    page.find_element("id", "submit-button").click()
    job_id = wait_for(
        page,
        lambda: js(page, "location.hash.match(/^#\\/jobs\\/(\\w+)$/)?.[1]"),
        PAGE_S,
        "the new job's page",
    )
    with stack.client() as client:
        assert client.get(f"/v1/jobs/{job_id}").json()["spec"]["search"] == {
            "strategy": "archtree",
            **search,
        }

    # While the job runs, the tree on the page grows without a reload.
    seen: list[tuple[str | None, int]] = []

    def tree_grew_while_running() -> bool:
        status, nodes = js(page, "[window.archtree.status, window.archtree.treeNodes]")
        seen.append((status, nodes))
        running = [n for s, n in seen if s == "running" and n > 0]
        return len(running) >= 2 and running[-1] > running[0]

    wait_for(page, tree_grew_while_running, JOB_S, "the tree to grow while the job runs")
    screenshot(page, "job-running")
    wait_for(
        page, lambda: js(page, "window.archtree.status") in {"succeeded", "failed"}, JOB_S, "end"
    )
    with stack.client() as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
        tree = client.get(f"/v1/jobs/{job_id}/tree").json()
    assert job["status"] == "succeeded", job["error"]

    # The finished job: the whole tree, the front, the answer and its results.
    wait_for(page, lambda: visible(page, "#artifacts"), PAGE_S, "the download links")
    # Saved under the job's id, so that two jobs' downloads keep apart.
    assert js(page, "[...document.querySelectorAll('.downloads a')].map(a => a.download)") == [
        f"report-{job_id}.json",
        f"arch-{job_id}.json",
        f"model-{job_id}.safetensors",
    ]
    assert js(page, "window.archtree.treeNodes") == len(tree["nodes"])
    assert not visible(page, "#open-depth-legend")  # no depth in progress, none left open
    # The scatter's legend names what it draws, and only that: on one line it stays readable.
    scatter = "echarts.getInstanceByDom(document.querySelector('#scatter-chart')).getOption()"
    legend = js(page, f"{scatter}.legend.flatMap(row => row.data)")
    drawn = js(page, f"{scatter}.series.filter(s => s.data.length).map(s => s.name)")
    assert legend == drawn and {"unpruned", "Pareto front", "chosen", "chosen, confirmed"} <= set(
        legend
    ), legend
    assert js(page, "document.querySelector('#tree-chart').dataset.nodes") == str(
        len(tree["nodes"])
    )
    front = js(
        page,
        "echarts.getInstanceByDom(document.querySelector('#scatter-chart')).getOption()"
        ".series.find(s => s.name === 'Pareto front').data.length",
    )
    assert front == js(page, "window.archtree.paretoPoints") >= 1
    assert js(page, "window.archtree.candidates") >= len(tree["nodes"])
    # Candidates are drawn at their search scores, which all had; the best few, tuned longer
    # after the search, again at their longer score, the answer's diamond with them.
    retuned = {
        node["id"]: node
        for event in job_events(stack, job_id)
        if event["kind"] == "reranked"
        for node in event["nodes"]
    }
    assert retuned and js(page, "window.archtree.retunedPoints") == len(retuned)
    series = js(
        page,
        "Object.fromEntries(echarts.getInstanceByDom(document.querySelector('#scatter-chart'))"
        ".getOption().series.map(s => [s.name, s.data]))",
    )
    searched = {i: score for _, score, i in series["within budget"] + series["over budget"]}
    assert {i: score for _, score, i in series["tuned longer"]} == {
        i: node["score"] for i, node in retuned.items()
    }
    for node_id, node in retuned.items():
        assert searched[node_id] == node["score_before"]
    ((_, chosen_score, chosen_id),) = series["chosen"]
    assert chosen_id in retuned and chosen_score == retuned[chosen_id]["score"]
    # The latency axis's labels stay apart over any range of latencies.
    for span in (250.0, 3.0, 0.04, 0.0005):
        labels = js(
            page,
            f"[0, 1, 2, 3, 4, 5].map(i => (2 + i * {span} / 5)"
            f".toFixed(window.archtree.latencyDecimals({span})))",
        )
        assert len(set(labels)) == 6, (span, labels)
    # The event log's words: counts in the singular where there is one; a data-free job's
    # scores called fidelity; a timing from the latency cache said to be.
    describe = "window.archtree.describe"
    one = js(page, f"{describe}({{kind: 'depth_started', depth: 1, children: 1}})")
    assert one == "depth 1: 1 child to evaluate"
    baseline = "{kind: 'baseline', latency_ms: 2, budget_ms: 1, score: -0.02, cached: true}"
    said = js(page, f"{describe}({baseline}, 'fidelity')")
    assert ", cached, budget" in said and said.endswith("fidelity −0.020"), said
    assert "score" not in said
    confirmed = js(page, f"{describe}({{kind: 'confirmed', id: 'n4', latency_ms: 1, trims: 1}})")
    assert confirmed.endswith("(1 trim)") and "cached" not in confirmed
    # "Best so far" counts the children of the depth in progress too, ranked as answers are.
    seen = [
        {"id": "n0", "within_budget": False, "score": 0.9, "latency_ms": 2.0},
        {"id": "n1", "within_budget": True, "score": 0.8, "latency_ms": 1.0},
        {"id": "n2", "within_budget": True, "score": 0.8, "latency_ms": 1.2},
        {"id": "n3", "within_budget": False, "score": 0.95, "latency_ms": 3.0},
        {"id": "n4", "within_budget": True, "score": 0.7, "latency_ms": 1.4},
    ]
    best_so_far = "window.archtree.bestSoFar"
    assert js(page, f"{best_so_far}({json.dumps(seen)}, 'n0')") == "n2"
    assert js(page, f"{best_so_far}({json.dumps(seen[:1] + seen[3:4])}, 'n0') ?? null") is None
    # A widened answer's gap: points of accuracy, a plain difference of fidelity.
    filled = json.dumps({
        "kind": "filled", "id": "n20", "answer": "n19", "groups": ["stage1"], "latency_ms": 0.95,
        "score": -0.004, "answer_score": -0.005, "chosen": "n20", "score_gap": 0.005,
        "score_gap_se": 0.002,
    })  # fmt: skip
    assert js(page, f"{describe}({filled}, 'fidelity')").endswith(
        "(was −0.005; +0.0050 ± 0.0040): answer n20"
    )
    assert js(page, f"{describe}({filled})").endswith("(was −0.005; +0.5 ± 0.4 points): answer n20")
    for tie, said in ((True, "as well"), (False, "better")):
        merged = f"{{kind: 'child_merged', id: 'n6', into: 'n5', tie: {json.dumps(tie)}}}"
        assert js(page, f"{describe}({merged})").endswith(f"n5, which scored {said}")
    # The answer is drawn a second time at the latency it was confirmed at, which the stats
    # give and say so; the candidates stay at their search latency.
    final = job["progress"]["final"]
    confirmed = js(
        page,
        "echarts.getInstanceByDom(document.querySelector('#scatter-chart')).getOption()"
        ".series.find(s => s.name === 'chosen, confirmed').data",
    )
    assert [(x, node_id) for x, _, node_id in confirmed] == [(final["latency_ms"], final["id"])]
    assert f"{final['id']} · " in text(page, "#job-stats") and "confirmed" in text(
        page, "#job-stats"
    )
    assert text(page, "#job-status") == "succeeded"
    assert not visible(page, "#cancel")
    # The untrained VGG scores at chance: the page says so, as the job does.
    wait_for(page, lambda: visible(page, "#job-notes"), PAGE_S, "the job's notes")
    assert text(page, "#job-notes").splitlines() == job["progress"]["notes"]
    assert "no better than always answering" in text(page, "#job-notes")
    assert NOTHING_PRUNED not in job["progress"]["notes"]
    comparison = text(page, "#comparison")
    assert "Answer" in comparison and comparison.count("%") >= 4
    # With labels, the scores keep their name (a data-free job's are fidelity).
    assert "Accuracy (validation)" in comparison and "Score (calibration)" in comparison
    assert "Fidelity" not in comparison
    scatter = "echarts.getInstanceByDom(document.querySelector('#scatter-chart'))"
    assert js(page, f"{scatter}.getOption().yAxis[0].name") == "score"
    # The event log follows the job's event stream, which may deliver the last status event
    # a moment after the status that the page polls.
    wait_for(page, lambda: "succeeded" in text(page, "#events"), PAGE_S, "the last event")
    events = text(page, "#events")
    assert "depth_done" in events and "done" in events
    assert "no better than always answering" in events  # the note, in the log too
    # Its candidates' scores are called scores, as the stats, chart and CLI call them.
    node_lines = text(page, '#events li[data-kind="node"]')
    assert re.search(r"\bscore \d", node_lines) and "accuracy" not in node_lines, node_lines

    links = js(page, "[...document.querySelectorAll('#artifacts a')].map(a => a.href)")
    assert [link.rsplit("/", 1)[1] for link in links] == [
        "report.json",
        "arch.json",
        "model.safetensors",
    ]
    report = httpx.get(links[0]).json()
    assert report["final"]["node"] == job["progress"]["final"]["id"]

    # Hovering a pruned node shows its move, latency, score and changed widths.
    pruned = next(node for node in tree["nodes"] if node["parent"] == tree["root_id"])
    tooltip = tree_tooltip(page, pruned["id"])
    assert pruned["move"] in tooltip and "latency" in tooltip and "score" in tooltip
    assert "→" in tooltip  # at least one layer narrower than in the unpruned model
    screenshot(page, "job-succeeded")

    # The devices page counts the measurements the job took on the agent (class, agents
    # online, queue depth, jobs waiting, measurements, ...).
    page.get(f"{stack.url}/#/devices")
    row = f'#classes-table tr[data-device-class="{DEVICE_CLASS}"]'
    wait_for(page, lambda: text(page, row).split()[4:5] not in ([], ["0"]), PAGE_S, "counts")
    assert int(text(page, row).split()[4]) >= job["progress"]["measurements"]
    screenshot(page, "devices-after-job")

    page.get(f"{stack.url}/#/")
    row = f'#jobs-table tr[data-job-id="{job_id}"]'
    wait_for(page, lambda: "succeeded" in text(page, row), PAGE_S, "the job listed succeeded")
    assert "builtin:vgg" in text(page, row) and DEVICE_CLASS in text(page, row)
    screenshot(page, "jobs")


def test_a_data_free_job_says_fidelity_wherever_it_names_scores_and_shows_its_notes(
    page: Any, stack: ApiProcess, tmp_path: Path
):
    """Data without labels, and a budget the unpruned model meets (nothing is searched): the
    page, opened once the job has ended, calls its scores fidelity and shows the answer's."""
    data = load_inputs("builtin:vgg", "builtin:digits").data
    np.savez(tmp_path / "unlabelled.npz", x=torch.cat([data.train_x, data.calib_x]).numpy())
    spec = {key: value for key, value in job_spec().items() if key != "data"}
    with stack.client() as client:
        sent = {"data": ("unlabelled.npz", (tmp_path / "unlabelled.npz").read_bytes())}
        answer = client.post(
            "/v1/jobs", data={"spec": json.dumps(spec | {"budget": "1000ms"})}, files=sent
        )
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]
        wait_until(
            lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] in FINAL_STATUSES,
            JOB_S,
            "the job's end",
        )
        job = client.get(f"/v1/jobs/{job_id}").json()
        report = client.get(f"/v1/jobs/{job_id}/artifacts/report.json").json()
    assert job["status"] == "succeeded", job["error"]
    progress = job["progress"]
    assert progress["scored_by"] == "fidelity"
    assert progress["final"]["fidelity"] == report["final"]["fidelity"] is not None
    # As the page writes it: toFixed has no negative zero (the answer is the unpruned model).
    fidelity = f"{report['final']['fidelity'] + 0.0:.3f}"

    # The job list, which has no events to go by, shows the answer's fidelity.
    open_jobs_page(page, stack)
    row = f'#jobs-table tr[data-job-id="{job_id}"]'
    wait_for(page, lambda: "succeeded" in text(page, row), PAGE_S, "the job listed")
    quality = text(page, f"{row} td:nth-last-child(2)")  # before the Delete button
    assert quality == f"{fidelity} fidelity", quality

    page.get(f"{stack.url}/#/jobs/{job_id}")
    wait_for(page, lambda: visible(page, "#artifacts"), PAGE_S, "the ended job")
    wait_for(page, lambda: visible(page, "#job-notes"), PAGE_S, "the note")
    assert text(page, "#job-notes").splitlines() == progress["notes"]
    assert progress["notes"][-1] == NOTHING_PRUNED_DATA_FREE
    # The answer's fidelity on the validation split where a labelled job's accuracy is, and
    # its fidelity on the calibration split where the score is.
    rows = js(
        page,
        "[...document.querySelectorAll('#comparison tbody tr')]"
        ".map(tr => [...tr.children].map(cell => cell.innerText))",
    )
    named = {row[0]: row[1:] for row in rows}
    assert named["Fidelity (validation)"][1] == fidelity, rows
    assert "Fidelity (calibration)" in named, rows
    assert not any("Accuracy" in name or named_score(name) for name in named), rows
    # The charts, their tooltips and the scatter's description.
    scatter = "echarts.getInstanceByDom(document.querySelector('#scatter-chart'))"
    assert js(page, f"{scatter}.getOption().yAxis[0].name") == "fidelity"
    tooltip = tree_tooltip(page, report["final"]["node"])
    assert "fidelity" in tooltip and not named_score(tooltip), tooltip
    scatter_panel = js(page, "document.querySelector('#scatter-chart').parentElement.innerText")
    assert "latency against fidelity" in scatter_panel and "no labels" in scatter_panel
    assert not named_score(scatter_panel), scatter_panel
    # The event log, replayed: the end says the answer's fidelity, not an accuracy it has not.
    wait_for(page, lambda: "succeeded" in text(page, "#events"), PAGE_S, "the last event")
    done = text(page, '#events li[data-kind="done"]')
    assert f"fidelity {fidelity}, " in done and "accuracy" not in done, done
    assert not named_score(text(page, "#events"))
    screenshot(page, "job-data-free")


def test_the_cancel_button_stops_a_running_job(page: Any, stack: ApiProcess):
    with stack.client() as client:
        # Children fine-tuned long enough that the cancel lands before their depth closes: the
        # cancel stops the next child's fine-tune within a second.
        spec = job_spec(planned_steps=3, ft_steps=2000)
        created = client.post("/v1/jobs", data={"spec": json.dumps(spec)})
    job_id = created.json()["id"]
    page.get(f"{stack.url}/#/jobs/{job_id}")
    # Cancelled once a child of the first depth is drawn, before that depth closes.
    wait_for(
        page,
        lambda: js(page, "window.archtree.pendingNodes") > 0 and visible(page, "#cancel"),
        JOB_S,
        "a child of the depth in progress",
    )
    assert text(page, "#open-depth-label") == "depth in progress"
    # Asked first: declined, the job runs on.
    page.find_element("id", "cancel").click()
    asked = page.switch_to.alert
    assert asked.text == f"Cancel job {job_id}? Its search stops and cannot go on from there."
    asked.dismiss()
    with stack.client() as client:
        assert not client.get(f"/v1/jobs/{job_id}").json()["cancel_requested"]
    page.find_element("id", "cancel").click()
    page.switch_to.alert.accept()
    wait_for(page, lambda: js(page, "window.archtree.status") == "cancelled", 60, "cancelled")
    assert not visible(page, "#cancel") and not visible(page, "#artifacts")
    # The events list follows its own stream: it may show the cancel a moment after the status.
    wait_for(page, lambda: "cancel_requested" in text(page, "#events"), PAGE_S, "the event")
    # The children of the depth the cancel cut short (nearly always some, as they are slow) are
    # drawn as left open, never as still in progress.
    with stack.client() as client:
        closed = client.get(f"/v1/jobs/{job_id}/tree").json()["depth"]
    happened = job_events(stack, job_id)
    merged = {e["id"] for e in happened if e["kind"] == "child_merged"}
    left_open = {e["id"] for e in happened if e["kind"] == "node" and e["depth"] > closed} - merged
    wait_for(
        page, lambda: js(page, "window.archtree.unclosedNodes") == len(left_open), PAGE_S, "open"
    )
    assert js(page, "window.archtree.pendingNodes") == 0
    assert visible(page, "#open-depth-legend") == bool(left_open)
    if left_open:
        assert text(page, "#open-depth-label") == "depth left open (job cancelled)"


def test_the_delete_button_removes_an_ended_job_once_confirmed(page: Any, stack: ApiProcess):
    inputs = load_inputs("builtin:vgg", "builtin:digits")
    data = io.BytesIO()
    splits = inputs.data
    x = torch.cat([splits.train_x, splits.calib_x, splits.val_x]).numpy()
    y = torch.cat([splits.train_y, splits.calib_y, splits.val_y]).numpy()
    np.savez(data, x=x, y=y)
    spec = {key: value for key, value in job_spec().items() if key != "data"}
    spec["device_class"] = "dashboard-nowhere"  # no agent: it never starts, and is ended at once
    with stack.client() as client:
        files = {"data": ("digits.npz", data.getvalue())}
        sent = client.post("/v1/jobs", data={"spec": json.dumps(spec)}, files=files)
        job_id = sent.json()["id"]
        folder = stack.artifacts / "jobs" / job_id
        assert folder.exists()
        page.get(f"{stack.url}/#/jobs/{job_id}")
        wait_for(page, lambda: visible(page, "#cancel"), PAGE_S, "the cancel button")
        assert not visible(page, "#delete")  # not while it may run
        assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        wait_for(page, lambda: visible(page, "#delete"), PAGE_S, "the delete button")
        assert not visible(page, "#cancel")

        # Asked first: declined, nothing happens.
        page.find_element("id", "delete").click()
        asked = page.switch_to.alert
        assert asked.text.startswith(f"Delete job {job_id}, its uploads, result files and events")
        asked.dismiss()
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200 and folder.exists()

        page.find_element("id", "delete").click()
        page.switch_to.alert.accept()
        wait_for(page, lambda: js(page, "location.hash") == "#/", PAGE_S, "the jobs list")
        assert client.get(f"/v1/jobs/{job_id}").status_code == 404
        assert not folder.exists()
        wait_for(page, lambda: visible(page, "#jobs-table"), PAGE_S, "the jobs table")
        assert not js(page, f"document.querySelector('#jobs-table tr[data-job-id=\"{job_id}\"]')")


def test_the_jobs_list_deletes_an_ended_job_from_its_row_once_confirmed(
    page: Any, stack: ApiProcess
):
    spec = job_spec() | {"device_class": "dashboard-list-nowhere"}  # no agent: never starts
    row = "#jobs-table tr[data-job-id='{}']"
    with stack.client() as client:
        ended, kept, waiting = (
            client.post("/v1/jobs", data={"spec": json.dumps(spec)}).json()["id"] for _ in range(3)
        )
        for job_id in (ended, kept):
            assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        open_jobs_page(page, stack)
        wait_for(page, lambda: visible(page, row.format(waiting)), PAGE_S, "the jobs rows")
        # Only an ended job has the button: one that may still run is cancelled first.
        assert not js(page, f'document.querySelector("{row.format(waiting)} button")')
        delete = f"{row.format(ended)} button[data-delete]"
        assert text(page, delete) == "Delete"

        page.find_element("css selector", delete).click()
        asked = page.switch_to.alert
        assert asked.text.startswith(f"Delete job {ended}, its uploads, result files and events")
        asked.dismiss()
        assert client.get(f"/v1/jobs/{ended}").status_code == 200

        page.find_element("css selector", delete).click()
        page.switch_to.alert.accept()
        wait_for(page, lambda: not visible(page, row.format(ended)), PAGE_S, "the row gone")
        assert client.get(f"/v1/jobs/{ended}").status_code == 404
        assert visible(page, row.format(kept)) and visible(page, row.format(waiting))
        assert client.get(f"/v1/jobs/{kept}").status_code == 200
        assert not visible(page, "#jobs-error")
        client.post(f"/v1/jobs/{waiting}/cancel")


def test_a_job_lost_with_the_services_redis_is_not_said_to_be_deleted(
    page: Any, quiet_api: ApiProcess, redis_url: str
):
    """A queued job cannot be deleted: gone before its end, it may have been lost with a Redis
    restarted without persistence, which the page cannot tell apart from a deletion whose
    final status it missed."""
    with quiet_api.client() as client:
        lost = submit(client, job_spec())
        page.get(f"{quiet_api.url}/#/jobs/{lost}")
        wait_for(page, lambda: visible(page, "#cancel"), PAGE_S, "the queued job's page")
        redis.Redis.from_url(f"{redis_url.rsplit('/', 1)[0]}/3").flushdb()  # its data lost
        assert client.get(f"/v1/jobs/{lost}").status_code == 404
        wait_for(page, lambda: visible(page, ".not-found"), PAGE_S, "the job said gone")
        said = text(page, ".not-found")
        gone = f"Job {lost} is gone from the service, last seen queued:"
        assert said.startswith(f"Job gone\n\n{gone}"), said
        assert "the service's Redis lost it" in said and "Job deleted" not in said


def test_a_job_deleted_elsewhere_is_said_to_be_deleted_on_its_page_and_in_the_list(
    page: Any, quiet_api: ApiProcess
):
    with quiet_api.client() as client:
        shown, listed, kept = (submit(client, job_spec()) for _ in range(3))
        for job_id in (shown, listed, kept):
            assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        # An ended job's page, left untouched while the API deletes the job: the page's own
        # look for its deletion (every 10 s at most) says so.
        page.get(f"{quiet_api.url}/#/jobs/{shown}")
        wait_for(page, lambda: visible(page, "#delete"), PAGE_S, "the delete button")
        assert client.delete(f"/v1/jobs/{shown}").status_code in (200, 204)
        wait_for(page, lambda: visible(page, ".not-found"), 10 + PAGE_S, "the job said deleted")
        said = text(page, ".not-found")
        assert f"Job {shown} was deleted elsewhere" in said and "/v1/jobs" not in said
        assert not visible(page, "#job-error")
        page.find_element("css selector", ".not-found a").click()
        wait_for(page, lambda: js(page, "window.archtree?.view") == "jobs", PAGE_S, "the jobs")

        # The list's Delete of a job deleted meanwhile: its row goes, with no error.
        row = "#jobs-table tr[data-job-id='{}']"
        wait_for(page, lambda: visible(page, row.format(listed)), PAGE_S, "the job's row")
        assert client.delete(f"/v1/jobs/{listed}").status_code in (200, 204)
        page.find_element("css selector", f"{row.format(listed)} button[data-delete]").click()
        page.switch_to.alert.accept()
        wait_for(page, lambda: not visible(page, row.format(listed)), PAGE_S, "the row gone")
        assert visible(page, row.format(kept))
        assert not visible(page, "#jobs-error"), text(page, "#jobs-error")


def focused(driver: Any) -> str:
    """The element with the keyboard focus, as tag#id[name] (BODY: none)."""
    return js(
        driver,
        "(e => e.tagName + (e.id ? '#' + e.id : '') + (e.name ? '[' + e.name + ']' : ''))"
        "(document.activeElement)",
    )


def test_the_keyboard_focus_stays_where_the_user_works_and_controls_are_named(
    page: Any, quiet_api: ApiProcess
):
    with quiet_api.client() as client:
        created = [submit(client, job_spec()) for _ in range(22)]
        for job_id in created[:-1]:
            assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    open_jobs_page(page, quiet_api)
    wait_for(page, lambda: text(page, "#page-info") == "1–20 of 22", PAGE_S, "page 1")
    # Each Delete button is named by its job.
    labels = js(
        page,
        "[...document.querySelectorAll('#jobs-table [data-delete]')]"
        ".map(b => [b.dataset.delete, b.getAttribute('aria-label')])",
    )
    assert labels and all(label == f"Delete job {job_id}" for job_id, label in labels)

    # The first Tab shows the skip link; following it takes the keyboard past the menu to the
    # page's heading, and leaves the address (the page's route) as it was.
    from selenium.webdriver.common.keys import Keys

    address = page.current_url
    page.find_element("tag name", "body").send_keys(Keys.TAB)
    assert focused(page) == "A#skip-link"
    assert js(page, "document.getElementById('skip-link').getBoundingClientRect().top") >= 0
    page.switch_to.active_element.send_keys(Keys.ENTER)
    assert js(page, "document.activeElement.matches('#view h1')"), focused(page)
    assert js(page, "document.activeElement.textContent") == "Jobs"
    assert page.current_url == address

    # The pager's Older, disabled on the last page: the keyboard goes on from Newer.
    page.find_element("id", "older").click()
    wait_for(page, lambda: text(page, "#page-info") == "21–22 of 22", PAGE_S, "page 2")
    assert js(page, "document.getElementById('older').disabled")
    assert focused(page) == "BUTTON#newer"

    # A row's Delete: the keyboard goes on from the row that takes its place.
    oldest = created[0]
    page.find_element("css selector", f"[data-delete='{oldest}']").click()
    page.switch_to.alert.accept()
    wait_for(page, lambda: text(page, "#page-info") == "21–21 of 21", PAGE_S, "the row gone")
    wait_for(page, lambda: focused(page) != "BODY", PAGE_S, "the focus kept")
    assert js(page, "document.activeElement.closest('#jobs-table') !== null")

    # An invalid field, refused by the API: the keyboard goes to it.
    page.find_element("id", "newer").click()
    fill(page, {"budget": "fast"})
    page.find_element("id", "submit-button").click()
    wait_for(page, lambda: visible(page, "#submit-error"), PAGE_S, "the form's error")
    assert focused(page) == "INPUT[budget]"
    fill(page, {"budget": "60%", "data": "upload"})  # no file chosen: refused by the page
    page.find_element("id", "submit-button").click()
    wait_for(page, lambda: focused(page) == "INPUT[data_file]", PAGE_S, "the data file")

    # Cancel on a job's page: the button goes, the keyboard stays in the job's header.
    page.get(f"{quiet_api.url}/#/jobs/{created[-1]}")
    wait_for(page, lambda: visible(page, "#cancel"), PAGE_S, "the cancel button")
    for chart in ("#tree-chart", "#scatter-chart"):
        assert js(page, f"document.querySelector('{chart}').getAttribute('role')") == "img"
    # Empty charts say why, in their middle and to a screen reader.
    label = "document.querySelector('{}').getAttribute('aria-label')"
    yet = "yet: the search draws them once it has measured and scored the unpruned model."
    wait_for(page, lambda: js(page, "window.archtree.treeNote"), PAGE_S, "the tree's note")
    assert js(page, "window.archtree.treeNote") == f"No nodes {yet}"
    assert js(page, label.format("#tree-chart")) == f"Search tree: No nodes {yet}"
    assert js(page, "window.archtree.scatterNote") == f"No candidates {yet}"
    assert js(page, label.format("#scatter-chart")).endswith(f": No candidates {yet}")
    scatter = "echarts.getInstanceByDom(document.querySelector('#scatter-chart')).getOption()"
    assert js(page, f"{scatter}.legend.flatMap(row => row.data)") == []  # nothing drawn
    page.find_element("id", "cancel").click()
    page.switch_to.alert.accept()
    wait_for(page, lambda: js(page, "window.archtree.status") == "cancelled", PAGE_S, "cancelled")
    assert js(page, "window.archtree.treeNote") == (
        "No nodes: the job was cancelled before its search drew any."
    )
    wait_for(page, lambda: visible(page, "#delete"), PAGE_S, "the delete button")
    assert focused(page) != "BODY"
    assert js(page, "document.activeElement.closest('.job-head') !== null")


def test_a_job_waiting_for_its_device_says_which_agent_to_start(
    page: Any, stack: ApiProcess, worker_pool: WorkerPool
):
    # A long device wait, so that the job is still waiting when looked at.
    with worker_pool.reconfigured(ARCHTREE_DEVICE_WAIT_S="300"):
        worker_pool.ensure(1)
        with stack.client() as client:
            spec = job_spec() | {"device_class": "dashboard-absent"}
            job_id = client.post("/v1/jobs", data={"spec": json.dumps(spec)}).json()["id"]
            page.get(f"{stack.url}/#/jobs/{job_id}")
            wait_for(page, lambda: visible(page, "#job-waiting"), JOB_S, "the wait shown")
            shown = text(page, "#job-waiting")
            assert js(page, "window.archtree.status") == "waiting_for_device"
            assert text(page, "#job-status") == "waiting for a device"  # as the filter says
            assert "No agent of device class dashboard-absent is online" in shown
            # And when the job fails if none comes: its device wait (300 s) after it began.
            progress = client.get(f"/v1/jobs/{job_id}").json()["progress"]
            assert progress["device_wait_until"] == pytest.approx(
                progress["device_wait_since"] + 300
            )
            assert "the job goes on once one is, and fails if none is by " in shown
            command = f"archtree agent --api {stack.url} --device-class dashboard-absent"
            assert text(page, "#job-waiting code") == command
            # Nothing measured yet: no depth either.
            assert js(page, "document.querySelector('#job-stats dd').innerText") == "—"
            screenshot(page, "job-waiting-for-device")
            # The devices page counts the job under its class, with the agent to start.
            assert client.get("/v1/devices").json()["jobs_waiting"] == {"dashboard-absent": 1}
            page.get(f"{stack.url}/#/devices")
            row = '#classes-table tr[data-device-class="dashboard-absent"]'
            wait_for(page, lambda: visible(page, "#classes-waiting"), PAGE_S, "the waiting job")
            assert text(page, row).split() == ["dashboard-absent", "0", "0", "1", "0", "0"]
            assert text(page, "#classes-waiting code") == command
            said = "1 job waits for class dashboard-absent: "
            assert text(page, "#classes-waiting").startswith(said)
            page.get(f"{stack.url}/#/jobs/{job_id}")

            client.post(f"/v1/jobs/{job_id}/cancel")
            wait_for(page, lambda: js(page, "window.archtree.status") == "cancelled", 60, "end")
            assert not visible(page, "#job-waiting")
    worker_pool.ensure(1)  # as the module's other tests expect


def test_uploads_are_named_as_the_user_named_their_files(
    page: Any, stack: ApiProcess, tmp_path: Path
):
    data = load_inputs("builtin:vgg", "builtin:digits").data
    np.savez(tmp_path / "upload.npz", x=data.train_x.numpy(), y=data.train_y.numpy())
    spec = {key: value for key, value in job_spec().items() if key != "data"}
    spec["device_class"] = "dashboard-absent"  # it waits, and is cancelled below
    with stack.client() as client:
        sent = {"data": ("my digits.npz", (tmp_path / "upload.npz").read_bytes())}
        answer = client.post("/v1/jobs", data={"spec": json.dumps(spec)}, files=sent)
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]
        try:
            page.get(f"{stack.url}/#/jobs/{job_id}")
            wait_for(page, lambda: "data uploaded" in text(page, "#job-summary"), PAGE_S, "job")
            assert "data uploaded my digits.npz" in text(page, "#job-summary")
            open_jobs_page(page, stack)
            row = f'tr[data-job-id="{job_id}"]'
            wait_for(page, lambda: visible(page, row), PAGE_S, "the job's row")
            assert "uploaded my digits.npz" in text(page, row)
        finally:
            client.post(f"/v1/jobs/{job_id}/cancel")


def test_a_job_whose_worker_is_lost_says_so_until_another_worker_takes_over(
    page: Any, stack: ApiProcess, worker_pool: WorkerPool
):
    worker_pool.ensure(1)
    # Children tuned long enough that the worker is surely killed inside one, holding its
    # task (the kill waits for that, starting another worker to try again otherwise).
    spec = job_spec(planned_steps=3, ft_steps=300)
    with stack.client() as client:
        created = client.post("/v1/jobs", data={"spec": json.dumps(spec)})
    job_id = created.json()["id"]
    page.get(f"{stack.url}/#/jobs/{job_id}")
    wait_for(page, lambda: "evaluating" in text(page, "#events"), JOB_S, "a child evaluated")
    # The only worker: the job stalls until another takes its task.
    worker, _ = worker_pool.kill_one_running_a_child(job_id)
    wait_for(page, lambda: visible(page, "#job-lost"), 30, "the lost worker shown")
    shown = text(page, "#job-lost")
    assert f"Worker {worker.name} stopped answering in " in shown
    assert "another worker takes the task by about" in shown
    assert js(page, "window.archtree.status") == "running"
    screenshot(page, "job-worker-lost")

    worker_pool.start(1)
    wait_for(page, lambda: js(page, "window.archtree.status") == "succeeded", JOB_S, "success")
    assert not visible(page, "#job-lost")
    assert f"Worker {worker.name} stopped answering" in text(page, "#events")


def test_a_job_failed_before_its_search_keeps_its_baseline_and_says_what_to_change_in_the_form(
    page: Any, stack: ApiProcess, worker_pool: WorkerPool
):
    worker_pool.ensure(1)
    with stack.client() as client:
        spec = job_spec() | {"budget": "5%"}  # far below the narrowest model
        job_id = client.post("/v1/jobs", data={"spec": json.dumps(spec)}).json()["id"]
    page.get(f"{stack.url}/#/jobs/{job_id}")
    wait_for(page, lambda: js(page, "window.archtree.status") == "failed", JOB_S, "the failure")
    wait_for(page, lambda: visible(page, "#job-error"), PAGE_S, "the error shown")
    shown = text(page, "#job-error")
    assert "cannot be met on this device" in shown
    assert "or lower Min width" in shown and "search." not in shown
    stats = dict(
        zip(
            js(page, "[...document.querySelectorAll('#job-stats dt')].map(e => e.innerText)"),
            js(page, "[...document.querySelectorAll('#job-stats dd')].map(e => e.innerText)"),
            strict=True,
        )
    )
    assert stats["Unpruned"].endswith(" ms") and stats["Budget"].endswith(" ms"), stats
    # The fields it names are in the form.
    open_jobs_page(page, stack)
    js(page, "document.querySelector('#submit-form details').open = true")
    for name in ("min_width_fraction", "margin"):
        assert visible(page, f"#submit-form [name={name}]")


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("#/jobs/0123456789ab", "No job 0123456789ab on this service."),
        ("#/nowhere", "Nothing is at #/nowhere"),
    ],
)
def test_an_address_that_names_nothing_says_so_with_the_way_back(
    page: Any, stack: ApiProcess, address: str, expected: str
):
    page.get(f"{stack.url}/{address}")
    wait_for(page, lambda: visible(page, ".not-found"), PAGE_S, "the not-found page")
    assert expected in text(page, ".not-found")
    page.find_element("css selector", ".not-found a").click()
    wait_for(page, lambda: js(page, "window.archtree?.view") == "jobs", PAGE_S, "the jobs")


def test_the_page_says_when_the_api_is_unreachable_and_recovers(
    page: Any, redis_url: str, tmp_path: Path
):
    env = api_env(redis_url, tmp_path)
    api = start_api(env, tmp_path / "logs")
    try:
        page.get(f"{api.url}/#/devices")
        wait_for(page, lambda: js(page, "window.archtree?.view") == "devices", PAGE_S, "devices")
        assert not visible(page, "#offline")
        port = int(api.url.rsplit(":", 1)[1])
        api.stop()
        wait_for(page, lambda: visible(page, "#offline"), PAGE_S, "the outage said")
        assert "The API is unreachable since" in text(page, "#offline")
        assert "stale" in js(page, "document.querySelector('#view').className")
        screenshot(page, "api-unreachable")
        api = start_api(env, tmp_path / "logs", port=port)
        wait_for(page, lambda: not visible(page, "#offline"), PAGE_S, "the recovery")
        assert "stale" not in js(page, "document.querySelector('#view').className")
    finally:
        api.stop()
    console_errors(page)  # the failed fetches of the outage, expected here


def test_the_page_says_when_the_api_stops_answering_and_recovers(
    page: Any, redis_url: str, tmp_path: Path
):
    """An API that takes connections but answers nothing (a stalled process): the page said
    "live" over what it last showed for as long as that lasted."""
    api = start_api(api_env(redis_url, tmp_path), tmp_path / "logs")
    try:
        page.get(f"{api.url}/#/devices")
        wait_for(page, lambda: js(page, "window.archtree?.view") == "devices", PAGE_S, "devices")
        assert not visible(page, "#offline")
        os.killpg(api.process.pid, signal.SIGSTOP)
        try:
            wait_for(page, lambda: visible(page, "#offline"), 2 * PAGE_S, "the stall said")
            assert text(page, "#connection") == "API not answering"
            assert "stale" in js(page, "document.querySelector('#view').className")
        finally:
            os.killpg(api.process.pid, signal.SIGCONT)
        wait_for(page, lambda: not visible(page, "#offline"), 2 * PAGE_S, "the recovery")
        assert text(page, "#connection").startswith("live")
    finally:
        api.stop()
    console_errors(page)  # the requests given up, expected here


def test_a_submission_the_api_did_not_get_is_said_until_it_answers_again(
    page: Any, redis_url: str, tmp_path: Path
):
    env = api_env(redis_url, tmp_path)
    api = start_api(env, tmp_path / "logs")
    try:
        open_jobs_page(page, api)
        port = int(api.url.rsplit(":", 1)[1])
        api.stop()
        page.find_element("id", "submit-button").click()
        wait_for(page, lambda: visible(page, "#submit-error"), PAGE_S, "the form's error")
        said = text(page, "#submit-error")
        assert said.startswith("cannot reach the API") and "fetch" not in said.lower(), said
        assert invalid_fields(page) == []
        api = start_api(env, tmp_path / "logs", port=port)
        wait_for(page, lambda: not visible(page, "#submit-error"), PAGE_S, "the error gone")
    finally:
        api.stop()
    console_errors(page)  # the failed fetches of the outage, expected here


def out_of_date(driver: Any) -> list[bool]:
    """For each table of the page, whether it is marked out of date."""
    return js(
        driver,
        "[...document.querySelectorAll('.table-wrap')]"
        ".map(wrap => wrap.classList.contains('out-of-date'))",
    )


def test_the_lists_show_the_api_error_and_mark_their_rows_out_of_date_until_it_answers(
    page: Any, tmp_path: Path
):
    """The API up and its Redis gone: the API answers 503. The jobs and devices pages show its
    message, do not call the connection live, and mark what they last showed out of date (or say
    that nothing could be loaded), until the API answers again."""
    port = free_port()
    server = start_redis(tmp_path / "redis", port)
    api = start_api(api_env(f"redis://127.0.0.1:{port}/0", tmp_path), tmp_path / "logs")
    try:
        with api.client() as client:
            job_id = submit(client, job_spec())
        row = f'#jobs-table tr[data-job-id="{job_id}"]'
        open_jobs_page(page, api)
        wait_for(page, lambda: visible(page, row), PAGE_S, "the job's row")
        assert text(page, "#connection").startswith("live · ")
        assert not visible(page, "#jobs-load-error") and out_of_date(page) == [False]

        stop_redis(server)
        with api.client() as client:
            answer = client.get("/v1/jobs")
        assert answer.status_code == 503
        detail = answer.json()["detail"]
        assert "cannot reach its Redis" in detail
        said = partial(text, page, "#jobs-load-error .message")
        wait_for(page, lambda: said() == detail, PAGE_S, "the API's error on the jobs page")
        assert text(page, "#connection").startswith("API error 503 · ")
        assert "down" in js(page, "document.querySelector('#connection').className")
        # What it last showed stays, marked out of date; the API answers, so no outage banner.
        assert visible(page, row) and out_of_date(page) == [True]
        assert text(page, "#jobs-load-error .note").startswith("Out of date: ")
        assert not visible(page, "#offline")
        screenshot(page, "api-failing")

        # Loaded while the API fails: nothing to show, and said so.
        page.refresh()
        wait_for(page, lambda: said() == detail, PAGE_S, "the error on a fresh jobs page")
        assert text(page, "#jobs-table tbody") == "Not loaded: the API answered with an error."
        assert not text(page, "#connection").startswith("live")

        page.find_element("css selector", "[data-nav=devices]").click()
        said = partial(text, page, "#devices-load-error .message")
        wait_for(page, lambda: said() == detail, PAGE_S, "the API's error on the devices page")
        for table in ("#devices-table", "#classes-table"):
            assert text(page, f"{table} tbody") == "Not loaded: the API answered with an error."
        assert not text(page, "#connection").startswith("live")

        for outage in range(2):
            server = start_redis(tmp_path / "redis", port)
            wait_for(page, lambda: not visible(page, "#devices-load-error"), PAGE_S, "the recovery")
            assert text(page, "#connection").startswith("live · ")
            wait_for(
                page,
                lambda: text(page, "#devices-table tbody").startswith("No device registered"),
                PAGE_S,
                "the devices loaded",
            )
            assert out_of_date(page) == [False, False]
            if outage:
                break
            # The devices page, once loaded, keeps what it showed, marked out of date.
            stop_redis(server)
            wait_for(page, lambda: said() == detail, PAGE_S, "the error again")
            assert out_of_date(page) == [True, True]
            assert text(page, "#devices-table tbody").startswith("No device registered")
            assert not text(page, "#connection").startswith("live")

        page.find_element("css selector", "[data-nav=jobs]").click()
        wait_for(page, lambda: text(page, "#jobs-table tbody") == "No jobs yet.", PAGE_S, "jobs")
        assert not visible(page, "#jobs-load-error") and out_of_date(page) == [False]
    finally:
        api.stop()
        stop_redis(server)


def test_an_ended_jobs_page_shows_its_own_error_again_once_the_api_answers(
    page: Any, tmp_path: Path
):
    """An ended job's page looks for its deletion every 10 s: an API error meanwhile (its
    Redis stalled) takes the place of the job's own error, which comes back with the API."""
    from workers.job_store import JobStore

    port = free_port()
    server = start_redis(tmp_path / "redis", port)
    url = f"redis://127.0.0.1:{port}/0"
    api = start_api(api_env(url, tmp_path), tmp_path / "logs")
    failure = "the budget of 1 ms cannot be met on this device"
    try:
        with api.client() as client:
            job_id = submit(client, job_spec())
        assert JobStore(redis.Redis.from_url(url)).set_status_if_active(job_id, "failed", failure)
        page.get(f"{api.url}/#/jobs/{job_id}")
        said = partial(text, page, "#job-error")
        wait_for(page, lambda: visible(page, "#job-error") and said() == failure, PAGE_S, "it")
        server.send_signal(signal.SIGSTOP)  # the API answers 503 after its Redis timeout
        try:
            wait_for(page, lambda: "Redis" in said(), 10 + 2 * PAGE_S, "the API's error")
        finally:
            server.send_signal(signal.SIGCONT)
        wait_for(page, lambda: said() == failure, 10 + PAGE_S, "the job's error again")
        assert not visible(page, ".not-found")
    finally:
        api.stop()
        stop_redis(server)
    console_errors(page)  # the failed reads of the stall, expected here


# How far the page is wider than the window (0 or less: no scrolling sideways).
OVERFLOW = "document.documentElement.scrollWidth - innerWidth"


# How many lines the top bar's badge takes.
BADGE_LINES = (
    "(r => { r.selectNodeContents(document.querySelector('#connection'));"
    " return new Set([...r.getClientRects()].map(line => line.top)).size; })"
    "(document.createRange())"
)


def scrolls(driver: Any, table: str) -> bool:
    """Whether the box of `table` is marked as scrolling sideways."""
    return js(
        driver,
        f"document.querySelector('{table}').closest('.table-wrap').classList.contains('scrolls')",
    )


def visible_hint(driver: Any, table: str) -> bool:
    """Whether the line above the box of `table` says that it scrolls sideways."""
    hint = js(
        driver,
        f"document.querySelector('{table}').closest('.table-wrap').previousElementSibling",
    )
    return bool(hint) and hint.is_displayed() and "sideways" in hint.text


def test_a_narrow_window_scrolls_tables_not_the_page(page: Any, stack: ApiProcess):
    with stack.client() as client:
        spec = job_spec() | {"budget": "1000ms"}
        job_id = client.post("/v1/jobs", data={"spec": json.dumps(spec)}).json()["id"]
        # Ended: its page's header holds its Delete button too, the widest it gets.
        ended = {"succeeded", "failed"}
        wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] in ended, JOB_S, "end")
    size = page.get_window_size()
    page.set_window_size(390, 844)
    try:
        addresses = (("#/", "jobs"), (f"#/jobs/{job_id}", "job"), ("#/devices", "devices"))
        for address, view in addresses:
            page.get(f"{stack.url}/{address}")
            wait_for(page, lambda v=view: js(page, "window.archtree?.view") == v, PAGE_S, view)
            wait_for(page, lambda: js(page, "document.querySelector('tbody tr')"), PAGE_S, "rows")
            # Once laid out (charts size themselves to the window a moment after it shows).
            wait_for(page, lambda: js(page, OVERFLOW) <= 0, PAGE_S, f"{address} within the width")
            # The top bar's badge on one line, whatever it says.
            assert js(page, BADGE_LINES) == 1, text(page, "#connection")
            if view == "jobs":  # the table scrolls sideways, and says so
                marked = partial(scrolls, page, "#jobs-table")
                wait_for(page, marked, PAGE_S, "the table marked")
                assert visible_hint(page, "#jobs-table")
            if view == "job":  # the comparison's numbers, all in view
                wait_for(page, lambda: "ms" in text(page, "#comparison tbody"), PAGE_S, "numbers")
                assert not scrolls(page, "#comparison") and not visible_hint(page, "#comparison")
                wrap = "document.querySelector('#comparison').closest('.table-wrap')"
                assert js(page, f"{wrap}.scrollWidth - {wrap}.clientWidth") <= 0
            if view == "job":  # an event's description gets the whole width, under its kind
                wait_for(
                    page, lambda: js(page, "document.querySelector('#events li')"), PAGE_S, "events"
                )
                share = js(
                    page,
                    "(li => li.lastElementChild.offsetWidth / li.clientWidth)"
                    "(document.querySelector('#events li'))",
                )
                assert share > 0.8, share
    finally:
        page.set_window_size(size["width"], size["height"])


# A device class of the longest the API takes, in words (64 characters).
LONG_CLASS = "cluster-b.rack-17.jetson-orin-nano-8gb.maxn-power-mode.jetpack-6"


@pytest.mark.parametrize("width", [1280, 1440])
def test_long_names_in_the_jobs_list_are_cut_short_so_that_its_table_fits(
    page: Any, quiet_api: ApiProcess, tmp_path: Path, width: int
):
    data = load_inputs("builtin:vgg", "builtin:digits").data
    np.savez(tmp_path / "upload.npz", x=data.train_x.numpy(), y=data.train_y.numpy())
    name = f"{('digits, augmented and relabelled by hand, ' * 6)[:246]}.npz"  # 250 characters
    assert len(LONG_CLASS) == 64
    spec = {key: value for key, value in job_spec().items() if key != "data"}
    spec["device_class"] = LONG_CLASS
    with quiet_api.client() as client:
        job_id = submit(client, spec, data=(name, (tmp_path / "upload.npz").read_bytes()))
        submit(client, job_spec())  # a short one beside it
        assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        shown_name = client.get(f"/v1/jobs/{job_id}").json()["spec"]["upload_names"]["data"]
    assert len(shown_name) >= 200  # as the API keeps it
    row = f'#jobs-table tr[data-job-id="{job_id}"]'
    wrap = "document.querySelector('#jobs-table').closest('.table-wrap')"
    size = page.get_window_size()
    page.set_window_size(width, 900)
    try:
        open_jobs_page(page, quiet_api)
        wait_for(page, lambda: visible(page, f"{row} [data-delete]"), PAGE_S, "the job's row")
        assert js(page, "document.documentElement.scrollWidth - innerWidth") <= 0
        # The whole row in view, its Delete button too: the table needs no scrolling.
        assert js(page, f"{wrap}.scrollWidth - {wrap}.clientWidth") <= 0
        right = js(page, f"{wrap}.getBoundingClientRect().right")
        button = f"document.querySelector('{row} [data-delete]')"
        assert js(page, f"{button}.getBoundingClientRect().right") <= right
        # The names are cut where shown, whole in the cells' tooltips and their text.
        for column, whole in ((5, f"uploaded {shown_name}"), (6, LONG_CLASS)):
            cell = f"document.querySelector('{row} td:nth-child({column})')"
            assert js(page, f"{cell}.title") == whole
            assert js(page, f"{cell}.innerText") == whole
            assert js(page, f"{cell}.offsetWidth") < js(
                page, f"{cell}.firstElementChild.scrollWidth"
            )
        screenshot(page, f"jobs-long-name-{width}")
    finally:
        page.set_window_size(size["width"], size["height"])


def test_a_phone_shows_a_devices_numbers_beside_a_long_class_cut_short(
    page: Any, quiet_api: ApiProcess
):
    with quiet_api.client() as client:
        device = {"device_class": LONG_CLASS, "host": "phone-test", "cpu": "ARM " * 30}
        assert client.post("/v1/devices", json=device).status_code == 201
    size = page.get_window_size()
    page.set_window_size(390, 844)
    row = f'#classes-table tr[data-device-class="{LONG_CLASS}"]'
    try:
        page.get(f"{quiet_api.url}/#/devices")
        wait_for(page, lambda: visible(page, row), PAGE_S, "the class's row")
        wait_for(page, lambda: js(page, OVERFLOW) <= 0, PAGE_S, "the page within the width")
        # The class cut short, the whole on hover; its numbers in view without scrolling.
        cell = f"document.querySelector('{row} td')"
        assert js(page, f"{cell}.title") == LONG_CLASS
        assert js(page, f"{cell}.offsetWidth") < js(page, f"{cell}.firstElementChild.scrollWidth")
        wrap = "document.querySelector('#classes-table').closest('.table-wrap')"
        right = js(page, f"{wrap}.getBoundingClientRect().right")
        for column in (2, 3, 4):  # agents online, queue depth, jobs waiting
            shown = f"document.querySelector('{row} td:nth-child({column})')"
            assert js(page, f"{shown}.getBoundingClientRect().right") <= right, column
        # What does not fit scrolls, and says so.
        # The agents' table, wider, scrolls and says so.
        wait_for(page, lambda: scrolls(page, "#devices-table"), PAGE_S, "the table marked")
        assert visible_hint(page, "#devices-table")
        screenshot(page, "devices-phone")
    finally:
        page.set_window_size(size["width"], size["height"])


def test_the_list_page_and_the_form_draft_survive_a_visit_elsewhere(page: Any, stack: ApiProcess):
    with stack.client() as client:
        # A second page of jobs, and of cancelled ones.
        while client.get("/v1/jobs", params={"status": "cancelled"}).json()["total"] <= 20:
            spec = job_spec() | {"device_class": "dashboard-nowhere"}
            answer = client.post("/v1/jobs", data={"spec": json.dumps(spec)})
            client.post(f"/v1/jobs/{answer.json()['id']}/cancel")
    open_jobs_page(page, stack)
    fill(page, {"budget": "7ms", "device_class": "somewhere"})
    page.find_element("id", "older").click()
    wait_for(page, lambda: text(page, "#page-info").startswith("21–"), PAGE_S, "page 2")
    first = js(page, "document.querySelector('#jobs-table tbody a').getAttribute('href')")
    page.find_element("css selector", "#jobs-table tbody a").click()
    wait_for(page, lambda: js(page, "window.archtree?.view") == "job", PAGE_S, "the job")
    assert js(page, "location.hash") == first

    page.back()
    wait_for(page, lambda: text(page, "#page-info").startswith("21–"), PAGE_S, "page 2 again")
    assert js(page, "document.querySelector('[name=budget]').value") == "7ms"
    assert js(page, "document.querySelector('[name=device_class]').value") == "somewhere"

    # The list in one status, from its first page, kept on coming back from a job.
    from selenium.webdriver.support.select import Select

    shown_ids = "[...document.querySelectorAll('#jobs-table tbody a')].map(a => a.innerText)"
    shown = partial(js, page, shown_ids)
    for status in ("succeeded", "cancelled"):
        with stack.client() as client:
            listed = client.get("/v1/jobs", params={"status": status, "limit": 20}).json()
        Select(page.find_element("id", "status-filter")).select_by_value(status)
        expected = [job["id"] for job in listed["jobs"]]
        wait_for(page, lambda want=expected: shown() == want, PAGE_S, f"the {status} jobs")
        if not expected:
            assert text(page, "#jobs-table tbody") == "No jobs in this status."
    assert len(expected) == 20 and text(page, "#page-info") == f"1–20 of {listed['total']}"
    page.find_element("css selector", "#jobs-table tbody a").click()
    wait_for(page, lambda: js(page, "window.archtree?.view") == "job", PAGE_S, "the job")
    page.back()
    wait_for(page, lambda: js(page, shown_ids) == expected, PAGE_S, "the same jobs again")
    assert js(page, "document.querySelector('#status-filter').value") == "cancelled"


def cancelled_jobs_at_page_two(
    page: Any, api: ApiProcess, client: httpx.Client, count: int
) -> list[str]:
    """`count` (21 to 40) jobs submitted and cancelled, the list filtered to cancelled jobs
    and shown at its second page; their ids, oldest first."""
    from selenium.webdriver.support.select import Select

    created = [submit(client, job_spec()) for _ in range(count)]
    for job_id in created:
        assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    open_jobs_page(page, api)
    Select(page.find_element("id", "status-filter")).select_by_value("cancelled")
    wait_for(page, lambda: text(page, "#page-info") == f"1–20 of {count}", PAGE_S, "page 1")
    page.find_element("id", "older").click()
    second = f"21–{count} of {count}"
    wait_for(page, lambda: text(page, "#page-info") == second, PAGE_S, "page 2")
    # Older, disabled on the last page under the keyboard, hands it to Newer.
    wait_for(page, lambda: js(page, "document.activeElement.id") == "newer", PAGE_S, "focus")
    return created


def test_the_list_page_and_filter_are_kept_when_the_top_bar_leads_back_to_them(
    page: Any, quiet_api: ApiProcess
):
    with quiet_api.client() as client:
        cancelled_jobs_at_page_two(page, quiet_api, client, 22)
    page.find_element("css selector", "#jobs-table tbody a").click()
    wait_for(page, lambda: js(page, "window.archtree?.view") == "job", PAGE_S, "the job")
    page.find_element("css selector", "[data-nav=jobs]").click()
    wait_for(page, lambda: js(page, "window.archtree?.view") == "jobs", PAGE_S, "the jobs")
    wait_for(page, lambda: text(page, "#page-info") == "21–22 of 22", PAGE_S, "page 2 again")
    assert js(page, "document.querySelector('#status-filter').value") == "cancelled"
    # The list opens at its top: the pager, whose Older button is disabled on this last page,
    # takes no focus that would scroll the page down to it.
    assert js(page, "window.scrollY") == 0
    assert js(page, "document.activeElement.id") not in ("newer", "older")


def test_an_unreadable_data_file_is_said_beside_the_file_input(
    page: Any, quiet_api: ApiProcess, tmp_path: Path
):
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"not an npz file at all")
    open_jobs_page(page, quiet_api)
    fill(page, {"data": "upload"})
    page.find_element("css selector", "[name=data_file]").send_keys(str(bad))
    page.find_element("id", "submit-button").click()
    wait_for(page, lambda: visible(page, "#submit-error"), PAGE_S, "the form's error")
    said = text(page, "#submit-error")
    assert invalid_fields(page) == [("data_file", said)], said


def test_a_list_page_emptied_elsewhere_goes_back_to_the_last_page_with_jobs(
    page: Any, quiet_api: ApiProcess
):
    with quiet_api.client() as client:
        created = cancelled_jobs_at_page_two(page, quiet_api, client, 30)

        for job_id in created[:16]:  # the oldest: page 2 and more
            assert client.delete(f"/v1/jobs/{job_id}").status_code in (200, 204)
        left = client.get("/v1/jobs", params={"status": "cancelled"}).json()
    assert left["total"] == 14
    wait_for(page, lambda: text(page, "#page-info") == "1–14 of 14", PAGE_S, "the last page")
    shown = js(page, "[...document.querySelectorAll('#jobs-table tbody a')].map(a => a.innerText)")
    assert shown == [job["id"] for job in left["jobs"]]
    buttons = "['newer', 'older'].map(id => document.getElementById(id).disabled)"
    assert js(page, buttons) == [True, True]
    assert js(page, "history.state.jobsOffset") == 0  # kept for Back from a job
    assert js(page, "document.querySelector('#status-filter').value") == "cancelled"


def test_the_page_says_its_values_one_way_in_words_with_code_as_code(
    page: Any, quiet_api: ApiProcess
):
    with quiet_api.client() as client:
        job_id = submit(client, job_spec() | {"budget": "1e5ms"})
    open_jobs_page(page, quiet_api)
    row = f'#jobs-table tr[data-job-id="{job_id}"]'
    wait_for(page, lambda: visible(page, row), PAGE_S, "the job's row")
    # A budget in milliseconds as given, not again in other words.
    assert text(page, f"{row} td:nth-child(7)") == "1e5ms"
    # The 24-hour clock everywhere, as the event log has it.
    twelve_hour = re.compile(r"\b[AP]M\b")
    wait_for(page, lambda: text(page, "#connection").startswith("live · "), PAGE_S, "live")
    assert not twelve_hour.search(text(page, "#connection"))
    assert not twelve_hour.search(text(page, f"{row} td:nth-child(2)"))
    # Negative numbers with a minus sign, as the changes have.
    said = js(
        page,
        "window.archtree.describe({kind: 'retuned', id: 'n1', steps: 5, score: -0.012,"
        " score_before: -0.02})",
    )
    assert said == "n1 tuned 5 more steps: score −0.012 (was −0.020)", said
    page.get(f"{quiet_api.url}/#/jobs/{job_id}")
    wait_for(page, lambda: "submitted" in text(page, "#job-summary"), PAGE_S, "the summary")
    assert not twelve_hour.search(text(page, "#job-summary"))
    # Markdown's code spans as code, without their backticks.
    page.get(f"{quiet_api.url}/#/devices")
    wait_for(page, lambda: visible(page, "#devices-table td code"), PAGE_S, "the empty row")
    assert text(page, "#devices-table td code") == "archtree agent"
    assert "`" not in text(page, "#devices-table tbody")


def test_a_jobs_notes_name_the_settings_by_the_forms_labels_as_its_error_does(
    page: Any, quiet_api: ApiProcess
):
    with quiet_api.client() as client:
        job_id = submit(client, job_spec(strategy="greedy"))  # the search's width is 2
        notes = client.get(f"/v1/jobs/{job_id}").json()["progress"]["notes"]
    assert notes == ["search.width 2 is not used: search.strategy greedy runs with 1"]
    page.get(f"{quiet_api.url}/#/jobs/{job_id}")
    wait_for(page, lambda: visible(page, "#job-notes"), PAGE_S, "the job's notes")
    assert text(page, "#job-notes") == "Width 2 is not used: Strategy greedy runs with 1"
    # The event log's notes and errors too.
    note = "{kind: 'note', message: 'raise search.ft_steps or search.final_epochs'}"
    said = js(page, f"window.archtree.describe({note})")
    assert said == "raise Fine-tuning steps or Final epochs"
    failed = "{kind: 'status', status: 'failed', error: 'lower search.min_width_fraction'}"
    assert js(page, f"window.archtree.describe({failed})") == "failed: lower Min width"
    # A child's evaluation run again (its worker lost) says so; its first run does not.
    first = "{kind: 'child_started', id: 'n3', depth: 2}"
    assert js(page, f"window.archtree.describe({first})") == "n3 (depth 2) evaluating"
    again = "{kind: 'child_started', id: 'n3', depth: 2, run: 2}"
    assert js(page, f"window.archtree.describe({again})") == (
        "n3 (depth 2) evaluating again (run 2: an earlier run was cut short)"
    )
