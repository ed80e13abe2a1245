"""Time and memory measurement: epoch clocks, epoch peak memory, exact peak of one call.

Framework-free. CUDA is synchronised before every clock read on a CUDA device.
"""

from __future__ import annotations

import os
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import torch

from lightning_nograd.core.checks.tensors import MIB, storage_key
from lightning_nograd.core.plumbing import torch_internals
from lightning_nograd.core.plumbing.torch_internals import MissingTorchInternal, tree_leaves


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work so a clock read means what it says."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


SETTLED_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
"""glibc malloc settings that keep freed memory in the process (32 MiB is glibc's largest mmap threshold)."""

_CACHING_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def cpu_timing_caveat(environ: dict[str, str] | None = None) -> str | None:
    """Why CPU time measurements in this process may swing from run to run, or ``None``.

    With glibc's default, adaptive malloc thresholds, memory freed by one batch goes back to the
    kernel and the next batch page-faults it in again; how often depends on the allocator's
    history, so the same forward can take 1-2x as long from one run to the next (see the
    docs' Benchmarks page). Both thresholds fixed (environment variables or ``GLIBC_TUNABLES``),
    or a caching allocator preloaded, settles it.

    Examples:
        >>> cpu_timing_caveat({"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"})
        >>> cpu_timing_caveat({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})
    """
    import os
    import platform
    import sys

    env = os.environ if environ is None else environ
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    if any(name in env.get("LD_PRELOAD", "") for name in _CACHING_ALLOCATORS):
        return None
    tunables = env.get("GLIBC_TUNABLES", "")
    if all(name in env for name in SETTLED_MALLOC_ENV) or (
        "glibc.malloc.mmap_threshold" in tunables and "glibc.malloc.trim_threshold" in tunables
    ):
        return None
    settings = " ".join(f"{k}={v}" for k, v in SETTLED_MALLOC_ENV.items())
    return (
        "CPU times were measured with glibc's default malloc thresholds, under which the same "
        "forward's time swings from run to run (by 10 points or more of time saved, in our "
        f"benchmarks); for stable figures run with {settings}"
    )


class EpochClock:
    """Wall time of an epoch, excluding the time spent in pauses (our own replays).

    Examples:
        >>> clock = EpochClock(torch.device("cpu"))
        >>> clock.start(); clock.pause(); clock.resume()
        >>> clock.stop() >= 0
        True
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._started = 0.0
        self._paused_at: float | None = None
        self._paused_total = 0.0

    def start(self) -> None:
        synchronize(self.device)
        self._started = time.perf_counter()
        self._paused_total = 0.0
        self._paused_at = None

    def pause(self) -> None:
        synchronize(self.device)
        self._paused_at = time.perf_counter()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._paused_total += time.perf_counter() - self._paused_at
            self._paused_at = None

    def stop(self) -> float:
        """Seconds since ``start``, minus pauses."""
        synchronize(self.device)
        return time.perf_counter() - self._started - self._paused_total


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _read_hwm_bytes() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class EpochPeakMemory:
    """Peak memory of an epoch: the CUDA allocator peak on GPU, the peak process RSS on CPU.

    On Linux the kernel's RSS high-water mark is reset at epoch start (``/proc/self/clear_refs``);
    elsewhere the RSS is sampled at every ``sample`` call. Our own replays are excluded:
    ``pause`` banks the peak so far and ``resume`` resets the counter.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._banked = 0
        self._hwm = False
        # the peak comes from `sample` calls (CPU, where the kernel's peak cannot be read); an attribute,
        # read every batch
        self.sampled = device.type != "cuda"

    def start(self) -> None:
        self._banked = 0
        self._reset()

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._hwm = _reset_hwm() and _read_hwm_bytes() is not None
            self.sampled = not self._hwm
            self._banked = max(self._banked, self._rss())

    def _rss(self) -> int:
        # a Process made per reading, not kept: it holds a lock, and the callbacks must pickle at any time
        return int(psutil.Process().memory_info().rss)

    def _current_peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self._hwm:
            return _read_hwm_bytes() or self._rss()
        return self._rss()

    def sample(self) -> None:
        """Take an RSS sample where the kernel peak cannot be read (cheap; CPU only)."""
        if self.sampled:
            self._banked = max(self._banked, self._rss())

    def pause(self) -> None:
        self._banked = max(self._banked, self._current_peak())

    def resume(self) -> None:
        self._reset()

    def peak_mib(self) -> float:
        return max(self._banked, self._current_peak()) / MIB


class EpochMeasures:
    """An epoch's wall time and peak memory, with our own work (the replays) kept out of both.

    Examples:
        >>> measures = EpochMeasures(torch.device("cpu"))
        >>> measures.start()
        >>> with measures.paused():
        ...     pass
        >>> seconds, peak_mib = measures.stop()
        >>> seconds >= 0 and peak_mib > 0
        True
    """

    def __init__(self, device: torch.device) -> None:
        self.clock = EpochClock(device)
        self.memory = EpochPeakMemory(device)

    def start(self) -> None:
        self.memory.start()
        self.clock.start()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Neither the time nor the memory of the block counts for the epoch."""
        self.clock.pause()
        self.memory.pause()
        try:
            yield
        finally:
            self.memory.resume()
            self.clock.resume()

    def stop(self) -> tuple[float, float]:
        """The epoch's seconds and peak MiB, pauses left out."""
        return self.clock.stop(), self.memory.peak_mib()


class LiveTensorMemory(torch_internals.LiveTensorMemoryBase):  # type: ignore[misc,no-untyped-call]
    """Exact peak of the bytes of tensor storages created while active, freed ones subtracted.

    Repeatable where process RSS is not: it counts storages, not pages.

    Examples:
        >>> with LiveTensorMemory() as memory:
        ...     a = torch.ones(256)  # 1 KiB
        ...     b = a * 2
        ...     del a, b
        ...     c = torch.ones(128)
        >>> memory.peak_bytes
        2048
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.current_bytes = 0
        self.peak_bytes = 0
        self._live: set[tuple[str, int]] = set()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf, inputs)
        return out

    def _track(self, tensor: torch.Tensor, inputs: set[tuple[str, int]]) -> None:
        storage = tensor.untyped_storage()
        key = storage_key(tensor)
        nbytes = int(storage.nbytes())
        if key in self._live or key in inputs or nbytes == 0:
            return  # a view or an in-place result: no new memory
        self._live.add(key)
        self.current_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: tuple[str, int], nbytes: int) -> None:
        if key in self._live:
            self._live.discard(key)
            self.current_bytes -= nbytes


@contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send the process's own stderr (file descriptor 2) to the null device while active.

    The profiler prints two lines to it from C++ on every start and stop (``USDT: ...
    profiler_start``, torch 2.13), which would appear in the user's console; only those two calls
    run inside this, never user code.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def profiler_available() -> bool:
    """Whether ``allocator_peak_bytes`` can run: no profiler of the user's is active (and this
    torch can tell)."""
    return torch_internals.allocator_events_usable()


def allocator_peak_bytes(run: Callable[[], Any]) -> int:
    """Peak bytes the CPU allocator handed out during ``run()``, above what was allocated before.

    From the allocation events of PyTorch's profiler (``profile_memory=True``, the legacy
    collector: no Kineto start-up, nothing recorded but ops and allocations), which see what
    kernels allocate inside (convolution columns, attention buffers, recurrent workspaces) as
    well as the tensors ops return. Whatever ``run`` returns is dropped inside the window.

    Examples:
        >>> def run():
        ...     a = torch.ones(256)  # 1 KiB
        ...     b = a * 2
        ...     del a, b
        ...     return torch.ones(128)
        >>> allocator_peak_bytes(run) // 1024  # KiB
        2
    """
    profiler: Any = torch.autograd.profiler.profile(use_kineto=False, profile_memory=True)
    with _native_stderr_silenced():
        profiler.__enter__()
    try:
        result = run()
        del result
    finally:
        with _native_stderr_silenced():
            profiler.__exit__(None, None, None)
    events = torch_internals.cpu_memory_events(profiler)
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += int(event.nbytes())
        peak = max(peak, current)
    return peak


def peak_bytes_of(run: Callable[[], Any], device: torch.device) -> int:
    """Peak memory that ``run()`` needs above what was allocated before it (exact).

    CUDA: allocator peak; CPU: the allocator's own events (``allocator_peak_bytes``), or
    ``LiveTensorMemory`` (tensors that ops return) while a profiler of the user's is active or on
    a torch without the allocator's events (``lightning_nograd.core.plumbing.torch_internals``).
    Whatever ``run`` returns is dropped before the measurement ends, as a step's graph would be.
    """
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = run()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return int(peak)
    if profiler_available():
        return allocator_peak_bytes(run)
    if torch_internals.LiveTensorMemoryBase is object:
        raise MissingTorchInternal(torch_internals.describe("dispatch_mode"))
    with LiveTensorMemory() as memory:
        result = run()
        del result
    return int(memory.peak_bytes)
