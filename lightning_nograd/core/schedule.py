"""When the savings replays run and how many timed pairs they take: the measurement budget.

:class:`ReplayBudget` keeps the replays within a share of the run's own time and learns what one
timed on/off pair of each set of recorded calls costs (estimated from the memory replay, then
measured by a warm-up pair). :class:`Measurement` is one measurement under way: memory first,
then timed pairs spread over the rest of the epoch, a few after each batch, stopping at the budget.
Framework-free: ``SavingsMonitor`` feeds it batches and reads the result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from lightning_nograd.core.replay import EAGER_REPLAY_NOTE, RecordedCall, Replay, ReplayResult, replayable


def call_signature(calls: list[RecordedCall]) -> tuple[Any, ...]:
    """What a measurement depends on: which modules ran, on what input shapes, in which grad mode."""

    def describe(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return (tuple(value.shape), str(value.dtype), str(value.device))
        if isinstance(value, (list, tuple)):
            return tuple(describe(v) for v in value)
        if isinstance(value, dict):
            return tuple(sorted((k, describe(v)) for k, v in value.items()))
        return type(value).__name__

    return tuple((id(c.module), describe(c.args), describe(c.kwargs), c.inference_mode) for c in calls)


class ReplayBudget:
    """The share of the run's time the replays may take, what they took, and what a timed pair costs.

    Args:
        budget: share of the run's own time (0.01: 1%).
        repeats: a fixed number of timed pairs (the budget then does not limit them), or ``None``.
        min_repeats: fewest timed pairs worth running; below it time is not measured.
        max_repeats: most timed pairs when ``repeats`` is ``None``.

    Example:
        >>> budget = ReplayBudget(0.01, None, min_repeats=6, max_repeats=40)
        >>> budget.estimate_pair("calls", memory_seconds=0.001)  # from the memory replay: 3x its two runs
        >>> budget.can_time("calls", allowed=0.002), budget.can_time("calls", allowed=0.004)
        (False, True)
    """

    def __init__(self, budget: float, repeats: int | None, min_repeats: int, max_repeats: int) -> None:
        self.budget = budget
        self.repeats = repeats
        self.min_repeats = min_repeats
        self.max_repeats = max_repeats
        self.run_started = time.perf_counter()
        self.spent = 0.0
        self._pair_costs: dict[Any, float] = {}
        self._pair_measured: set[Any] = set()

    def start_run(self) -> None:
        """A new run (``trainer.fit``, ``validate``, ...): its time and spend start from zero."""
        self.run_started = time.perf_counter()
        self.spent = 0.0

    def allowed(self, seconds_left: float) -> float:
        """Seconds the replays may still take, for a run expected to go on for ``seconds_left``."""
        return self.budget * (time.perf_counter() - self.run_started + seconds_left) - self.spent

    def pair_cost(self, signature: Any) -> float:
        """What one timed pair of ``signature``'s calls costs (0 while unknown)."""
        return self._pair_costs.get(signature, 0.0)

    def estimate_pair(self, signature: Any, memory_seconds: float) -> None:
        """A first estimate from the memory replay's two runs (a pair runs the calls six times: three times theirs)."""
        self._pair_costs.setdefault(signature, 3 * memory_seconds)

    def measured_pair(self, signature: Any, seconds: float) -> float:
        """A warm-up pair took ``seconds``; the least a pair has cost is what counts from now on (a warm-up
        slowed by a busy machine must not stop timing for good)."""
        if signature in self._pair_measured:
            seconds = min(seconds, self._pair_costs[signature])
        self._pair_costs[signature] = seconds
        self._pair_measured.add(signature)
        return seconds

    def can_time(self, signature: Any, allowed: float) -> bool:
        """Whether ``allowed`` seconds cover the next step of timing ``signature`` (always, with ``repeats``):
        while a pair's cost is only estimated, the warm-up pair that measures it; once measured, a warm-up
        and ``min_repeats`` timed pairs."""
        if self.repeats is not None:
            return True
        pair = self._pair_costs.get(signature)
        if pair is None:
            return False
        if signature not in self._pair_measured:
            return allowed >= pair
        return allowed >= (1 + self.min_repeats) * pair

    @property
    def pairs_kept(self) -> int:
        """Most timed pairs a running estimate accumulates: ``repeats`` (measured once), else five
        measurements of ``max_repeats``."""
        return self.repeats if self.repeats is not None else 5 * self.max_repeats

    def reusable(self, cached: ReplayResult | None, signature: Any, allowed: float) -> bool:
        """Whether an earlier measurement of the same calls stands as it is: it holds all the pairs it may
        keep, or timing more is not affordable now. Otherwise this epoch adds pairs to its running estimate
        (and a measurement without time gets its first ones once the run has grown)."""
        return cached is not None and (len(cached.time_on) >= self.pairs_kept or not self.can_time(signature, allowed))

    def pairs(self, affordable_seconds: float, pair: float) -> int:
        """How many timed pairs to take: ``repeats``, or as many as ``affordable_seconds`` pay for, between
        ``min_repeats`` (else none) and ``max_repeats``."""
        if self.repeats is not None:
            return self.repeats
        affordable = int(affordable_seconds / max(pair, 1e-9))
        return 0 if affordable < self.min_repeats else min(affordable, self.max_repeats)


class Measurement:
    """One measurement under way: replays of the recorded batches, memory then time, within the budget.

    Args:
        budget: the run's budget; every second spent here is added to it.
        batches: the recorded calls of each batch to replay.
        signature: what the measurement depends on (:func:`call_signature` of each batch).
        device: where the model runs.
        exclude: storages of parameters and buffers (never counted as graph memory).
        allowed: seconds this measurement may take.
        memory_from: an earlier result of the same calls whose memory figures are kept (only time is
            measured now), or ``None``.
        pause: a context manager that keeps the replays out of the epoch's own time and memory.
    """

    def __init__(
        self,
        budget: ReplayBudget,
        batches: list[list[RecordedCall]],
        signature: tuple[Any, ...],
        device: torch.device,
        exclude: set[tuple[str, int]],
        allowed: float,
        memory_from: ReplayResult | None,
        pause: Callable[[], AbstractContextManager[Any]],
    ) -> None:
        self.budget = budget
        self.signature = signature
        self.allowed = allowed
        self.memory_from = memory_from
        self.spent = 0.0
        self.target = 0
        self.pairs_per_batch = 1
        self._pause = pause
        with self._paused():
            self.sessions = [Replay(replayable(calls), device, exclude) for calls in batches]

    @contextmanager
    def _paused(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            with self._pause():
                yield
        finally:
            spent = time.perf_counter() - started
            self.spent += spent
            self.budget.spent += spent

    @property
    def out_of_memory(self) -> bool:
        """Whether a replay with gradients on ran out of memory."""
        return any(s.result.out_of_memory for s in self.sessions)

    @property
    def pairs_done(self) -> int:
        return min(len(s.result.time_on) for s in self.sessions)

    def start(self, batches_left: int) -> None:
        """Measure memory (unless known), take a warm-up pair if the budget covers it, and plan the timed
        pairs: spread over the ``batches_left`` of the epoch, a few after each batch."""
        self.measure_memory()
        if self.out_of_memory:
            return
        pair = 0.0
        timing = self.budget.can_time(self.signature, self.allowed - self.spent)
        if timing:
            self.warm_up()
            pair = self.pair_cost()
        # with `repeats`, `can_time` is always true and `pairs` returns `repeats`
        self.target = self.budget.pairs(self.allowed - self.spent, pair) if timing else 0
        self.pairs_per_batch = max(1, -(-self.target // max(1, batches_left)))

    def measure_memory(self) -> None:
        """The memory replay alone (unless known): for ranks that must agree on timing before they time."""
        if self.memory_from is None:
            with self._paused():
                for session in self.sessions:
                    session.measure_memory()
            self.budget.estimate_pair(self.signature, sum(s.memory_run_seconds for s in self.sessions))

    def warm_up(self) -> None:
        """A warm-up pair, which measures what a timed pair costs (:meth:`pair_cost`)."""
        with self._paused():
            for session in self.sessions:
                session.warm_up()
        self.budget.measured_pair(self.signature, sum(s.pair_seconds for s in self.sessions))

    def pair_cost(self) -> float:
        return self.budget.pair_cost(self.signature)

    def time_pairs(self, pairs: int) -> None:
        """``pairs`` timed pairs now, whatever they cost (the number was agreed beforehand)."""
        self.target = pairs
        with self._paused():
            for session in self.sessions:
                session.time_pairs(pairs)
        if self.pairs_done < self.budget.min_repeats and self.budget.repeats is None:
            for session in self.sessions:
                session.result.time_on, session.result.time_off = [], []

    def time(self, finish: bool = False) -> bool:
        """Take this batch's timed pairs (``finish``: all that are left); whether the measurement is done.

        Pairs that cost more than the warm-up said (a machine that got busy) stop at the budget; the
        time is kept only if ``min_repeats`` pairs were taken (else it is retried in a later epoch)."""
        done = self.pairs_done
        todo = self.target - done if finish else min(self.pairs_per_batch, self.target - done)
        pair = self.budget.pair_cost(self.signature)
        for _ in range(max(0, todo)):
            if self.budget.repeats is None and self.spent + pair > self.allowed:
                if self.pairs_done < self.budget.min_repeats:
                    for session in self.sessions:
                        session.result.time_on, session.result.time_off = [], []
                return True
            with self._paused():
                for session in self.sessions:
                    session.time_pairs(1)
        return finish or self.pairs_done >= self.target

    def result(self) -> tuple[ReplayResult, dict[str, Any]]:
        """The per-batch result (means over the replayed batches) and its details."""
        merged = ReplayResult.merge([s.result for s in self.sessions])
        if self.memory_from is not None:  # timed later: the memory figures of the first measurement
            memory = self.memory_from
            merged.graph_bytes, merged.peak_on_bytes = memory.graph_bytes, memory.peak_on_bytes
            merged.peak_off_bytes = memory.peak_off_bytes
        info: dict[str, Any] = {"repeats": len(merged.time_on), "batches_replayed": len(self.sessions)}
        if any(call.compiled for session in self.sessions for call in session.calls):
            info["compiled"] = EAGER_REPLAY_NOTE
        return merged, info
