"""Runners by name: the built-in `echo`, and any runner given as `module:attr`."""

from __future__ import annotations

import importlib
from typing import cast

from gateway.core.conversation import RunnerSpec
from gateway.runners.base import Runner
from gateway.runners.echo import EchoRunner


class RunnerRegistry:
    def __init__(self, runners: list[Runner] | None = None) -> None:
        self._runners: dict[str, Runner] = {}
        for runner in runners or []:
            self.add(runner)

    def add(self, runner: Runner) -> None:
        self._runners[runner.name] = runner

    def get(self, name: str) -> Runner | None:
        return self._runners.get(name)

    def spec(self, name: str) -> RunnerSpec | None:
        runner = self._runners.get(name)
        if runner is None:
            return None
        return RunnerSpec(runner.name, runner.supports_steering, runner.leftover_steering)

    def names(self) -> list[str]:
        return sorted(self._runners)


def load_runner(spec: str) -> Runner:
    """A runner from `module:attr`: a Runner instance, or a class or factory making one."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"runner {spec!r}: expected module:attr")
    target = getattr(importlib.import_module(module_name), attr)
    runner = target() if callable(target) and not hasattr(target, "run") else target
    if isinstance(runner, type):
        runner = runner()
    for needed in ("name", "run"):
        if not hasattr(runner, needed):
            raise ValueError(f"runner {spec!r} has no {needed!r}")
    return cast(Runner, runner)


def default_registry(echo_delay_ms: float, extra: list[str] | None = None) -> RunnerRegistry:
    registry = RunnerRegistry([EchoRunner(delay_ms=echo_delay_ms)])
    for spec in extra or []:
        registry.add(load_runner(spec))
    return registry
