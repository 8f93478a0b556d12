"""The `steerway` command: `steerway serve [flags]` (every flag is also a STEERWAY_* variable)
and `steerway token --sub NAME [--convs PATTERNS] [--role ROLE] [--ttl 1h]`."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import re
import socket
import sys
from collections.abc import Sequence

import uvicorn
import uvloop

from gateway import auth
from gateway.app import create_app, open_store
from gateway.config import Settings
from gateway.errors import ConfigError
from gateway.runners.registry import RunnerRegistry, local_runners
from gateway.webhooks.endpoints import load_endpoints
from gateway.wsserver import SteerwayHttpToolsProtocol, connection_options


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steerway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the chat UI, dashboard, WebSocket and REST API")
    serve.add_argument("--host", help="address to bind (STEERWAY_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (STEERWAY_PORT, default 8000)")
    serve.add_argument(
        "--store", help="`auto` (default: embedded nx-27017), `memory`, or a mongodb:// URI"
    )
    serve.add_argument("--data-dir", help="the embedded store's data (STEERWAY_DATA_DIR)")
    serve.add_argument("--runner", help="default runner of new conversations (STEERWAY_RUNNER)")
    serve.add_argument(
        "--runners", nargs="*", help="extra runners: module:attr or names (STEERWAY_RUNNERS)"
    )
    serve.add_argument(
        "--runners-config", help="per-runner options, a TOML file (STEERWAY_RUNNERS_CONFIG)"
    )
    serve.add_argument(
        "--webhooks-config", help="webhook endpoints, a TOML file (STEERWAY_WEBHOOKS_CONFIG)"
    )
    serve.add_argument("--echo-delay-ms", type=float, help="echo runner delay per word")
    serve.add_argument(
        "--ws-compression",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="permessage-deflate on client WebSockets (STEERWAY_WS_COMPRESSION)",
    )
    serve.add_argument("--log-level", help="debug, info, warning (STEERWAY_LOG_LEVEL)")
    token = sub.add_parser("token", help="print a token signed with STEERWAY_SECRET")
    token.add_argument("--sub", required=True, help="the subject: author of its messages")
    token.add_argument("--role", choices=auth.ROLES, default="user")
    token.add_argument(
        "--convs", default="", help="conversation ids or `*` patterns, comma separated"
    )
    token.add_argument("--runners", default="", help="runner names (role runner), comma separated")
    token.add_argument("--ttl", type=_duration, default="1h", help="lifetime: 90s, 15m, 1h, 7d")
    return parser


_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> float:
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if found is None or float(found.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 15m, 1h, 7d)")
    return float(found.group(1)) * _UNITS[found.group(2)]


def _list(text: str) -> list[str]:
    return [part for part in text.replace(",", " ").split() if part]


def token(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.secret_key:
        print("steerway: set STEERWAY_SECRET to mint tokens", file=sys.stderr)
        return 2
    print(
        auth.mint(
            settings.secret_key,
            args.sub,
            args.role,
            args.ttl,
            convs=_list(args.convs),
            runners=_list(args.runners),
        )
    )
    return 0


class Server(uvicorn.Server):
    """uvicorn's server, returning normally after a SIGTERM/SIGINT shutdown (also used
    by examples/agui_agent.py, which then stops the gateway it started)."""

    async def _serve(self, sockets: list[socket.socket] | None = None) -> None:
        await super()._serve(sockets)
        # uvicorn re-raises a caught SIGTERM/SIGINT once it has shut down, which would
        # kill the process before the store is closed and the embedded server stopped;
        # the shutdown is already graceful, so the process exits normally instead.
        self._captured_signals.clear()


async def run_server(settings: Settings, runners: RunnerRegistry | None = None) -> None:
    """Open the store, serve until told to stop, then close the store."""
    async with contextlib.AsyncExitStack() as stack:
        store = await open_store(settings, stack)
        app = create_app(settings, store=store, runners=runners)
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            http=SteerwayHttpToolsProtocol,
            **connection_options(settings),
            log_level=settings.log_level,
            access_log=False,
            # a reconnect storm after a deploy: every client at once (the kernel caps it
            # at net.core.somaxconn)
            backlog=max(2048, settings.max_connections),
        )
        # Everything imported so far lives as long as the process: keep it out of the
        # collector's way (full collections of it cost 25-45 ms pauses under load).
        gc.collect()
        gc.freeze()
        await Server(config).serve()


def serve(settings: Settings, runners: RunnerRegistry) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    uvloop.run(run_server(settings, runners))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    flags = vars(args) if args.command == "serve" else {}
    overrides = {k: v for k, v in flags.items() if k != "command" and v is not None}
    try:
        # every setting is checked here, before the store starts or anything listens
        settings = Settings.load(overrides)
        if args.command == "token":
            return token(args, settings)
        runners = local_runners(settings)
        load_endpoints(settings.webhooks_config, setting=settings.name_of("webhooks_config"))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"steerway: {problem}", file=sys.stderr)
        return 2
    serve(settings, runners)
    return 0


if __name__ == "__main__":
    sys.exit(main())
