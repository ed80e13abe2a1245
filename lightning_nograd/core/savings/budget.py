"""When the savings replays run and how many timed pairs they take: the measurement budget.

``ReplayBudget`` keeps the replays within a share of the run (of the whole ``fit`` where its length
is known) and learns what one run of each set of recorded calls costs (estimated from the memory
replay, then measured by the timed runs). ``Measurement`` is one measurement: memory first, then
as many timed pairs as the budget covers, each a settled block of one timed run per grad mode. Framework-free:
``SavingsMonitor`` feeds it batches and reads the result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from lightning_nograd.core.savings.estimate import ReplayResult
from lightning_nograd.core.savings.recording import Tape, replayable
from lightning_nograd.core.savings.replay import EAGER_REPLAY_NOTE, RUNS_PER_PAIR, Replay


class ReplayBudget:
    """The share of the run's time the replays may take, what they took, and what one run of the calls costs.

    Each timed pair is a block of its own, each grad mode's timed run after two settling runs: ``k`` pairs
    cost ``6k`` runs of the recorded step.

    Args:
        budget: share of the run's own time (0.01: 1%).
        repeats: a fixed number of timed pairs (the budget then does not limit them), or ``None``.
        min_repeats: fewest timed pairs worth running; below it time is not measured.
        max_repeats: most timed pairs one measurement takes when ``repeats`` is ``None``.

    Examples:
        >>> budget = ReplayBudget(0.01, None, min_repeats=3, max_repeats=40)
        >>> budget.estimate_run("calls", memory_seconds=0.002)  # the memory replay's two runs: 1 ms a run
        >>> budget.can_time("calls", allowed=0.017), budget.can_time("calls", allowed=0.019)  # 6 x 3 runs
        (False, True)
        >>> budget.pairs(0.030, budget.run_cost("calls"))  # 30 / 6
        5
    """

    def __init__(self, budget: float, repeats: int | None, min_repeats: int, max_repeats: int) -> None:
        self.budget = budget
        self.repeats = repeats
        self.min_repeats = min_repeats
        self.max_repeats = max_repeats
        self.run_started = time.perf_counter()
        self.spent = 0.0
        self._run_costs: dict[Any, float] = {}

    def start_run(self) -> None:
        """A new run (``trainer.fit``, ``validate``, ...): its time and spend start from zero."""
        self.run_started = time.perf_counter()
        self.spent = 0.0

    def allowed(self, seconds_left: float, run_seconds: float | None = None) -> float:
        """Seconds the replays may still take, for a run expected to go on for ``seconds_left``, or to last
        ``run_seconds`` in all where that is known (a ``fit`` of ``max_epochs``): the budget is a share of
        the whole run, so the first epoch may spend it."""
        total = time.perf_counter() - self.run_started + seconds_left
        return self.budget * max(total, run_seconds or 0.0) - self.spent

    def run_cost(self, signature: Any) -> float:
        """What one run of ``signature``'s calls costs (0 while unknown)."""
        return self._run_costs.get(signature, 0.0)

    def estimate_run(self, signature: Any, memory_seconds: float) -> None:
        """A first estimate from the memory replay's two runs (an upper bound: they also count memory)."""
        self._run_costs.setdefault(signature, memory_seconds / 2)

    def measured_run(self, signature: Any, seconds: float) -> None:
        """Timed runs took ``seconds`` each; the least a run has cost is what counts from now on (timing slowed
        by a busy machine must not stop it for good)."""
        if seconds > 0:
            self._run_costs[signature] = min(seconds, self._run_costs.get(signature, seconds))

    @staticmethod
    def block_runs(pairs: int) -> int:
        """Runs of the step that ``pairs`` timed pairs take, settling runs included."""
        return RUNS_PER_PAIR * pairs

    def can_time(self, signature: Any, allowed: float) -> bool:
        """Whether ``allowed`` seconds cover ``min_repeats`` timed pairs of ``signature`` (always, with ``repeats``)."""
        if self.repeats is not None:
            return True
        run = self._run_costs.get(signature)
        return run is not None and allowed >= self.block_runs(self.min_repeats) * run

    @property
    def pairs_kept(self) -> int:
        """Most timed pairs a running estimate accumulates: ``repeats`` (measured once), else five
        measurements of ``max_repeats``."""
        return self.repeats if self.repeats is not None else 5 * self.max_repeats

    def reusable(self, cached: ReplayResult | None, signature: Any, allowed: float) -> bool:
        """Whether an earlier measurement of the same calls stands as it is: it holds all the pairs it may
        keep, or timing more is not affordable now. Otherwise this epoch adds pairs to its running estimate
        (and a measurement without time gets its first ones once the run has grown)."""
        return cached is not None and (cached.pairs >= self.pairs_kept or not self.can_time(signature, allowed))

    def pairs(self, affordable_seconds: float, run: float) -> int:
        """How many timed pairs to take: ``repeats``, or as many as ``affordable_seconds`` pay for, between
        ``min_repeats`` (else none) and ``max_repeats``."""
        if self.repeats is not None:
            return self.repeats
        affordable = int(affordable_seconds / max(run, 1e-9) / RUNS_PER_PAIR)
        return 0 if affordable < self.min_repeats else min(affordable, self.max_repeats)


class Measurement:
    """One measurement under way: replays of the recorded batches, memory then time, within the budget.

    Args:
        budget: the run's budget; every second spent here is added to it.
        batches: the tape of each batch to replay.
        signature: what the measurement depends on (each tape's ``signature``).
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
        batches: list[Tape],
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
        self._pause = pause
        with self._paused():
            self.sessions = [Replay(replayable(tape), device, exclude) for tape in batches]

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
    def blocks_done(self) -> int:
        return min(len(s.result.blocks) for s in self.sessions)

    def start(self) -> None:
        """Measure memory (unless known), then as many timed pairs as the budget covers (none below
        ``min_repeats``), all at once: settling runs are paid once per block, not once per pair."""
        self.measure_memory()
        if self.out_of_memory:
            return
        affordable = self.allowed - self.spent
        if self.budget.can_time(self.signature, affordable):
            pairs = self.budget.pairs(affordable, self.run_cost())
            if self.memory_from is None and self.budget.repeats is None:
                # a first measurement leaves half of what it could take to later epochs, whose pairs narrow it
                pairs = max(self.budget.min_repeats, self.budget.pairs(affordable / 2, self.run_cost()))
            self.time_pairs(pairs, stop_at_budget=True)

    def _drop_time(self) -> None:
        """Fewer than ``min_repeats`` blocks give no useful interval: the time is retried later."""
        for session in self.sessions:
            session.result.blocks = []

    def measure_memory(self) -> None:
        """The memory replay alone (unless known): for ranks that must agree on timing before they time."""
        if self.memory_from is None:
            with self._paused():
                for session in self.sessions:
                    session.measure_memory()
            self.budget.estimate_run(self.signature, sum(s.memory_run_seconds for s in self.sessions))

    def run_cost(self) -> float:
        return self.budget.run_cost(self.signature)

    def time_pairs(self, pairs: int, stop_at_budget: bool = False) -> None:
        """``pairs`` timed pairs now. With ``stop_at_budget`` (and no ``repeats``), runs that cost more than
        estimated (a machine that got busy) stop at the budget, and the time is kept only if ``min_repeats``
        pairs were taken (else it is retried in a later epoch); without it every rank times the same pairs
        (the number was agreed beforehand)."""
        deadline = None
        if stop_at_budget and self.budget.repeats is None:
            deadline = time.perf_counter() + self.allowed - self.spent
        with self._paused():
            for session in self.sessions:
                session.time_pairs(pairs, deadline)
        self.budget.measured_run(self.signature, sum(s.run_seconds for s in self.sessions))
        if self.blocks_done < self.budget.min_repeats and self.budget.repeats is None:
            self._drop_time()

    def result(self) -> tuple[ReplayResult, dict[str, Any]]:
        """The per-batch result (means over the replayed batches) and its details."""
        merged = ReplayResult.merge([s.result for s in self.sessions])
        if self.memory_from is not None:  # timed later: the memory figures of the first measurement
            merged = merged.with_memory_of(self.memory_from)
        info: dict[str, Any] = {"repeats": merged.pairs, "batches_replayed": len(self.sessions)}
        if any(session.tape.compiled for session in self.sessions):
            info["compiled"] = EAGER_REPLAY_NOTE
        return merged, info
