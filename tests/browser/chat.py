"""The chat page as the browser tests drive it: locators by role and label, as a person
(or a screen reader) finds things, and a few steps every test takes."""

from __future__ import annotations

import re

from playwright.sync_api import Locator, Page, expect

from tests.browser.conftest import LiveGateway


class Chat:
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
