"""Bad input, said in one sentence: `ConfigError`, the value checks every option's own `check`
is written with, and the readers of values several options share (the depth). The lowest layer: it
imports nothing from dlntorch, so every module
(options, config, the loop) can raise and check downward."""
from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """A configuration value outside what is allowed; the message is one sentence."""


def show(value: Any) -> str:
    """A value as the user typed it: 0 not 0.0, 'text' quoted, lists plain."""
    if isinstance(value, float):
        return f"{value:g}"
    if not isinstance(value, str) and hasattr(value, "__iter__"):   # lists, ListConfig
        return str(list(value))
    return repr(value)


def fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={show(value)} is not allowed: {allowed}.")


def one_of(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        fail(key, value, "choose one of " + ", ".join(choices))


def positive_finite(key: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        fail(key, value, "it must be a finite number > 0")


def non_negative_finite(key: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        fail(key, value, "it must be a finite number ≥ 0")


def at_least(key: str, value: Any, low: int) -> None:
    if not (isinstance(value, int) and value >= low):
        fail(key, value, f"it must be an integer ≥ {low}")


# -- values several options read ------------------------------------------------------------

def resolve_depth(model: Any) -> int:
    """N of `cfg.model`: len(widths) − 1, else model.depth, else 3."""
    if model.widths is not None:
        depth = len(model.widths) - 1
        if model.depth is not None and model.depth != depth:
            fail("model.depth", model.depth,
                 f"it must match model.widths={list(model.widths)} (depth {depth}) or be left unset")
        return depth
    return 3 if model.depth is None else int(model.depth)


def parse_depth(value: Any) -> float:
    """optim.depth: an integer ≥ 1 or 'inf'."""
    if isinstance(value, str) and value.strip().lower() in ("inf", "infinity"):
        return math.inf
    try:
        depth = int(value)
    except (TypeError, ValueError):
        depth = 0
    if depth < 1 or str(value).strip() not in (str(depth), f"{depth}.0"):
        fail("optim.depth", value, "it must be an integer ≥ 1 or inf")
    return depth
