"""The one place that reads the Python call stack.

Used to name the hook a finding happened in, to point a warning at the user's line, and by the few checks
that must know what called them (a reentrant checkpoint, a module's call, the trainer of a framework that
does not pass itself to its callbacks). Never on the hot path of a clean run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from types import CodeType, FrameType
from typing import Any


def caller(depth: int = 1) -> FrameType:
    """The frame ``depth`` levels above the function that calls this (1: that function's caller)."""
    return sys._getframe(depth + 1)


def outward(frame: FrameType | None) -> Iterator[FrameType]:
    """``frame`` and every frame that called it, innermost first."""
    while frame is not None:
        yield frame
        frame = frame.f_back


def calling_hook(frame: FrameType | None, hook_names: frozenset[str]) -> str | None:
    """Name of the innermost function on the stack (from ``frame`` outwards) that is a hook.

    Examples:
        >>> def validation_step():
        ...     return calling_hook(None, frozenset({"validation_step"}))
        >>> validation_step()
        'validation_step'
    """
    for outer in outward(frame if frame is not None else caller()):
        if outer.f_code.co_name in hook_names:
            return outer.f_code.co_name
    return None


def frame_running(code: CodeType, frame: FrameType | None = None) -> FrameType | None:
    """The innermost frame (from ``frame``, default: the caller's) running ``code``."""
    return next((f for f in outward(frame if frame is not None else caller()) if f.f_code is code), None)


def running_function(path_suffix: str, name: str) -> bool:
    """Whether a function called ``name`` defined in a file whose path ends with ``path_suffix`` is on the stack.

    Examples:
        >>> running_function("doctest.py", "run")
        True
    """
    return any(f.f_code.co_name == name and f.f_code.co_filename.endswith(path_suffix) for f in outward(caller()))


def innermost_self(accepts: Callable[[Any], bool]) -> Any:
    """The ``self`` of the innermost method on the stack for which ``accepts`` is true (``None``: none)."""
    for frame in outward(caller()):
        candidate = frame.f_locals.get("self")
        if candidate is not None and accepts(candidate):
            return candidate
    return None
