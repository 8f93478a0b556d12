"""Runners by name: built in (`echo`, `openai`, `agui`), `steerway.runners` entry points,
`module:attr`, and the names remote runners serve (gateway.runners.remote).

A name an in-process runner has is always served in-process; any other name a
conversation may use is served by the remote runners that announce it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator, Mapping
from importlib.metadata import entry_points
from typing import Any, Protocol, cast

from pydantic import ValidationError

from gateway.config import Settings, variable
from gateway.core.conversation import RunnerSpec
from gateway.errors import ConfigError
from gateway.runners.base import Runner
from gateway.runners.options import RunnerOptions, apply_common, load_options
from gateway.runners.remote import RemotePool

log = logging.getLogger("steerway.runners")

ENTRY_POINT_GROUP = "steerway.runners"
BUILTIN = {
    "echo": "gateway.runners.echo:EchoRunner",
    "openai": "gateway.runners.openai:OpenAIRunner",
    "agui": "gateway.agui.runner:AguiRunner",
}


class RemoteRunners(Protocol):
    """What the registry asks of the remote runner pool."""

    def runner(self, name: str) -> Runner | None: ...

    def spec(self, name: str) -> RunnerSpec | None: ...

    def stop_placing(self) -> None: ...


class RunnerRegistry:
    def __init__(self, runners: list[Runner] | None = None) -> None:
        self._runners: dict[str, Runner] = {}
        self.remote: RemoteRunners | None = None
        for runner in runners or []:
            self.add(runner)

    def add(self, runner: Runner) -> None:
        self._runners[runner.name] = runner

    def local(self, name: str) -> Runner | None:
        return self._runners.get(name)

    def get(self, name: str) -> Runner | None:
        runner = self._runners.get(name)
        if runner is None and self.remote is not None:
            return self.remote.runner(name)
        return runner

    def spec(self, name: str) -> RunnerSpec | None:
        runner = self._runners.get(name)
        if runner is None:
            return self.remote.spec(name) if self.remote is not None else None
        return RunnerSpec(runner.name, runner.supports_steering, runner.leftover_steering)

    def names(self) -> list[str]:
        return sorted(self._runners)


def resolve(use: str) -> Any:
    """The object `use` names: a built-in runner, an entry point of `steerway.runners`,
    or `module:attr`."""
    if ":" not in use:
        if use in BUILTIN:
            use = BUILTIN[use]
        else:
            found = entry_points(group=ENTRY_POINT_GROUP, name=use)
            if not found:
                raise ValueError(
                    f"runner {use!r}: not built in, not a {ENTRY_POINT_GROUP} entry point, "
                    "not module:attr"
                )
            return next(iter(found)).load()
    module_name, _, attr = use.partition(":")
    if not module_name or not attr:
        raise ValueError(f"runner {use!r}: expected module:attr")
    return getattr(importlib.import_module(module_name), attr)


def make_runner(
    use: str, name: str | None = None, options: RunnerOptions | None = None, **defaults: Any
) -> Runner:
    """A runner from `use`: a Runner instance, or a class or factory making one, called
    with `defaults` and the runner's own options; then named and given its options."""
    target = resolve(use)
    own = {**defaults, **(options.extra if options else {})}
    if isinstance(target, type) or (callable(target) and not hasattr(target, "run")):
        runner = target(**own)
    elif options is not None and options.extra:
        raise ValueError(f"runner {use!r} is an instance: it takes no {sorted(options.extra)}")
    else:
        runner = target
    for needed in ("name", "run"):
        if not hasattr(runner, needed):
            raise ValueError(f"runner {use!r} has no {needed!r}")
    if name is not None:
        runner.name = name
    for option, default in (
        ("supports_steering", True),
        ("leftover_steering", "follow_up"),
        ("deadline_s", None),
        ("idle_s", None),
    ):
        if not hasattr(runner, option):
            setattr(runner, option, default)
    apply_common(runner, options)
    return cast(Runner, runner)


def load_runner(spec: str) -> Runner:
    """A runner from `module:attr`, a built-in name or an entry-point name."""
    return make_runner(spec)


@contextlib.contextmanager
def _blame(setting: str, use: str) -> Iterator[None]:
    """A runner that cannot be made (no such module or name, a factory refusing its
    options) is a bad setting: one line naming it, not a traceback."""
    try:
        yield
    except ValidationError as exc:  # a factory checking its options with pydantic
        raise ConfigError(
            *(
                (setting, f"runner {use!r}: {'.'.join(map(str, e['loc']))}: {e['msg']}")
                for e in exc.errors(include_url=False)
            )
        ) from exc
    except Exception as exc:
        what = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        if not what.startswith("runner "):
            what = f"runner {use!r}: {what}"
        raise ConfigError((setting, what)) from exc


def build_registry(
    echo_delay_ms: float,
    extra: list[str] | None = None,
    options: Mapping[str, RunnerOptions] | None = None,
    extra_setting: str = variable("runners"),
) -> tuple[RunnerRegistry, dict[str, RunnerOptions]]:
    """The in-process runners, and the options of the names left to remote runners.

    `echo` always; every installed `steerway.runners` entry point (one that fails to
    load is logged and skipped: the gateway still serves); the runners `extra` names
    (`--runners`, given as `extra_setting`); every configured section that names an
    in-process runner. A runner that cannot be made raises ConfigError."""
    options = dict(options or {})
    registry = RunnerRegistry()

    def add(use: str, name: str | None, key: str | None = None, **defaults: Any) -> None:
        """Add the runner `use` names, as `name`, with the options under `key` or `name`."""
        key = key or name
        opts = options.get(key) if key is not None else None
        registry.add(make_runner(use, name, opts, **defaults))

    echo = options.get("echo")
    if echo is None or echo.use in (None, "echo"):
        with _blame("[runners.echo]", "echo"):
            add("echo", "echo", delay_ms=echo_delay_ms)
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name in options and options[point.name].use is not None:
            continue  # configured to be something else
        try:
            add(point.value, point.name)
        except Exception as exc:
            log.error("runner entry point %s (%s) failed to load: %s", point.name, point.value, exc)
    for spec in extra or []:
        with _blame(extra_setting, spec):
            if ":" in spec:  # named by itself: its options are under that name
                own = getattr(resolve(spec), "name", None)
                add(spec, None, own if isinstance(own, str) else None)
            else:
                add(spec, spec)
    for name, opts in options.items():
        with _blame(f"[runners.{name}]", opts.use or name):
            if opts.use is not None:
                add(opts.use, name)
            elif name in BUILTIN and registry.local(name) is None:
                add(name, name)
    remote: dict[str, RunnerOptions] = {}
    for name, opts in options.items():
        runner = registry.local(name)
        if runner is None:
            remote[name] = opts
        else:  # a runner that named itself (a factory's): the options every runner has
            apply_common(runner, opts)
    return registry, remote


def local_runners(settings: Settings) -> RunnerRegistry:
    """The in-process runners the settings and the runners config name; raises ConfigError
    (`steerway serve` calls it before it listens)."""
    options = load_options(settings.runners_config, setting=settings.name_of("runners_config"))
    registry, _ = build_registry(
        settings.echo_delay_ms, settings.runners, options, settings.name_of("runners")
    )
    return registry


def open_runners(
    settings: Settings, runners: RunnerRegistry | None = None
) -> tuple[RunnerRegistry, RemotePool]:
    """The gateway's runners: in-process ones (`runners`, else built from the settings and
    the runners config), and the pool of remote runners serving every other name."""
    if runners is None:
        runners = local_runners(settings)
    options = {
        name: opts
        for name, opts in load_options(
            settings.runners_config, setting=settings.name_of("runners_config")
        ).items()
        if runners.local(name) is None
    }
    default = () if runners.local(settings.runner) is not None else (settings.runner,)
    if default:
        log.info("default runner %r is not in-process: remote runners serve it", settings.runner)
    pool = RemotePool(
        options, wait_s=settings.runner_wait_s, max_waiting=settings.runner_queue, names=default
    )
    runners.remote = pool
    return runners, pool
