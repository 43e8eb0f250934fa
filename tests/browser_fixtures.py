"""Headless Chromium for dashboard tests, driven by selenium.

`browser` (one per test module) is a selenium WebDriver on Debian's `chromium` and
`chromedriver` (or the paths in TESTS_CHROMIUM / TESTS_CHROMEDRIVER); the tests using it
are skipped when either is missing. Selenium Manager is never asked for anything: it would try
to download a browser. `screenshot(driver, name)` saves a PNG under test-artifacts/screenshots/
and `wait_for(driver, condition, timeout_s, what)` polls a condition with a deadline, saving a
screenshot when it fails. Use with `pytest_plugins = ["tests.browser_fixtures"]`.

PYTEST_DONT_REWRITE: no asserts here (see tests/redis_fixtures.py).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
WINDOW = (1440, 1900)
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--no-first-run",
    f"--window-size={WINDOW[0]},{WINDOW[1]}",
)
INSTALL_HINT = "apt-get install -y chromium chromium-driver"

T = TypeVar("T")

__all__ = ["browser", "console_errors", "screenshot", "wait_for"]


def _executable(variable: str, *names: str) -> str | None:
    """The path in `variable` if set (None when it is no file), else the first name on PATH."""
    if os.environ.get(variable):
        return os.environ[variable] if Path(os.environ[variable]).is_file() else None
    return next((found for name in names if (found := shutil.which(name))), None)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A headless Chromium session; quit at the module's end."""
    chromium = _executable("TESTS_CHROMIUM", "chromium", "chromium-browser")
    chromedriver = _executable("TESTS_CHROMEDRIVER", "chromedriver")
    if chromium is None or chromedriver is None:
        missing = "chromium" if chromium is None else "chromedriver"
        pytest.skip(f"{missing} is not installed: dashboard tests need `{INSTALL_HINT}`")
    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip("selenium is not installed: `pip install selenium` (the test extra)")

    base = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={base / 'profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(
        executable_path=chromedriver, log_output=str(base / "chromedriver.log")
    )
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_window_size(*WINDOW)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: Any, name: str) -> Path:
    """Save the browser's viewport as test-artifacts/screenshots/<name>.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}.png"
    driver.save_screenshot(str(path))
    return path


def console_errors(driver: Any) -> list[str]:
    """Script errors logged in the page's console since the last call (answers with an error
    status, which the page shows itself, are left out)."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and entry.get("source") != "network"
    ]


def wait_for(
    driver: Any, condition: Callable[[], T], timeout_s: float, what: str, poll_s: float = 0.1
) -> T:
    """Poll `condition` until it returns something truthy; on timeout, save a screenshot and
    fail the test. Elements replaced while the page re-renders count as not yet."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = condition()
        except (NoSuchElementException, StaleElementReferenceException):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            path = screenshot(driver, f"timeout-{what}")
            errors = "\n".join(console_errors(driver))
            pytest.fail(f"timed out after {timeout_s} s waiting for {what} ({path})\n{errors}")
        time.sleep(poll_s)
