"""Shared timing helpers: interleaved A/B statistics and a callback's own time in its hooks."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

HOOK_PREFIXES = ("on_", "setup", "teardown")


def time_own_hooks(callback: Any) -> list[float]:
    """Wrap every Lightning hook of ``callback`` so the seconds spent inside are added up.

    Returns a one-element list that holds the running total. In a clean run the lightning-nograd
    callbacks install no module hooks, so this is all the time they add to the run.
    """
    total = [0.0]
    for name in dir(type(callback)):
        if not name.startswith(HOOK_PREFIXES) or name.startswith("on_save") or name == "on_load_checkpoint":
            continue
        method = getattr(callback, name)
        if not callable(method):
            continue

        def timed(*args: Any, __method: Callable[..., Any] = method, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return __method(*args, **kwargs)
            finally:
                total[0] += time.perf_counter() - start

        setattr(callback, name, functools.wraps(method)(timed))
    return total


def summarise(ratios: list[float]) -> dict[str, float]:
    """Median and interquartile range of paired ratios."""
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"ratio_median": statistics.median(ratios), "ratio_q1": quartiles[0], "ratio_q3": quartiles[2]}
