"""The chat in Chromium (issue 5, items 1, 2 and 7): conversations, live Markdown that
never runs HTML, Enter and Shift+Enter, and steering a run while it writes: steer
(the default), queue, interrupt, stop, and what becomes of each steering message."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import Chat, screenshot
from tests.helpers import Fed, Gated, completed, delta, run_completed

pytestmark = pytest.mark.browser

HOSTILE = "<img src=x onerror=alert(1)> <script>alert(2)</script>"


def test_markdown_streams_live_and_html_in_messages_is_text(serve, page: Page) -> None:
    fed = Fed()
    live = serve(runners=[fed], runner="fed")
    chat = Chat(page, live).open("md")

    chat.send(HOSTILE)
    expect(chat.user(HOSTILE)).to_have_attribute("data-state", "stored")
    reply = chat.assistant()
    live.call(fed.put, delta("Here is **bold**"))
    expect(reply).to_have_text("Here is bold")
    expect(reply).to_have_attribute("aria-live", "polite")
    expect(reply).to_have_attribute("aria-busy", "true")  # still streaming
    expect(reply.locator("strong")).to_have_text("bold")
    expect(chat.status).to_have_text("Running · fed")

    live.call(fed.put, delta(", `code` and " + HOSTILE))
    expect(reply).to_contain_text("code and " + HOSTILE)
    expect(reply.locator("code")).to_have_text("code")
    final = "Here is **bold**, `code` and " + HOSTILE + "\n\n- one\n- [link](https://example.org)"
    live.call(fed.put, completed(final), run_completed())
    expect(reply).to_have_attribute("aria-busy", "false")
    expect(reply.locator("li")).to_have_text(["one", "link"])
    expect(reply.get_by_role("link", name="link")).to_have_attribute("href", "https://example.org")
    expect(chat.status).to_have_text("Completed")
    # The HTML is on the screen as characters; no element came of it.
    expect(chat.messages.locator("img, script")).to_have_count(0)
    expect(chat.user(HOSTILE)).to_have_count(1)


def test_enter_sends_shift_enter_breaks_the_line(serve, page: Page) -> None:
    live = serve()
    chat = Chat(page, live).open("keys")
    chat.composer.type("line one")
    chat.composer.press("Shift+Enter")
    chat.composer.type("line two")
    expect(chat.composer).to_have_value("line one\nline two")
    expect(page.locator(".msg.user")).to_have_count(0)
    chat.composer.press("Enter")
    expect(chat.user("line one\nline two")).to_have_attribute("data-state", "stored")
    expect(chat.composer).to_have_value("")
    expect(chat.assistant()).to_have_text("echo: line one line two")


def test_conversation_list_and_new_conversation(serve, page: Page) -> None:
    live = serve()
    chat = Chat(page, live).open()
    first = chat.conversation_id
    assert first.startswith("c-")
    chat.send("remember me")
    expect(chat.assistant()).to_have_text("echo: remember me")

    page.get_by_role("button", name="New conversation").click()
    expect(page).not_to_have_url(re.compile(f"#{re.escape(first)}$"))
    second = chat.conversation_id
    expect(page.locator(".msg")).to_have_count(0)
    nav = page.get_by_role("navigation", name="Conversations")
    earlier = nav.get_by_role("link", name=re.compile("remember me"))
    expect(earlier).to_have_attribute("href", f"#{first}")
    expect(nav.locator('[aria-current="page"]')).to_have_attribute("href", f"#{second}")

    earlier.click()
    expect(chat.assistant()).to_have_text("echo: remember me")
    expect(page.get_by_role("heading", level=1)).to_have_text("remember me")


def test_titles_show_the_text_a_person_reads(serve, page: Page) -> None:
    """Issue 11, item 5: no Markdown marks in the chat's header or the list."""
    live = serve()
    response = httpx.post(
        f"{live.url}/api/conversations/legacy/messages",
        json={"client_msg_id": "l1", "text": "an older conversation"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    chat = Chat(page, live).open("titled")
    chat.send("Tell me about **steering**")
    expect(chat.assistant()).to_have_text("echo: Tell me about steering")
    heading = page.get_by_role("heading", level=1)
    nav = page.get_by_role("navigation", name="Conversations")
    current = nav.locator('[aria-current="page"] .conversation-title')
    expect(heading).to_have_text("Tell me about steering")
    expect(page).to_have_title("Tell me about steering · Steerway")
    expect(current).to_have_text("Tell me about steering")

    # A title kept by an earlier version is its raw first line: shown the same way.
    titles = json.loads(page.evaluate("localStorage.getItem('steerway.titles')"))
    titles["legacy"] = "Ask `about` **[old](https://e.org)** things"
    page.evaluate("(t) => localStorage.setItem('steerway.titles', t)", json.dumps(titles))
    page.reload()
    expect(heading).to_have_text("Tell me about steering")  # from the replayed events
    expect(current).to_have_text("Tell me about steering")
    legacy = nav.locator('a[data-cid="legacy"] .conversation-title')
    expect(legacy).to_have_text("Ask about old things")


def test_steering_waits_then_is_absorbed(serve, page: Page) -> None:
    gated = Gated()
    live = serve(runners=[gated], runner="gated")
    chat = Chat(page, live).open("steer")
    chat.send("first")
    expect(chat.assistant()).to_have_text("start first")
    expect(chat.status).to_have_text("Running · gated")
    expect(page.get_by_role("radio", name="Steer")).to_be_checked()
    expect(chat.composer).to_have_attribute("placeholder", re.compile("Steer it"))
    expect(page.get_by_role("button", name="Steer")).to_be_visible()

    chat.send("go left")
    steer = chat.user("go left")
    expect(steer).to_have_attribute("data-steering", "waiting")
    expect(steer).to_contain_text("waiting for the agent")
    (run_id,) = live.running("steer")
    live.call(gated.release, run_id)
    expect(steer).to_have_attribute("data-steering", "absorbed")
    expect(steer).to_contain_text("absorbed by the agent")
    expect(chat.assistant()).to_have_text("start first [steer] go left")
    expect(chat.status).to_have_text("Completed")
    expect(page.get_by_role("radio", name="Steer")).to_be_hidden()


def test_unread_steering_becomes_a_follow_up_run(serve, page: Page) -> None:
    gated = Gated()
    live = serve(runners=[gated], runner="gated")
    chat = Chat(page, live).open("follow")
    chat.send("nopull please")  # this run ends without reading its steering
    expect(chat.assistant()).to_have_text("start nopull please")
    chat.send("and then this")
    steer = chat.user("and then this")
    expect(steer).to_have_attribute("data-steering", "waiting")
    (first,) = live.running("follow")
    live.call(gated.release, first)
    expect(steer).to_have_attribute("data-steering", "followup")
    expect(steer).to_contain_text("became a follow-up run")
    expect(chat.assistant()).to_have_text("start and then this")
    (follow_up,) = live.running("follow")
    live.call(gated.release, follow_up)
    expect(chat.status).to_have_text("Completed")


def test_stop_cancels_and_drops_waiting_steering(serve, page: Page) -> None:
    gated = Gated()
    live = serve(runners=[gated], runner="gated")
    chat = Chat(page, live).open("stop")
    chat.send("long job")
    expect(chat.stop).to_be_visible()
    chat.send("never mind")
    steer = chat.user("never mind")
    expect(steer).to_have_attribute("data-steering", "waiting")
    chat.stop.click()
    expect(steer).to_have_attribute("data-steering", "dropped")
    expect(steer).to_contain_text("dropped: the run was stopped before the agent read it")
    expect(page.get_by_role("note")).to_have_text("Stopped.")
    expect(chat.status).to_have_text("Stopped")
    expect(chat.stop).to_be_hidden()


def test_queue_and_interrupt(serve, page: Page) -> None:
    gated = Gated()
    live = serve(runners=[gated], runner="gated")
    chat = Chat(page, live).open("modes")
    chat.send("one")
    expect(chat.status).to_have_text("Running · gated")
    chat.send("two", mode="Queue")
    queued = chat.user("two")
    expect(queued).to_contain_text("Queued · position 1 · runs next")
    expect(chat.status).to_have_text("Running · gated · 1 queued")

    chat.send("three", mode="Interrupt")
    expect(page.get_by_role("note")).to_have_text("Interrupted by a new message.")
    expect(chat.user("three")).to_contain_text("Interrupted the previous run")
    expect(chat.assistant()).to_have_text("start three")
    (run_id,) = live.running("modes")
    live.call(gated.release, run_id)
    expect(chat.assistant()).to_have_text("start two")  # the queued run, after it
    expect(queued).not_to_contain_text("Queued")
    (run_id,) = live.running("modes")
    live.call(gated.release, run_id)
    expect(chat.status).to_have_text("Completed")


def test_queued_positions_follow_the_queue(serve, page: Page) -> None:
    """Issue 11, item 6: each queued message shows its run's place in line, and it moves
    up when the run ahead starts (queue.updated), live and after a reload."""
    gated = Gated()
    live = serve(runners=[gated], runner="gated")
    chat = Chat(page, live).open("line")
    chat.send("one")
    expect(chat.status).to_have_text("Running · gated")
    chat.send("two", mode="Queue")
    chat.send("three", mode="Queue")
    two, three = chat.user("two"), chat.user("three")
    expect(two.locator("[data-queue-position]")).to_have_attribute("data-queue-position", "1")
    expect(two).to_contain_text("Queued · position 1 · runs next")
    expect(three.locator("[data-queue-position]")).to_have_attribute("data-queue-position", "2")
    expect(three).to_contain_text("Queued · position 2 · runs after 1 more queued")
    expect(chat.status).to_have_text("Running · gated · 2 queued")

    (run_id,) = live.running("line")
    live.call(gated.release, run_id)  # "one" ends, "two" starts: "three" is next now
    expect(chat.assistant()).to_have_text("start two")
    expect(two).not_to_contain_text("Queued")
    expect(three).to_contain_text("Queued · position 1 · runs next")
    expect(three.locator("[data-queue-position]")).to_have_attribute("data-queue-position", "1")
    expect(chat.status).to_have_text("Running · gated · 1 queued")
    page.reload()  # replayed from offset 0: the same place in line
    expect(chat.user("three")).to_contain_text("Queued · position 1 · runs next")

    (run_id,) = live.running("line")
    live.call(gated.release, run_id)
    expect(chat.assistant()).to_have_text("start three")
    (run_id,) = live.running("line")
    live.call(gated.release, run_id)
    expect(chat.status).to_have_text("Completed")


def test_screenshot_of_the_chat_mid_steer(serve, page: Page) -> None:
    live = serve(echo_delay_ms=150)
    chat = Chat(page, live).open("tour")
    words = (
        "Tell me about **steering**: how a message I send reaches an agent while it is "
        "still writing, when the agent reads it, and what happens to a message it never "
        "reads because the run ended first or was stopped"
    )
    chat.send(words)
    expect(chat.assistant()).to_contain_text("steering")
    chat.send("keep it short")
    steer = chat.user("keep it short")
    expect(steer).to_have_attribute("data-steering", "absorbed")
    expect(chat.assistant()).to_contain_text("[steer] keep it short")
    chat.send("then list three uses")
    expect(chat.user("then list three uses")).to_have_attribute("data-steering", re.compile("."))
    expect(chat.status).to_have_text(re.compile("^Running"))
    screenshot(page, "chat-steering.png")
    expect(chat.status).to_have_text("Completed")


def test_tool_calls_and_the_latest_state_show_folded(serve, page: Page) -> None:
    """Issue 14, item 4: a run's tool calls (name, arguments, result; folded) and its
    latest state, in the chat."""
    fed = Fed()
    live = serve(runners=[fed], runner="fed")
    chat = Chat(page, live).open("tools")
    chat.send("use a tool")
    started = {"tool_call_id": "c1", "name": "add", "arguments": {"a": 1, "b": 2}}
    live.call(
        fed.put,
        {"type": "tool.call.started", "data": started},
        {"type": "state.updated", "data": {"scope": "runner", "key": "state", "value": {"n": 1}}},
    )
    tool = page.locator("details.tool")
    expect(tool.locator("summary")).to_have_text("Tool add: running…")
    expect(tool).not_to_have_attribute("open", re.compile(".*"))  # folded by default
    live.call(
        fed.put,
        {"type": "tool.call.completed", "data": {"tool_call_id": "c1", "name": "add", "result": 3}},
        {"type": "state.updated", "data": {"scope": "runner", "key": "state", "value": {"n": 2}}},
        completed("done"),
        run_completed(),
    )
    expect(tool.locator("summary")).to_have_text("Tool add: done")
    tool.locator("summary").click()
    expect(tool.locator(".tool-io")).to_contain_text('"result": 3')
    expect(tool.locator(".tool-io")).to_contain_text('"a": 1')
    state = page.locator("details.state")
    expect(state).to_have_count(1)  # one item per key, updated in place
    expect(state.locator("summary")).to_have_text("State runner.state")
    expect(state.locator(".tool-io")).to_have_text('{\n  "n": 2\n}')
