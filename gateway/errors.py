"""The one error hierarchy: every refusal the gateway answers a client with, and the
error of a bad setting, which stops `steerway serve` before it listens."""

from __future__ import annotations

from gateway.protocol.codes import ErrorCode


class SteerwayError(Exception):
    """A refusal with a protocol error code; it never closes a connection by itself."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(
        self, message: str, *, code: ErrorCode | None = None, client_msg_id: str | None = None
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.client_msg_id = client_msg_id


class FrameError(SteerwayError):
    """A client frame that cannot be parsed or validated (invalid_json, invalid_frame, ...)."""

    code = ErrorCode.INVALID_FRAME


class RoutingError(SteerwayError):
    """A well-formed request the conversation cannot take (queue_full, no_active_run, ...)."""


class RunnerUnavailable(SteerwayError):
    """No runner of the name a run needs took it in time (or none may wait for one)."""

    code = ErrorCode.RUNNER_UNAVAILABLE


class StoreUnavailable(SteerwayError):
    """The store did not answer; nothing was stored."""

    code = ErrorCode.INTERNAL


class ConfigError(ValueError):
    """Bad settings: one line per problem, each naming the setting as the operator gave
    it (a flag, a STEERWAY_* variable, a section of the runners config)."""

    def __init__(self, *problems: tuple[str, str]) -> None:
        # one line each, whatever the message of the exception it came from
        self.problems = [" ".join(f"{setting}: {what}".split()) for setting, what in problems]
        super().__init__("; ".join(self.problems))
