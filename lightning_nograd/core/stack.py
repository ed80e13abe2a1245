"""Reads the Python call stack to name the hook a finding happened in.

Used only once something was found, never on the hot path of a clean run.
"""

from __future__ import annotations

import sys
from types import FrameType


def calling_hook(frame: FrameType | None, hook_names: frozenset[str]) -> str | None:
    """Name of the innermost function on the stack (from ``frame`` outwards) that is a hook.

    Examples:
        >>> def validation_step():
        ...     return calling_hook(None, frozenset({"validation_step"}))
        >>> validation_step()
        'validation_step'
    """
    if frame is None:
        frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name in hook_names:
            return frame.f_code.co_name
        frame = frame.f_back
    return None
