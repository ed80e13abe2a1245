"""SavingsMonitor: per-epoch time and memory of validation/test, and what disabling gradients saved."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_nograd.callbacks._base import LOOP_NAMES, EvaluationLoopCallback, guarded
from lightning_nograd.callbacks._lightning import LightningModule, Trainer, is_sanity_checking, steps_are_compiled
from lightning_nograd.callbacks.loggers import reduce_vector
from lightning_nograd.core import kinds
from lightning_nograd.core.arguments import check_float, check_int
from lightning_nograd.core.findings import Finding
from lightning_nograd.core.graph import weight_storages
from lightning_nograd.core.measure import EpochClock, EpochPeakMemory
from lightning_nograd.core.replay import (
    EAGER_REPLAY_NOTE,
    CallRecorder,
    RecordedCall,
    Replay,
    ReplayResult,
    is_work_module,
    replayable,
    savings_metrics,
)

log = logging.getLogger(__name__)


def _excluded_types() -> tuple[type, ...]:
    try:
        from torchmetrics import Metric
    except ImportError:  # torchmetrics is a dependency, but the check must not depend on it
        return ()
    return (Metric,)


def _signature(calls: list[RecordedCall]) -> tuple[Any, ...]:
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


def percent(share: float) -> str:
    """A share of the run's time as the user wrote it: ``0.005`` -> ``"0.5%"`` (not ``"0%"``).

    Example:
        >>> percent(0.005), percent(0.2), percent(1.0)
        ('0.5%', '20%', '100%')
    """
    return f"{share * 100:g}%"


class SavingsMonitor(EvaluationLoopCallback):
    """Measures each validation / test epoch and what running it without gradients saved.

    Per epoch (never the sanity check) it logs wall time and peak memory. During
    ``measure_batches`` batches of an epoch it records the outermost calls of the modules that do
    the model's work (modules with parameters, not torchmetrics metrics) with their inputs, then
    replays them with gradients on and off, interleaved and repeated, in eval mode, after a
    warm-up pair. No step or hook of the user is re-run, RNG state is restored and batch-norm
    statistics are untouched. A measurement is reused until the recorded calls change (other
    modules, another input shape), so a long fit pays for it once.

    Logged metrics (``{stage}`` is ``val`` or ``test``):
        ``nograd/{stage}/epoch_time_s``: wall time of the epoch, CUDA-synchronised, replays excluded.
        ``nograd/{stage}/peak_memory_mib``: CUDA allocator peak on GPU, peak process RSS on CPU.
        ``nograd/{stage}/graph_memory_mib``: bytes autograd would keep for backward for one batch
            (each storage once, parameters and buffers left out).
        ``nograd/{stage}/memory_saved_mib``: peak memory of one batch with gradients on minus off
            (CUDA allocator peak; exact tensor-storage peak on CPU).
        ``nograd/{stage}/time_saved_s`` and ``nograd/{stage}/time_saved_pct``: the median per-batch
            difference times the batches of the epoch, and that as a percentage of what the epoch
            would have taken with gradients on. Not logged when the difference cannot be told from
            noise (sign test over the paired repeats); ``report`` then says so, with the spread.

    Args:
        measure_batches: batches recorded and replayed per measurement (>= 1).
        repeats: timed on/off pairs per measurement; ``None`` chooses as many as ``budget`` allows,
            between ``min_repeats`` and ``max_repeats``.
        budget: the share of the run's own time the replays may take (default 1%).
        min_repeats: fewest timed pairs worth running; below it time is not measured.
        max_repeats: most timed pairs when ``repeats`` is ``None``.

    Raises:
        ValueError, TypeError: an argument of the wrong type or out of range.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[SavingsMonitor(budget=0.02)])
    """

    _evaluation_stages = frozenset({"val", "test"})

    def __init__(
        self,
        measure_batches: int = 2,
        repeats: int | None = None,
        budget: float = 0.01,
        min_repeats: int = 6,
        max_repeats: int = 40,
    ) -> None:
        super().__init__("warn")
        self.measure_batches = check_int("measure_batches", measure_batches, 1)
        self.repeats = None if repeats is None else check_int("repeats", repeats, 1)
        self.budget = check_float("budget", budget, 0.0, 1000.0)
        self.min_repeats = check_int("min_repeats", min_repeats, 1)
        self.max_repeats = check_int("max_repeats", max_repeats, 1)
        if self.max_repeats < self.min_repeats:
            raise ValueError(
                f"Expected argument `max_repeats` to be >= `min_repeats` ({self.min_repeats}), "
                f"but got max_repeats={self.max_repeats} and min_repeats={self.min_repeats}."
            )
        self._run_started = time.perf_counter()
        self._spent = 0.0
        self._device = torch.device("cpu")
        self._compiled_steps = False
        self._clock: EpochClock | None = None
        self._memory: EpochPeakMemory | None = None
        self._recorder: CallRecorder | None = None
        self._recorded: list[list[RecordedCall]] = []
        self._candidates: set[int] | None = None
        self._batches = 0
        self._record_from = 1
        self._batch_started = 0.0
        self._batch_seconds: list[float] = []
        self._cache: dict[tuple[Any, ...], tuple[ReplayResult, dict[str, Any]]] = {}
        # what one timed pair of each recorded-call signature costs (estimated, then measured)
        self._pair_costs: dict[tuple[Any, ...], float] = {}
        self._pair_measured: set[tuple[Any, ...]] = set()
        self._allowed = 0.0  # seconds the measurement under way may take
        self._memory_from: ReplayResult | None = None
        self._measurement: tuple[ReplayResult, dict[str, Any]] | None = None
        self._sessions: list[Replay] = []
        self._signature: tuple[Any, ...] = ()
        self._target = 0
        self._pairs_per_batch = 1
        self._spent_this_measurement = 0.0
        self._skip_reason: str | None = None
        self._stage: str | None = None
        self._epoch = 0

    @override
    def _state_key_settings(self) -> dict[str, Any]:
        return {"measure_batches": self.measure_batches, "repeats": self.repeats, "budget": self.budget}

    # -- Lightning hooks -------------------------------------------------------------------------

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._run_started = time.perf_counter()
        self._spent = 0.0
        self._set_rank_zero(trainer)

    @override
    def _eval_epoch_start(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._begin_epoch(trainer, pl_module, stage)

    @override
    def _eval_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch_idx: int) -> None:
        # once this epoch's measurement is taken (or refused) a batch costs a counter and, where the
        # kernel's peak RSS cannot be read, one RSS sample
        if self._stage is None or self._measurement is not None or self._skip_reason is not None:
            return
        self._batch_started = time.perf_counter()  # the batch times until then estimate the run's length
        if self._wants_recording():
            self._start_recording(pl_module)

    @override
    def _eval_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch_idx: int) -> None:
        if self._stage is None:
            return
        self._batches += 1
        if self._memory is not None and self._memory.sampled:
            self._memory.sample()
        if self._measurement is not None or self._skip_reason is not None:
            return
        self._batch_seconds.append(time.perf_counter() - self._batch_started)
        if self._recorder is not None:
            self._finish_recording(trainer, pl_module)
        elif self._sessions:
            self._continue_timing(trainer)

    @override
    def _eval_epoch_end(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._end_epoch(trainer)

    @override
    def _release(self, check: str | None = None) -> None:
        if self._recorder is not None:
            self._recorder.stop()
            self._recorder = None
        self._recorded = []
        self._sessions = []
        if check is None:
            self._measurement = None

    # -- epoch -----------------------------------------------------------------------------------

    def _active(self, trainer: Trainer) -> bool:
        return self._stage is not None and not is_sanity_checking(trainer)

    def _begin_epoch(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if is_sanity_checking(trainer):
            self._stage = None
            return
        self._stage = stage
        self._epoch = int(trainer.current_epoch)
        self._batches = 0
        self._recorded = []
        self._measurement = None
        self._sessions = []
        self._skip_reason = None
        self._batch_seconds = []
        self._candidates = None
        self._device = torch.device(pl_module.device)
        self._compiled_steps = steps_are_compiled(pl_module)
        self._start_epoch_measures()
        total = _total_batches(trainer, stage)
        self._record_from = 1 if total is None or total > self.measure_batches else 0
        self._skip_reason = _replay_refusal(trainer)

    @guarded("epoch_measures")
    def _start_epoch_measures(self) -> None:
        self._clock = EpochClock(self._device)
        self._memory = EpochPeakMemory(self._device)
        self._memory.start()
        self._clock.start()

    def _wants_recording(self) -> bool:
        return (
            self._measurement is None
            and self._skip_reason is None
            and not self._sessions
            and self._batches >= self._record_from
            and len(self._recorded) < self.measure_batches
            and "replay" not in self._switched_off
        )

    @guarded("replay")
    def _start_recording(self, pl_module: nn.Module) -> None:
        if self._candidates is None:  # once per epoch: which modules do the model's work
            excluded = _excluded_types()
            self._candidates = {
                id(m) for m in pl_module.modules() if m is not pl_module and is_work_module(m, excluded)
            }
        self._recorder = CallRecorder(self._candidates)
        self._recorder.on_error = lambda err: self._switch_off("replay", err)
        self._recorder.start()

    @guarded("replay")
    def _finish_recording(self, trainer: Trainer, pl_module: nn.Module) -> None:
        recorder, self._recorder = self._recorder, None
        if recorder is None:
            return
        recorder.stop()
        if recorder.calls:
            self._recorded.append(recorder.calls)
        if len(self._recorded) >= self.measure_batches:
            self._start_measurement(trainer, pl_module)

    def _paused(self) -> _PausedMeasures:
        return _PausedMeasures(self)

    @guarded("replay")
    def _start_measurement(self, trainer: Trainer, pl_module: nn.Module) -> None:
        """Memory always (one replay with gradients on, one off); time as the budget allows.

        What the replays cost is measured, not guessed from the batch time: a pair's cost is first
        estimated from the memory replay's two runs (a pair runs the calls six times: three times
        theirs), and a warm-up pair is taken once the budget covers it; its exact cost then sets how
        many timed pairs follow (none below ``min_repeats``, at most ``max_repeats``), and whether
        a later epoch has room for a warm-up and ``min_repeats`` pairs. A measurement is reused while
        the recorded calls stay the same; one taken without time gets its time later (its memory
        figures kept), once the run has grown.
        """
        batches, self._recorded = self._recorded, []
        self._signature = tuple(_signature(calls) for calls in batches)
        seconds_per_batch = sorted(self._batch_seconds)[len(self._batch_seconds) // 2]
        remaining = max(0, (_total_batches(trainer, self._stage or "val") or self._batches) - self._batches)
        run_time = time.perf_counter() - self._run_started + remaining * seconds_per_batch
        allowed = self.budget * run_time - self._spent
        cached = self._cache.get(self._signature)
        if cached is not None and (cached[0].time_on or not self._can_time(allowed)):
            self._measurement = cached
            return
        exclude = weight_storages(pl_module)
        self._spent_this_measurement = 0.0
        self._memory_from = cached[0] if cached is not None else None
        with self._paused():
            self._sessions = [Replay(replayable(calls), self._device, exclude) for calls in batches]
            if self._memory_from is None:
                for session in self._sessions:
                    session.measure_memory()
                self._pair_costs.setdefault(self._signature, 3 * sum(s.memory_run_seconds for s in self._sessions))
        if any(s.result.out_of_memory for s in self._sessions):
            self._report_oom(batches[0])
            self._finish_measurement()
            return
        self._allowed = allowed
        timing = self._can_time(allowed - self._spent_this_measurement)
        if timing:
            with self._paused():
                for session in self._sessions:
                    session.warm_up()
            # the least a pair has cost: a warm-up slowed by a busy machine must not stop timing for good
            pair = sum(s.pair_seconds for s in self._sessions)
            if self._signature in self._pair_measured:
                pair = min(pair, self._pair_costs[self._signature])
            self._pair_costs[self._signature] = pair
            self._pair_measured.add(self._signature)
        else:
            pair = 0.0
        if self.repeats is not None:
            self._target = self.repeats
        elif not timing:
            self._target = 0
        else:
            affordable = int((allowed - self._spent_this_measurement) / max(pair, 1e-9))
            self._target = 0 if affordable < self.min_repeats else min(affordable, self.max_repeats)
        # spread the timed pairs over the rest of the epoch, a few after each batch
        self._pairs_per_batch = max(1, -(-self._target // max(1, remaining)))
        self._continue_timing(trainer)

    @guarded("replay")
    def _continue_timing(self, trainer: Trainer, finish: bool = False) -> None:
        if not self._sessions:
            return
        done = min(len(s.result.time_on) for s in self._sessions)
        todo = self._target - done if finish else min(self._pairs_per_batch, self._target - done)
        pair = self._pair_costs.get(self._signature, 0.0)
        for _ in range(max(0, todo)):
            if self.repeats is None and self._spent_this_measurement + pair > self._allowed:
                # pairs cost more than the warm-up said (a machine that got busy): stop at the budget,
                # keeping the time only if `min_repeats` pairs were taken (else it is retried later)
                if min(len(s.result.time_on) for s in self._sessions) < self.min_repeats:
                    for session in self._sessions:
                        session.result.time_on, session.result.time_off = [], []
                self._finish_measurement()
                return
            with self._paused():
                for session in self._sessions:
                    session.time_pairs(1)
        if any(s.result.out_of_memory for s in self._sessions):
            self._report_oom(self._sessions[0].calls)
        if finish or min(len(s.result.time_on) for s in self._sessions) >= self._target:
            self._finish_measurement()

    def _can_time(self, allowed: float) -> bool:
        """Whether ``allowed`` seconds cover the next step of timing the current calls (always, with
        ``repeats``): while a pair's cost is only estimated, the warm-up pair that measures it; once
        measured, a warm-up and ``min_repeats`` timed pairs."""
        if self.repeats is not None:
            return True
        pair = self._pair_costs.get(self._signature)
        if pair is None:
            return False
        if self._signature not in self._pair_measured:
            return allowed >= pair
        return allowed >= (1 + self.min_repeats) * pair

    def _finish_measurement(self) -> None:
        sessions, self._sessions = self._sessions, []
        merged = ReplayResult.merge([s.result for s in sessions])
        if self._memory_from is not None:  # timed later: the memory figures of the first measurement
            memory = self._memory_from
            merged.graph_bytes, merged.peak_on_bytes = memory.graph_bytes, memory.peak_on_bytes
            merged.peak_off_bytes = memory.peak_off_bytes
        info: dict[str, Any] = {"repeats": len(merged.time_on), "batches_replayed": len(sessions)}
        if any(call.compiled for session in sessions for call in session.calls):
            info["compiled"] = EAGER_REPLAY_NOTE
        self._measurement = (merged, info)
        if not merged.out_of_memory:
            self._cache[self._signature] = self._measurement

    def _report_oom(self, calls: list[RecordedCall]) -> None:
        stage = self._stage or "val"
        subject = ", ".join(sorted({type(c.module).__name__ for c in calls}))
        text = kinds.grad_replay_oom()
        self._add_finding(
            Finding(
                "grad_replay_oom", subject, stage, f"{LOOP_NAMES[stage]}_step", self._batches - 1, self._epoch, *text
            )
        )

    def _end_epoch(self, trainer: Trainer) -> None:
        if not self._active(trainer):
            return
        self._stop_recording()
        if self._sessions:
            self._continue_timing(trainer, finish=True)
        stage = self._stage or "val"
        self._emit_epoch_metrics(
            trainer, stage, lambda: self._epoch_metrics(stage), lambda t, m: _reduce_across_ranks(t, stage, m)
        )
        self._stage = None

    def _stop_recording(self) -> None:
        if self._recorder is not None:
            self._recorder.stop()
            self._recorder = None

    def _epoch_metrics(self, stage: str) -> tuple[dict[str, float], dict[str, Any]]:
        prefix = f"nograd/{stage}"
        metrics: dict[str, float] = {}
        details: dict[str, Any] = {"batches": self._batches}
        if self._clock is not None and "epoch_measures" not in self._switched_off:
            metrics[f"{prefix}/epoch_time_s"] = self._clock.stop()
        if self._memory is not None and "epoch_measures" not in self._switched_off:
            metrics[f"{prefix}/peak_memory_mib"] = self._memory.peak_mib()
        measurement = self._measurement
        if measurement is None:
            details["savings"] = self._skip_reason or (
                "not measured: the LightningModule was compiled whole (`torch.compile(model)`), so its steps run as "
                "compiled code in which module calls cannot be recorded; compile submodules to have them measured"
                if self._compiled_steps
                else "no module calls with parameters were recorded"
            )
            return metrics, details
        result, info = measurement
        details.update(info)
        untimed = (
            f"time not measured yet: the run so far is too short for {self.min_repeats} timed repeats within "
            f"its {percent(self.budget)} time budget (retried in later epochs; raise `budget` "
            "or set `repeats` to measure now)"
        )
        epoch_seconds = metrics.get(f"{prefix}/epoch_time_s", 0.0)
        savings, savings_details = savings_metrics(result, self._batches, epoch_seconds, self._device, untimed)
        metrics.update({f"{prefix}/{key}": value for key, value in savings.items()})
        details.update(savings_details)
        return metrics, details


class _PausedMeasures:
    """Keeps our own replay out of the epoch's time and peak memory, and adds it to the spend."""

    def __init__(self, monitor: SavingsMonitor) -> None:
        self.monitor = monitor
        self.started = 0.0

    def __enter__(self) -> None:
        if self.monitor._clock is not None:
            self.monitor._clock.pause()
        if self.monitor._memory is not None:
            self.monitor._memory.pause()
        self.started = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        spent = time.perf_counter() - self.started
        self.monitor._spent += spent
        self.monitor._spent_this_measurement += spent
        if self.monitor._memory is not None:
            self.monitor._memory.resume()
        if self.monitor._clock is not None:
            self.monitor._clock.resume()


_KEYS = ("epoch_time_s", "peak_memory_mib", "graph_memory_mib", "memory_saved_mib", "time_saved_s", "time_saved_pct")


def _reduce_across_ranks(trainer: Trainer, stage: str, metrics: dict[str, float]) -> dict[str, float]:
    """Max of time and peak memory over ranks, mean of savings over the ranks that measured them.

    Every rank calls both collectives every epoch, whatever it measured.
    """
    keys = [f"nograd/{stage}/{k}" for k in _KEYS]
    present = [1.0 if k in metrics else 0.0 for k in keys]
    values = [metrics.get(k, 0.0) for k in keys]
    maxima = reduce_vector(trainer, values, "max")
    sums = reduce_vector(trainer, values + present, "sum")
    reduced: dict[str, float] = {}
    for i, key in enumerate(keys):
        count = sums[len(keys) + i]
        if count == 0:
            continue
        reduced[key] = maxima[i] if i < 2 else sums[i] / count
    return reduced


def _total_batches(trainer: Trainer, stage: str) -> int | None:
    counts = trainer.num_val_batches if stage == "val" else trainer.num_test_batches
    try:
        total = sum(int(c) for c in counts)
    except (TypeError, ValueError, OverflowError):
        return None
    return total if total > 0 else None


def _replay_refusal(trainer: Trainer) -> str | None:
    """Why the replay must not run under this strategy (its module calls would need collectives)."""
    name = type(getattr(trainer, "strategy", None)).__name__
    if "FSDP" in name or "DeepSpeed" in name or "ModelParallel" in name:
        return f"replay skipped under {name}: sharded module calls need every rank, and a replay on one rank would hang"
    return None
