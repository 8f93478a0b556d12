"""Errors and accessibility in Chromium (issue 5, items 5 and 6): every failure is said
in plain words on the page; controls are labelled, focus is visible, the chat and the
dashboard work at 375 px."""

from __future__ import annotations

import re

import httpx
import pytest
from playwright.sync_api import Page, Route, WebSocketRoute, expect

from tests.browser.conftest import Chat, LiveGateway
from tests.helpers import Gated

pytestmark = pytest.mark.browser


def test_text_too_long_is_refused_in_plain_words(serve, page: Page) -> None:
    chat = Chat(page, serve()).open("long")
    chat.composer.fill("a" * 32_769)
    chat.composer.press("Enter")
    expect(chat.alert).to_contain_text("That message is too long. The limit is 32,768 characters.")
    expect(chat.alert).to_contain_text("Yours has 32,769")
    expect(page.locator(".msg.user")).to_have_count(0)
    expect(chat.composer).to_have_value("a" * 32_769)  # nothing typed is lost
    chat.composer.fill("a" * 32_768)
    chat.composer.press("Enter")
    expect(page.locator(".msg.user")).to_have_attribute("data-state", "stored")
    expect(chat.alert).to_be_hidden()


def test_rate_limited_says_so_and_sends_again_by_itself(serve, page: Page) -> None:
    live = serve(rate_burst=1, rate_per_s=0.5)
    chat = Chat(page, live).open("fast")
    chat.send("first")
    chat.send("second")
    expect(chat.alert).to_contain_text("You're sending messages too fast")
    for text in ("first", "second"):
        expect(chat.user(text)).to_have_attribute("data-state", "stored")
        expect(chat.user(text)).to_have_count(1)
    texts = [e["text"] for e in live.events("fast") if e["type"] == "user.message"]
    assert sorted(texts) == ["first", "second"]


def test_store_outage_marks_the_message_and_retry_sends_it_once(serve, page: Page) -> None:
    live = serve()
    chat = Chat(page, live).open("outage")
    live.gw.store.fail = True
    try:
        chat.send("save me")
        message = chat.user("save me")
        expect(message).to_have_attribute("data-state", "failed")
        expect(message).to_contain_text("Not sent: The server can't save messages right now.")
        expect(chat.alert).to_contain_text("The server can't save messages right now")
    finally:
        live.gw.store.fail = False
    message.get_by_role("button", name="Retry").click()
    expect(message).to_have_attribute("data-state", "stored")
    expect(chat.assistant()).to_have_text("echo: save me")
    expect(chat.user("save me")).to_have_count(1)
    stored = [e for e in live.events("outage") if e["type"] == "user.message"]
    assert [e["client_msg_id"] for e in stored] == [message.get_attribute("data-client-msg-id")]


def test_an_unreachable_server_is_a_message_not_a_blank_page(serve, page: Page) -> None:
    live = serve()

    def unavailable(route: Route) -> None:
        route.fulfill(
            status=503,
            content_type="application/json",
            body='{"error":{"code":"internal","message":"the store is unavailable"}}',
        )

    page.route(re.compile(r"/api/conversations\?"), unavailable)
    page.route_web_socket(re.compile("/ws/"), WebSocketRoute.close)
    chat = Chat(page, live)
    page.goto(f"{live.url}/#away")
    expect(chat.banner).to_contain_text("Can't reach the server. Reconnecting")
    listing = page.locator("#conversation-list-error")
    expect(listing).to_contain_text("Couldn't load your conversations. The server can't save")
    expect(chat.composer).to_be_editable()

    page.unroute_all()
    page.route_web_socket(re.compile("/ws/"), lambda ws: ws.connect_to_server())
    chat.banner.get_by_role("button", name="Retry now").click()
    expect(page.locator("body")).to_have_attribute("data-connection", "open")
    expect(chat.banner).to_be_hidden()
    listing.get_by_role("button", name="Retry").click()
    expect(listing).to_be_hidden()


# --------------------------------------------------------------------------- accessibility

UNNAMED = """() => [...document.querySelectorAll('a[href], button, input, select, textarea')]
  .filter((el) => {
    const labelled = el.getAttribute('aria-labelledby');
    const name = el.getAttribute('aria-label') || el.title
      || (labelled && document.getElementById(labelled)?.textContent)
      || [...(el.labels || [])].map((l) => l.textContent).join('')
      || (el.type === 'radio' || el.tagName === 'TEXTAREA' || el.tagName === 'INPUT'
          ? '' : el.textContent);
    return !name || !name.trim();
  })
  .map((el) => el.outerHTML.slice(0, 120))"""

FOCUS = """() => { const el = document.activeElement; const s = getComputedStyle(el);
  return [el.tagName + '#' + el.id + ' ' + el.textContent.trim().slice(0, 30),
          s.outlineStyle, parseFloat(s.outlineWidth)]; }"""


def controls_are_labelled_and_focus_is_visible(page: Page, tabs: int) -> None:
    """No control without a name; each of the next `tabs` controls Tab reaches shows an
    outline (Tab past the last control leaves the page once, to the browser)."""
    assert page.evaluate(UNNAMED) == []
    seen: list[str] = []
    while len(seen) < tabs:
        page.keyboard.press("Tab")
        name, style, width = page.evaluate(FOCUS)
        if name.startswith("BODY"):
            assert "BODY" not in seen, seen
        else:
            assert style != "none", (name, style)
            assert width >= 2, (name, width)
        seen.append(name.split("#")[0] if name.startswith("BODY") else name)


def test_labels_focus_and_live_regions(serve, page: Page) -> None:
    live = serve(runners=[Gated()], runner="gated")  # the run stays active throughout
    chat = Chat(page, live).open("a11y")
    chat.send("one two three")
    expect(chat.stop).to_be_visible()  # the steering controls are on the page too
    expect(chat.messages).to_have_attribute("role", "log")
    expect(chat.assistant()).to_have_attribute("aria-live", "polite")
    expect(page.get_by_role("status").filter(has_text="Running")).to_be_visible()
    controls_are_labelled_and_focus_is_visible(page, 8)

    page.goto(f"{live.url}/dashboard")
    expect(page.get_by_text("Live", exact=True)).to_be_visible()
    expect(page.get_by_role("button", name=re.compile("^Cancel run"))).to_be_visible()
    controls_are_labelled_and_focus_is_visible(page, 6)


def fits(page: Page, width: int) -> None:
    assert page.evaluate("document.scrollingElement.scrollWidth") <= width


def test_usable_at_375_px(serve, page: Page) -> None:
    live: LiveGateway = serve()
    page.set_viewport_size({"width": 375, "height": 740})
    chat = Chat(page, live).open("phone")
    chat.send("hello from a phone with a rather long message that has to wrap nicely")
    expect(chat.assistant()).to_contain_text("echo: hello from a phone")
    fits(page, 375)
    send = page.get_by_role("button", name="Send")
    box = send.bounding_box()
    assert box is not None
    assert box["x"] + box["width"] <= 375

    nav = page.get_by_role("navigation", name="Conversations")
    expect(nav.get_by_role("link").first).to_be_hidden()
    menu = page.get_by_role("button", name="Show conversations")
    menu.click()
    expect(menu).to_have_attribute("aria-expanded", "true")
    expect(nav.get_by_role("link", name=re.compile("hello from a phone"))).to_be_visible()
    page.keyboard.press("Escape")
    expect(menu).to_have_attribute("aria-expanded", "false")
    expect(nav.get_by_role("link").first).to_be_hidden()

    page.goto(f"{live.url}/dashboard")
    expect(page.locator("#runs-body tr")).to_have_count(1)
    fits(page, 375)


def test_a_token_in_the_address_opens_a_secured_gateway(serve, page: Page) -> None:
    """With a secret, the pages take `?token=` once, keep it for the tab, drop it from
    the address bar, and send it on every socket and request; without one they say
    the person is not signed in."""
    from gateway import auth

    secret = "browser-test-secret-of-at-least-32-bytes"
    live = serve(secret=secret)
    page.goto(f"{live.url}/#locked")
    expect(page.locator("body")).not_to_have_attribute("data-connection", "open")
    expect(page.get_by_text("You're not signed in").first).to_be_visible()

    admin = auth.mint(secret, "ops", "admin", 3600, (), ())
    page.goto(f"{live.url}/?token={admin}#locked")
    chat = Chat(page, live)
    expect(page.locator("body")).to_have_attribute("data-connection", "open")
    assert "token" not in page.url
    chat.send("hello secured")
    expect(chat.assistant()).to_have_text("echo: hello secured")
    message = next(e for e in live.events("locked", admin) if e["type"] == "user.message")
    assert message["author"] == "ops"
    page.goto(f"{live.url}/dashboard")  # the same tab: the token is kept
    expect(page.get_by_text("locked").first).to_be_visible()


def test_a_user_token_lists_its_own_conversations(serve, page: Page) -> None:
    """Issue 11, item 7: with a user token the conversation list is the token's own
    conversations (no error), never another's."""
    from gateway import auth

    secret = "browser-test-secret-of-at-least-32-bytes"
    live = serve(secret=secret)
    admin = auth.mint(secret, "ops", "admin", 3600, (), ())
    for cid in ("team-a", "private"):
        response = httpx.post(
            f"{live.url}/api/conversations/{cid}/messages",
            json={"client_msg_id": "m1", "text": f"hello {cid}"},
            headers={"authorization": f"Bearer {admin}"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
    user = auth.mint(secret, "alice", "user", 3600, ("team-*",), ())
    page.goto(f"{live.url}/?token={user}#team-b")
    Chat(page, live)
    expect(page.locator("body")).to_have_attribute("data-connection", "open")
    nav = page.get_by_role("navigation", name="Conversations")
    expect(nav.locator('a[data-cid="team-a"]')).to_be_visible()
    expect(page.locator("#conversation-list-error")).to_be_hidden()
    expect(nav.locator('a[data-cid="private"]')).to_have_count(0)
