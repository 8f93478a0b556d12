"""Webhook endpoints: a TOML file (`--webhooks-config`) and `STEERWAY_WEBHOOKS__*` variables.

    [webhooks.billing]                      # the endpoint's name
    url = "https://example.com/hooks"
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"   # Standard Webhooks: whsec_ + base64
    events = ["run.ended", "message.completed"]

The environment overrides the file, as for runners (gateway/runners/options.py):
`STEERWAY_WEBHOOKS__BILLING__URL=…`, `…__SECRET=…`, `…__EVENTS=run.ended,run.started`.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.sections import named_sections, validated

ENV_PREFIX = "STEERWAY_WEBHOOKS__"
CREATED = "conversation.created"
# what an endpoint may subscribe to: four event types, and a conversation's first event
EVENT_TYPES = ("run.started", "run.ended", "message.completed", "steering.dropped", CREATED)
SECRET_PREFIX = "whsec_"
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # in delivery ids, before the first `:`


class Endpoint(BaseModel):
    """One endpoint's section."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    name: str = Field(pattern=NAME.pattern)
    url: str
    secret: str = Field(repr=False)
    events: tuple[str, ...]

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", value):
            raise ValueError("expected an http:// or https:// URL")
        return value

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str) -> str:
        key_bytes(value)  # raises ValueError
        return value

    @field_validator("events", mode="before")
    @classmethod
    def _events(cls, value: Any) -> Any:
        if isinstance(value, str):  # from the environment: comma or space separated
            value = [part for part in value.replace(",", " ").split() if part]
        if isinstance(value, list | tuple):
            unknown = [e for e in value if e not in EVENT_TYPES]
            if unknown:
                raise ValueError(
                    f"unknown event type {unknown[0]!r}: expected some of {', '.join(EVENT_TYPES)}"
                )
            if not value:
                raise ValueError(f"name at least one of {', '.join(EVENT_TYPES)}")
            return tuple(dict.fromkeys(value))
        return value

    @property
    def key(self) -> bytes:
        return key_bytes(self.secret)

    def wants(self, event_type: str) -> bool:
        return event_type in self.events


def key_bytes(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret (24 to 64 bytes, as Standard Webhooks
    recommends); ValueError otherwise. The message never shows the secret."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"expected {SECRET_PREFIX} followed by base64 (Standard Webhooks)")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the part after {SECRET_PREFIX} is not base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"the key must be 24 to 64 bytes, not {len(key)}")
    return key


def _env_key(name: str) -> str:
    return name.replace("-", "_").upper()


def load_endpoints(
    path: Path | str | None,
    environ: Mapping[str, str] | None = None,
    setting: str = "STEERWAY_WEBHOOKS_CONFIG",
) -> list[Endpoint]:
    """Every configured endpoint, by name; raises ConfigError on a bad file (naming it as
    `setting`), variable or value."""
    env = os.environ if environ is None else environ
    sections = named_sections(
        "webhooks",
        path,
        setting,
        env,
        ENV_PREFIX,
        _env_key,
        option_ok=lambda option: option in ("url", "secret", "events"),
        expected="URL, __SECRET or __EVENTS",
    )
    return [
        validated("webhooks", name, Endpoint, {**table, "name": name})
        for name, table in sections.items()
    ]
