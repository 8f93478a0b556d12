"""Real servers for the cluster tests (issue 12): redis-server, nginx as a round-robin
balancer with no stickiness, one shared nx-27017 and several `steerway serve` nodes,
each on a free port and stopped by its pid."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from redis.asyncio import Redis

from store.embedded import EmbeddedMongo, free_port
from tests.processes import GatewayProcess, Loopback, spawn_gateway

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WITHIN = 20.0
LEASE_S = 4.0  # short, so that take-over tests finish quickly; the default is 10 s


@dataclass
class RedisServer:
    port: int
    proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start on `port` (again after `stop`: the same port), keeping nothing on disk,
        and return once it answers."""
        self.proc = await asyncio.create_subprocess_exec(
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = Redis(port=self.port)
        try:
            async with asyncio.timeout(WITHIN):
                while True:
                    with contextlib.suppress(Exception):
                        if await client.ping():
                            return
                    await asyncio.sleep(0.02)  # polling a server that has no event to wait on
        finally:
            await client.aclose()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


NGINX_CONF = """
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    upstream steerway {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://steerway;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_next_upstream error timeout;
            proxy_connect_timeout 1s;
        }}
    }}
}}
"""


@dataclass
class Nginx(Loopback):
    port: int
    proc: asyncio.subprocess.Process

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), WITHIN)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def _nginx_conf(directory: Path, ports: list[int], port: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=0;" for p in ports)
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=directory, servers=servers, port=port))
    return conf


async def start_nginx(directory: Path, ports: list[int]) -> Nginx:
    """nginx on a free port, round-robin over `ports`, with no stickiness."""
    port = free_port()
    return await launch_nginx(directory, _nginx_conf(directory, ports, port), port)


async def launch_nginx(directory: Path, conf: Path, port: int) -> Nginx:
    """nginx with `conf` (prefix `directory`), once it listens on `port`."""
    proc = await asyncio.create_subprocess_exec(
        NGINX, "-c", str(conf), "-p", str(directory), "-e", str(directory / "error.log"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    async with asyncio.timeout(WITHIN):
        while True:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await writer.wait_closed()
                return Nginx(port, proc)
            if proc.returncode is not None:
                raise RuntimeError((directory / "error.log").read_text())
            await asyncio.sleep(0.02)  # polling: nginx says nothing when it listens


@dataclass
class Cluster:
    mongo: EmbeddedMongo
    redis: RedisServer
    nodes: list[GatewayProcess] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    async def holder(self, conversation_id: str) -> str | None:
        """The node that holds a conversation's lease, as Redis says."""
        client = Redis(port=self.redis.port)
        try:
            value = await client.get(f"steerway:lease:{conversation_id}")
        finally:
            await client.aclose()
        return None if value is None else value.decode().split(" ", 1)[0]

    async def add(self, name: str, *args: str) -> GatewayProcess:
        node = await spawn_gateway("--store", self.mongo.uri, *args, env={
            **self.env, "STEERWAY_NODE": name,
        })  # fmt: skip
        self.nodes.append(node)
        return node


@contextlib.asynccontextmanager
async def cluster(
    tmp_path: Path, names: tuple[str, ...] = ("a", "b", "c"), **env: str
) -> AsyncIterator[Cluster]:
    """One nx-27017, one redis-server and a node per name, all stopped by pid after."""
    mongo = await EmbeddedMongo.start(tmp_path / "nx")
    redis = RedisServer(free_port())
    try:
        await redis.start()
        c = Cluster(
            mongo,
            redis,
            env={
                "STEERWAY_REDIS_URL": redis.url,
                "STEERWAY_LEASE_S": str(LEASE_S),
                "STEERWAY_ECHO_DELAY_MS": "5",
                "STEERWAY_MONGODB_URI": "",
                **env,
            },
        )
        try:
            for name in names:
                await c.add(name)
            yield c
        finally:
            for node in c.nodes:
                await node.kill()
    finally:
        await redis.stop()
        await mongo.stop()
