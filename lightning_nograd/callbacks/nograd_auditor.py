"""NoGradAuditor: the one-line callback, composed of the three parts with one shared report."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from typing_extensions import override

from lightning_nograd.callbacks._base import LOOP_NAMES, EvaluationLoopCallback, NoGradCallback
from lightning_nograd.callbacks._lightning import LightningModule, Trainer, is_global_zero, is_logger
from lightning_nograd.callbacks.backprop_guard import BackpropGuard
from lightning_nograd.callbacks.eval_mode_auditor import EvalModeAuditor
from lightning_nograd.callbacks.loggers import MetricSink, flat_summary, write_summaries
from lightning_nograd.callbacks.savings_monitor import SavingsMonitor
from lightning_nograd.core.plumbing.arguments import check_bool, check_float, check_int
from lightning_nograd.core.plumbing.module_paths import NamePatterns
from lightning_nograd.core.reporting.findings import FindingLog, OnViolation, user_stacklevel
from lightning_nograd.core.reporting.report import unwritable_reason
from lightning_nograd.core.reporting.summary import render, summarise
from lightning_nograd.errors import NoGradWarning

log = logging.getLogger(__name__)


PartT = TypeVar("PartT", bound=NoGradCallback)

#: The hooks Lightning calls on every batch (or step).
PER_BATCH_HOOKS = (
    "on_train_batch_start",
    "on_train_batch_end",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_test_batch_start",
    "on_test_batch_end",
    "on_predict_batch_start",
    "on_predict_batch_end",
    *("on_before_zero_grad", "on_before_backward", "on_after_backward", "on_before_optimizer_step"),
)


def _part_hooks() -> tuple[str, ...]:
    """The Lightning hooks the parts implement in their own classes (not Lightning's no-op ``Callback``)."""
    names: set[str] = set()
    for part in (EvalModeAuditor, SavingsMonitor, BackpropGuard):
        for cls in part.__mro__:
            if cls.__module__.startswith("lightning_nograd."):
                names |= {name for name, value in vars(cls).items() if name.startswith("on_") and callable(value)}
    return tuple(sorted(names - {"on_exception"}))  # on_exception: NoGradAuditor's own, below


class NoGradAuditor(NoGradCallback):
    """Everything in one line: ``Trainer(callbacks=[NoGradAuditor()])``.

    Runs ``EvalModeAuditor``, ``SavingsMonitor`` and ``BackpropGuard`` (each can be
    switched off) with one shared ``report``. After each ``fit``, ``validate`` and ``test`` call,
    rank zero prints one compact table of that call (rich when installed): per stage, epochs, mean
    epoch time, peak memory, the memory and time saved, long notes as footnotes, and every finding
    not printed before, with its fix. The same summary
    goes where each logger shows summaries (W&B run summary, TensorBoard text, MLflow run, a JSON
    file beside CSV logs), and optionally to ``report_path`` as JSON so CI pipelines can gate on it.

    Logged metrics: everything its parts log (see each part).

    Args:
        on_violation: ``"warn"``, ``"fix"`` or ``"error"``, passed to the auditor and the guard.
        verbose: print the end-of-stage table (findings are warned either way).
        audit_eval: run the ``EvalModeAuditor`` part.
        monitor_savings: run the ``SavingsMonitor`` part.
        guard_backprop: run the ``BackpropGuard`` part.
        allow_train_mode: see ``EvalModeAuditor``.
        allow_grad: see ``EvalModeAuditor``.
        allow: see ``BackpropGuard`` (and, for the collections that grow across evaluation epochs and the
            savings replay, ``EvalModeAuditor`` and ``SavingsMonitor``). Each finding's fix ends with the exact
            pattern, and its option, that silences it.
        budget: share of the run's time the timed savings replays may take (default 1.5%); the
            memory figures are measured at any budget (see the docs' SavingsMonitor page).
        repeats: timed on/off pairs per savings measurement, whatever the budget (``None``: as many
            as ``budget`` allows); see ``SavingsMonitor``.
        report_path: where to write ``report.to_dict()`` as JSON after each stage (``None``: nowhere).

    Raises:
        ValueError: ``on_violation`` is not ``"warn"``, ``"fix"`` or ``"error"``, or a pattern is bad.
        TypeError: a switch is not a bool, or another argument has the wrong type.

    Examples:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[NoGradAuditor(report_path="nograd_report.json")])
    """

    # Every hook a part implements is a slot of the auditor holding that hook's handlers, filled once at
    # construction (`_route`): a part's method where one part handles it, all of them in order where
    # several do. Lightning's call of a per-batch hook so costs what a method call costs.
    __slots__ = _part_hooks()

    def __init__(
        self,
        on_violation: OnViolation = "warn",
        verbose: bool = True,
        audit_eval: bool = True,
        monitor_savings: bool = True,
        guard_backprop: bool = True,
        allow_train_mode: Iterable[str] = (),
        allow_grad: Iterable[str] = (),
        allow: Iterable[str] = (),
        budget: float = 0.015,
        repeats: int | None = None,
        report_path: str | Path | None = None,
    ) -> None:
        super().__init__(on_violation)
        self.verbose = check_bool("verbose", verbose)
        self.report_path = _check_path(report_path)
        # every argument is checked, and under its own name, whether or not its part is switched on
        check_float("budget", budget, 0.0, 1000.0)
        if repeats is not None:
            check_int("repeats", repeats, 1)
        for argument, patterns in (
            ("allow_train_mode", allow_train_mode),
            ("allow_grad", allow_grad),
            ("allow", allow),
        ):
            NamePatterns(argument, patterns)
        self._parts: list[NoGradCallback] = []
        if check_bool("audit_eval", audit_eval):
            self._parts.append(EvalModeAuditor(on_violation, allow_train_mode, allow_grad, allow))
        if check_bool("monitor_savings", monitor_savings):
            self._parts.append(SavingsMonitor(budget=budget, repeats=repeats, allow=allow))
        if check_bool("guard_backprop", guard_backprop):
            self._parts.append(BackpropGuard(on_violation, allow))
        self._findings_printed = 0
        self._sink = MetricSink(holding=True)  # one row per step for each logger, whatever the parts log
        for part in self._parts:
            part._share(self.report, self._sink)
        self._route()

    def _route(self) -> None:
        """Fill each hook's slot with the handlers of the parts that implement it and watch its loop; the
        hooks of epochs and stages then send what the parts logged, together."""
        for hook in type(self).__slots__:
            handlers = tuple(getattr(p, hook) for p in self._parts if implements(p, hook) and _watches(p, hook))
            if hook not in PER_BATCH_HOOKS:
                setattr(self, hook, _CallEach(handlers, self._sink))
            elif len(handlers) == 1:
                setattr(self, hook, handlers[0])  # batch hooks log nothing: no metrics to send after them
            else:
                setattr(self, hook, _CallEach(handlers))

    def __setstate__(self, state: dict[str, Any]) -> None:
        # unpickled (a spawned worker, a deep copy): the slots are routed again, to the parts of this copy
        self.__dict__.update(state)
        self._route()

    @override
    def _state_key_settings(self) -> dict[str, Any]:
        return {**super()._state_key_settings(), "parts": [type(p).__name__ for p in self._parts]}

    @override
    def _handoff_logs(self) -> list[FindingLog]:
        return [part._findings for part in self._parts]

    def part(self, kind: type[PartT]) -> PartT | None:
        """The part of type ``kind`` (``EvalModeAuditor``, ``SavingsMonitor``, ``BackpropGuard``), if switched on.

        Examples:
            >>> auditor = NoGradAuditor(monitor_savings=False)
            >>> auditor.part(SavingsMonitor) is None, type(auditor.part(BackpropGuard)).__name__
            (True, 'BackpropGuard')
        """
        return next((p for p in self._parts if isinstance(p, kind)), None)

    def _each(self, hook: str, *args: Any, **kwargs: Any) -> None:
        _CallEach(tuple(getattr(part, hook) for part in self._parts), self._sink)(*args, **kwargs)

    # -- the hooks with work of their own; every other hook is a slot (see `_route`) --------------

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._each("setup", trainer, pl_module, stage)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._each("teardown", trainer, pl_module, stage)
        super().teardown(trainer, pl_module, stage)
        self._end_of_stage_report(trainer, stage)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # nothing here may replace the user's exception: Lightning would then skip finalizing the loggers
        try:
            self._each("on_exception", trainer, pl_module, exception)
        except Exception as err:
            log.debug("releasing after the run's exception failed", exc_info=err)
        if is_global_zero(trainer):
            self._write_report()  # a crashed run is exactly what CI must see

    def _write_report(self) -> None:
        """Write the JSON report to ``report_path``; a failure is one warning, never an exception."""
        if self.report_path is None or "report_path" in self._switched_off:
            return
        try:
            self.report.write_json(self.report_path)
        except OSError as err:
            self._switched_off.add("report_path")
            warnings.warn(
                f"[lightning-nograd] could not write the report to `report_path` ({self.report_path}): "
                f"{type(err).__name__}: {err}. The run goes on; the report is still in `callback.report`.",
                NoGradWarning,
                stacklevel=user_stacklevel(),
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {type(p).__name__: p.state_dict() for p in self._parts}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part in self._parts:
            state = state_dict.get(type(part).__name__)
            if isinstance(state, dict):
                part.load_state_dict(state)

    # -- the end-of-stage report ---------------------------------------------------------------------

    def _end_of_stage_report(self, trainer: Trainer, stage: str) -> None:
        if stage not in ("fit", "validate", "test"):
            # predict has no epoch metrics to summarise, but its findings belong in the JSON report
            if stage == "predict" and is_global_zero(trainer):
                self._write_report()
            return
        try:
            summaries = [s.to_dict() for s in summarise(self.report)]
            # the table costs milliseconds (and rich's import): build it only for someone to read
            wants_text = self.verbose or any(is_logger(lg, "TensorBoardLogger") for lg in trainer.loggers)
            # the table shows this Trainer call's rows and the findings not printed before
            text = (
                render(self.report, call=self.report.calls, findings_from=self._findings_printed) if wants_text else ""
            )
            self._findings_printed = len(self.report.findings)
            if trainer.loggers:
                write_summaries(trainer, flat_summary(summaries, len(self.report.findings)), text)
            if not is_global_zero(trainer):
                return
            if self.verbose:
                print(text)
            self._write_report()
        except Exception as err:  # the report is a courtesy: it must never fail the run
            log.warning("lightning-nograd could not produce its end-of-stage report: %s", err)


class _CallEach:
    """Calls each of ``handlers`` with the same arguments, then sends the metrics the sink holds (if given)."""

    __slots__ = ("handlers", "sink")

    def __init__(self, handlers: tuple[Any, ...], sink: MetricSink | None = None) -> None:
        self.handlers = handlers
        self.sink = sink

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        try:
            for handler in self.handlers:
                handler(*args, **kwargs)
        finally:
            sink = self.sink
            if sink is not None and sink.held:
                sink.flush()

    def __getstate__(self) -> tuple[tuple[Any, ...], MetricSink | None]:
        return self.handlers, self.sink

    def __setstate__(self, state: tuple[tuple[Any, ...], MetricSink | None]) -> None:
        self.handlers, self.sink = state


def _watches(part: NoGradCallback, hook: str) -> bool:
    """Whether ``part`` watches the stage of the batch hook ``hook`` (``on_test_batch_end``: ``test``)."""
    stage = {loop: stage for stage, loop in LOOP_NAMES.items()}.get(hook.split("_")[1])
    return stage is None or not isinstance(part, EvaluationLoopCallback) or part._watches(stage)


def implements(part: NoGradCallback, hook: str) -> bool:
    """Whether ``part``'s class (not Lightning's no-op ``Callback``) defines ``hook``."""
    owner = next((cls for cls in type(part).__mro__ if hook in vars(cls)), None)
    return owner is not None and owner.__module__.startswith("lightning_nograd.")


def _check_path(value: Any) -> Path | None:
    """``report_path`` as a ``Path``, refused at once where no file can ever be written."""
    if value is None:
        return None
    if not isinstance(value, (str, Path)) or not str(value):
        raise TypeError(f"Expected argument `report_path` to be a file path or None, but got {value!r}.")
    path = Path(value)
    problem = unwritable_reason(path)
    if problem == "it is a directory":
        raise ValueError(f"Expected argument `report_path` to be a file path, but got the directory {str(value)!r}.")
    if problem is not None:
        raise ValueError(
            f"Expected argument `report_path` to be a writable file path, but got {str(value)!r}: {problem}."
        )
    return path
