"""Settings: defaults, overridden by `STEERWAY_*` environment variables, overridden by flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pymongo import uri_parser
from pymongo.errors import PyMongoError

from gateway.errors import ConfigError

ENV_PREFIX = "STEERWAY_"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's
_PACKAGE = Path(__file__).resolve().parent


def _pages() -> Path:
    """The chat and the dashboard: `gateway/web/` in an installed wheel (pyproject.toml maps
    the repository's web/ there), else the checkout's web/ (a source checkout or an editable
    install, which so serves the live files)."""
    installed = _PACKAGE / "web"
    return installed if installed.is_dir() else _PACKAGE.parent / "web"


def _check_mongodb_uri(uri: str) -> str:
    if not uri.startswith(("mongodb://", "mongodb+srv://")):
        raise ValueError("expected a mongodb:// or mongodb+srv:// URI")
    if uri.startswith("mongodb://"):
        # parsing a mongodb+srv:// URI resolves its DNS records: the store checks that one
        # when it connects
        try:
            uri_parser.parse_uri(uri)
        except (PyMongoError, ValueError) as exc:
            raise ValueError(f"not a valid MongoDB URI: {exc}") from None
    return uri


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def variable(field: str) -> str:
    return ENV_PREFIX + field.upper()


class Settings(BaseModel):
    # hide_input_in_errors: a bad setting's message must not print the secret
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    store: str = Field(
        "auto",
        description="`memory`; a mongodb:// URI; `auto`: STEERWAY_MONGODB_URI if set, "
        "else an embedded nx-27017 server on `data_dir`",
    )
    mongodb_uri: str = Field("", description="a real MongoDB, used by store `auto`")
    mongodb_database: str = "steerway"
    data_dir: Path = Field(Path(".steerway"), description="where the embedded store keeps data")
    runner: str = Field("echo", description="the default runner of new conversations")
    runners: list[str] = Field(default_factory=list, description="extra runners, module:attr")
    echo_delay_ms: float = Field(50.0, ge=0)
    runners_config: Path | None = Field(None, description="per-runner options, TOML")
    runner_wait_s: float = Field(30.0, gt=0, description="a run's wait for a remote runner")
    runner_queue: int = Field(256, ge=1, description="runs waiting for one remote name, at most")
    runner_rate_per_s: float = Field(20_000.0, gt=0, description="frames/s from a remote runner")
    ws_compression: bool = Field(False, description="permessage-deflate on client sockets")
    # zlib's window (2**bits bytes, both ways) and memory level: 11 and 2 compress a chat's
    # frames as well as uvicorn's 12 and 5 at ~23 KiB of zlib state per connection, not ~40
    # (docs/performance.md)
    ws_deflate_window_bits: int = Field(11, ge=9, le=15, description="permessage-deflate window")
    ws_deflate_mem_level: int = Field(2, ge=1, le=9, description="permessage-deflate zlib memLevel")
    secret: SecretStr = Field(
        SecretStr(""), description="HS256 key of tokens (>= 32 bytes); empty: no authentication"
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="origins of browser WebSockets; empty: the request's own host; `*`: any",
    )
    max_frame_bytes: int = Field(64 * 1024, ge=1024)
    max_text_chars: int = Field(32_768, ge=1, description="characters of a message's text")
    max_metadata_bytes: int = Field(16 * 1024, ge=2, description="a message's metadata as JSON")
    max_queued_runs: int = Field(16, ge=0, description="user-queued runs per conversation")
    max_steering: int = Field(100, ge=0, description="steering messages waiting in one run")
    max_connections: int = Field(10_000, ge=1, description="WebSockets per process")
    max_conversation_clients: int = Field(1_000, ge=1, description="WebSockets per conversation")
    ws_ping_interval_s: float = Field(20.0, gt=0, description="idle-connection ping period")
    ws_ping_timeout_s: float = Field(
        20.0, gt=0, description="a peer that answers no ping (or close) within this is dropped"
    )
    http_idle_s: int = Field(
        5, ge=1, description="an HTTP connection sending no request for this long is closed"
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="on SIGTERM, how long active runs may go on before ending failed"
    )
    outbox_frames: int = Field(256, ge=8)
    outbox_bytes: int = Field(1024 * 1024, ge=64 * 1024)
    rate_per_s: float = Field(20.0, gt=0, description="client frames per second, sustained")
    rate_burst: int = Field(60, ge=1, description="client frames in a burst")
    rate_abuse: int = Field(50, ge=1, description="rate_limited answers in a row before 4029")
    run_deadline_s: float = Field(300.0, gt=0)
    run_idle_s: float = Field(60.0, gt=0)
    actor_idle_s: float = Field(
        30.0, gt=0, description="an idle conversation's actor stops after this to twice this"
    )
    node: str = Field(
        "",
        pattern=r"^[^\s]*$",
        description="this node's name on the runs it owns (default host:pid); no spaces",
    )
    redis_url: str = Field(
        "", description="cluster mode: the Redis that nodes share (redis://host:6379/0)"
    )
    lease_s: float = Field(
        10.0, ge=1.0, description="cluster: a lost node's conversations are taken over within"
    )
    otlp_endpoint: str = Field(
        "",
        description="trace runs to this OTLP/HTTP collector (http://host:4318/v1/traces); "
        "needs pip install 'steerway[otel]'",
    )
    webhooks_config: Path | None = Field(
        None, description="webhook endpoints, TOML ([webhooks.NAME] url, secret, events)"
    )
    webhook_timeout_s: float = Field(
        10.0, gt=0, description="a delivery's request, at most; slower counts as failed"
    )
    webhook_backoff_s: float = Field(
        1.0, gt=0, description="retry n waits a random time up to this x 2^(n-1)"
    )
    webhook_backoff_max_s: float = Field(3600.0, gt=0, description="... and at most this")
    webhook_give_up_s: float = Field(
        86_400.0, gt=0, description="a delivery still failing after this is given up"
    )
    webhook_concurrency: int = Field(
        8, ge=1, description="deliveries in flight to one endpoint from one node"
    )
    webhook_poll_s: float = Field(
        1.0, gt=0, description="how often the store is looked at for due deliveries"
    )
    web_dir: Path = Field(default_factory=_pages, description="the pages: index.html, ...")
    log_level: str = Field("info", description=", ".join(LOG_LEVELS))
    # the fields given as flags, so that an error names the setting as it was given
    _flags: frozenset[str] = PrivateAttr(frozenset())

    @field_validator("store")
    @classmethod
    def _store(cls, value: str) -> str:
        if value in ("memory", "auto"):
            return value
        if not value.startswith(("mongodb://", "mongodb+srv://")):
            raise ValueError("expected `memory`, `auto` or a mongodb:// URI")
        return _check_mongodb_uri(value)

    @field_validator("mongodb_uri")
    @classmethod
    def _mongodb_uri(cls, value: str) -> str:
        return _check_mongodb_uri(value) if value else value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str, info: ValidationInfo) -> str:
        if not value:
            return value
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected a redis://, rediss:// or unix:// URL")
        # `store` and `mongodb_uri` are declared (so validated) before this field
        store, uri = info.data.get("store"), info.data.get("mongodb_uri")
        if store == "memory" or (store == "auto" and not uri):
            raise ValueError(
                "cluster mode needs one MongoDB shared by every node: "
                "set STEERWAY_MONGODB_URI (or --store mongodb://…)"
            )
        return value

    @field_validator("otlp_endpoint")
    @classmethod
    def _otlp_endpoint(cls, value: str) -> str:
        if not value:
            return value
        if not value.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL (OTLP over HTTP)")
        from gateway import tracing

        if not tracing.available():
            raise ValueError("tracing needs opentelemetry-sdk: pip install 'steerway[otel]'")
        return value

    @field_validator("web_dir")
    @classmethod
    def _web_dir(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"{str(value)!r} is not a directory")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.lower() not in LOG_LEVELS:
            raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
        return value.lower()

    @field_validator("secret")
    @classmethod
    def _secret_length(cls, value: SecretStr) -> SecretStr:
        # RFC 7518 section 3.2: an HS256 key has at least 256 bits
        if 0 < len(value.get_secret_value().encode()) < 32:
            raise ValueError("the secret must be at least 32 bytes")
        return value

    @property
    def secret_key(self) -> str:
        return self.secret.get_secret_value()

    def name_of(self, field: str) -> str:
        """The setting `field` as the operator gave it: its flag, else its variable."""
        return flag(field) if field in self._flags else variable(field)

    @classmethod
    def load(
        cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Defaults < environment < `overrides` (flags given on the command line).

        Raises ConfigError naming each bad setting as it was given."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, info in cls.model_fields.items():
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is None:
                continue
            if info.annotation == list[str]:
                values[name] = [part for part in raw.replace(",", " ").split() if part]
            elif info.annotation is bool:
                values[name] = raw.strip().lower() in ("1", "true", "yes", "on")
            else:
                values[name] = raw
        flags = {k: v for k, v in (overrides or {}).items() if v is not None}
        values.update(flags)
        try:
            settings = cls.model_validate(values, strict=False)
        except ValidationError as exc:
            problems = []
            for error in exc.errors(include_url=False):
                field = str(error["loc"][0]) if error["loc"] else ""
                name = flag(field) if field in flags else variable(field)
                # a validator's ValueError reads "Value error, <its message>"
                problems.append((name, error["msg"].removeprefix("Value error, ")))
            raise ConfigError(*problems) from None
        settings._flags = frozenset(flags)
        return settings
