"""The ASGI application: routes, lifespan, and the objects every edge shares."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from gateway import auth, tracing
from gateway.agui.endpoint import AguiEndpoint
from gateway.auth import Refused
from gateway.bus import Bus, MemoryBus
from gateway.cluster.node import ClusterNode
from gateway.config import Settings
from gateway.conversation import ConversationHub
from gateway.core.limits import ConnectionSlots
from gateway.dashboard import DashboardSocket
from gateway.errors import SteerwayError
from gateway.metrics import Metrics
from gateway.protocol.codes import ErrorCode
from gateway.rest import Api, error
from gateway.runners.registry import RunnerRegistry, open_runners
from gateway.runnersocket import RunnerSocket
from gateway.webhooks.dispatcher import Dispatcher
from gateway.webhooks.endpoints import load_endpoints
from gateway.webhooks.subscriptions import Subscriptions
from gateway.ws import ConversationSocket
from store.base import Store
from store.embedded import EmbeddedMongo
from store.memory import MemoryStore
from store.mongo import MongoStore

log = logging.getLogger("steerway")
OPEN_WARNING = (
    "no secret is configured (STEERWAY_SECRET): authentication is OFF, every endpoint "
    "and every conversation is open to anyone who can reach this server"
)


CONVERSATION_PATH = "/ws/conversations/{conversation_id}"
_CONVERSATIONS = CONVERSATION_PATH.split("{", 1)[0]


class Gateway(Starlette):
    """Starlette, with the conversation WebSocket served straight: its connections are the
    many long-lived ones, and each coroutine of Starlette's middleware and routing would
    stay suspended under it for the connection's life (~2.5 KiB per connection)."""

    conversations: ConversationSocket

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "websocket" and path.startswith(_CONVERSATIONS):
            cid = path[len(_CONVERSATIONS) :]
            if cid and "/" not in cid:  # what the route would match
                scope["app"] = self
                scope["path_params"] = {"conversation_id": cid}
                await self.conversations(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


async def open_store(settings: Settings, stack: contextlib.AsyncExitStack) -> Store:
    """The store the settings name, closed (and an embedded server stopped) with `stack`."""
    if settings.store == "memory":
        log.warning("store: memory; nothing survives a restart")
        return MemoryStore()
    # the settings hold `auto`, `memory` or a URI (gateway/config.py checks it)
    uri = settings.mongodb_uri if settings.store == "auto" else settings.store
    if not uri:
        server = await stack.enter_async_context(await EmbeddedMongo.start(settings.data_dir))
        log.info("store: embedded nx-27017 on %s, data in %s", server.uri, settings.data_dir)
        uri = server.uri
    store = await MongoStore.open(uri, settings.mongodb_database)
    stack.push_async_callback(store.close)
    return store


def create_app(
    settings: Settings | None = None,
    *,
    store: Store,
    runners: RunnerRegistry | None = None,
    bus: Bus | None = None,
) -> Starlette:
    settings = settings or Settings.load()
    runners, pool = open_runners(settings, runners)
    metrics = Metrics()
    hub = ConversationHub(settings, store, bus or MemoryBus(), runners, metrics)
    metrics.store_batches.set_function(lambda: hub.committer.batches)
    endpoints = load_endpoints(
        settings.webhooks_config, setting=settings.name_of("webhooks_config")
    )
    dispatcher = None
    if endpoints:
        hub.webhooks = Subscriptions(endpoints)
        dispatcher = Dispatcher(store, hub.webhooks, settings, hub.node)
    api = Api(hub)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    cluster = (
        ClusterNode.attach(hub, settings.redis_url, settings.lease_s, pool)
        if settings.redis_url
        else None
    )
    if cluster is not None:  # presence crosses nodes on the cluster's bus
        hub.presence.attach(hub.bus)

    async def readyz(request: Request) -> Response:
        try:
            await store.ping()
        except Exception:
            return error(ErrorCode.INTERNAL, "the store does not answer")
        if not hub.committer.healthy:
            return error(ErrorCode.INTERNAL, "store writes are failing")
        if cluster is not None:
            try:
                await cluster.ping()
            except SteerwayError as exc:
                return error(ErrorCode.INTERNAL, exc.message)
        return PlainTextResponse("ready")

    async def metrics_endpoint(request: Request) -> Response:
        try:
            auth.for_admin(auth.authenticate(request.scope, settings))
        except Refused as exc:
            return error(exc.code, exc.message)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    async def not_found(request: Request, who: auth.Principal) -> Response:
        return error(ErrorCode.NOT_FOUND, f"no such path: {request.url.path}")

    connections = ConnectionSlots(settings.max_connections, settings.max_conversation_clients)
    conversations = ConversationSocket(hub, connections)
    routes: list[BaseRoute] = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
        *api.routes(),
        Route("/api/agui", AguiEndpoint(hub, connections).handle, methods=["POST"]),
        Route(
            "/api/{rest:path}",
            api.wrap(not_found),
            methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
        ),
        WebSocketRoute(CONVERSATION_PATH, conversations),
        WebSocketRoute("/ws/runners", RunnerSocket(hub, pool, connections)),
        WebSocketRoute("/ws/dashboard", DashboardSocket(hub, connections)),
    ]
    dashboard_page = settings.web_dir / "dashboard.html"

    async def dashboard(request: Request) -> Response:
        return FileResponse(dashboard_page)

    routes.append(Route("/dashboard", dashboard))
    routes.append(Mount("/", StaticFiles(directory=settings.web_dir, html=True), name="web"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if settings.otlp_endpoint:
            tracing.enable(hub.node, settings.otlp_endpoint)
        hub.start()
        if dispatcher is not None:
            dispatcher.start()
        if cluster is not None:
            await cluster.start()
        await hub.recover()
        if not settings.secret_key:
            log.warning(OPEN_WARNING)
        try:
            yield
        finally:
            if cluster is not None:
                cluster.drain()
            await hub.shutdown(settings.shutdown_grace_s)
            if dispatcher is not None:
                await dispatcher.stop()
            if cluster is not None:
                await cluster.stop()
            if settings.otlp_endpoint:
                tracing.disable()  # flushes the spans not yet exported

    auth.redact_logs()
    app = Gateway(routes=routes, lifespan=lifespan)
    app.conversations = conversations
    app.state.hub = hub
    app.state.settings = settings
    app.state.connections = connections  # WebSocket slots, shared by every endpoint
    return app
