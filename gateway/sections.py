"""Named sections of settings: `[<table>.<name>]` tables of a TOML file, each option
overridable by a `STEERWAY_<TABLE>__<NAME>__<OPTION>` variable (runners, webhooks).

Every problem is a ConfigError naming the setting as it was given: the file's
setting, the variable, or `[<table>.<name>] <option>` for a value its model refuses.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from gateway.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)


def named_sections(
    table: str,
    path: Path | str | None,
    setting: str,
    env: Mapping[str, str],
    prefix: str,
    env_key: Callable[[str], str],
    option_ok: Callable[[str], bool] = bool,
    expected: str = "<OPTION>",
) -> dict[str, dict[str, Any]]:
    """The raw options of every section, by name: the file's, then the variables'
    (`prefix<NAME>__<OPTION>`, NAME matched to a file's section by `env_key`)."""
    sections: dict[str, dict[str, Any]] = {}
    if path:
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError((setting, f"cannot read {str(path)!r}: {exc.strerror}")) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError((setting, f"{str(path)!r} is not TOML: {exc}")) from None
        tables = doc.get(table, {})
        if set(doc) - {table} or not isinstance(tables, dict):
            raise ConfigError((setting, f"{str(path)!r}: expected only [{table}.<name>] tables"))
        for name, options in tables.items():
            if not isinstance(options, dict):
                raise ConfigError((setting, f"{str(path)!r}: [{table}.{name}] must be a table"))
            sections[name] = dict(options)
    by_key = {env_key(name): name for name in sections}
    for key, value in env.items():
        if not key.startswith(prefix):
            continue
        name_key, sep, option = key[len(prefix) :].partition("__")
        if not sep or not name_key or not option or not option_ok(option.lower()):
            raise ConfigError((key, f"expected {prefix}<NAME>__{expected}"))
        name = by_key.setdefault(name_key, name_key.lower())
        sections.setdefault(name, {})[option.lower()] = value
    return sections


def validated(table: str, name: str, model: type[ModelT], options: dict[str, Any]) -> ModelT:
    """A section's options as its model, or a ConfigError line per problem."""
    try:
        return model.model_validate(options)
    except ValidationError as exc:
        raise ConfigError(
            *(
                (
                    f"[{table}.{name}] {'.'.join(str(p) for p in error['loc'])}",
                    error["msg"].removeprefix("Value error, "),
                )
                for error in exc.errors(include_url=False)
            )
        ) from None
