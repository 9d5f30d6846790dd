"""Typed readers for settings taken from environment variables.

Each reader returns the default when the variable is unset or empty and raises
:class:`ImproperlyConfiguredEnv` naming the variable when the value is malformed, so a typo stops
start-up instead of silently running with a default.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any


class ImproperlyConfiguredEnv(Exception):
    """An environment variable holds a value that cannot be used."""

    def __init__(self, name: str, value: str, expected: str) -> None:
        super().__init__(f"environment variable {name}={value!r} is invalid: expected {expected}")
        self.name = name


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None or value.strip() == "" else value.strip()


def env_str(name: str, default: str) -> str:
    return _raw(name) or default


def _number(name: str, default: Any, parse: Callable[[str], Any], kind: str,
            minimum: Any) -> Any:
    raw = _raw(name)
    if raw is None:
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise ImproperlyConfiguredEnv(name, raw, kind) from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfiguredEnv(name, raw, f"{kind} >= {minimum}")
    return value


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    return int(_number(name, default, int, "an integer", minimum))


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    return float(_number(name, default, float, "a number", minimum))


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_bool(name: str, default: bool) -> bool:
    raw = _raw(name)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ImproperlyConfiguredEnv(name, raw, "one of 1/0, true/false, yes/no, on/off")


def env_list(name: str, default: Sequence[str]) -> list[str]:
    raw = _raw(name)
    if raw is None:
        return list(default)
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_choice(name: str, default: str, choices: Sequence[str]) -> str:
    value = env_str(name, default)
    if value not in choices:
        raise ImproperlyConfiguredEnv(name, value, "one of " + ", ".join(choices))
    return value
