"""Helpers shared by every frozen-dataclass config: JSON round trips and argparse flags from metadata.

Configs are frozen dataclasses whose fields carry ``metadata={"help": ...}``. They are saved beside
every artifact (``to_json``) so the artifact can be reloaded with exactly the settings that made it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

from dssm.errors import ConfigError

__all__ = ["config_to_dict", "config_from_dict", "save_config", "load_config", "add_config_arguments",
           "config_from_args", "field"]

T = TypeVar("T")


def field(default: Any, help: str, *, cli: bool = True) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field with a default and a help text (used for ``--help`` and docs); ``cli=False``:
    no ``--flag`` (a setting only a command's own logic sets, saved in the config like the others)."""
    return dataclasses.field(default=default, metadata={"help": help, "cli": cli})


def config_to_dict(config: Any) -> dict[str, Any]:
    """Dataclass → JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """JSON dict → dataclass, rejecting unknown keys and restoring tuples.

    Raises:
        ConfigError: ``data`` has a key that ``cls`` does not define.
    """
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {unknown}; known: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if isinstance(value, list) and "tuple" in str(hints.get(key, "")):
            value = tuple(value)
        values[key] = value
    return cls(**values)


def save_config(config: Any, path: str | Path) -> None:
    """Write ``config`` as indented JSON."""
    Path(path).write_text(json.dumps(config_to_dict(config), indent=2, sort_keys=True) + "\n")


def load_config(cls: type[T], path: str | Path) -> T:
    """Read a config written by :func:`save_config`."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from exc
    return config_from_dict(cls, data)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "") -> None:
    """Add one ``--flag`` per dataclass field (``num_buckets`` → ``--num-buckets``) with its help text.

    Booleans become ``--flag/--no-flag``; tuples take several values. Defaults are left as ``None``
    so :func:`config_from_args` can tell which flags the user set.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        flag = "--" + prefix + f.name.replace("_", "-")
        # argparse %-formats help texts; a literal "3%" in a field's help would crash --help.
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})".replace("%", "%%")
        hint = hints[f.name]
        dest = prefix.replace("-", "_") + f.name
        if hint is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        elif typing.get_origin(hint) is tuple:
            inner = typing.get_args(hint)[0]
            parser.add_argument(flag, dest=dest, type=inner, nargs="+", default=None, help=help_text)
        else:
            kind = hint if hint in (int, float, str) else str
            parser.add_argument(flag, dest=dest, type=kind, default=None, help=help_text)


def config_from_args(cls: type[T], args: argparse.Namespace, *, prefix: str = "",
                     base: T | None = None) -> T:
    """Build ``cls`` from parsed flags, starting from ``base`` (or the defaults) for unset flags."""
    start = base if base is not None else cls()
    changes = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = getattr(args, prefix.replace("-", "_") + f.name, None)
        if value is not None:
            changes[f.name] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(start, **changes)  # type: ignore[type-var]
