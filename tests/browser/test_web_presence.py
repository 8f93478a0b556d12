"""Presence in the chat and the dashboard (issue 15, item 3): two tabs as two users see
each other, who is typing and who is steering; the dashboard lists the people of each
conversation; a tab that closes is gone from the others."""

from __future__ import annotations

import pytest
from playwright.sync_api import BrowserContext, Page, expect

from gateway import auth
from tests.browser.conftest import Chat
from tests.helpers import Fed, delta

pytestmark = pytest.mark.browser

SECRET = "browser-test-secret-of-at-least-32-bytes"


def as_user(page: Page, live: object, sub: str, cid: str) -> Chat:
    token = auth.mint(SECRET, sub, "user", 3600, ("room-*",), ())
    chat = Chat(page, live)  # type: ignore[arg-type]
    page.goto(f"{chat.live.url}/?token={token}#{cid}")
    expect(page.locator("body")).to_have_attribute("data-connection", "open")
    return chat


def test_two_tabs_as_two_users_see_each_other_type_steer_and_leave(
    serve, context: BrowserContext, page: Page
) -> None:
    fed = Fed()
    live = serve(runners=[fed], runner="fed", secret=SECRET)
    alice = as_user(page, live, "alice", "room-p")
    bob_page = context.new_page()
    bob = as_user(bob_page, live, "bob", "room-p")
    here_a, here_b = page.locator("#presence"), bob_page.locator("#presence")
    expect(here_a).to_have_text("Here: bob")
    expect(here_b).to_have_text("Here: alice")

    bob.composer.press_sequentially("hel")
    expect(page.locator("#typing")).to_have_text("bob is typing…")
    expect(bob_page.locator("#typing")).to_be_hidden()  # nobody else types

    bob.composer.press("Enter")
    expect(page.locator("#typing")).to_be_hidden()
    live.call(fed.put, delta("thinking"))
    expect(alice.status).to_have_text("Running · fed")
    expect(here_a).to_have_text("Here: bob (steering)")

    admin = auth.mint(SECRET, "ops", "admin", 3600, (), ())
    dash = context.new_page()
    dash.goto(f"{live.url}/dashboard?token={admin}")
    people = dash.locator('tr[data-cid="room-p"] td.people')
    expect(people).to_have_text("alice, bob (steering)")

    bob_page.close()
    expect(here_a).to_be_hidden()
    expect(people).to_have_text("alice")
