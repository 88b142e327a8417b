"""Named options registered where they are defined (torchdiffeq's SOLVERS, as a small class).

A module owns a `Registry` and registers each of its options next to its code; config.py derives
the allowed names and calls each option's `check` from it, so adding a task, an initial
condition, an optimiser or a noise model touches its own module, its YAML and its test.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import ConfigError


@dataclass(frozen=True)
class Option:
    """One registered option: what builds it, what checks its values (check(cfg) with the whole
    config, raising ConfigError), its structured config where it has one of its own, and extras."""
    name: str
    build: Any
    check: Optional[Callable[[Any], None]] = None
    schema: Optional[type] = None
    extra: dict[str, Any] = field(default_factory=dict)


class Registry:
    """name → Option for one config key (e.g. "task.name")."""

    def __init__(self, key: str):
        self.key = key
        self.options: dict[str, Option] = {}

    def register(self, name: str, *, check: Callable | None = None, schema: type | None = None,
                 **extra: Any) -> Callable:
        """Decorator: `@TASKS.register("seed2x2", check=...)` above the builder."""
        def add(build: Any) -> Any:
            self.options[name] = Option(name, build, check, schema, extra)
            return build
        return add

    def unregister(self, name: str) -> None:
        self.options.pop(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(self.options)

    def __contains__(self, name: object) -> bool:
        return name in self.options

    def __getitem__(self, name: str) -> Option:
        if name not in self.options:
            raise ConfigError(f"{self.key}={name!r} is not allowed: choose one of {', '.join(self.options)}.")
        return self.options[name]
