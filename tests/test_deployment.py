"""docs/deployment.md's example (issue 12, item 9): the compose file names real settings
and hangs together, and the nginx configuration, run for real in front of a gateway,
upgrades WebSockets and passes REST. Docker itself does not run here."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import httpx
import yaml

from gateway.config import Settings, variable
from store.embedded import free_port
from tests.cluster import launch_nginx
from tests.processes import reader, spawn_gateway

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cluster"
NODES = ("gateway-a", "gateway-b", "gateway-c")


def compose() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load((EXAMPLE / "compose.yaml").read_text())["services"]
    return services


def test_the_compose_file_runs_three_named_nodes_on_redis_and_mongodb() -> None:
    services = compose()
    assert set(services) == {*NODES, "redis", "mongo", "nginx"}
    known = {variable(field) for field in Settings.model_fields}
    envs = [services[name]["environment"] for name in NODES]
    assert [env["STEERWAY_NODE"] for env in envs] == ["a", "b", "c"]
    for env in envs:
        assert set(env) <= known, set(env) - known  # every variable is a setting
        assert env["STEERWAY_REDIS_URL"].startswith("redis://redis:")
        assert env["STEERWAY_MONGODB_URI"].startswith("mongodb://mongo:")
    for name in NODES:
        service = services[name]
        env = {k: v for k, v in service["environment"].items() if k != "STEERWAY_SECRET"}
        settings = Settings.load(environ=env)  # every value is valid
        assert settings.redis_url
        assert settings.node
        stop = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
        assert stop is not None
        assert (
            float(stop[1]) > settings.shutdown_grace_s
        )  # SIGKILL only after the grace and the flush
        assert set(service["depends_on"]) == {"redis", "mongo"}
    assert set(services["nginx"]["depends_on"]) == set(NODES)
    upstream = re.findall(r"server (\S+):8000", (EXAMPLE / "nginx.conf").read_text())
    assert upstream == list(NODES)


async def test_the_nginx_configuration_proxies_websockets_and_rest(tmp_path: Path) -> None:
    gateway = await spawn_gateway("--store", "memory")
    try:
        port = free_port()
        text = (EXAMPLE / "nginx.conf").read_text()
        text = re.sub(r"server gateway-[abc]:8000", f"server 127.0.0.1:{gateway.port}", text)
        text = text.replace("listen 80;", f"listen 127.0.0.1:{port};")
        assert text.count(f"127.0.0.1:{gateway.port}") == 3
        # run unprivileged in tmp_path; the rest is the example as written
        text = text.replace("worker_processes auto;", "worker_processes 1;")
        # (as root, workers would run as `nobody`, who cannot write a large body to tmp_path)
        user = "user root;\n" if os.geteuid() == 0 else ""
        text = f"daemon off;\n{user}pid {tmp_path}/nginx.pid;\n" + text.replace(
            "http {",
            "http {\n"
            + "".join(
                f"    {kind}_temp_path {tmp_path}/{kind};\n"
                for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            ),
        )
        conf = tmp_path / "nginx.conf"
        conf.write_text(text)
        nginx = await launch_nginx(tmp_path, conf, port)
        try:
            async with reader(nginx, "through", 0) as client:  # the upgrade passes
                ack = await client.send("hello there", "m1")
                await client.until("run.ended", run_id=ack["run_id"])
            async with httpx.AsyncClient(base_url=nginx.http, timeout=10) as http:
                events = (await http.get("/api/conversations/through/events")).json()
                assert events["events"][-1]["type"] == "run.ended"
                big = {"client_msg_id": "m2", "text": "x" * 32_768}  # a body nginx must pass
                assert (await http.post("/api/conversations/big/messages", json=big)).is_success
        finally:
            await nginx.stop()
    finally:
        await gateway.kill()
