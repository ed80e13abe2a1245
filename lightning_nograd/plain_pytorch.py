"""The same audits for code that does not use Lightning.

* ``with audit(model) as report:`` around a plain PyTorch evaluation loop finds modules that run
  in train mode and forwards that record a graph, and measures what ``no_grad`` saves, into the
  same ``lightning_nograd.core.reporting.report.Report`` the callbacks fill.
* ``check_training_step`` runs one training step's forward and backward and names what will
  not learn, then puts the model back as it was.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_nograd.core.checks.eval_mode_at_start import eval_mode_under_trainable
from lightning_nograd.core.checks.gradient_gaps import GradModeProbe, explain_gradient_gaps
from lightning_nograd.core.checks.gradients import without_gradient
from lightning_nograd.core.checks.graph import GraphEvent, GraphProbe
from lightning_nograd.core.checks.inference_tensors import inference_tensors
from lightning_nograd.core.checks.modes import ModeProbe
from lightning_nograd.core.checks.tensors import MIB, module_device, tally_tensors, weight_storages
from lightning_nograd.core.checks.unstepped_gradients import UnsteppedGradients, describe_groups
from lightning_nograd.core.plumbing import torch_internals
from lightning_nograd.core.plumbing.arguments import check_bool, check_int
from lightning_nograd.core.plumbing.faults import Probe, report_fault
from lightning_nograd.core.plumbing.model_index import ParamIndex
from lightning_nograd.core.plumbing.module_paths import NamePatterns, named_modules
from lightning_nograd.core.reporting import messages
from lightning_nograd.core.reporting.findings import Finding, FindingLog, OnViolation, Policy
from lightning_nograd.core.reporting.report import Report
from lightning_nograd.core.savings.estimate import savings_metrics
from lightning_nograd.core.savings.recording import StepRecorder, Tape, call_hooks, recorded_modules, replayable
from lightning_nograd.core.savings.replay import EAGER_REPLAY_NOTE, Replay
from lightning_nograd.errors import BrokenBackpropWarning

__all__ = ["audit", "check_training_step"]

_LOOP = "evaluation loop"


class _EvaluationAudit(Probe):
    """The state behind ``audit``: probes on one model, batch boundaries at its forward."""

    def __init__(
        self,
        model: nn.Module,
        log: FindingLog,
        allow_train_mode: NamePatterns,
        allow_grad: NamePatterns,
        allow: NamePatterns,
        monitor_savings: bool,
        repeats: int,
    ) -> None:
        self.model = model
        self.log = log
        self.allow_grad = allow_grad
        self.allow = allow
        self.root_type = type(model).__name__
        self.batch = -1
        self.depth = 0
        self.grad_off_around = True  # gradients were off as the batch started: a graph was enabled inside
        self.repeats = repeats
        self.modes = ModeProbe(
            model,
            allow_train_mode,
            self._on_train_forward,
            log.policy.fixes,
            report_at_once=log.policy.raises,
        )
        self.graph = GraphProbe(model, frozenset(), self._graph_finding, allow_grad.matches, log.policy.raises)
        # one batch is what runs from one call of the model to the next (the loop's loss included); the second
        # batch is the one replayed: the first pays for lazy set-up and warm caches
        self.recorder: StepRecorder | None = None
        if monitor_savings:
            whole, opaque = recorded_modules(model)
            self.recorder = StepRecorder(whole, opaque, model, on_error=self._recorder_failed)
        self.recorded: Tape | None = None
        self.handles: list[RemovableHandle] = []

    def start(self) -> None:
        self.modes.refresh()
        self.graph.start()
        self.handles = call_hooks(self, self._pre, self._post)
        if self.recorder is not None:
            self.recorder.start(record=False)  # after the batch hooks: a batch begins before the recorder looks

    def _recorder_failed(self, err: BaseException) -> None:
        report_fault(self, err)

    def stop(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.recorder is not None:
            self.recorded = self.recorder.stop() or self.recorded
        self.graph.flush()
        self.modes.close()
        self.graph.close()

    def _pre(self, module: nn.Module, args: Any) -> None:
        if module is not self.model:
            return
        self.depth += 1
        if self.depth > 1:
            return
        self.batch += 1
        self.grad_off_around = not torch.is_grad_enabled()
        if self.recorder is not None and self.batch <= 2:
            self.recorded = self.recorder.end() or self.recorded
            if self.batch < 2:
                self.recorder.begin()
        self.graph.new_batch()
        self.modes.before_batch()

    def _post(self, module: nn.Module, args: Any, kwargs: dict[str, Any] | None, output: Any) -> None:
        if module is not self.model:
            return
        self.depth -= 1
        if self.depth > 0:
            return
        self.modes.after_batch()
        self.graph.flush()
        tally = tally_tensors(output)
        if tally.attached and not self.allow_grad.names("model outputs"):
            kept = tally.kept_bytes(weight_storages(self.model)) / MIB
            self._add(
                "graph_in_outputs",
                "model outputs",
                messages.graph_in_outputs("the model", "model outputs", tally, kept, self.grad_off_around),
            )

    def _add(self, kind: str, subject: str, text: messages.Explanation) -> None:
        self.log.add(Finding(kind, subject, "val", _LOOP, self.batch, 0, *text))

    def _on_train_forward(
        self, path: str, module: nn.Module, confirmed: bool, layers: list[tuple[str, nn.Module]], hook: str | None
    ) -> None:
        self._add("train_mode", path, messages.train_mode(path, module, self.root_type, confirmed, "the batch", layers))

    def _graph_finding(self, event: GraphEvent, modules: list[str]) -> None:
        self._add(
            "grad_enabled", event.module, messages.grad_enabled(event, modules, self.root_type, self.grad_off_around)
        )

    def savings(self, loop_seconds: float) -> tuple[dict[str, float], dict[str, Any]]:
        metrics: dict[str, float] = {"epoch_time_s": loop_seconds}
        details: dict[str, Any] = {"batches": self.batch + 1}
        if self.recorded is None:
            details["savings"] = "no forward of the model was recorded"
            return metrics, details
        if self.recorded.compiled:
            details["compiled"] = EAGER_REPLAY_NOTE
        device = module_device(self.model)
        refusal = torch_internals.replay_refusal(device)
        if refusal is not None:
            details["savings"] = refusal
            return metrics, details
        session = Replay(replayable(self.recorded), device, weight_storages(self.model))
        session.measure_memory()
        if not session.result.out_of_memory:
            session.time_pairs(self.repeats)
        result = session.result
        if result.out_of_memory:
            if not self.allow.names(messages.REPLAY_SUBJECT):
                self._add("grad_replay_oom", messages.REPLAY_SUBJECT, messages.grad_replay_oom())
        details["repeats"] = result.pairs
        savings, savings_details = savings_metrics(result, self.batch + 1, loop_seconds, device, "time not measured")
        metrics.update(savings)
        details.update(savings_details)
        return metrics, details


@contextmanager
def audit(
    model: nn.Module,
    on_violation: OnViolation = "warn",
    allow_train_mode: Iterable[str] = (),
    allow_grad: Iterable[str] = (),
    monitor_savings: bool = True,
    repeats: int = 10,
    allow: Iterable[str] = (),
) -> Iterator[Report]:
    """Audit a plain PyTorch evaluation loop: ``with audit(model) as report: ...``.

    Each call of ``model`` starts a batch, which runs until the next call: the loss the loop computes
    from the model's output is part of it, as it is of a Lightning evaluation step. Inside the block it
    finds modules that run in train mode and forwards that record an autograd graph (warned as they
    happen, like the callbacks); when the block ends it replays one recorded batch (the second, or the
    first if there is one only) with gradients on and off and adds the measured savings
    (``nograd/val/graph_memory_mib``, ``memory_saved_mib``, ``time_saved_s``, ``time_saved_pct`` and the
    loop's ``epoch_time_s``) to ``report.epochs``.

    Args:
        model: the model the loop calls.
        on_violation: ``"warn"``, ``"fix"`` (modules put in eval mode before their forward) or
            ``"error"`` (``lightning_nograd.NoGradError`` at the first violation).
        allow_train_mode: regular expressions of module paths allowed to stay in train mode.
        allow_grad: regular expressions of module paths allowed to record a graph (``"model outputs"``: the
            model may return tensors attached to one).
        monitor_savings: replay one batch to measure the savings when the block ends (the name
            ``NoGradAuditor`` uses for its savings part).
        repeats: timed on/off pairs for the time measurement (each a settled block of its own).
        allow: regular expressions of the other findings' subjects not to report (``"savings replay"``).

    Each finding's fix ends with the exact pattern that silences it (and the CLI option of the same name).

    Raises:
        ValueError, TypeError: bad arguments, naming the argument.

    Examples:
        >>> import warnings
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(), nn.Linear(8, 1))
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     with audit(net, monitor_savings=False) as report:  # forgot net.eval() and no_grad
        ...         for _ in range(3):
        ...             _ = net(torch.randn(2, 4))
        >>> sorted(f.kind for f in report.findings)
        ['grad_enabled', 'graph_in_outputs', 'train_mode']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected argument `model` to be a torch.nn.Module, but got {type(model).__name__}.")
    policy = Policy.of(on_violation)
    torch_internals.warn_missing()
    report = Report()
    log = FindingLog(policy, on_new=report.add_finding)
    session = _EvaluationAudit(
        model,
        log,
        NamePatterns("allow_train_mode", allow_train_mode),
        NamePatterns("allow_grad", allow_grad),
        NamePatterns("allow", allow),
        check_bool("monitor_savings", monitor_savings),
        check_int("repeats", repeats, 1),
    )
    session.start()
    started = time.perf_counter()
    try:
        yield report
    finally:
        loop_seconds = time.perf_counter() - started
        session.stop()
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    if monitor_savings and not session.failed:
        try:
            metrics, details = session.savings(loop_seconds)
        except Exception as err:  # the replay runs at the end of the user's `with` block: never raise there
            report_fault(session, err)
            metrics, details = {}, {"savings": f"not measured: internal error ({type(err).__name__})"}
    metrics = {f"nograd/val/{key}": value for key, value in metrics.items()}
    metrics["nograd/val/violations"] = float(log.epoch_count("val"))
    report.record_epoch("val", 0, 0, metrics, details)


def check_training_step(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    on_violation: OnViolation = "warn",
    allow: Iterable[str] = (),
) -> Report:
    """Check one training step for broken backprop, and leave the model as it was.

    Runs ``loss_fn(model, batch)`` and its backward, then names: modules with trainable
    parameters whose forward ran only with gradients disabled, parameters (of ``optimizer``, or
    all trainable ones) that got no gradient and why, dropout / batch-norm layers in eval mode
    inside trainable blocks, and inference tensors held by the model. Gradients, buffers (batch-norm
    statistics) and the RNG state are restored afterwards; no optimizer step is taken.

    Args:
        model: the model to check.
        batch: one batch, passed to ``loss_fn`` as is.
        loss_fn: ``loss_fn(model, batch)`` returns the scalar loss of a training step.
        optimizer: only its parameters are checked for gradients (default: every trainable one).
        on_violation: ``"warn"``/``"fix"`` warn (``BrokenBackpropWarning``), ``"error"`` raises.
        allow: regular expressions of module paths never to report.

    Returns:
        A ``lightning_nograd.core.reporting.report.Report`` whose ``findings`` name what will not learn.

    Examples:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> def loss_fn(model, batch):
        ...     x, y = batch
        ...     with torch.no_grad():
        ...         h = model[0](x)
        ...     return ((model[2](model[1](h)) - y) ** 2).mean()
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     report = check_training_step(net, (torch.randn(3, 4), torch.randn(3, 1)), loss_fn)
        >>> [(f.kind, f.subject) for f in report.findings]
        [('no_grad_module', '0')]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected argument `model` to be a torch.nn.Module, but got {type(model).__name__}.")
    if not callable(loss_fn):
        raise TypeError(f"Expected argument `loss_fn` to be callable, but got {type(loss_fn).__name__}.")
    policy = Policy.of(on_violation)
    allowed = NamePatterns("allow", allow)
    torch_internals.warn_missing()
    report = Report()
    log = FindingLog(policy, BrokenBackpropWarning, on_new=report.add_finding)
    root_type = type(model).__name__

    def add(kind: str, subject: str, hook: str, text: messages.Explanation) -> None:
        log.add(Finding(kind, subject, "train", hook, 0, 0, *text))

    for path, kind in inference_tensors(model, allowed.matches):
        add("inference_tensor", path, "before the step", messages.inference_tensor(path, kind))
    for path, layers in eval_mode_under_trainable(model, None, allowed.matches):
        add("eval_mode_at_start", path, "before the step", messages.eval_mode_at_start(path, layers, root_type))

    index = ParamIndex(model)
    params = index.stepped(optimizer, allowed.matches)
    saved_grads = {id(p): p.grad for p in index.params.values()}
    saved_buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    # CPU and every CUDA device the model uses: dropout in the checked step must not shift the user's RNG
    cuda_devices = sorted({p.device.index or 0 for p in index.params.values() if p.device.type == "cuda"})
    rng = contextlib.ExitStack()
    rng.enter_context(torch.random.fork_rng(devices=cuda_devices))
    probe = GradModeProbe({id(m): path for path, m in named_modules(model) if not allowed.matches(path)})
    unstepped = UnsteppedGradients(allowed.matches)
    unstepped.start(index)
    try:
        for p in index.params.values():
            p.grad = None
        if optimizer is not None:
            unstepped.before_backward([optimizer])
        probe.start()
        try:
            loss = loss_fn(model, batch)
        finally:
            probe.stop()
        if loss.requires_grad:
            loss.backward()  # type: ignore[no-untyped-call]
        if optimizer is not None:  # gradients the backward made that the optimizer will never apply
            for group in unstepped.step([optimizer]):
                text = messages.grad_without_step(
                    group.subject, group.parameters, group.modules, group.kinds, group.mib,
                    describe_groups([optimizer]), root_type,
                )  # fmt: skip
                add("grad_without_step", group.subject, "training step", text)
        for gap in explain_gradient_gaps(index, without_gradient(params), probe):
            if not allowed.matches(gap.subject):
                add(gap.kind, gap.subject, "training step", gap.explanation(root_type))
        probe.release()
    finally:
        for p in index.params.values():
            p.grad = saved_grads.get(id(p))
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in saved_buffers and buffer.shape == saved_buffers[name].shape:
                    buffer.copy_(saved_buffers[name])
        rng.close()  # RNG states as they were
    return report
