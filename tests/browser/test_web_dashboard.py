"""The runs dashboard in Chromium (issue 5, items 4 and 7; issue 11, item 2): a live
table of runs with filters and a cancel action, clients per conversation, live charts
(active runs: the most at once in each second), one run's events, its tool calls and
latest state (folded, as in the chat), and a reconnect that starts again from a fresh
snapshot."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from playwright.sync_api import BrowserContext, Locator, Page, WebSocketRoute, expect

from tests.browser.conftest import Chat, LiveGateway, screenshot
from tests.helpers import Fed, Gated, completed, run_completed

pytestmark = pytest.mark.browser


def post(live: LiveGateway, conversation_id: str, **body: Any) -> dict[str, Any]:
    response = httpx.post(
        f"{live.url}/api/conversations/{conversation_id}/messages", json=body, timeout=10
    )
    assert response.status_code == 200, response.text
    ack: dict[str, Any] = response.json()
    return ack


def row(page: Page, run_id: str) -> Locator:
    return page.locator(f'#runs-body tr[data-run-id="{run_id}"]')


def cells(row: Locator) -> Locator:
    return row.locator("td")


def chart(page: Page, name: str, now: str = r"\d+", most: str = r"[1-9]\d*") -> None:
    """Wait until the chart's text alternative says `now` and `most` (regexes)."""
    label = re.compile(f"^{name}: {now} now, at most {most} over the last \\d+ s$")
    expect(page.get_by_role("img", name=name)).to_have_attribute("aria-label", label)


def open_dashboard(page: Page, live: LiveGateway) -> None:
    page.goto(f"{live.url}/dashboard")
    expect(page.locator("#live")).to_have_text("Live")
    page.evaluate("window.sameDocument = true")  # gone if the page ever reloads


def test_runs_update_live_filter_and_cancel(serve, context: BrowserContext, page: Page) -> None:
    gated = Gated()
    live = serve(runners=[gated], runner="gated", echo_delay_ms=100)
    open_dashboard(page, live)
    expect(page.locator("#runs-empty")).to_have_text("No runs yet.")

    chat = Chat(context.new_page(), live).open("team")
    chat.send("work")
    (run_id,) = live.running("team")
    work = row(page, run_id)
    expect(cells(work)).to_have_text(
        ["running", re.compile("run_"), "gated", "team", re.compile(r"\d s"), re.compile(r"\d s"),
         "0 / 0 / 0", "—", live.gw.hub.node, "Cancel"]
    )  # fmt: skip
    conversation = page.locator('#conversations-body tr[data-cid="team"]')
    expect(conversation.locator("td.clients")).to_have_text("1")
    expect(page.locator("#active-value")).to_have_text("1")
    expect(page.locator("#clients-value")).to_have_text("1")

    chat.send("hurry")
    expect(cells(work).nth(6)).to_have_text("1 / 0 / 0")
    expect(page.locator("#waiting-value")).to_have_text("1")
    live.call(gated.release, run_id)
    expect(cells(work).first).to_have_text("completed · stop")
    expect(cells(work).nth(6)).to_have_text("0 / 1 / 0")
    expect(work.get_by_role("button", name=re.compile("^Cancel"))).to_have_count(0)
    expect(page.locator("#active-value")).to_have_text("0")
    chart(page, "Active runs", now="0", most="1")  # however short the run was

    failed = post(live, "broken", client_msg_id="f1", text="/fail", runner="echo")["run_id"]
    expect(cells(row(page, failed)).first).to_have_text("failed · demo_failure")

    chat.send("second job")
    expect(page.locator('#runs-body tr[data-status="running"]')).to_have_count(1)
    (second,) = live.running("team")
    row(page, second).get_by_role("button", name=f"Cancel run {second}").click()
    expect(cells(row(page, second)).first).to_have_text("cancelled · cancel_requested")
    expect(chat.status).to_have_text("Stopped")

    status = page.get_by_label("Status")
    status.select_option("failed")
    expect(page.locator("#runs-body tr")).to_have_count(1)
    expect(row(page, failed)).to_be_visible()
    status.select_option("")
    page.get_by_role("searchbox", name="Conversation").fill("tea")
    expect(page.locator("#runs-body tr")).to_have_count(2)
    expect(row(page, failed)).to_be_hidden()
    page.get_by_role("searchbox", name="Conversation").fill("")
    expect(page.locator("#runs-body tr")).to_have_count(3)

    chart(page, "Events per second")
    assert page.evaluate("window.sameDocument") is True

    # A busy moment for the picture in the README: a run streaming and being steered.
    tour = post(
        live,
        "tour",
        client_msg_id="t1",
        runner="echo",
        text="a long answer that streams word by word while people steer it " * 3,
    )
    post(live, "tour", client_msg_id="t2", text="shorter please")
    post(live, "tour", client_msg_id="t3", text="and friendlier")
    expect(cells(row(page, tour["run_id"])).nth(6)).to_have_text(re.compile(r"[0-2] / [0-2] / 0"))
    expect(cells(row(page, tour["run_id"])).first).to_have_text("running")
    page.evaluate("document.activeElement.blur()")
    screenshot(page, "dashboard.png")


def test_a_run_shorter_than_a_second_shows_on_the_active_runs_chart(serve, page: Page) -> None:
    """Issue 11, item 2: the chart is each second's most at once, not a sample."""
    live = serve()
    open_dashboard(page, live)
    chart(page, "Active runs", now="0", most="0")
    failed = post(live, "brief", client_msg_id="b1", text="/fail", runner="echo")["run_id"]
    expect(cells(row(page, failed)).first).to_have_text("failed · demo_failure")
    chart(page, "Active runs", now="0", most="1")


def test_open_a_run_to_see_its_events_live(serve, page: Page) -> None:
    gated = Gated()
    live = serve(runners=[gated], runner="gated")
    open_dashboard(page, live)
    run_id = post(live, "inspect", client_msg_id="m1", text="look inside")["run_id"]
    row(page, run_id).get_by_role("button", name=f"Open run {run_id}").click()
    detail = page.get_by_role("dialog", name=f"Run {run_id}")
    expect(detail).to_be_visible()
    expect(detail.locator("dd").first).to_have_text("running")
    events = detail.locator("#detail-events li")
    expect(events.locator(".type")).to_have_text(["user.message", "run.started", "message.delta"])
    expect(events.first).to_contain_text("run: look inside")

    live.call(gated.release, run_id)
    expect(events.locator(".type")).to_have_text(
        ["user.message", "run.started", "message.delta", "message.completed", "run.ended"]
    )
    expect(detail.locator("dd").first).to_have_text("completed (stop)")
    page.keyboard.press("Escape")
    expect(detail).to_be_hidden()


def test_a_runs_tool_calls_and_latest_state_show_folded_in_its_detail(serve, page: Page) -> None:
    """Issue 14, item 4: the run's detail shows each tool call (name, arguments, result
    or error) and the latest value of each state key, folded by default as in the chat."""
    fed = Fed()
    live = serve(runners=[fed], runner="fed")
    open_dashboard(page, live)
    run_id = post(live, "tools", client_msg_id="m1", text="use tools")["run_id"]
    row(page, run_id).get_by_role("button", name=f"Open run {run_id}").click()
    detail = page.get_by_role("dialog", name=f"Run {run_id}")
    expect(detail).to_be_visible()
    section = detail.get_by_role("region", name="Tool calls and state")
    expect(section).to_be_hidden()  # nothing to show yet

    def state(n: int) -> dict[str, Any]:
        data = {"scope": "runner", "key": "state", "value": {"n": n}}
        return {"type": "state.updated", "data": data}

    add = {"tool_call_id": "c1", "name": "add", "arguments": {"a": 1, "b": 2}}
    divide = {"tool_call_id": "c2", "name": "divide", "arguments": {"a": 1, "b": 0}}
    live.call(
        fed.put,
        {"type": "tool.call.started", "data": add},
        state(1),
        {"type": "tool.call.started", "data": divide},
    )
    tools = section.locator("details.tool")
    expect(tools.locator("summary")).to_have_text(["Tool add: running…", "Tool divide: running…"])
    values = section.locator("details.state")
    expect(values.locator("summary")).to_have_text(["State runner.state"])
    expect(values.locator(".tool-io")).to_have_text('{\n  "n": 1\n}')

    live.call(
        fed.put,
        {
            "type": "tool.call.completed",
            "data": {"tool_call_id": "c1", "name": "add", "result": 3},
        },
        state(2),
        {
            "type": "tool.call.completed",
            "data": {"tool_call_id": "c2", "name": "divide", "error": "division by zero"},
        },
        completed("done"),
        run_completed(),
    )
    expect(detail.locator("dd").first).to_have_text("completed (stop)")
    expect(tools.locator("summary")).to_have_text(["Tool add: done", "Tool divide: failed"])
    expect(values).to_have_count(1)  # one entry per key: the latest value, updated in place
    for entry in [*tools.all(), values]:
        expect(entry).not_to_have_attribute("open", re.compile(".*"))  # folded by default
        expect(entry.locator(".tool-io")).to_be_hidden()

    tools.first.locator("summary").click()
    expect(tools.first.locator(".tool-io")).to_be_visible()
    expect(tools.first.locator(".tool-io")).to_have_text(
        '{\n  "arguments": {\n    "a": 1,\n    "b": 2\n  },\n  "result": 3\n}'
    )
    tools.last.locator("summary").click()
    expect(tools.last.locator(".tool-io")).to_contain_text('"error": "division by zero"')
    expect(tools.last.locator(".tool-io")).to_contain_text('"b": 0')
    values.locator("summary").click()
    expect(values.locator(".tool-io")).to_be_visible()
    expect(values.locator(".tool-io")).to_have_text('{\n  "n": 2\n}')
    # the event list still has every event, in order, with its one-line summary
    events = detail.locator("#detail-events li")
    expect(events.filter(has_text="tool.call.completed")).to_have_text(
        [re.compile(r"add → 3$"), re.compile(r'divide failed: "division by zero"$')]
    )
    page.keyboard.press("Escape")
    expect(detail).to_be_hidden()


def test_the_nodes_panel_and_the_node_of_each_run(
    serve, context: BrowserContext, page: Page
) -> None:
    """Issue 12, item 7: the nodes with their runs, clients and events per second (one
    node here: this gateway), and each run naming the node that runs it."""
    gated = Gated()
    live = serve(runners=[gated], runner="gated", node="gw-one")
    open_dashboard(page, live)
    node = page.locator('#nodes-body tr[data-node="gw-one"]')
    expect(page.locator("#nodes-body tr")).to_have_count(1)
    expect(node.locator("th, td")).to_have_text(["gw-one", "0", "0", "0", "0", re.compile(r"\d")])

    chat = Chat(context.new_page(), live).open("where")
    chat.send("which node?")
    (run_id,) = live.running("where")
    expect(cells(row(page, run_id)).nth(8)).to_have_text("gw-one")
    # nodes.updated, once a second: one active run, one client, one conversation
    expect(node.locator("td")).to_have_text(["1", "1", re.compile(r"\d+"), "1", re.compile(r"\d")])
    row(page, run_id).get_by_role("button", name=f"Open run {run_id}").click()
    detail = page.get_by_role("dialog", name=f"Run {run_id}")
    expect(detail.locator("dt", has_text="Node").locator("+ dd")).to_have_text("gw-one")
    page.keyboard.press("Escape")
    live.call(gated.release, run_id)
    expect(cells(row(page, run_id)).first).to_have_text("completed · stop")
    expect(node.locator("td").first).to_have_text("0")


def test_a_queued_run_shows_when_it_moves_up(serve, page: Page) -> None:
    """Issue 11, item 6: `queue.updated` has no run_id; a run's events list it for the
    runs it moves."""
    gated = Gated()
    live = serve(runners=[gated], runner="gated")
    open_dashboard(page, live)
    first = post(live, "line", client_msg_id="m1", text="first")["run_id"]
    post(live, "line", client_msg_id="m2", text="second", mode="queue")
    third = post(live, "line", client_msg_id="m3", text="third", mode="queue")["run_id"]
    row(page, third).get_by_role("button", name=f"Open run {third}").click()
    detail = page.get_by_role("dialog", name=f"Run {third}")
    events = detail.locator("#detail-events li")
    expect(events.locator(".type")).to_have_text(["user.message", "run.queued"])
    live.call(gated.release, first)
    expect(events.locator(".type")).to_have_text(["user.message", "run.queued", "queue.updated"])
    expect(events.last).to_contain_text("now position 1 of 1 queued")
    page.keyboard.press("Escape")
    expect(detail).to_be_hidden()


def test_a_dropped_dashboard_reconnects_to_a_fresh_snapshot(serve, page: Page) -> None:
    live = serve()
    routes: list[WebSocketRoute] = []
    down = {"now": False}

    def route(ws: WebSocketRoute) -> None:
        if down["now"]:
            ws.close()
        else:
            ws.connect_to_server()
            routes.append(ws)

    page.route_web_socket(re.compile("/ws/dashboard"), route)
    open_dashboard(page, live)
    down["now"] = True
    for ws in routes:
        ws.close()
    expect(page.locator("#offline-banner")).to_contain_text("Can't reach the server")
    expect(page.locator("#live")).to_have_text("Reconnecting…")
    run_id = post(live, "meanwhile", client_msg_id="m1", text="while you were away")["run_id"]
    down["now"] = False
    expect(page.locator("#live")).to_have_text("Live")
    expect(page.locator("#offline-banner")).to_be_hidden()
    expect(cells(row(page, run_id)).first).to_have_text("completed · stop")
    assert page.evaluate("window.sameDocument") is True
