"""Arrays from files (.npz or .pt): what `task.file` and `init.file` read. Low in the house:
tasks and initial conditions import it downward."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError


def load_arrays(path: str, key: str) -> dict[str, Tensor]:
    """The named arrays of a .npz or .pt file (a dict of tensors); `key` names the config key in
    the one sentence a missing or unreadable file gets."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{key}={path!r} is not allowed: no such file.")
    try:
        if file.suffix == ".npz":
            with np.load(file) as data:
                return {k: torch.as_tensor(data[k]) for k in data.files}
        arrays = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(arrays, dict):
            raise TypeError("not a dict of tensors")
        return {k: torch.as_tensor(v) for k, v in arrays.items()}
    except Exception as error:  # noqa: BLE001 — any unreadable file gets the same sentence
        raise ConfigError(f"{key}={path!r} is not allowed: it could not be read as .npz or .pt ({error}).") from error


def load_completion_file(path: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """`mask` and `values` (and optionally `truth`) from a .npz or .pt file."""
    arrays = load_arrays(path, "task.file")
    if "mask" not in arrays or "values" not in arrays:
        raise ConfigError(f"task.file={path!r} is not allowed: it must hold arrays named 'mask' and 'values' "
                          f"(found {sorted(arrays)}).")
    mask, values, truth = arrays["mask"], arrays["values"], arrays.get("truth")
    if mask.ndim != 2 or mask.shape != values.shape or (truth is not None and truth.shape != mask.shape):
        shapes = f"mask {tuple(mask.shape)}, values {tuple(values.shape)}" + (
            "" if truth is None else f", truth {tuple(truth.shape)}")
        raise ConfigError(f"task.file={path!r} is not allowed: mask and values must be matrices of one shape "
                          f"({shapes}).")
    if not mask.to(torch.bool).any():
        raise ConfigError(f"task.file={path!r} is not allowed: its mask observes no entry.")
    to64 = lambda a: None if a is None else a.to(torch.float64)  # noqa: E731
    return mask.to(torch.bool), to64(values), to64(truth)


def load_sensing_file(path: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """`sensors` A_k (K, m, n) and `values` y (K,) (and optionally `truth` (m, n)) from a .npz or
    .pt file: the measurements y_k = ⟨A_k, W*⟩ (+ noise) of task=sensing."""
    arrays = load_arrays(path, "task.file")
    if "sensors" not in arrays or "values" not in arrays:
        raise ConfigError(f"task.file={path!r} is not allowed: task=sensing needs arrays named 'sensors' (K, m, n) "
                          f"and 'values' (K,) (found {sorted(arrays)}).")
    sensors, values, truth = arrays["sensors"], arrays["values"], arrays.get("truth")
    if sensors.ndim != 3 or sensors.shape[0] < 1 or values.shape != sensors.shape[:1] or \
            (truth is not None and truth.shape != sensors.shape[1:]):
        shapes = f"sensors {tuple(sensors.shape)}, values {tuple(values.shape)}" + (
            "" if truth is None else f", truth {tuple(truth.shape)}")
        raise ConfigError(f"task.file={path!r} is not allowed: sensors must be (K, m, n) with K ≥ 1, values (K,) "
                          f"and truth (m, n) ({shapes}).")
    if not (torch.isfinite(sensors).all() and torch.isfinite(values).all()):
        raise ConfigError(f"task.file={path!r} is not allowed: its sensors and values must be finite.")
    to64 = lambda a: None if a is None else a.to(torch.float64)  # noqa: E731
    return to64(sensors), to64(values), to64(truth)
