"""What the replays' measurements mean: the savings metrics of an epoch and their uncertainty.

``ReplayResult`` holds the graph bytes, the peaks and the timed on/off pairs of a measurement;
``savings_metrics`` turns it into the logged ``graph_memory_mib``, ``memory_saved_mib``,
``time_saved_s``, ``time_saved_pct`` and ``time_saved_pct_err`` (a Student-t 95% half-width).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from math import comb
from typing import Any

import torch

from lightning_nograd.core.measure import cpu_timing_caveat
from lightning_nograd.core.tensors import MIB


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
