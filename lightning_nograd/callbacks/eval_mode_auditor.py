"""EvalModeAuditor: validation, test and predict run with every module in eval mode, gradients off."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_nograd.callbacks._base import LOOP_NAMES, EvaluationLoopCallback, guarded
from lightning_nograd.callbacks._lightning import LightningModule, Trainer, is_sanity_checking
from lightning_nograd.callbacks.loggers import reduce_present_max
from lightning_nograd.core.checks.graph import GraphEvent, GraphProbe
from lightning_nograd.core.checks.modes import ModeProbe
from lightning_nograd.core.checks.tensors import MIB, AttributeTensors, tally_tensors, weight_storages
from lightning_nograd.core.plumbing.counters import mode_switches
from lightning_nograd.core.plumbing.module_paths import NamePatterns, class_name
from lightning_nograd.core.plumbing.stack import calling_hook
from lightning_nograd.core.reporting import messages
from lightning_nograd.core.reporting.findings import Finding, OnViolation

EVAL_HOOK_NAMES = frozenset(
    name
    for loop in LOOP_NAMES.values()
    for name in (
        f"{loop}_step",
        f"on_{loop}_start",
        f"on_{loop}_end",
        f"on_{loop}_epoch_start",
        f"on_{loop}_epoch_end",
        f"on_{loop}_batch_start",
        f"on_{loop}_batch_end",
        f"on_{loop}_model_eval",
    )
)
AUDIT_KINDS = frozenset(
    {"train_mode", "grad_enabled", "graph_in_outputs", "graph_in_attribute", "growing_collection", "grad_replay_oom"}
)


class EvalModeAuditor(EvaluationLoopCallback):
    """Audits, and on request enforces, eval mode and disabled gradients in validation, test, predict.

    Checks every validation (sanity check included), test and predict batch for:

    * a module whose forward runs in train mode (dropout and batch norm active while evaluating);
    * a module whose forward records an autograd graph (gradients enabled, e.g. under
      ``torch.enable_grad()`` or a library function decorated with it);
    * tensors attached to an autograd graph returned from the step or kept in attributes of the
      LightningModule, and such collections that keep growing across epochs.

    A correct model costs one pass over a cached module list per batch: no module hooks are
    installed, so fused inference kernels (``nn.TransformerEncoderLayer``) stay on.

    Logged metrics (every validation and test epoch, not the sanity check):
        ``nograd/{stage}/violations``: distinct violations found in the epoch (0 when clean).

    Args:
        on_violation: ``"warn"`` warns once per distinct finding; ``"fix"`` also puts offending
            modules in eval mode before their forward runs, for the rest of the stage (Lightning
            restores modes afterwards), other findings are warned; ``"error"`` raises
            ``lightning_nograd.NoGradError`` at the first violation.
        allow_train_mode: regular expressions (full match on ``named_modules()`` paths) of modules
            that legitimately stay in train mode, e.g. MC dropout. Their submodules are allowed too.
        allow_grad: regular expressions of modules that legitimately record a graph while
            evaluating (saliency maps, forces from a physics model), and of the step outputs or attributes
            (``validation_step outputs``, ``self.preds``) that may hold one.
        allow: regular expressions of the attributes whose collections may grow across epochs
            (``self.preds``), as its finding names them.

    Each finding's fix ends with the exact pattern (and the CLI option) that silences it.

    Raises:
        ValueError: ``on_violation`` is not ``"warn"``, ``"fix"`` or ``"error"``, or a pattern is
            not a valid regular expression.
        TypeError: an allow-list is not a list of strings.

    Examples:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[EvalModeAuditor(allow_train_mode=[r"mc_dropout"])])
    """

    def __init__(
        self,
        on_violation: OnViolation = "warn",
        allow_train_mode: Iterable[str] = (),
        allow_grad: Iterable[str] = (),
        allow: Iterable[str] = (),
    ) -> None:
        super().__init__(on_violation)
        self.allow_train_mode = NamePatterns("allow_train_mode", allow_train_mode)
        self.allow_grad = NamePatterns("allow_grad", allow_grad)
        self.allow = NamePatterns("allow", allow)
        self._stage: str | None = None
        self._step_hook = ""
        self._batch_idx: int | None = None
        self._epoch = 0
        self._root_type = "LightningModule"
        self._modes: ModeProbe | None = None
        self._graph: GraphProbe | None = None
        self._fixed_by_stage: dict[str, set[str]] = {}
        self._attributes = AttributeTensors()
        self._fitting = False
        # gradients were off around the batch (Lightning's loops run under no_grad), so a graph means code inside
        # switched them on; a loop that is not Lightning's may have forgotten `no_grad` instead
        self._grad_off_around = True
        self._step_disables_grad = False

    @override
    def _state_key_settings(self) -> dict[str, Any]:
        settings = super()._state_key_settings()
        allowed = {"allow_train_mode": self.allow_train_mode.patterns, "allow_grad": self.allow_grad.patterns}
        if self.allow.patterns:  # (only then: checkpoints of runs without it keep their key)
            allowed["allow"] = self.allow.patterns
        return {**settings, **allowed}

    # -- the evaluation loops' events, as calls into core ---------------------------------------
    # (the probes' methods isolate their own failures: one switches that check off, the run goes on)

    @override
    def _eval_start(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._release()
        self._set_rank_zero(trainer)
        self._stage = stage
        self._fitting = getattr(getattr(trainer, "state", None), "fn", None) == "fit"  # a str enum
        self._step_disables_grad = bool(getattr(trainer, "eval_step_disables_grad", False))
        step_hook = f"{LOOP_NAMES[stage]}_step"
        self._step_hook = self._hook_names.get(step_hook, step_hook)
        self._epoch = int(trainer.current_epoch)
        self._root_type = class_name(pl_module)
        self._findings.start_epoch(stage)
        self._start_mode_probe(pl_module)
        self._start_graph_probe(pl_module)

    @override
    def _eval_epoch_start(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._epoch = int(trainer.current_epoch)
        if self._modes is not None:
            self._modes.refresh()
        self._count_collections(pl_module)

    @override
    def _eval_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch_idx: int) -> None:
        # every batch pays for this and the next hook: each does its cheap test inline and calls into a
        # check only when there is work (a mode to read or watch, a graph recorded, outputs to look at)
        self._batch_idx = batch_idx
        self._grad_off_around = self._step_disables_grad or not torch.is_grad_enabled()
        modes = self._modes
        if modes is not None and modes.settled_at != mode_switches.count:
            modes.before_batch()
        graph = self._graph
        if graph is not None and graph.has_events:
            graph.new_batch()

    @override
    def _eval_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch_idx: int) -> None:
        modes = self._modes
        if modes is not None and modes.settled_at != mode_switches.count:
            modes.after_batch()
        graph = self._graph
        if graph is not None and graph.has_events:
            graph.flush()
        if outputs is not None:
            self._check_outputs(pl_module, outputs)

    @override
    def _eval_epoch_end(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._batch_idx = None
        if self._graph is not None:
            self._graph.flush()
        self._check_attributes(pl_module)

    @override
    def _eval_end(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._graph is not None:
            self._graph.flush()
        self._release()
        if stage in ("val", "test") and not is_sanity_checking(trainer):
            self._log_violations(trainer, stage)  # with every rank's findings gathered first
        elif stage == "predict":
            self._gather_findings(trainer)
        self._stage = None

    @guarded("train_mode")
    def _start_mode_probe(self, pl_module: nn.Module) -> None:
        self._modes = ModeProbe(
            pl_module,
            self.allow_train_mode,
            self._on_train_forward,
            self._policy.fixes,
            on_error=lambda err: self._switch_off("train_mode", err),
            report_at_once=self._policy.raises,
            locate=lambda: calling_hook(None, EVAL_HOOK_NAMES),
        )
        self._modes.keep_fixing(self._fixed_by_stage.get(self._stage_name(), set()))

    @guarded("grad_enabled")
    def _start_graph_probe(self, pl_module: nn.Module) -> None:
        self._graph = GraphProbe(
            pl_module,
            EVAL_HOOK_NAMES,
            self._graph_finding,
            self.allow_grad.matches,
            self._policy.raises,
            on_error=lambda err: self._switch_off("grad_enabled", err),
        )
        self._graph.start()

    @guarded("graph_in_attribute")
    def _count_collections(self, pl_module: nn.Module) -> None:
        self._attributes.epoch_start(pl_module)

    def _log_violations(self, trainer: Trainer, stage: str) -> None:
        key = f"nograd/{stage}/violations"

        def compute() -> tuple[dict[str, float], dict[str, Any]]:
            return {key: float(self._findings.epoch_count(stage, AUDIT_KINDS))}, {}

        self._emit_epoch_metrics(trainer, stage, compute, lambda t, m: reduce_present_max(t, [key], m))

    @override
    def _release(self, check: str | None = None) -> None:
        if check in (None, "train_mode") and self._modes is not None:
            fixed = self._fixed_by_stage.setdefault(self._stage_name(), set())
            fixed.update(self._modes.fixed_modules())
            self._modes.close()
            self._modes = None
        if check in (None, "grad_enabled") and self._graph is not None:
            self._graph.close()
            self._graph = None

    # -- findings -------------------------------------------------------------------------------

    def _stage_name(self) -> str:
        return self._stage or "val"

    def _on_train_forward(
        self, path: str, module: nn.Module, confirmed: bool, layers: list[tuple[str, nn.Module]], hook: str | None
    ) -> None:
        text = messages.train_mode(path, module, self._root_type, confirmed, "the step", layers)
        hook = hook or self._step_hook
        action = ""
        if self._policy.fixes:
            action = "; it was put in eval mode for the rest of the stage"
            action = action if confirmed else "; it is kept in eval mode from the next batch on"
        self._finding("train_mode", path, hook, text._replace(problem=text.problem + action))

    def _finding(
        self, kind: str, subject: str, hook: str, text: messages.Explanation, stage: str | None = None
    ) -> None:
        stage = stage or self._stage_name()
        batch_idx = None if kind in ("graph_in_attribute", "growing_collection") else self._batch_idx
        self._add_finding(Finding(kind, subject, stage, hook, batch_idx, self._epoch, *text))

    def _graph_finding(self, event: GraphEvent, modules: list[str]) -> None:
        text = messages.grad_enabled(event, modules, self._root_type, self._grad_off_around)
        self._finding("grad_enabled", event.module, event.hook or self._step_hook, text)

    @guarded("graph_in_outputs")
    def _check_outputs(self, pl_module: nn.Module, outputs: Any) -> None:
        subject = f"{self._step_hook} outputs"
        if self.allow_grad.names(subject):
            return
        tally = tally_tensors(outputs)
        if tally.attached:
            kept = tally.kept_bytes(weight_storages(pl_module)) / MIB
            text = messages.graph_in_outputs(f"`{self._step_hook}`", subject, tally, kept, self._grad_off_around)
            self._finding("graph_in_outputs", subject, self._step_hook, text)

    @guarded("graph_in_attribute")
    def _check_attributes(self, pl_module: nn.Module) -> None:
        stage = self._stage_name()
        epoch_end = f"on_{LOOP_NAMES.get(stage, stage)}_epoch_end"
        for kept in self._attributes.epoch_end(pl_module, stage):
            name, tally = kept.name, kept.tally
            if tally.attached and not self.allow_grad.names(f"self.{name}"):
                mib = tally.kept_bytes(weight_storages(pl_module)) / MIB
                in_training = self._fitting and kept.attached_between
                when = "during training (`training_step` or a training hook)" if in_training else ""
                text = messages.graph_in_attribute(name, self._root_type, tally, mib, when)
                hook, where = ("training_step", "train") if in_training else (epoch_end, stage)
                self._finding("graph_in_attribute", f"self.{name}", hook, text, where)
            if kept.grows and not self.allow.names(f"self.{name}"):
                devices = sorted(tally.devices)
                text = messages.growing_collection(name, tally.tensors, tally.nbytes / MIB, devices, epoch_end)
                self._finding("growing_collection", f"self.{name}", epoch_end, text, stage)
