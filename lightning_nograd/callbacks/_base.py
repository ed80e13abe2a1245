"""What every lightning-nograd callback shares: argument checks, findings, fault isolation."""

from __future__ import annotations

import dataclasses
import functools
import logging
import warnings
import weakref
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from typing_extensions import override

from lightning_nograd.callbacks._lightning import (
    LightningModule,
    Trainer,
    forget_lightning_module,
    is_global_zero,
    log_step,
    world_size,
)
from lightning_nograd.callbacks.handoff import ReportHandoff
from lightning_nograd.callbacks.loggers import MetricSink, gather_objects
from lightning_nograd.callbacks.namespaces import CallbackBase
from lightning_nograd.core.plumbing import torch_internals
from lightning_nograd.core.plumbing.faults import fault_message
from lightning_nograd.core.reporting.findings import Finding, FindingLog, OnViolation, Policy, user_stacklevel
from lightning_nograd.core.reporting.report import Report
from lightning_nograd.errors import NoGradError, NoGradWarning

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
C = TypeVar("C", bound="NoGradCallback")


def guarded(check: str) -> Callable[[Callable[Concatenate[C, P], R]], Callable[Concatenate[C, P], R | None]]:
    """Run a method as part of ``check`` (``NoGradCallback._checked``): nothing once ``check`` is switched off,
    and an internal failure switches it off with one warning; ``NoGradError`` (the user asked to stop) passes."""

    def decorate(method: Callable[Concatenate[C, P], R]) -> Callable[Concatenate[C, P], R | None]:
        @functools.wraps(method)
        def run(callback: C, *args: P.args, **kwargs: P.kwargs) -> R | None:
            return callback._checked(check, method, callback, *args, **kwargs)

        return run  # type: ignore[return-value]

    return decorate


_LIVE_STATE_KEYS: dict[str, weakref.WeakSet[NoGradCallback]] = {}


def _settings_key(callback: NoGradCallback) -> str:
    """The checkpoint key of ``callback``'s class and settings, in Lightning's own format
    (``Callback._generate_state_key``, 2.2 to 2.6), written out: the same in both namespaces."""
    return f"{type(callback).__qualname__}{callback._state_key_settings()!r}"


def _claim_state_key(callback: NoGradCallback) -> str:
    """The settings key, or ``key#N`` when another instance with the same settings is in use now.

    Only for Lightning's duplicate check when the ``Trainer`` is built, before any callback sees its
    trainer; ``setup`` then sets the key from the order in the trainer's list. An instance whose run
    ended (torn down) holds no number, so a fresh one in the same process (a notebook, a resuming
    script) gets the key a fresh process would give it.
    """
    base = _settings_key(callback)
    in_use = _LIVE_STATE_KEYS.setdefault(base, weakref.WeakSet())
    taken = {other._state_key for other in in_use if other is not callback}
    key, number = base, 1
    while key in taken:
        number += 1
        key = f"{base}#{number}"
    in_use.add(callback)
    return key


def _state_key_by_order(callback: NoGradCallback, callbacks: list[Any]) -> str | None:
    """The key from ``callback``'s place among the instances with its settings in the trainer's list (``None``:
    not in it); the instance is then in use."""
    base = _settings_key(callback)
    same = [cb for cb in callbacks if isinstance(cb, NoGradCallback) and _settings_key(cb) == base]
    position = next((i for i, cb in enumerate(same) if cb is callback), None)
    _LIVE_STATE_KEYS.setdefault(base, weakref.WeakSet()).add(callback)
    if position is None:
        return None
    return base if position == 0 else f"{base}#{position + 1}"


class NoGradCallback(CallbackBase):
    """Base of the lightning-nograd callbacks.

    Args:
        on_violation: ``"warn"``, ``"fix"`` or ``"error"``.

    Raises:
        ValueError: ``on_violation`` is not one of the allowed values.
    """

    _warning_category: type[NoGradWarning] = NoGradWarning

    def __init__(self, on_violation: OnViolation = "warn") -> None:
        super().__init__()
        self._policy = Policy.of(on_violation)  # decoded once: the checks ask it whether to fix or to raise
        self.on_violation: OnViolation = on_violation
        torch_internals.warn_missing()  # what a check cannot do on this torch, said as the callback is built
        self._report = Report()
        # where a run in spawned or forked worker processes (`ddp_spawn`, `ddp_notebook`) leaves the report
        # for this object in the launching process (see `report`); a name only, no file is made here
        self._handoff = ReportHandoff()
        self._switched_off: set[str] = set()
        self._findings = FindingLog(
            self._policy,
            self._warning_category,
            on_new=self._on_new_finding,
            on_ranks_added=self._on_ranks_added,
        )
        self._run: str | None = None  # the Trainer call under way (setup's `stage`)
        self._sink = MetricSink()
        self._state_key: str | None = None
        self._shared = False
        # the names the loop under watch gives Lightning's hooks (a Hugging Face or Fabric loop's): findings use them
        self._hook_names: dict[str, str] = {}
        # named counts of distinct members (the modules or parameters behind a metric), brought together over
        # the ranks with the findings
        self._counts: dict[str, set[str]] = {}

    def _state_key_settings(self) -> dict[str, Any]:
        """The constructor settings that tell two instances of this callback apart in a checkpoint."""
        return {"on_violation": self.on_violation}

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads this on every hook call (profiler names), so it is computed once.
        if self._state_key is None:
            self._state_key = _claim_state_key(self)
        return self._state_key

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Key the checkpoint state by settings and, for identical instances, by order in ``trainer.callbacks``."""
        self._state_key = _state_key_by_order(self, getattr(trainer, "callbacks", [])) or self._state_key
        self._hook_names = dict(getattr(trainer, "hook_names", None) or {})
        self._run = stage  # Lightning's `stage` here is the Trainer call: fit, validate, test, predict
        if not self._shared:  # a shared report is counted by its owner
            self.report.start_call()

    def _on_new_finding(self, finding: Finding) -> None:
        self._report.add_finding(finding)

    def _on_ranks_added(self, old: Finding, new: Finding) -> None:
        self._report.update_finding(old, new)

    @property
    def report(self) -> Report:
        """Every epoch's measurements and every finding of the runs this callback watched.

        Where Lightning ran them in worker processes (``ddp_spawn``, ``ddp_notebook``), the report comes
        back from rank zero's worker when the Trainer call returns: this object in the launching process
        holds it as if it had watched the run itself.
        """
        self._handoff.take(self._report, self._handoff_logs())
        return self._report

    def __getstate__(self) -> dict[str, Any]:
        # pickled for the next spawned workers: they carry on from the report the last ones left
        _ = self.report
        return self.__dict__.copy()

    def _handoff_logs(self) -> list[FindingLog]:
        """The finding logs that go with the report (``NoGradAuditor``: its parts')."""
        return [self._findings]

    def _hand_off(self, trainer: Trainer) -> None:
        """In rank zero's worker process (``ddp_spawn``, ``ddp_notebook``), leave the report for the launching one."""
        if self._handoff.in_worker and not self._shared and is_global_zero(trainer):
            self._handoff.leave(self._report, self._handoff_logs())

    def _share(self, report: Report, sink: MetricSink) -> None:
        """Use ``report`` and ``sink`` shared with sibling callbacks (used by ``NoGradAuditor``)."""
        self._report = report
        self._sink = sink
        self._shared = True

    def _add_finding(self, finding: Finding) -> bool:
        """Report ``finding`` under this callback's ``on_violation``; returns whether it was new."""
        if finding.run is None and self._run is not None:
            finding = dataclasses.replace(finding, run=self._run)
        if finding.hook in self._hook_names:
            finding = dataclasses.replace(finding, hook=self._hook_names[finding.hook])
        return self._findings.add(finding)

    def _set_rank_zero(self, trainer: Trainer) -> None:
        """Only rank zero prints warnings; every rank records findings, and in a distributed run
        names its rank in them (``_gather_findings`` brings them together)."""
        rank = int(getattr(trainer, "global_rank", 0)) if world_size(trainer) > 1 else None
        self._findings.join_run(rank, warns=is_global_zero(trainer))

    def _gather_findings(self, trainer: Trainer) -> None:
        """Every rank's findings to every rank (a collective, made at epoch and stage ends): rank zero
        warns those seen only elsewhere, and the report, the counts and the table name every rank
        that saw each. A rank whose checks are all switched off still takes part."""
        if world_size(trainer) <= 1:
            return
        payload: dict[str, Any] = {}
        try:
            payload = self._findings.export()
            payload["counts"] = {name: sorted(members) for name, members in self._counts.items()}
        except Exception as err:
            self._switch_off("findings", err)
        gathered = gather_objects(trainer, payload)
        if "findings" in self._switched_off:
            return
        try:
            self._findings.merge(gathered)
            for rank_counts in (p.get("counts", {}) for p in gathered):
                for name, members in rank_counts.items():
                    if name in self._counts:
                        self._counts[name].update(members)
        except Exception as err:
            self._switch_off("findings", err)

    def _checked(self, check: str, work: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R | None:
        """``work(*args, **kwargs)`` as part of ``check``: nothing once ``check`` is switched off, and an internal
        failure switches it off with one warning (``_switch_off``); ``NoGradError`` (the user asked to stop)
        passes. ``@guarded(check)`` runs a method so."""
        if check in self._switched_off:
            return None
        try:
            return work(*args, **kwargs)
        except NoGradError:
            raise
        except Exception as err:
            self._switch_off(check, err)
            return None

    def _switch_off(self, check: str, err: BaseException) -> None:
        """Turn ``check`` off after an internal failure, warning once."""
        if check in self._switched_off:
            return
        self._switched_off.add(check)
        try:
            self._release(check)
        except Exception as release_err:
            log.debug("releasing check %s failed", check, exc_info=release_err)
        if self._findings.may_warn:
            warnings.warn(
                fault_message(f"{type(self).__name__} check `{check}`", err),
                NoGradWarning,
                stacklevel=user_stacklevel(),
            )
        log.debug("check %s failed", check, exc_info=err)

    def _emit_epoch_metrics(
        self,
        trainer: Trainer,
        stage: str,
        compute: Callable[[], tuple[dict[str, float], dict[str, Any]]],
        reduce: Callable[[Trainer, dict[str, float]], dict[str, float]],
    ) -> None:
        """Compute this rank's metrics, reduce them over the ranks, record and log them.

        ``reduce`` (a collective under DDP) runs on every rank each time this is called, whether
        or not ``compute`` failed or the ``metrics`` check is switched off on this rank: a rank
        that skipped it would leave the others waiting. A rank with nothing to contribute sends
        an empty dict, which ``reduce`` must accept.
        """
        self._gather_findings(trainer)  # first: the counts below are then those of every rank
        metrics: dict[str, float] = {}
        details: dict[str, Any] = {}
        if "metrics" not in self._switched_off:
            try:
                metrics, details = compute()
            except Exception as err:
                self._switch_off("metrics", err)
                metrics, details = {}, {}
        if world_size(trainer) > 1:
            try:
                metrics = reduce(trainer, metrics)
            except Exception as err:
                self._switch_off("metrics", err)
        if "metrics" in self._switched_off:
            return
        try:
            step = int(trainer.global_step)
            self.report.record_epoch(stage, int(trainer.current_epoch), step, metrics, details or None, self._run)
            self._sink.emit(trainer, metrics, log_step(trainer, stage))
        except Exception as err:
            self._switch_off("metrics", err)

    def _release(self, check: str | None = None) -> None:
        """Remove the hooks of ``check`` (all checks when ``None``) and drop model references.

        Safe to call at any time, any number of times.
        """

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._release()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._release()
        self._hand_off(trainer)
        forget_lightning_module(self)
        _LIVE_STATE_KEYS.get(_settings_key(self), weakref.WeakSet()).discard(self)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"warned": self._findings.state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        warned = state_dict.get("warned", [])
        if isinstance(warned, list):
            self._findings.load_state(warned)


LOOP_NAMES = {"val": "validation", "test": "test", "predict": "predict"}
"""Our stage names to Lightning's loop names, as they appear in hook names (``on_{loop}_epoch_end``)."""


class EvaluationLoopCallback(NoGradCallback):
    """Turns Lightning's validation / test / predict hooks into one set of stage-aware calls.

    Subclasses override the ``_eval_*`` methods they need; ``_evaluation_stages`` says which of
    ``"val"``, ``"test"`` and ``"predict"`` they watch. The batch methods are called in every stage
    (a batch pays for no stage lookup) and must do nothing outside an epoch the subclass watches.
    """

    _evaluation_stages: frozenset[str] = frozenset({"val", "test", "predict"})

    def _eval_start(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """The loop of ``stage`` starts (the model is already in eval mode)."""

    def _eval_epoch_start(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """An epoch of ``stage`` starts."""

    def _eval_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch_idx: int) -> None:
        """A batch starts."""

    def _eval_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch_idx: int) -> None:
        """A batch ended; ``outputs`` is what the step returned."""

    def _eval_epoch_end(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """An epoch of ``stage`` ends (before the LightningModule's own epoch-end hook)."""

    def _eval_end(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """The loop of ``stage`` ends."""

    def _watches(self, stage: str) -> bool:
        return stage in self._evaluation_stages

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._watches("val"):
            self._eval_start(trainer, pl_module, "val")

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._watches("test"):
            self._eval_start(trainer, pl_module, "test")

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._watches("predict"):
            self._eval_start(trainer, pl_module, "predict")

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._watches("val"):
            self._eval_epoch_start(trainer, pl_module, "val")

    @override
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._watches("test"):
            self._eval_epoch_start(trainer, pl_module, "test")

    @override
    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._watches("predict"):
            self._eval_epoch_start(trainer, pl_module, "predict")

    @override
    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._eval_batch_start(trainer, pl_module, args[1])

    @override
    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._eval_batch_start(trainer, pl_module, args[1])

    @override
    def on_predict_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._eval_batch_start(trainer, pl_module, args[1])

    @override
    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._eval_batch_end(trainer, pl_module, args[0], args[2])

    @override
    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._eval_batch_end(trainer, pl_module, args[0], args[2])

    @override
    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._eval_batch_end(trainer, pl_module, args[0], args[2])

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._watches("val"):
            self._eval_epoch_end(trainer, pl_module, "val")

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._watches("test"):
            self._eval_epoch_end(trainer, pl_module, "test")

    @override
    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._watches("predict"):
            self._eval_epoch_end(trainer, pl_module, "predict")

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._watches("val"):
            self._eval_end(trainer, pl_module, "val")

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._watches("test"):
            self._eval_end(trainer, pl_module, "test")

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._watches("predict"):
            self._eval_end(trainer, pl_module, "predict")
