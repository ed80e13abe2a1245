"""What the replays' measurements mean: the savings metrics of an epoch and their uncertainty.

``ReplayResult`` holds the graph bytes, the peaks and the timed blocks of a measurement;
``savings_metrics`` turns it into the logged ``graph_memory_mib``, ``memory_saved_mib``,
``time_saved_s``, ``time_saved_pct`` and ``time_saved_pct_err``.

How time is estimated. Each timed block runs the recorded step a few times with gradients on and a few
times without, each mode after settling runs of its own; a block gives one ratio, the median run with
gradients on over the median run without. The runs are timed by the process's CPU time on a CPU (a
competing process does not lengthen it, where wall time takes every moment the process waits for a
core) and by the wall clock, CUDA synchronised, on a GPU. The block, not the run, is the unit of
replication: the state the allocator is left in moves the runs of a whole block together, so the
95% interval comes from the spread between blocks (Student's t over their log ratios), and a time
figure needs two blocks at least. The epoch's saving is then ``(ratio - 1)`` times what the replayed
work took per batch in wall time (at most the epoch's own time per batch), times its batches, so a
batch can never be said to take a negative time with gradients on.

``time_saved_pct`` is ``100 * time_saved_s / max(T_on, T)``, ``T`` the epoch's time as it ran and
``T_on = T + time_saved_s`` what it would have taken with gradients on: the time gradients would have
added as a share of the epoch with them, or, when negative, the time no_grad cost as a share of the
epoch as it ran. It lies strictly between -100 and 100 for any measurement, and is never clipped.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_nograd.core.checks.tensors import MIB
from lightning_nograd.core.savings.epoch_measures import cpu_timing_caveat


@dataclass
class TimedBlock:
    """One settled block of timed runs per grad mode, in seconds of the measurement's clock.

    Attributes:
        on: each timed run with gradients on.
        off: each timed run without gradients (no_grad or inference mode, as the step ran).
        wall_off: the wall time of each run without gradients (what the work takes in an epoch).
    """

    on: list[float]
    off: list[float]
    wall_off: list[float]

    @property
    def log_ratio(self) -> float:
        """``log(median(on) / median(off))``: how much longer a run takes with gradients on, on a log scale."""
        return math.log(max(statistics.median(self.on), 1e-12) / max(statistics.median(self.off), 1e-12))


@dataclass
class ReplayResult:
    """Per-batch measurements of a replay (all recorded steps of one batch).

    Attributes:
        blocks: the timed blocks, oldest first (a running estimate keeps adding them).
        clock: what the runs were timed with: ``"cpu"`` (process CPU time) or ``"wall"``.
    """

    blocks: list[TimedBlock] = field(default_factory=list)
    graph_bytes: int = 0
    peak_on_bytes: int = 0
    peak_off_bytes: int = 0
    out_of_memory: bool = False
    clock: str = "wall"

    @property
    def pairs(self) -> int:
        """Timed runs per grad mode, over every block."""
        return sum(min(len(b.on), len(b.off)) for b in self.blocks)

    @property
    def ratio(self) -> float:
        """How many times longer a run takes with gradients on: the geometric mean of the blocks' ratios.

        Examples:
            >>> result = ReplayResult([TimedBlock([2.0], [1.0], [1.0]), TimedBlock([8.0], [1.0], [1.0])])
            >>> result.ratio
            4.0
        """
        if not self.blocks:
            return 1.0
        return math.exp(statistics.fmean(b.log_ratio for b in self.blocks))

    @property
    def ratio_interval(self) -> tuple[float, float] | None:
        """The 95% interval of ``ratio`` (Student's t over the blocks' log ratios); ``None`` below two blocks.

        Examples:
            >>> steady = [TimedBlock([1.21, 1.2], [1.0, 1.0], [1.0, 1.0]), TimedBlock([1.19], [1.0], [1.0])]
            >>> [round(r, 2) for r in ReplayResult(steady).ratio_interval]
            [1.11, 1.3]
        """
        if len(self.blocks) < 2:
            return None
        logs = [b.log_ratio for b in self.blocks]
        half = t_quantile_95(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
        centre = statistics.fmean(logs)
        return math.exp(centre - half), math.exp(centre + half)

    @property
    def work_seconds(self) -> float:
        """The wall time one run without gradients took (the median over every block)."""
        return statistics.median([t for b in self.blocks for t in b.wall_off]) if self.blocks else 0.0

    def within_noise(self) -> bool:
        """Whether gradients' cost cannot be told from noise: the ratio's interval holds 1 (or is unknown)."""
        interval = self.ratio_interval
        return interval is None or interval[0] <= 1.0 <= interval[1]

    def with_earlier(self, earlier: ReplayResult) -> ReplayResult:
        """This result's memory figures with ``earlier``'s blocks before its own: a running estimate over a fit.

        Examples:
            >>> first = ReplayResult([TimedBlock([2.0], [1.0], [1.0])], graph_bytes=10)
            >>> later = ReplayResult([TimedBlock([3.0], [1.0], [1.0])], graph_bytes=10)
            >>> len(later.with_earlier(first).blocks)
            2
        """
        return ReplayResult(
            earlier.blocks + self.blocks,
            self.graph_bytes,
            self.peak_on_bytes,
            self.peak_off_bytes,
            self.out_of_memory,
            self.clock,
        )

    def with_memory_of(self, other: ReplayResult) -> ReplayResult:
        """This result's blocks with ``other``'s memory figures (a measurement that only added time)."""
        return ReplayResult(
            self.blocks, other.graph_bytes, other.peak_on_bytes, other.peak_off_bytes, self.out_of_memory, self.clock
        )

    @classmethod
    def merge(cls, results: list[ReplayResult]) -> ReplayResult:
        """One per-batch result from several replayed batches: their means, run by run.

        Examples:
            >>> a = ReplayResult([TimedBlock([3.0, 5.0], [1.0, 1.0], [1.0, 1.0])], graph_bytes=10)
            >>> b = ReplayResult([TimedBlock([5.0], [3.0], [3.0])], graph_bytes=20)
            >>> merged = ReplayResult.merge([a, b])
            >>> merged.blocks[0].on, merged.blocks[0].off, merged.graph_bytes
            ([4.0], [2.0], 15)
        """
        if len(results) == 1:
            return results[0]
        n = len(results)
        blocks = []
        for index in range(min(len(r.blocks) for r in results)):
            parts = [r.blocks[index] for r in results]
            runs = min(min(len(p.on), len(p.off)) for p in parts)
            if runs:
                blocks.append(
                    TimedBlock(
                        [sum(p.on[i] for p in parts) / n for i in range(runs)],
                        [sum(p.off[i] for p in parts) / n for i in range(runs)],
                        [sum(p.wall_off[i] for p in parts) / n for i in range(runs)],
                    )
                )
        return cls(
            blocks,
            graph_bytes=sum(r.graph_bytes for r in results) // n,
            peak_on_bytes=sum(r.peak_on_bytes for r in results) // n,
            peak_off_bytes=sum(r.peak_off_bytes for r in results) // n,
            out_of_memory=any(r.out_of_memory for r in results),
            clock=results[0].clock,
        )


def saved_share(saved: float, epoch_seconds: float) -> float:
    """``100 * saved / max(epoch_seconds + saved, epoch_seconds)``: the percentage ``time_saved_pct`` is.

    Examples:
        >>> saved_share(1.0, 3.0), round(saved_share(-1.0, 3.0), 2)  # a quarter of the epoch with gradients on
        (25.0, -33.33)
    """
    return 100.0 * saved / max(epoch_seconds + saved, epoch_seconds)


def time_savings(result: ReplayResult, batches: int, epoch_seconds: float) -> tuple[dict[str, float], dict[str, Any]]:
    """``time_saved_s``, ``time_saved_pct`` and ``time_saved_pct_err`` of an epoch of ``batches`` that took
    ``epoch_seconds``, and the details behind them (see the module's doc for the estimate).

    ``time_saved_pct_err`` is the larger distance from ``time_saved_pct`` to an end of its 95% interval, so
    ``pct ± err`` holds the whole interval; it is logged once two blocks were timed. Logged also when the
    interval straddles 0 (a chart with holes reads as a bug): the details then say the saving is within noise.

    Examples:
        >>> blocks = [TimedBlock([4.0, 4.1], [2.0, 2.0], [0.002] * 2), TimedBlock([4.0, 3.9], [2.0, 2.0], [0.002] * 2)]
        >>> metrics, details = time_savings(ReplayResult(blocks, clock="cpu"), batches=10, epoch_seconds=0.05)
        >>> round(metrics["time_saved_s"], 3), round(metrics["time_saved_pct"], 1), details["savings"]
        (0.02, 28.6, 'measured')
    """
    work = min(result.work_seconds, epoch_seconds / max(batches, 1))
    ratio = result.ratio
    saved = batches * work * (ratio - 1.0)
    metrics = {"time_saved_s": saved, "time_saved_pct": saved_share(saved, epoch_seconds)}
    details: dict[str, Any] = {
        "time_saved_per_batch_s": work * (ratio - 1.0),
        "grad_on_ratio": ratio,
        "replayed_work_s": work,
        "timed_blocks": len(result.blocks),
        "clock": "process CPU time" if result.clock == "cpu" else "wall time",
        "within_noise": result.within_noise(),
        "savings": "measured",
    }
    interval = result.ratio_interval
    if interval is not None:
        low, high = (batches * work * (r - 1.0) for r in interval)
        details["grad_on_ratio_95"] = list(interval)
        details["time_saved_interval_s"] = [low, high]
        pct = metrics["time_saved_pct"]
        metrics["time_saved_pct_err"] = max(
            pct - saved_share(low, epoch_seconds), saved_share(high, epoch_seconds) - pct
        )
    if result.within_noise():
        if interval is None:
            why = f"one timed block of {result.pairs} runs per grad mode: no interval yet"
        else:
            why = f"95% interval of the ratio {interval[0]:.3f}-{interval[1]:.3f} over {len(result.blocks)} blocks"
        details["savings"] = f"time difference within noise: gradients on x{ratio:.3f} ({why})"
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
        >>> blocks = [TimedBlock([0.004] * 3, [0.001] * 3, [0.001] * 3)] * 2
        >>> metrics, _ = savings_metrics(ReplayResult(blocks, 2**20), 10, 0.07, torch.device("cuda"), "not timed")
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
    if not result.blocks or epoch_seconds <= 0:
        details["savings"] = untimed
        return metrics, details
    caveat = cpu_timing_caveat() if device.type == "cpu" else None
    if caveat is not None:
        details["timing_caveat"] = caveat
    times, time_details = time_savings(result, batches, epoch_seconds)
    metrics.update(times)
    details.update(time_details)
    return metrics, details
