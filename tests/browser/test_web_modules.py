"""The chat's ES modules on their own, in Chromium (issue 5, items 1 and 3; issue 11,
items 2 and 5): the Markdown renderer against hostile and ordinary input, titles as
plain text, the reconnect backoff, the timeline's rule that an offset is applied once,
and the dashboard's most-at-once per second."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import Page

from tests.browser.conftest import LiveGateway

pytestmark = pytest.mark.browser

LINK = 'target="_blank" rel="noopener noreferrer nofollow"'

MARKDOWN = {
    "**bold** and *it* and _it_ and ~~gone~~": (
        "<p><strong>bold</strong> and <em>it</em> and <em>it</em> and <del>gone</del></p>"
    ),
    "<img src=x onerror=alert(1)>": "<p>&lt;img src=x onerror=alert(1)&gt;</p>",
    "<script>alert(1)</script>": "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>",
    "[x](javascript:alert(1))": "<p>[x](javascript:alert(1))</p>",
    "[x](data:text/html,<b>)": "<p>[x](data:text/html,&lt;b&gt;)</p>",
    "![pic](https://e.org/a.png)": f'<p><a href="https://e.org/a.png" {LINK}>pic</a></p>',
    "![x](javascript:alert(1)) a!": "<p>![x](javascript:alert(1)) a!</p>",
    '[ok](https://example.org "t")': f'<p><a href="https://example.org" {LINK}>ok</a></p>',
    "[mail](mailto:a@example.org)": f'<p><a href="mailto:a@example.org" {LINK}>mail</a></p>',
    '[q](https://x.org/"onclick="alert(1))': (
        f'<p><a href="https://x.org/&quot;onclick=&quot;alert(1" {LINK}>q</a>)</p>'
    ),
    "see https://e.org/x.": f'<p>see <a href="https://e.org/x" {LINK}>https://e.org/x</a>.</p>',
    "```js\nconst a = '<b>';\n```": (
        "<pre><code class=\"language-js\">const a = '&lt;b&gt;';</code></pre>"
    ),
    "```\nstill streaming": "<pre><code>still streaming</code></pre>",
    "`<b>x</b>` and ``a ` b``": "<p><code>&lt;b&gt;x&lt;/b&gt;</code> and <code>a ` b</code></p>",
    "- one\n- two\n  - nested": "<ul><li>one</li><li>two<ul><li>nested</li></ul></li></ul>",
    "3. c\n4. d": '<ol start="3"><li>c</li><li>d</li></ol>',
    "# Title\ntext": "<h3>Title</h3><p>text</p>",
    "> quoted **text**": "<blockquote><p>quoted <strong>text</strong></p></blockquote>",
    "a\nb\n\nc": "<p>a<br>b</p><p>c</p>",
    "\\*not em\\* and a_b_c and 2 * 3 * 4": "<p>*not em* and a_b_c and 2 * 3 * 4</p>",
    "---": "<hr>",
    "**unclosed": "<p>**unclosed</p>",
}

RENDER = """async (cases) => {
  const { renderMarkdown } = await import('/js/markdown.js');
  const out = {};
  for (const src of cases) {
    const div = document.createElement('div');
    div.append(renderMarkdown(src));
    out[src] = div.innerHTML;
  }
  return out;
}"""

ELEMENTS = """async (cases) => {
  const { renderMarkdown } = await import('/js/markdown.js');
  const div = document.createElement('div');
  for (const src of cases) div.append(renderMarkdown(src));
  return [...new Set([...div.querySelectorAll('*')].flatMap(
    (el) => [el.tagName.toLowerCase(), ...el.getAttributeNames().map((a) => '@' + a)]))].sort();
}"""


def blank(page: Page, live: LiveGateway) -> Page:
    """A blank page of the gateway's origin, to import the modules into."""
    page.route(f"{live.url}/blank.html", lambda route: route.fulfill(body="<!doctype html>"))
    page.goto(f"{live.url}/blank.html")
    return page


def test_markdown_is_rendered_safely(serve, page: Page) -> None:
    blank(page, serve())
    rendered: dict[str, str] = page.evaluate(RENDER, list(MARKDOWN))
    assert rendered == MARKDOWN
    made: list[str] = page.evaluate(ELEMENTS, list(MARKDOWN))
    allowed = {"a", "blockquote", "br", "code", "del", "em", "h3", "hr", "li", "ol", "p", "pre"}
    allowed |= {"strong", "ul", "@class", "@href", "@rel", "@start", "@target"}
    assert set(made) <= allowed


# The first line a person reads, with no marks (issue 11, item 5).
TITLES = {
    "Tell me about **steering**": "Tell me about steering",
    "  __Bold__ and *it*, _it_, ~~gone~~\nsecond line": "Bold and it, it, gone",
    "# A heading #": "A heading",
    "- first item\n- second": "first item",
    "3. third": "third",
    "> quoted `code` here": "quoted code here",
    "[the docs](https://e.org/d) and ![a cat](https://e.org/c.png)": "the docs and a cat",
    "see https://e.org/x.": "see https://e.org/x.",
    "```py\nprint(1)\n```": "print(1)",
    "---\n\n\\*literal\\* 2 * 3": "*literal* 2 * 3",
    "<b>html</b> stays": "<b>html</b> stays",
    "[x](javascript:alert(1))": "[x](javascript:alert(1))",
    "a   lot\tof   space": "a lot of space",
    "```\n\n```": "",
    "é" * 100: "é" * 79 + "…",
}

PLAIN_TITLE = """async (cases) => {
  const { plainTitle } = await import('/js/markdown.js');
  return Object.fromEntries(cases.map((src) => [src, plainTitle(src)]));
}"""


def test_titles_are_the_text_a_person_reads(serve, page: Page) -> None:
    blank(page, serve())
    assert page.evaluate(PLAIN_TITLE, list(TITLES)) == TITLES


BACKOFF = """async () => {
  const { LiveSocket } = await import('/js/socket.js');
  const socket = new LiveSocket({ url: () => '/', onFrame: () => {} });
  const out = [];
  for (let attempt = 0; attempt < 8; attempt += 1) {
    socket.attempt = attempt;
    for (let i = 0; i < 50; i += 1) out.push([attempt, socket.backoff()]);
  }
  return out;
}"""


def test_reconnect_backoff_doubles_with_jitter_up_to_a_cap(serve, page: Page) -> None:
    blank(page, serve())
    samples: list[list[int]] = page.evaluate(BACKOFF)
    for attempt, delay in samples:
        base = min(8000, 500 * 2**attempt)
        assert 0.75 * base <= delay <= 1.25 * base, (attempt, delay)
    # uncapped, even the shortest wait of a try is longer than the longest of the one before
    assert all(0.75 * 500 * 2 ** (n + 1) > 1.25 * 500 * 2**n for n in range(4))


TIMELINE = """async (events) => {
  const { Timeline } = await import('/js/timeline.js');
  const t = new Timeline('c1');
  for (const e of events) t.event(e);
  const item = t.items.find((i) => i.kind === 'assistant');
  return { text: item.text, last: t.lastOffset, behind: t.ready({ head: 2, active_run: null }) };
}"""


def event(offset: int, **fields: Any) -> dict[str, Any]:
    return {"offset": offset, "ts": 1, "conversation_id": "c1", "run_id": "r1", **fields}


def test_timeline_applies_each_offset_once(serve, page: Page) -> None:
    blank(page, serve())
    d = {"type": "message.delta", "message_id": "a1"}
    events = [
        event(1, type="run.started", runner="echo", trigger_message_ids=[]),
        event(2, delta="one", **d),
        event(2, delta="one", **d),  # the same offset again
        event(3, delta=" two", **d),
        event(1, type="run.started", runner="echo", trigger_message_ids=[]),
        event(5, delta=" four", first_offset=4, **d),  # a merged delta
    ]
    result = page.evaluate(TIMELINE, events)
    # a server whose head is below the cursor (its store was reset) means: start over
    assert result == {"text": "one two four", "last": 5, "behind": False}


# Each entry: [what, time in ms, count]; "take" answers the closed seconds' peaks.
PEAKS = """async (steps) => {
  const { PeakPerSecond } = await import('/js/charts.js');
  const peaks = new PeakPerSecond(10000, { keep: 5 });
  const out = [];
  for (const [what, now, count] of steps) {
    if (what === 'take') out.push(peaks.take(now));
    else peaks[what](count, now);
  }
  return out;
}"""


def test_active_runs_chart_keeps_each_seconds_most_at_once(serve, page: Page) -> None:
    """Issue 11, item 2: runs that start and end between two ticks still count."""
    blank(page, serve())
    steps = [
        ["set", 10100, 1],
        ["set", 10200, 2],
        ["set", 10300, 1],
        ["set", 10400, 0],  # up to 2 and back to 0 within second 10
        ["take", 10999, None],  # second 10 is not over yet
        ["take", 11001, None],
        ["set", 11500, 3],
        ["take", 14000, None],  # 11 saw 3; 12 and 13 carry the count of 3
        ["set", 14100, 0],  # 14 began at 3
        ["take", 15000, None],
        ["blip", 15200, 1],  # a run seen only once it had ended
        ["take", 16000, None],
        ["take", 17000, None],  # no change: the count, 0
        ["set", 17000, 4],
        ["take", 27500, None],  # a long gap: only the last `keep` seconds
        ["set", 26000, 1],  # the clock went back: still second 27, whose peak is 4
        ["take", 28000, None],
    ]
    assert page.evaluate(PEAKS, steps) == [
        [],
        [2],
        [3, 3, 3],
        [3],
        [1],
        [0],
        [4, 4, 4, 4, 4],
        [4],
    ]
