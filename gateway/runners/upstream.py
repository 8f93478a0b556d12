"""What the runners that stream from an HTTP service share (`openai`, `agui`): the
constructor over their options model, and how a failed answer becomes the run's error.

Failures end the run `failed` with an honest `retryable`: a 429, a 408 or a 5xx, a
network error or a timeout are worth retrying; another 4xx, or an answer that is not
the protocol, are not.
"""

from __future__ import annotations

from typing import Any, ClassVar, Generic, Literal, TypeVar

import httpx
import orjson
from pydantic import BaseModel

ERROR_TEXT = 300  # characters of an upstream error body kept in the run's error

OptionsT = TypeVar("OptionsT", bound=BaseModel)


class UpstreamFailure(Exception):
    """Ends the run `failed` with this code, message and `retryable`."""

    def __init__(self, code: str, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


class UpstreamRunner(Generic[OptionsT]):
    """A steerable runner configured by an options model (`[runners.<name>]`)."""

    options_model: ClassVar[type[BaseModel]]

    def __init__(
        self,
        name: str,
        leftover_steering: Literal["follow_up", "drop"] = "follow_up",
        **options: Any,
    ) -> None:
        self.name = name
        self.supports_steering = True
        self.leftover_steering: Literal["follow_up", "drop"] = leftover_steering
        self.deadline_s: float | None = None
        self.idle_s: float | None = None
        self.options: OptionsT = self.options_model.model_validate(options)  # type: ignore[assignment]


def http_failure(status: int, body: bytes, response: httpx.Response) -> UpstreamFailure:
    """An HTTP error answer as the run's error: 408, 429 and 5xx are worth retrying."""
    try:
        detail = orjson.loads(body)["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        detail = body.decode("utf-8", "replace")
    message = f"HTTP {status}: {str(detail)[:ERROR_TEXT]}"
    retry_after = response.headers.get("retry-after")
    if retry_after:
        message += f" (retry after {retry_after[:20]} s)"
    if status == 429:
        return UpstreamFailure("upstream_rate_limited", message, True)
    if status in (401, 403):
        return UpstreamFailure("upstream_unauthorized", message, False)
    return UpstreamFailure("upstream_error", message, status == 408 or status >= 500)
