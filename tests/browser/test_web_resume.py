"""Resume in Chromium (issue 5, item 3): a reload mid-run, a dropped connection that
comes back with backoff and `after=<last offset seen>`, messages sent while offline
or whose ack was lost, and two tabs of one conversation."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from playwright.sync_api import BrowserContext, Page, WebSocketRoute, expect

from tests.browser.conftest import Chat
from tests.helpers import Fed, completed, delta, run_completed

pytestmark = pytest.mark.browser


class Network:
    """The page's conversation sockets, routed through the test: it sees every frame
    both ways, and can take the network down (open connections drop, new ones fail)
    and bring it back."""

    def __init__(self, page: Page) -> None:
        self.down = False
        self.cut_after_message = False  # drop the connection right after a message
        self.urls: list[str] = []  # every connection attempt
        self.sent: list[dict[str, Any]] = []  # frames the page sent to the server
        self.offsets: list[int] = []  # event offsets the page was sent
        self.open: list[tuple[WebSocketRoute, WebSocketRoute]] = []
        page.route_web_socket(re.compile(r"/ws/conversations/"), self.route)

    def route(self, ws: WebSocketRoute) -> None:
        self.urls.append(ws.url)
        if self.down:
            ws.close()
            return
        server = ws.connect_to_server()
        self.open.append((ws, server))

        def to_server(message: str | bytes) -> None:
            frame = json.loads(message)
            self.sent.append(frame)
            server.send(message)
            if self.cut_after_message and frame.get("type") == "message":
                self.cut_after_message = False
                self.cut()

        def to_page(message: str | bytes) -> None:
            frame = json.loads(message)
            if "offset" in frame and frame["type"] != "ack":
                self.offsets.append(frame["offset"])
            ws.send(message)

        ws.on_message(to_server)
        server.on_message(to_page)

    def cut(self) -> None:
        self.down = True
        for ws, server in self.open:
            ws.close()
            server.close()
        self.open.clear()

    def restore(self) -> None:
        self.down = False

    def after(self, url: str) -> int:
        return int(parse_qs(urlparse(url).query)["after"][0])

    def sent_ids(self, text: str) -> list[str]:
        return [f["client_msg_id"] for f in self.sent if f.get("text") == text]


def user_messages(live: Any, conversation_id: str, text: str) -> list[dict[str, Any]]:
    return [
        e for e in live.events(conversation_id) if e["type"] == "user.message" and e["text"] == text
    ]


def test_reload_mid_run_shows_everything_once_then_the_rest(serve, page: Page) -> None:
    fed = Fed()
    live = serve(runners=[fed], runner="fed")
    chat = Chat(page, live).open("reload")
    chat.send("go")
    live.call(fed.put, delta("alpha"), delta(" beta"))
    expect(chat.assistant()).to_have_text("alpha beta")

    page.reload()
    expect(page.locator("body")).to_have_attribute("data-connection", "open")
    expect(chat.assistant()).to_have_text("alpha beta")
    expect(chat.status).to_have_text("Running · fed")
    live.call(fed.put, delta(" gamma"))
    expect(chat.assistant()).to_have_text("alpha beta gamma")
    live.call(fed.put, completed("alpha beta gamma"), run_completed())
    expect(chat.status).to_have_text("Completed")
    expect(chat.user("go")).to_have_count(1)
    expect(page.locator(".msg.assistant")).to_have_count(1)


def test_reload_while_streaming_never_shows_a_word_twice_or_skips_one(serve, page: Page) -> None:
    live = serve(echo_delay_ms=40)
    words = " ".join(f"w{i}" for i in range(50))
    chat = Chat(page, live).open("stream")
    chat.send(words)
    expect(chat.assistant()).to_contain_text("w5")
    # every text the reloaded page shows for the reply, from its first paint
    page.add_init_script(
        """window.texts = [];
        new MutationObserver(() => {
          const replies = document.querySelectorAll('.msg.assistant');
          if (replies.length) window.texts.push(replies[replies.length - 1].textContent);
        }).observe(document, {subtree: true, childList: true, characterData: true});"""
    )
    page.reload()
    expect(chat.status).to_have_text("Completed")
    expected = f"echo: {words}"
    expect(chat.assistant()).to_have_text(expected)
    texts: list[str] = page.evaluate("window.texts")
    assert texts
    assert [t for t in texts if not expected.startswith(t)] == []


def test_dropped_connection_resumes_from_the_last_offset(serve, page: Page) -> None:
    fed = Fed()
    live = serve(runners=[fed], runner="fed")
    net = Network(page)
    chat = Chat(page, live).open("drop")
    chat.send("start")
    live.call(fed.put, delta("one"))
    expect(chat.assistant()).to_have_text("one")
    seen = max(net.offsets)
    attempts = len(net.urls)

    net.cut()
    expect(chat.banner).to_be_visible()
    expect(chat.banner).to_contain_text("Reconnecting")
    live.call(fed.put, delta(" two"), delta(" three"))  # the page is not there to see it
    chat.send("sent while offline")
    offline = chat.user("sent while offline")
    expect(offline).to_have_attribute("data-state", re.compile("offline|sending"))
    client_msg_id = offline.get_attribute("data-client-msg-id")
    expect(chat.banner).to_have_attribute("data-attempt", "2")  # a retry failed meanwhile

    net.restore()
    expect(page.locator("body")).to_have_attribute("data-connection", "open")
    expect(chat.banner).to_be_hidden()
    assert len(net.urls) >= attempts + 2  # the failed retry, then the one that worked
    assert {net.after(url) for url in net.urls[attempts:]} == {seen}
    expect(chat.assistant()).to_have_text("one two three")
    live.call(fed.put, delta(" four"))
    expect(chat.assistant()).to_have_text("one two three four")

    expect(offline).to_have_attribute("data-state", "stored")
    expect(chat.user("sent while offline")).to_have_count(1)
    assert client_msg_id in net.sent_ids("sent while offline")
    (stored,) = user_messages(live, "drop", "sent while offline")
    assert stored["client_msg_id"] == client_msg_id
    assert net.offsets == sorted(set(net.offsets))  # no offset twice, in order


def test_a_message_whose_ack_was_lost_is_resent_and_appears_once(serve, page: Page) -> None:
    live = serve()
    net = Network(page)
    chat = Chat(page, live).open("lost-ack")
    net.cut_after_message = True
    chat.send("only once please")
    expect(chat.banner).to_be_visible()
    net.restore()
    expect(page.locator("body")).to_have_attribute("data-connection", "open")
    expect(chat.user("only once please")).to_have_attribute("data-state", "stored")
    expect(chat.assistant()).to_have_text("echo: only once please")
    first, *resent = net.sent_ids("only once please")
    assert resent == [first]  # the same client_msg_id, sent again on reconnect
    expect(chat.user("only once please")).to_have_count(1)
    assert len(user_messages(live, "lost-ack", "only once please")) == 1


def test_two_tabs_show_the_same_conversation_live(serve, context: BrowserContext) -> None:
    live = serve(echo_delay_ms=100)
    a = Chat(context.new_page(), live).open("pair")
    b = Chat(context.new_page(), live).open("pair")
    words = "one two three four five six seven eight nine ten eleven twelve"
    a.send(words)
    expect(b.user(words)).to_have_count(1)
    expect(b.assistant()).to_contain_text("echo: one")
    expect(b.status).to_have_text("Running · echo")
    b.send("from the other tab")
    expect(a.user("from the other tab")).to_have_attribute("data-steering", "absorbed")
    expect(a.status).to_have_text("Completed")
    expect(b.status).to_have_text("Completed")
    final = a.assistant().text_content()
    assert final is not None
    assert "[steer] from the other tab" in final
    expect(b.assistant()).to_have_text(final)
    for tab in (a, b):
        expect(tab.page.locator(".msg")).to_have_count(3)
