"""Shared timing helpers: interleaved A/B statistics and a callback's own time in its hooks."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

from lightning_nograd.core.savings.epoch_measures import SETTLED_MALLOC_ENV

HOOK_PREFIXES = ("on_", "setup", "teardown")


def time_own_hooks(callback: Any) -> list[float]:
    """Wrap every Lightning hook of ``callback`` so the seconds spent inside are added up.

    Returns a one-element list that holds the running total. In a clean run the lightning-nograd
    callbacks install no module hooks, so this is all the time they add to the run. A hook the
    callback binds on itself during ``setup`` (``NoGradAuditor`` hands each per-batch hook straight to
    its parts there, replacing the wrapper) is wrapped again once ``setup`` returns.
    """
    total = [0.0]
    wrappers: set[int] = set()

    def wrap(name: str) -> None:
        method = getattr(callback, name)

        def timed(*args: Any, __method: Callable[..., Any] = method, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return __method(*args, **kwargs)
            finally:
                total[0] += time.perf_counter() - start

        wrapper = functools.wraps(method)(timed)
        wrappers.add(id(wrapper))
        setattr(callback, name, wrapper)

    names = [
        name
        for name in dir(type(callback))
        if name.startswith(HOOK_PREFIXES)
        and not name.startswith("on_save")
        and name != "on_load_checkpoint"
        and callable(getattr(callback, name))
    ]
    for name in names:
        wrap(name)
    timed_setup = callback.setup

    def setup(*args: Any, **kwargs: Any) -> Any:
        try:
            return timed_setup(*args, **kwargs)
        finally:
            for name in names:
                if name in vars(callback) and id(vars(callback)[name]) not in wrappers:
                    wrap(name)  # bound during setup: time it too

    callback.setup = setup
    return total


def summarise(ratios: list[float]) -> dict[str, float]:
    """Median and interquartile range of paired ratios."""
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"ratio_median": statistics.median(ratios), "ratio_q1": quartiles[0], "ratio_q3": quartiles[2]}


# glibc's malloc returns freed memory to the kernel and maps it afresh: with its default, adaptive
# thresholds, every few batches' tensors page-fault again. Measured on the ResNet here: ms per
# grad-enabled forward 11-46 depending on the thresholds, "time saved by no_grad" anywhere from
# -11% to +59% between runs, most of the time spent in the kernel. Fixing both thresholds keeps
# freed memory in the process, as PyTorch's CUDA caching allocator does on a GPU. SavingsMonitor
# notes the same (``cpu_timing_caveat``) when a user's run has not fixed them.


def in_fresh_process(module: str, *args: str, settled_allocator: bool = True) -> Any:
    """Run ``python -m module *args --json`` and return its JSON output.

    Each model is measured in a new process: on CPU, the allocator's state after one model's
    runs changes the next model's timings (measured here: a ResNet's no_grad epochs went from
    0.35 s to 0.75 s after an MLP had run in the same process). With ``settled_allocator`` (the
    default) the process runs with ``SETTLED_MALLOC_ENV``'s glibc thresholds; without, with
    whatever this process has (the default allocator, unless the caller set them).
    """
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    if settled_allocator:
        env.update(SETTLED_MALLOC_ENV)
    else:
        for name in SETTLED_MALLOC_ENV:
            env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", module, *args, "--json"], capture_output=True, text=True, check=False, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
