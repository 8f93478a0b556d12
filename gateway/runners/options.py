"""Per-runner options: a TOML file (`--runners-config`) and `STEERWAY_RUNNERS__*` variables.

    [runners.gpt]                 # the runner's name, as conversations ask for it
    use = "openai"                # built-in, `steerway.runners` entry point or module:attr
    supports_steering = true      # the options every runner has ...
    leftover_steering = "follow_up"
    deadline_s = 600
    idle_s = 60
    model = "qwen2.5"             # ... and the runner's own, passed to its factory

A section whose name no in-process runner has, and with no `use`, configures the
remote runners that announce that name.  The environment overrides the file:
`STEERWAY_RUNNERS__GPT__MODEL=llama3` sets `model` of the runner `gpt` (a name is
matched upper-cased, with `.`, `:` and `-` written as `_`).  docs/runners.md
describes the format.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.sections import named_sections, validated

ENV_PREFIX = "STEERWAY_RUNNERS__"
COMMON = ("supports_steering", "leftover_steering", "deadline_s", "idle_s")


class RunnerOptions(BaseModel):
    """One runner's section; fields beyond these are the runner's own options."""

    model_config = ConfigDict(extra="allow", frozen=True)

    use: str | None = None
    supports_steering: bool | None = None
    leftover_steering: Literal["follow_up", "drop"] | None = None
    deadline_s: float | None = Field(None, gt=0)
    idle_s: float | None = Field(None, gt=0)

    @property
    def extra(self) -> dict[str, Any]:
        """The runner's own options (keyword arguments of its factory)."""
        return dict(self.model_extra or {})


def env_key(name: str) -> str:
    return re.sub(r"[.:-]", "_", name).upper()


def load_options(
    path: Path | str | None,
    environ: Mapping[str, str] | None = None,
    setting: str = "STEERWAY_RUNNERS_CONFIG",
) -> dict[str, RunnerOptions]:
    """Every configured runner's options, by name; raises ConfigError on a bad file (naming
    it as `setting`), variable or value."""
    env = os.environ if environ is None else environ
    sections = named_sections("runners", path, setting, env, ENV_PREFIX, env_key)
    return {
        name: validated("runners", name, RunnerOptions, table) for name, table in sections.items()
    }


def apply_common(runner: Any, options: RunnerOptions | None) -> None:
    """Set the options every runner has on a runner object, where configured."""
    if options is None:
        return
    for option in COMMON:
        value = getattr(options, option)
        if value is not None:
            setattr(runner, option, value)
