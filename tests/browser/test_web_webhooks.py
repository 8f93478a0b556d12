"""The dashboard's Webhooks panel in Chromium (issue 15, item 1): an endpoint's last
deliveries and those given up, and a Replay button that sends one again."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import LiveGateway
from tests.test_webhooks import SECRET

pytestmark = pytest.mark.browser


class Endpoint(ThreadingHTTPServer):
    """A webhook endpoint on a free port: answers `status`, keeps each webhook-id."""

    status = 503
    ids: list[str]


class _Handler(BaseHTTPRequestHandler):
    server: Endpoint

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.server.ids.append(self.headers["webhook-id"])
        self.send_response(self.server.status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def endpoint() -> Iterator[Endpoint]:
    server = Endpoint(("127.0.0.1", 0), _Handler)
    server.ids = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_webhooks_panel_shows_failures_and_replays(serve, page: Page, tmp_path: Path) -> None:
    with endpoint() as hook:
        config = tmp_path / "webhooks.toml"
        url = f"http://127.0.0.1:{hook.server_address[1]}/in"
        config.write_text(
            f'[webhooks.hook]\nurl = "{url}"\nsecret = "{SECRET}"\nevents = ["run.ended"]\n'
        )
        live: LiveGateway = serve(
            webhooks_config=str(config),
            webhook_give_up_s=0.3,
            webhook_backoff_s=0.02,
            webhook_backoff_max_s=0.05,
            webhook_poll_s=0.05,
        )
        answer = httpx.post(
            f"{live.url}/api/conversations/c1/messages",
            json={"client_msg_id": "k1", "text": "hi"},
            timeout=10,
        )
        assert answer.status_code == 200
        page.goto(f"{live.url}/dashboard")
        panel = page.locator('.webhook[data-endpoint="hook"]')
        expect(panel.locator("h3")).to_have_text(f"hook {url}")
        failure = panel.locator("table.failures tbody tr")
        expect(failure.locator("td").first).to_have_text("failed")  # polled every 5 s
        expect(failure.locator("td").nth(5)).to_have_text("HTTP 503")
        (delivery_id,) = set(hook.ids)
        expect(failure).to_have_attribute("data-delivery-id", delivery_id)

        hook.status = 200
        tries = len(hook.ids)
        offset = delivery_id.rsplit(":", 1)[1]
        failure.get_by_role("button", name=f"Replay run.ended of c1 at {offset}").click()
        row = panel.locator(f'table.deliveries tr[data-delivery-id="{delivery_id}"]')
        expect(row.locator("td").first).to_have_text("delivered")
        expect(panel.locator("p.failures")).to_have_text("No delivery given up.")
        assert hook.ids[tries:] == [delivery_id]  # sent once more, with the same id
