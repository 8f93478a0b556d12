"""Browser tests (issue 5): Debian's Chromium, driven by Playwright, against a real gateway.

The gateway is `tests.conftest.run_gateway` (uvicorn on a free port, memory store)
running in a thread with its own event loop, so the tests use Playwright's sync
API; `LiveGateway.call` runs a function in the gateway's loop (to feed a runner,
open a gate).  One Chromium serves each test module; every test gets a fresh context
(no storage, no cache) and fails if a page raised an uncaught error or opened a
dialog (`alert()` from a message would be one).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Locator, Page, expect, sync_playwright

from tests.conftest import TIMEOUT, Gateway, run_gateway

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = Path(os.environ.get("STEERWAY_SCREENSHOT_DIR") or ROOT / "docs" / "screenshots")

expect.set_options(timeout=TIMEOUT * 1000)


class LiveGateway:
    """A gateway served from a thread; stopped (and its thread joined) by `stop`."""

    def __init__(self, runners: list[Any], settings: dict[str, Any]) -> None:
        self._runners = runners
        self._settings = settings
        self._started: concurrent.futures.Future[Gateway] = concurrent.futures.Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)
        self._thread.start()
        self.gw = self._started.result(TIMEOUT * 3)

    async def _serve(self) -> None:
        try:
            async with run_gateway(runners=self._runners, **self._settings) as gw:
                self._loop = asyncio.get_running_loop()
                self._stop = asyncio.Event()
                self._started.set_result(gw)
                await self._stop.wait()
        except BaseException as exc:
            if not self._started.done():
                self._started.set_exception(exc)
                return
            raise

    @property
    def url(self) -> str:
        return self.gw.http

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` in the gateway's event loop and return its result."""
        assert self._loop is not None

        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(TIMEOUT)

    def get(self, path: str, token: str | None = None) -> Any:
        """GET a REST path (with a bearer token when given); the decoded JSON body."""
        headers = {"authorization": f"Bearer {token}"} if token else {}
        response = httpx.get(self.url + path, headers=headers, timeout=TIMEOUT)
        response.raise_for_status()
        return response.json()

    def events(self, conversation_id: str, token: str | None = None) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = self.get(
            f"/api/conversations/{conversation_id}/events?after=0", token
        )["events"]
        return events

    def running(self, conversation_id: str) -> list[str]:
        """Ids of the conversation's running runs."""
        runs = self.get(f"/api/runs?status=running&conversation_id={conversation_id}")["runs"]
        return [run["run_id"] for run in runs]

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(TIMEOUT * 3)
        assert not self._thread.is_alive(), "the gateway did not stop"


@pytest.fixture
def serve() -> Iterator[Callable[..., LiveGateway]]:
    """`serve(runners=[...], **settings)`: a gateway for this test, stopped after it."""
    started: list[LiveGateway] = []

    def start(runners: list[Any] | None = None, **settings: Any) -> LiveGateway:
        live = LiveGateway(runners or [], settings)
        started.append(live)
        return live

    yield start
    for live in started:
        live.stop()


# Per module, not per session: while Playwright's sync API is open, its event loop is
# the thread's running loop, and the asyncio tests that pytest runs after this folder
# could not start their own.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=TIMEOUT * 3000
        )
        yield browser
        browser.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    problems: list[str] = []
    context.on("weberror", lambda error: problems.append(f"uncaught: {error.error}"))

    def on_dialog(dialog: Any) -> None:
        problems.append(f"dialog: {dialog.message}")
        dialog.dismiss()

    context.on("dialog", on_dialog)
    yield context
    context.close()
    assert problems == [], problems


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


def screenshot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    page.screenshot(path=str(path))
    return path


# --------------------------------------------------------------------------- the chat page


class Chat:
    """The chat page as the tests drive it: found by role and label, as a person (or a
    screen reader) finds things, and the steps every test takes."""

    def __init__(self, page: Page, live: LiveGateway) -> None:
        self.page = page
        self.live = live
        self.composer = page.get_by_role("textbox", name="Message")
        self.status = page.locator("#run-status")
        self.messages = page.get_by_role("log", name="Messages")
        self.alert = page.get_by_role("alert").filter(has=page.locator("#alert-text"))
        self.banner = page.locator("#offline-banner")
        self.stop = page.get_by_role("button", name="Stop the run")

    def open(self, conversation_id: str = "") -> Chat:
        self.page.goto(f"{self.live.url}/#{conversation_id}")
        expect(self.page.locator("body")).to_have_attribute("data-connection", "open")
        return self

    @property
    def conversation_id(self) -> str:
        return self.page.evaluate("location.hash.slice(1)")  # type: ignore[no-any-return]

    def send(self, text: str, mode: str | None = None) -> None:
        """Type `text` and press Enter; `mode` (Steer, Queue, Interrupt) picked first."""
        if mode is not None:
            self.page.get_by_role("radio", name=mode).check()
        self.composer.fill(text)
        self.composer.press("Enter")

    def user(self, text: str) -> Locator:
        """The user message whose text is exactly `text`."""
        return self.page.locator(".msg.user").filter(
            has=self.page.locator(".text", has_text=re.compile(f"^{re.escape(text)}$"))
        )

    def assistant(self, index: int = -1) -> Locator:
        replies = self.page.locator(".msg.assistant")
        return replies.last if index == -1 else replies.nth(index)
