"""The replay that measures what disabling gradients saves, on the user's own model and data.

``CallRecorder`` records, during one evaluation batch, the outermost calls of the modules
that do the model's work (modules with parameters; not metrics, not parameter-free layers) with
their inputs. ``replay`` then runs exactly those calls again with gradients on and off,
interleaved and repeated, in eval mode, with RNG state restored, and measures time, graph bytes
and peak memory. No user hook or step is re-run.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from math import comb
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_nograd.core.counters import mode_switches
from lightning_nograd.core.faults import Probe, isolated
from lightning_nograd.core.graph import HUB, MIB, storage_bytes, storage_key
from lightning_nograd.core.measure import cpu_timing_caveat, peak_bytes_of, synchronize
from lightning_nograd.core.torch_internals import (
    UserHooksOff,
    eager_module,
    register_forward_hook_with_kwargs,
    tree_map,
)


@dataclass
class RecordedCall:
    """One module call: the module, its inputs, the grad mode and autocast it ran under."""

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    inference_mode: bool
    autocast: tuple[str, torch.dtype] | None = None
    compiled: bool = False
    """The call went through a ``torch.compile`` wrapper; ``module`` is the eager module behind it."""

    @classmethod
    def of(cls, module: nn.Module, args: Any, kwargs: Any) -> RecordedCall:
        """The call of ``module`` that is running now: its eager module, inputs, grad mode and autocast."""
        eager = eager_module(module)
        return cls(
            eager,
            tuple(args),
            dict(kwargs),
            torch.is_inference_mode_enabled(),
            current_autocast(),
            compiled=eager is not module,
        )


EAGER_REPLAY_NOTE = (
    "compiled modules were replayed eagerly (their `_orig_mod`): the figures are those of the eager forward, "
    "and the compiled code is never run by the replay"
)


def current_autocast() -> tuple[str, torch.dtype] | None:
    """The active autocast (device type, dtype), if any: mixed precision must be replayed as run."""
    for device_type in ("cuda", "cpu"):
        if torch.is_autocast_enabled(device_type):
            return device_type, torch.get_autocast_dtype(device_type)
    return None


def is_work_module(module: nn.Module, excluded: tuple[type, ...] = ()) -> bool:
    """Whether ``module`` does model work worth replaying: it has parameters and is not excluded."""
    if excluded and isinstance(module, excluded):
        return False
    return any(True for _ in module.parameters())


def call_hooks(
    probe: Probe,
    pre: Callable[[nn.Module, Any], None],
    post: Callable[[nn.Module, Any, dict[str, Any] | None, Any], None],
) -> list[RemovableHandle]:
    """Global hooks around every module call, isolated as ``probe``'s: ``pre(module, args)`` and
    ``post(module, args, kwargs, output)``, the latter also when the forward raises (``output`` None).
    ``kwargs`` is ``None`` where they are not known: the forward raised, or they cannot be read
    (see ``lightning_nograd.core.torch_internals.register_forward_hook_with_kwargs``).

    Global hooks, unlike per-module ones, leave fused kernels (``nn.TransformerEncoderLayer``) on.
    """

    def after(module: nn.Module, args: Any, kwargs: Any = None, output: Any = None) -> None:
        # when a forward raises, PyTorch calls always-called global hooks as (module, args, None)
        post(module, args, kwargs if isinstance(kwargs, dict) else None, output)

    return [
        nn.modules.module.register_module_forward_pre_hook(isolated(pre, probe)),
        register_forward_hook_with_kwargs(after, lambda hook: isolated(hook, probe)),
    ]


class CallRecorder(Probe):
    """Records the outermost calls of ``candidates`` while active (global hooks, so fused paths stay on).

    Args:
        candidates: the modules whose calls may be recorded (by ``id``).

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> recorder = CallRecorder({id(m) for m in (net, net[0], net[2])})
        >>> recorder.start()
        >>> with torch.no_grad():
        ...     _ = net(torch.ones(4, 2))
        >>> recorder.stop()
        >>> [type(c.module).__name__ for c in recorder.calls]
        ['Sequential']
    """

    def __init__(self, candidates: set[int], on_error: Callable[[BaseException], None] | None = None) -> None:
        self.on_error = on_error
        self.candidates = candidates
        self.calls: list[RecordedCall] = []
        self._active: int | None = None
        self._handles: list[RemovableHandle] = []

    def start(self) -> None:
        if not self._handles:
            self._handles = call_hooks(self, self._pre, self._post)

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._active = None

    def _pre(self, module: nn.Module, args: Any) -> None:
        if self._active is None and id(module) in self.candidates:
            self._active = id(module)

    def _post(self, module: nn.Module, args: Any, kwargs: dict[str, Any] | None, output: Any) -> None:
        if self._active == id(module):
            self._active = None
            if kwargs is not None:  # a call whose keyword arguments are not known cannot be replayed
                self.calls.append(RecordedCall.of(module, args, kwargs))


def _clone_inference(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_inference():
        with torch.inference_mode(False):
            return value.clone()
    return value


def replayable(calls: Iterable[RecordedCall]) -> list[RecordedCall]:
    """Calls whose inference-mode inputs are cloned, so a grad-enabled replay can use them."""
    return [
        RecordedCall(
            c.module,
            tree_map(_clone_inference, c.args),
            tree_map(_clone_inference, c.kwargs),
            c.inference_mode,
            c.autocast,
            c.compiled,
        )
        for c in calls
    ]


@dataclass
class ReplayResult:
    """Per-batch measurements of a replay. Times are seconds for all recorded calls of one batch."""

    time_on: list[float] = field(default_factory=list)
    time_off: list[float] = field(default_factory=list)
    graph_bytes: int = 0
    peak_on_bytes: int = 0
    peak_off_bytes: int = 0
    out_of_memory: bool = False

    @property
    def differences(self) -> list[float]:
        """Paired (grad on - grad off) differences, one per repeat."""
        return [a - b for a, b in zip(self.time_on, self.time_off, strict=True)]

    @property
    def saved_per_batch(self) -> float:
        """Mean time one batch saves by running without gradients (over every pair taken so far)."""
        return statistics.fmean(self.differences) if self.time_on else 0.0

    @property
    def half_width(self) -> float | None:
        """Half-width of the 95% interval of ``saved_per_batch`` (Student's t over the paired
        differences); ``None`` with fewer than two pairs.

        Examples:
            >>> result = ReplayResult(time_on=[3.0, 5.0, 4.0], time_off=[1.0, 1.0, 1.0])
            >>> result.saved_per_batch, round(result.half_width, 3)  # mean 3, sd 1, t(2) = 4.303
            (3.0, 2.484)
        """
        n = len(self.time_on)
        if n < 2:
            return None
        return t_quantile_95(n - 1) * statistics.stdev(self.differences) / math.sqrt(n)

    @property
    def spread(self) -> tuple[float, float]:
        """Interquartile range of the paired differences (seconds per batch)."""
        diffs = self.differences
        if len(diffs) < 2:
            return (diffs[0], diffs[0]) if diffs else (0.0, 0.0)
        q1, _, q3 = statistics.quantiles(diffs, n=4)
        return (q1, q3)

    @property
    def sign_test_p(self) -> float:
        """Two-sided sign-test p-value that grad on and off take the same time."""
        diffs = [d for d in self.differences if d != 0]
        n = len(diffs)
        if n == 0:
            return 1.0
        k = min(sum(d > 0 for d in diffs), sum(d < 0 for d in diffs))
        return float(min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n))

    def within_noise(self) -> bool:
        """Whether the saving cannot be told from noise: its 95% interval straddles 0 (or is unknown)."""
        half_width = self.half_width
        return half_width is None or abs(self.saved_per_batch) <= half_width

    @classmethod
    def merge(cls, results: list[ReplayResult]) -> ReplayResult:
        """One per-batch result from several replayed batches: their means, pair by pair.

        Examples:
            >>> a = ReplayResult(time_on=[3.0, 5.0], time_off=[1.0, 1.0], graph_bytes=10)
            >>> b = ReplayResult(time_on=[5.0], time_off=[3.0], graph_bytes=20)
            >>> merged = ReplayResult.merge([a, b])
            >>> merged.time_on, merged.time_off, merged.graph_bytes
            ([4.0], [2.0], 15)
        """
        if len(results) == 1:
            return results[0]
        n = len(results)
        pairs = min(len(r.time_on) for r in results)
        return cls(
            time_on=[sum(r.time_on[i] for r in results) / n for i in range(pairs)],
            time_off=[sum(r.time_off[i] for r in results) / n for i in range(pairs)],
            graph_bytes=sum(r.graph_bytes for r in results) // n,
            peak_on_bytes=sum(r.peak_on_bytes for r in results) // n,
            peak_off_bytes=sum(r.peak_off_bytes for r in results) // n,
            out_of_memory=any(r.out_of_memory for r in results),
        )


def time_savings(result: ReplayResult, batches: int, epoch_seconds: float) -> tuple[dict[str, float], dict[str, Any]]:
    """``time_saved_s``, ``time_saved_pct`` and ``time_saved_pct_err`` of an epoch of ``batches``, and the
    details behind them.

    The saving per batch is the mean of every paired difference taken so far (a running estimate that
    narrows as pairs accumulate); ``time_saved_pct_err`` is the half-width of its 95% interval, as
    points of the same percentage. Logged also when the interval straddles 0 (a chart with holes reads
    as a bug): the details then say the saving is within noise.

    Examples:
        >>> result = ReplayResult(time_on=[0.004, 0.005, 0.004, 0.005], time_off=[0.001] * 4)
        >>> metrics, details = time_savings(result, batches=10, epoch_seconds=0.07)
        >>> round(metrics["time_saved_s"], 3), round(metrics["time_saved_pct"], 1), details["savings"]
        (0.035, 33.3, 'measured')
        >>> round(metrics["time_saved_pct_err"], 1)  # the 95% interval: 33.3 +- 8.7 points
        8.7
    """
    saved = result.saved_per_batch * batches
    total = epoch_seconds + saved
    metrics = {"time_saved_s": saved, "time_saved_pct": 100.0 * saved / total if total > 0 else 0.0}
    half_width = result.half_width
    if half_width is not None:
        metrics["time_saved_pct_err"] = 100.0 * half_width * batches / total if total > 0 else 0.0
    low, high = result.spread
    details: dict[str, Any] = {
        "time_saved_per_batch_s": result.saved_per_batch,
        "time_saved_per_batch_iqr_s": [low, high],
        "sign_test_p": result.sign_test_p,
        "within_noise": result.within_noise(),
        "savings": "measured",
    }
    if result.within_noise():
        interval = "" if half_width is None else f", 95% interval {half_width * 1e3:.3f} ms either side"
        details["savings"] = (
            f"time difference within noise: {result.saved_per_batch * 1e3:+.3f} ms per batch over "
            f"{len(result.time_on)} pairs{interval} (sign test p={result.sign_test_p:.2f})"
        )
    return metrics, details


def t_quantile_95(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (a 95% two-sided interval).

    Examples:
        >>> t_quantile_95(1), t_quantile_95(5), round(t_quantile_95(60), 3)
        (12.706, 2.571, 2.002)
    """
    if df <= len(_T_95):
        return _T_95[df - 1]
    return 1.96 + 2.5 / df  # within 0.002 of the exact quantile beyond 30 degrees of freedom


# fmt: off
_T_95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)
# fmt: on


def savings_metrics(
    result: ReplayResult, batches: int, epoch_seconds: float, device: torch.device, untimed: str
) -> tuple[dict[str, float], dict[str, Any]]:
    """The savings metrics of one epoch (keys without the ``nograd/{stage}/`` prefix) and their details.

    For ``SavingsMonitor`` and ``audit()`` alike: ``graph_memory_mib``, ``memory_saved_mib`` and,
    once time was measured, ``time_saved_s`` and ``time_saved_pct`` (``time_savings``), with a
    caveat when CPU timings share the cores with other threads. ``untimed`` says why time is missing.

    Examples:
        >>> result = ReplayResult(time_on=[0.004] * 6, time_off=[0.001] * 6, graph_bytes=2**20)
        >>> metrics, _ = savings_metrics(result, 10, 0.07, torch.device("cuda"), "not timed")
        >>> sorted(metrics)
        ['graph_memory_mib', 'memory_saved_mib', 'time_saved_pct', 'time_saved_pct_err', 'time_saved_s']
    """
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    if result.out_of_memory:
        details["savings"] = "with gradients on, a batch does not fit in memory"
        return metrics, details
    metrics["graph_memory_mib"] = result.graph_bytes / MIB
    metrics["memory_saved_mib"] = (result.peak_on_bytes - result.peak_off_bytes) / MIB
    if not result.time_on:
        details["savings"] = untimed
        return metrics, details
    caveat = cpu_timing_caveat() if device.type == "cpu" else None
    if caveat is not None:
        details["timing_caveat"] = caveat
    times, time_details = time_savings(result, batches, epoch_seconds)
    metrics.update(times)
    details.update(time_details)
    return metrics, details


def _run_calls(calls: list[RecordedCall], grad: bool) -> list[Any]:
    outputs = []
    for call in calls:
        precision: contextlib.AbstractContextManager[Any] = (
            torch.autocast(call.autocast[0], dtype=call.autocast[1]) if call.autocast else contextlib.nullcontext()
        )
        with precision:
            outputs.append(_run_call(call, grad))
    return outputs


def _run_call(call: RecordedCall, grad: bool) -> Any:
    if grad:
        with torch.inference_mode(False), torch.enable_grad():
            return call.module(*call.args, **call.kwargs)
    if call.inference_mode:
        with torch.inference_mode():
            return call.module(*call.args, **call.kwargs)
    with torch.no_grad():
        return call.module(*call.args, **call.kwargs)


def graph_bytes_of(calls: list[RecordedCall], exclude: set[tuple[str, int]]) -> int:
    """Bytes autograd saves for backward in one grad-enabled run of ``calls``.

    Each storage is counted once, at its full size; parameters and buffers (``exclude``) are left
    out because they exist anyway.
    """
    seen: dict[tuple[str, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = storage_key(tensor)
        if key not in exclude:
            seen[key] = storage_bytes(tensor)
        # detached: a node holding one of its own outputs would be a cycle through C++ that the garbage
        # collector cannot see, and the whole graph would stay allocated (seen on an H100: gigabytes)
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = _run_calls(calls, grad=True)
    del outputs
    return sum(seen.values())


def _weight_hook_types() -> tuple[type, ...]:
    """PyTorch's hooks that compute a module's weights (pruning masks, old-style weight / spectral norm)."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return (BasePruningMethod, WeightNorm, SpectralNorm)


def torch_runs_the_module(hook: Any, weight_hooks: tuple[type, ...] = ()) -> bool:
    """Whether a module's ``hook`` is part of how PyTorch runs it, not an observer: a weight hook
    (``weight_hooks``), or a hook of ``torch.distributed`` (FSDP2 gathers a module's parameters
    in its forward pre-hook and frees them in its forward hook, tensor parallelism moves inputs
    and outputs between meshes)."""
    if weight_hooks and isinstance(hook, weight_hooks):
        return True
    return str(getattr(hook, "__module__", "") or "").startswith("torch.distributed.")


def _user_hooks_off(roots: list[nn.Module]) -> UserHooksOff:
    """No forward or backward hook of the user's (module-level or global) fires inside the block.

    A replay re-runs module calls: a feature-capture or statistics hook would see them as real
    batches. Only the hooks PyTorch runs the modules with stay (``torch_runs_the_module``).
    """
    weight_hooks = _weight_hook_types()
    modules = {id(m): m for root in roots for m in root.modules()}.values()
    return UserHooksOff(modules, lambda hook: torch_runs_the_module(hook, weight_hooks))


class _EvalModeAndRng:
    """Puts the replayed modules in eval mode and restores modes and RNG state afterwards."""

    def __init__(self, modules: list[nn.Module], device: torch.device) -> None:
        self.modules = modules
        self.device = device
        self._modes: list[tuple[nn.Module, bool]] = []
        self._cpu_rng: torch.Tensor | None = None
        self._cuda_rng: list[torch.Tensor] | None = None
        self._switches = 0

    def __enter__(self) -> None:
        self._modes = [(m, m.training) for root in self.modules for m in root.modules()]
        self._switches = mode_switches.count
        for root in self.modules:
            root.train(False)
        self._cpu_rng = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            self._cuda_rng = torch.cuda.get_rng_state_all()

    def __exit__(self, *exc: object) -> None:
        for module, mode in self._modes:
            module.training = mode
        # the modes are as they were: our own switches are no reason for the checks to read them again
        mode_switches.count = self._switches
        if self._cpu_rng is not None:
            torch.set_rng_state(self._cpu_rng)
        if self._cuda_rng is not None:
            torch.cuda.set_rng_state_all(self._cuda_rng)


#: Untimed runs before a block of timed runs in one grad mode.
SETTLING_RUNS = 2


def _timed_runs(
    calls: list[RecordedCall], grad: bool, device: torch.device, runs: int, deadline: float | None = None
) -> list[float]:
    """Seconds of each of ``runs`` runs of ``calls``, timed one by one after two untimed runs in the same
    grad mode; fewer when ``deadline`` (a ``time.perf_counter()`` value) passes.

    A run straight after one in the other mode is slowed by the allocator reshaping its memory
    (a ResNet under no_grad runs about a quarter slower after a grad-enabled run than after another
    no_grad run), which hides the very difference being measured; one settling run was not always
    enough after a 50 MiB graph was freed, two were. An evaluation epoch runs every batch in one
    mode, so the settled runs are the ones that match it. Timing a block of runs after the settling
    ones pays for settling once per block, not once per run.

    The outputs are dropped inside each timed window: every real batch frees its graph (each
    node and saved tensor, host work that is most of the difference where kernels are fast), so
    freeing it is part of what gradients cost.
    """
    for _ in range(SETTLING_RUNS):
        _run_calls(calls, grad)
    times = []
    for _ in range(runs):
        if deadline is not None and time.perf_counter() > deadline:
            break
        synchronize(device)
        start = time.perf_counter()
        outputs = _run_calls(calls, grad)
        del outputs
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


class Replay:
    """Replays one batch's recorded calls, a little at a time.

    ``measure_memory`` runs once (graph bytes and both peaks; ``memory_run_seconds`` is
    what its two runs took, the profiler's start and stop left out);
    ``time_pairs`` adds settled on/off timings, a block per grad mode; each later epoch that
    adds pairs starts with the other mode, so a slow moment of the machine does not always fall on
    the same side.

    Args:
        calls: the recorded calls of one batch (inference-mode inputs already cloned).
        device: where the model runs (CUDA is synchronised around every timing).
        exclude_storages: parameter and buffer storages, not counted as graph memory.

    A grad-enabled run that raises ``torch.OutOfMemoryError`` leaves ``result.out_of_memory=True``
    (its memory freed) and the run goes on.
    """

    def __init__(
        self,
        calls: list[RecordedCall],
        device: torch.device,
        exclude_storages: set[tuple[str, int]],
    ) -> None:
        self.calls = calls
        self.device = device
        self.exclude_storages = exclude_storages
        self.result = ReplayResult()
        self.run_seconds = 0.0
        self._blocks = 0
        self.memory_run_seconds = 0.0
        self._modules = list({id(c.module): c.module for c in calls}.values())

    def _guarded(self, work: Callable[[], None]) -> None:
        if self.result.out_of_memory:
            return
        with _EvalModeAndRng(self._modules, self.device), HUB.paused(), _user_hooks_off(self._modules):
            try:
                work()
            except torch.OutOfMemoryError:
                self.result.out_of_memory = True
                self.result.time_on, self.result.time_off = [], []

    def measure_memory(self) -> None:
        """Graph bytes and peak memory with gradients on and off (one run each)."""

        def work() -> None:
            calls, device = self.calls, self.device
            graph: list[int] = []
            # one run with gradients on gives both the graph's bytes and the peak (the counting hook
            # adds no storage), one run with them off the other peak
            self.result.peak_on_bytes = peak_bytes_of(
                self._clocked(lambda: graph.append(graph_bytes_of(calls, self.exclude_storages))), device
            )
            self.result.graph_bytes = graph[0]
            self.result.peak_off_bytes = peak_bytes_of(self._clocked(lambda: _run_calls(calls, grad=False)), device)

        self._guarded(work)

    def _clocked(self, run: Callable[[], Any]) -> Callable[[], Any]:
        """``run``, adding what it takes to ``memory_run_seconds``."""

        def clocked() -> Any:
            start = time.perf_counter()
            try:
                return run()
            finally:
                synchronize(self.device)
                self.memory_run_seconds += time.perf_counter() - start

        return clocked

    def time_pairs(self, pairs: int, deadline: float | None = None) -> None:
        """Add up to ``pairs`` timed on/off pairs as two blocks, one per grad mode, each after its settling
        runs; which mode goes first alternates from block to block. A ``deadline`` that passes ends the
        blocks early (only complete pairs are kept); ``run_seconds`` is then what one run cost."""

        def work() -> None:
            first = self._blocks % 2 == 0
            self._blocks += 1
            started = time.perf_counter()
            blocks: dict[bool, list[float]] = {}
            wanted = pairs
            for grad in (first, not first):
                blocks[grad] = _timed_runs(self.calls, grad, self.device, wanted, deadline)
                wanted = len(blocks[grad])  # the second block pairs with what the first took
            kept = min(len(blocks[True]), len(blocks[False]))
            self.result.time_on.extend(blocks[True][:kept])
            self.result.time_off.extend(blocks[False][:kept])
            runs = 2 * SETTLING_RUNS + len(blocks[True]) + len(blocks[False])
            self.run_seconds = (time.perf_counter() - started) / runs

        self._guarded(work)
