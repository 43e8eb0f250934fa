"""The polling benchmark's wrk think-time script, run by the real wrk against a small server."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler

import pytest

from bench.service_overhead import QUICK, parse_wrk, run_wrk, think_time_script
from tests.http_servers import serving

CLIENTS = 10
DURATION_S = 2.0
THINK_MS = 100.0


class _Ok(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the API answers wrk

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def server_url() -> Iterator[str]:
    with serving(_Ok) as url:
        yield f"{url}/"


def test_the_think_time_script_spaces_each_clients_requests(server_url: str):
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install -y wrk; `make bench-deps` does it)")
    config = replace(QUICK, clients=CLIENTS, polling_s=DURATION_S)

    output, _ = run_wrk(server_url, config, think_time_script(THINK_MS))
    stats = parse_wrk(output)

    # Each client sends one request per think time at most: about CLIENTS / 0.1 s = 100/s.
    ceiling = CLIENTS * 1000 / (THINK_MS * 0.5)
    assert 0 < stats["requests_per_s"] <= ceiling, output
    assert stats["requests"] >= CLIENTS * DURATION_S, output
    assert stats["non_2xx"] == 0


def test_the_think_time_is_drawn_around_its_mean():
    assert think_time_script(100) == "function delay()\n  return math.random(50, 150)\nend\n"
