"""SavingsMonitor: per-epoch time and memory of validation/test, and what disabling gradients saved."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_nograd.callbacks._base import LOOP_NAMES, EvaluationLoopCallback, guarded
from lightning_nograd.callbacks._lightning import (
    LightningModule,
    Trainer,
    is_sanity_checking,
    steps_are_compiled,
    world_size,
)
from lightning_nograd.callbacks.loggers import gather_objects, reduce_vector
from lightning_nograd.core.checks.tensors import module_device, weight_storages
from lightning_nograd.core.plumbing import torch_internals
from lightning_nograd.core.plumbing.arguments import check_float, check_int
from lightning_nograd.core.plumbing.module_paths import NamePatterns
from lightning_nograd.core.reporting import messages
from lightning_nograd.core.reporting.findings import Finding
from lightning_nograd.core.savings.budget import Measurement, ReplayBudget
from lightning_nograd.core.savings.epoch_measures import EpochMeasures
from lightning_nograd.core.savings.estimate import ReplayResult, savings_metrics
from lightning_nograd.core.savings.recording import StepRecorder, Tape, recorded_modules

log = logging.getLogger(__name__)


def percent(share: float) -> str:
    """A share of the run's time as the user wrote it: ``0.005`` -> ``"0.5%"`` (not ``"0%"``).

    Examples:
        >>> percent(0.005), percent(0.2), percent(1.0)
        ('0.5%', '20%', '100%')
    """
    return f"{share * 100:g}%"


@dataclass
class _StageEpoch:
    """What ``SavingsMonitor`` holds for one epoch of one stage; each epoch starts a new one."""

    stage: str | None = None  # None: no epoch watched (outside one, or the sanity check)
    epoch: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    compiled_steps: bool = False
    run_seconds: float | None = None  # the projected length of the run (the whole fit where it is known)
    more_epochs: bool = False  # whether another epoch of this stage follows in this run (a fit with epochs left)
    record_from: int = 1  # the first batch recorded (the second, unless the epoch is too short)
    skip_reason: str | None = None  # why nothing is measured in this epoch
    # under a sharded strategy every rank replays at the same batch end, as rank zero decides (see
    # `_measure_in_lockstep`): a module call there gathers parameters from every rank
    lockstep: bool = False
    paths: dict[int, str] = field(default_factory=dict)
    measures: EpochMeasures | None = None
    # the modules recorded whole (those that do the model's work) and the metrics, read at the first recording
    candidates: tuple[set[int], set[int]] | None = None
    recorder: StepRecorder | None = None
    recorded: list[Tape | None] = field(default_factory=list)
    batches: int = 0
    batch_started: float = 0.0
    batch_seconds: list[float] = field(default_factory=list)
    measurement: tuple[ReplayResult, dict[str, Any]] | None = None


class SavingsMonitor(EvaluationLoopCallback):
    """Measures each validation / test epoch and what running it without gradients saved.

    Per epoch (never the sanity check) it logs wall time and peak memory. During
    ``measure_batches`` batches of an epoch it records what the step runs that autograd would record
    (the outermost calls of the modules that do the model's work, the LightningModule's own forward
    included, and the torch functions between them, the loss too;
    ``lightning_nograd.core.savings.recording``), then replays that with gradients on and off, in eval mode,
    in settled blocks. No step or hook of the user is re-run, RNG state is restored and batch-norm
    statistics are untouched. A measurement is reused while what decides the graph stays the same
    (the modules and functions run, input shapes and dtypes, autocast, which parameters are
    trainable), so a long fit pays for it once and a fine-tuning schedule that unfreezes layers gets
    measured again.

    Logged metrics (``{stage}`` is ``val`` or ``test``):
        ``nograd/{stage}/epoch_time_s``: wall time of the epoch, CUDA-synchronised, replays excluded.
        ``nograd/{stage}/peak_memory_mib``: CUDA allocator peak on GPU, peak process RSS on CPU.
        ``nograd/{stage}/graph_memory_mib``: bytes autograd would keep for backward for one batch
            (each storage once, parameters and buffers left out).
        ``nograd/{stage}/memory_saved_mib``: peak memory of one batch with gradients on minus off
            (CUDA allocator peak; exact tensor-storage peak on CPU).
        ``nograd/{stage}/time_saved_s``: ``(ratio - 1)`` times the replayed work's wall time per batch
            (at most the epoch's time per batch) times the epoch's batches, ``ratio`` how much longer
            the step runs with gradients on (a running estimate over the fit: each epoch the budget
            allows adds timed blocks to it; ``lightning_nograd.core.savings.estimate``). Logged within noise too.
        ``nograd/{stage}/time_saved_pct``: ``100 * time_saved_s / max(T_on, T)``, ``T`` the epoch's
            time and ``T_on`` its time with gradients on: strictly between -100 and 100.
        ``nograd/{stage}/time_saved_pct_err``: half-width (the larger side) of the 95% interval of
            ``time_saved_pct``, from the spread between timed blocks; the interval straddles 0 when
            the saving is within noise, and ``report`` then says so.

    Args:
        measure_batches: batches recorded and replayed per measurement (>= 1).
        repeats: timed on/off pairs per measurement, each a settled block of its own; ``None`` chooses as
            many as ``budget`` allows, between ``min_repeats`` and ``max_repeats``.
        budget: the share of the run (of the whole `fit` where `max_epochs` says how long it is) the replays
            may take (default 1.5%).
        min_repeats: fewest timed pairs worth running (the interval needs blocks to spread); below it time is
            not measured.
        max_repeats: most timed pairs when ``repeats`` is ``None``.
        allow: regular expressions; ``"savings replay"`` silences the finding that a batch does not fit with
            gradients on (``grad_replay_oom``).

    Raises:
        ValueError, TypeError: an argument of the wrong type or out of range.

    Examples:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[SavingsMonitor(budget=0.02)])
    """

    _evaluation_stages = frozenset({"val", "test"})

    def __init__(
        self,
        measure_batches: int = 1,
        repeats: int | None = None,
        budget: float = 0.015,
        min_repeats: int = 3,
        max_repeats: int = 10,
        allow: Iterable[str] = (),
    ) -> None:
        super().__init__("warn")
        self.allow = NamePatterns("allow", allow)
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
        self._budget = ReplayBudget(self.budget, self.repeats, self.min_repeats, self.max_repeats)
        self._cache: dict[tuple[Any, ...], tuple[ReplayResult, dict[str, Any]]] = {}
        self._epochs: dict[str, _StageEpoch] = {}  # the latest epoch of each stage
        self._now = _StageEpoch()  # the epoch under way (its `stage` is None outside a watched one)

    @override
    def _state_key_settings(self) -> dict[str, Any]:
        return {"measure_batches": self.measure_batches, "repeats": self.repeats, "budget": self.budget}

    # -- Lightning hooks -------------------------------------------------------------------------

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._budget.start_run()
        self._set_rank_zero(trainer)

    @override
    def _eval_epoch_start(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if is_sanity_checking(trainer):
            self._now = _StageEpoch()
            return
        device = module_device(pl_module)
        total = _total_batches(trainer, stage)
        now = self._now = self._epochs[stage] = _StageEpoch(
            stage=stage,
            epoch=int(trainer.current_epoch),
            device=device,
            compiled_steps=steps_are_compiled(pl_module),
            run_seconds=_projected_fit_seconds(trainer, self._budget.run_started),
            more_epochs=_more_epochs_follow(trainer),
            record_from=1 if total is None or total > self.measure_batches else 0,
            skip_reason=_replay_refusal(trainer, device),
            lockstep=world_size(trainer) > 1 and _shards_parameters(trainer),
        )
        self._start_epoch_measures()
        if now.lockstep and now.skip_reason is None:
            now.paths = {id(m): path for path, m in pl_module.named_modules()}
            if total is None or total < now.record_from + self.measure_batches:
                now.skip_reason = (
                    "replay skipped: under a sharded strategy the ranks replay together at a batch every rank "
                    "reaches, and this epoch's number of batches is not known (or too small)"
                )

    @override
    def _eval_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch_idx: int) -> None:
        # once this epoch's measurement is taken (or refused) a batch costs a counter and, where the
        # kernel's peak RSS cannot be read, one RSS sample
        now = self._now
        if now.stage is None or now.measurement is not None or now.skip_reason is not None:
            return
        now.batch_started = time.perf_counter()  # the batch times until then estimate the run's length
        if self._wants_recording():
            self._start_recording(pl_module)

    @override
    def _eval_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch_idx: int) -> None:
        now = self._now
        if now.stage is None:
            return
        now.batches += 1
        measures = now.measures
        if measures is not None and measures.memory.sampled:
            measures.memory.sample()
        if now.measurement is not None or now.skip_reason is not None:
            return
        now.batch_seconds.append(time.perf_counter() - now.batch_started)
        if now.lockstep:
            self._stop_lockstep_recording()
            if now.batches == now.record_from + self.measure_batches:  # the same batch end on every rank
                self._measure_in_lockstep(trainer, pl_module)
        elif now.recorder is not None:
            self._finish_recording(trainer, pl_module)

    @override
    def _eval_epoch_end(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._now.stage is None or is_sanity_checking(trainer):
            return
        self._stop_recording()
        if self._now.recorded and not self._now.lockstep and self._now.measurement is None:
            self._start_measurement(trainer, pl_module)  # an epoch shorter than `measure_batches` (fast_dev_run)
        self._emit_epoch_metrics(
            trainer, stage, lambda: self._epoch_metrics(stage), lambda t, m: _reduce_across_ranks(t, stage, m)
        )
        self._now.stage = None

    @override
    def _release(self, check: str | None = None) -> None:
        if self._now.recorder is not None:
            self._now.recorder.stop()
            self._now.recorder = None
        self._now.recorded = []
        if check is None:
            self._now.measurement = None

    # -- epoch -----------------------------------------------------------------------------------

    @guarded("epoch_measures")
    def _start_epoch_measures(self) -> None:
        self._now.measures = EpochMeasures(self._now.device)
        self._now.measures.start()

    def _wants_recording(self) -> bool:
        # steps compiled whole run no module call that could be recorded, and on torch 2.4 dynamo
        # recompiles them whenever a global hook comes or goes
        if self._now.lockstep:  # by batch index alone, as on every other rank
            return self._now.record_from <= self._now.batches < self._now.record_from + self.measure_batches
        return (
            not self._now.compiled_steps
            and self._now.measurement is None
            and self._now.skip_reason is None
            and self._now.batches >= self._now.record_from
            and len(self._now.recorded) < self.measure_batches
            and "replay" not in self._switched_off
        )

    @guarded("replay")
    def _start_recording(self, pl_module: nn.Module) -> None:
        now = self._now
        if now.candidates is None:  # once per epoch: which modules do the model's work
            # under a sharded strategy parameters are whole only inside their module's call: only module calls
            # below the LightningModule are replayed
            now.candidates = recorded_modules(pl_module, root_whole=not now.lockstep)
        whole, opaque = now.candidates
        now.recorder = StepRecorder(
            whole, opaque, pl_module, functions=not now.lockstep, on_error=lambda err: self._switch_off("replay", err)
        )
        now.recorder.start()

    @guarded("replay")
    def _finish_recording(self, trainer: Trainer, pl_module: nn.Module) -> None:
        recorder, self._now.recorder = self._now.recorder, None
        if recorder is None:
            return
        tape = recorder.stop()
        if tape is not None:
            self._now.recorded.append(tape)
        if len(self._now.recorded) >= self.measure_batches:
            self._start_measurement(trainer, pl_module)

    def _stop_lockstep_recording(self) -> None:
        recorder, self._now.recorder = self._now.recorder, None
        if recorder is not None:
            self._now.recorded.append(recorder.stop())

    def _measure_in_lockstep(self, trainer: Trainer, pl_module: nn.Module) -> None:
        """Every rank replays its recorded batches at this batch end, exactly as rank zero decides: a
        module call of a sharded model gathers its parameters from every rank, so all must make the same
        calls at the same moment. Each decision is taken on rank zero from its own budget and sent to
        all (up to three small collectives, every rank makes each of them whatever it recorded); the replays
        run only if every rank recorded the same module calls on the same shapes."""
        batches, self._now.recorded = self._now.recorded, []
        ready = (
            not self._now.compiled_steps
            and "replay" not in self._switched_off
            and len(batches) == self.measure_batches
            and all(tape is not None for tape in batches)
        )
        shapes = None
        allowed = reuse = 0.0
        signature: tuple[Any, ...] = ()
        tapes = [tape for tape in batches if tape is not None]
        cached = None
        if ready:
            try:
                signature = tuple(tape.signature for tape in tapes)
                shapes = repr([[(self._now.paths.get(key, key), *rest) for key, *rest in sig] for sig in signature])
                seconds_per_batch = sorted(self._now.batch_seconds)[len(self._now.batch_seconds) // 2]
                now = self._now
                remaining = max(0, (_total_batches(trainer, now.stage or "val") or now.batches) - now.batches)
                allowed = self._budget.allowed(remaining * seconds_per_batch, self._now.run_seconds)
                cached = self._cache.get(signature)
                reuse = float(cached is not None and self._budget.reusable(cached[0], signature, allowed))
            except Exception as err:
                self._switch_off("replay", err)
                ready = False
        plans = gather_objects(trainer, {"ready": ready, "calls": shapes, "allowed": allowed, "reuse": reuse})
        if not all(p["ready"] for p in plans) or len({p["calls"] for p in plans}) != 1:
            self._now.skip_reason = "replay skipped in this epoch: the ranks did not all record the same module calls"
            return
        if plans[0]["reuse"] and cached is not None:
            self._now.measurement = cached
            return
        measurement = Measurement(
            self._budget, tapes, signature, self._now.device, weight_storages(pl_module), plans[0]["allowed"],
            cached[0] if cached is not None else None, self._paused,
        )  # fmt: skip
        measurement.measure_memory()
        timing = self._budget.can_time(signature, measurement.allowed - measurement.spent)
        pairs = self._budget.pairs(measurement.allowed - measurement.spent, measurement.run_cost()) if timing else 0
        plans = gather_objects(trainer, {"pairs": pairs, "oom": measurement.out_of_memory})
        if plans[0]["pairs"] and not any(p["oom"] for p in plans):
            measurement.time_pairs(plans[0]["pairs"])
        if measurement.out_of_memory:
            self._report_oom()
        self._finish_measurement(measurement)

    def _paused(self) -> AbstractContextManager[None]:
        return self._now.measures.paused() if self._now.measures is not None else nullcontext()

    @guarded("replay")
    def _start_measurement(self, trainer: Trainer, pl_module: nn.Module) -> None:
        """Memory always (one replay with gradients on, one off); time as the budget allows
        (``lightning_nograd.core.savings.budget``). A measurement is reused while what decides the graph stays the
        same (``lightning_nograd.core.savings.recording.tape_signature``)."""
        batches = [tape for tape in self._now.recorded if tape is not None]
        self._now.recorded = []
        signature = tuple(tape.signature for tape in batches)
        seconds_per_batch = sorted(self._now.batch_seconds)[len(self._now.batch_seconds) // 2]
        remaining = max(0, (_total_batches(trainer, self._now.stage or "val") or self._now.batches) - self._now.batches)
        allowed = self._budget.allowed(remaining * seconds_per_batch, self._now.run_seconds)
        cached = self._cache.get(signature)
        if cached is not None and self._budget.reusable(cached[0], signature, allowed):
            self._now.measurement = cached
            return
        memory_from = cached[0] if cached is not None else None
        exclude = weight_storages(pl_module)
        measurement = Measurement(
            self._budget, batches, signature, self._now.device, exclude, allowed, memory_from, self._paused
        )
        measurement.start()
        if measurement.out_of_memory:
            self._report_oom()
        self._finish_measurement(measurement)

    def _finish_measurement(self, measurement: Measurement) -> None:
        result, info = measurement.result()
        cached = self._cache.get(measurement.signature)
        if cached is not None and not result.out_of_memory:
            # a running estimate over the whole fit: this epoch's blocks join the earlier ones of the same step
            info["pairs_this_epoch"] = result.pairs
            result = result.with_earlier(cached[0])
            info["repeats"] = result.pairs
        self._now.measurement = (result, info)
        if not result.out_of_memory:
            self._cache[measurement.signature] = self._now.measurement

    def _report_oom(self) -> None:
        if self.allow.names(messages.REPLAY_SUBJECT):
            return
        stage = self._now.stage or "val"
        text = messages.grad_replay_oom()
        self._add_finding(
            Finding(
                "grad_replay_oom",
                messages.REPLAY_SUBJECT,
                stage,
                f"{LOOP_NAMES[stage]}_step",
                self._now.batches - 1,
                self._now.epoch,
                *text,
            )
        )

    def _stop_recording(self) -> None:
        if self._now.recorder is not None:
            self._now.recorder.stop()
            self._now.recorder = None

    def _epoch_metrics(self, stage: str) -> tuple[dict[str, float], dict[str, Any]]:
        prefix = f"nograd/{stage}"
        metrics: dict[str, float] = {}
        details: dict[str, Any] = {"batches": self._now.batches}
        if self._now.measures is not None and "epoch_measures" not in self._switched_off:
            metrics[f"{prefix}/epoch_time_s"], metrics[f"{prefix}/peak_memory_mib"] = self._now.measures.stop()
            details["peak_memory_of"] = "CUDA allocator" if self._now.device.type == "cuda" else "process RSS"
        measurement = self._now.measurement
        if measurement is None:
            details["savings"] = self._now.skip_reason or (
                "not measured: the LightningModule was compiled whole (`torch.compile(model)`), so its steps run as "
                "compiled code in which module calls cannot be recorded; compile submodules to have them measured"
                if self._now.compiled_steps
                else "nothing the step ran would record a graph with gradients on (no module with parameters, "
                "no trainable parameter used)"
            )
            return metrics, details
        result, info = measurement
        details.update(info)
        untimed = (
            f"time not measured: the run so far is too short for {self.min_repeats} timed pairs "
            f"within its {percent(self.budget)} time budget"
        )
        if self._now.more_epochs and stage == "val":
            untimed += " (tried again in the next validation epoch)"
        epoch_seconds = metrics.get(f"{prefix}/epoch_time_s", 0.0)
        savings, savings_details = savings_metrics(result, self._now.batches, epoch_seconds, self._now.device, untimed)
        metrics.update({f"{prefix}/{key}": value for key, value in savings.items()})
        details.update(savings_details)
        if details.get("savings") == untimed:
            details["savings_options"] = ["budget", "repeats"]  # what would measure it: the table names them
        return metrics, details


_KEYS = (
    "epoch_time_s",
    "peak_memory_mib",
    "graph_memory_mib",
    "memory_saved_mib",
    "time_saved_s",
    "time_saved_pct",
    "time_saved_pct_err",
)


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


def _projected_fit_seconds(trainer: Trainer, started: float) -> float | None:
    """How long the whole ``fit`` will take, from the epochs done so far and ``max_epochs`` (``None`` outside
    ``fit`` or without a finite ``max_epochs``; never called for the sanity check)."""
    try:
        if getattr(getattr(trainer, "state", None), "fn", None) != "fit":
            return None
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 1:
            return None
        done = int(trainer.current_epoch) + 1  # this validation epoch ends training epoch `current_epoch`
        return (time.perf_counter() - started) * max(1.0, max_epochs / done)
    except (AttributeError, TypeError, ValueError):
        return None


def _more_epochs_follow(trainer: Trainer) -> bool:
    """Whether this is a ``fit`` with training epochs left after this one (so another validation epoch comes)."""
    try:
        if getattr(getattr(trainer, "state", None), "fn", None) != "fit":
            return False
        max_epochs = trainer.max_epochs
        return max_epochs is None or max_epochs < 0 or int(trainer.current_epoch) + 1 < max_epochs
    except (AttributeError, TypeError, ValueError):
        return False


def _shards_parameters(trainer: Trainer) -> bool:
    """Whether the strategy shards parameters, so that a module call gathers them from every rank
    (``FSDPStrategy``, ``ModelParallelStrategy`` with FSDP2's ``fully_shard``)."""
    name = type(getattr(trainer, "strategy", None)).__name__
    return "FSDP" in name or "ModelParallel" in name


def _replay_refusal(trainer: Trainer, device: torch.device) -> str | None:
    """Why the replay must not run: under DeepSpeed (its engine runs module calls in ways a replay cannot
    follow), or on this torch (``lightning_nograd.core.plumbing.torch_internals.replay_refusal``)."""
    name = type(getattr(trainer, "strategy", None)).__name__
    if "DeepSpeed" in name:
        return (
            f"replay skipped under {name}: its engine partitions parameters inside module calls in ways a "
            "replay cannot follow"
        )
    return torch_internals.replay_refusal(device)
