"""The four private interfaces of other libraries that dlntorch leans on, named in one place.

Each is used only where the library's version is one it was tested with and the private name
exists; otherwise dlntorch takes the public path, slower but the same result:

- `SummaryWriter._get_file_writer()` — the writer add_scalar itself writes through; dlntorch
  hands it ONE Summary record per logged row. Public path: `add_scalar` per tag (same events,
  one record each).
- `tensorboard.summary.writer.record_writer.masked_crc32c` — replaced process-wide by a C
  implementation (google-crc32c; same value). Public path: TensorBoard's own pure-Python CRC.
- `Tensor._version` — the in-place counter that tells the fast path's replica-last copy of the
  factors whether anything else changed them. Public path: refresh the copy on every call.
- `torch._disable_dynamo`'s per-function cache `__dynamo_disable` — filled for torch.optim's
  Optimizer methods so that their first call does not import torch._dynamo (seconds, more than
  torch itself) merely to mark them "not to be compiled" in a process that never compiles; once
  anything imports torch._dynamo (torch.compile does), they take torch's own path. Public path:
  the import, on the first optimizer built.
"""
from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Any

# (major, minor) ranges, inclusive, that the private paths were tested with
TESTED = {"torch": ((2, 0), (2, 13)), "tensorboard": ((2, 0), (2, 21))}


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


def tested(library: str, version: str) -> bool:
    """Whether `version` of `library` lies in the range the private path was tested with."""
    low, high = TESTED[library]
    found = _major_minor(version)
    return found is not None and low <= found <= high


def _version_of(module_name: str) -> str:
    module = __import__(module_name)
    return getattr(module, "__version__", "")


# -- SummaryWriter._get_file_writer -------------------------------------------------------

def file_writer(writer: Any) -> Any | None:
    """The SummaryWriter's file writer (add_summary(summary, step)), or None: use add_scalar."""
    get = getattr(writer, "_get_file_writer", None)
    if get is None or not tested("tensorboard", _version_of("tensorboard")):
        return None
    return get()


# -- TensorBoard's record CRC -------------------------------------------------------------

def install_event_checksums(crc: Callable[[bytes], int]) -> bool:
    """Make TensorBoard's event writer use `crc` for TFRecord checksums. Returns whether it did:
    False (TensorBoard keeps its own) when the attribute or google-crc32c is missing or the
    version is untested."""
    try:
        import google_crc32c  # noqa: F401 — crc needs it
        from tensorboard.summary.writer import record_writer
    except ImportError:
        return False
    if not hasattr(record_writer, "masked_crc32c") or not tested("tensorboard", _version_of("tensorboard")):
        return False
    record_writer.masked_crc32c = crc
    return True


# -- Tensor._version ----------------------------------------------------------------------

class _Unknown:
    """A version that equals nothing, not even itself: the copy is always refreshed."""

    def __eq__(self, other: object) -> bool:
        return False

    __hash__ = None  # type: ignore[assignment]


def _torch_tested() -> bool:
    import torch
    return tested("torch", torch.__version__)


TRACK_VERSIONS: bool | None = None   # decided on first use


def tensor_version(tensor: Any) -> Any:
    """The tensor's in-place version counter, or a value equal to nothing where it cannot be read."""
    global TRACK_VERSIONS
    if TRACK_VERSIONS is None:
        TRACK_VERSIONS = _torch_tested()
    if not TRACK_VERSIONS:
        return _Unknown()
    version = getattr(tensor, "_version", None)
    return _Unknown() if version is None else version


# -- torch._disable_dynamo ------------------------------------------------------------------

DYNAMO_DEFERRED = False


def _deferred_disable(fn: Callable, recursive: bool) -> Callable:
    """`fn` called as it is while torch._dynamo is not imported (nothing can be compiling it),
    torch._dynamo.disable(fn) once it is: the same call torch's wrapper makes, made later."""
    def call(*args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        import torch._dynamo
        disabled = torch._dynamo.disable(fn, recursive, wrapping=False)
        fn.__dynamo_disable = disabled
        return disabled(*args, **kwargs)
    return call


def defer_dynamo_import() -> bool:
    """Let torch.optim.Optimizer's dynamo-disabled methods (add_param_group, state_dict,
    load_state_dict, zero_grad, …) run without importing torch._dynamo until something else
    imports it. Returns whether it did: False where torch's version is untested or its wrapper
    is not the one known (then the first optimizer pays the import)."""
    global DYNAMO_DEFERRED
    if DYNAMO_DEFERRED:
        return True
    import torch
    if not _torch_tested() or not hasattr(torch, "_disable_dynamo"):
        return False
    wrapper_code = torch._disable_dynamo(lambda: None).__code__
    for method in vars(torch.optim.Optimizer).values():
        fn = getattr(method, "__wrapped__", None)
        if getattr(method, "__code__", None) is not wrapper_code or fn is None:
            continue
        cells = dict(zip(method.__code__.co_freevars, (c.cell_contents for c in method.__closure__ or ())))
        if getattr(fn, "__dynamo_disable", None) is None and isinstance(cells.get("recursive"), bool):
            fn.__dynamo_disable = _deferred_disable(fn, cells["recursive"])
    DYNAMO_DEFERRED = True
    return True
