"""BackpropGuard: catches training steps that silently stop a trainable part of the model learning."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from lightning_nograd.callbacks._base import NoGradCallback, guarded
from lightning_nograd.callbacks._lightning import LightningModule, Trainer, ddp_stops_on_unused_parameters
from lightning_nograd.callbacks.loggers import reduce_present_max
from lightning_nograd.callbacks.training_findings import COUNTS, TrainingFindings
from lightning_nograd.core.checks.eval_mode_at_start import EvalModeAtStart
from lightning_nograd.core.checks.eval_mode_leaks import EvalModeLeaks
from lightning_nograd.core.checks.gradients import GradientCheck
from lightning_nograd.core.checks.graph import GraphProbe
from lightning_nograd.core.checks.missing_gradients import MissingGradients
from lightning_nograd.core.checks.stray_graphs import StrayGraphWatch
from lightning_nograd.core.checks.unstepped_gradients import UnsteppedGradients
from lightning_nograd.core.plumbing.arguments import check_int
from lightning_nograd.core.plumbing.model_index import trained_parameter_ids
from lightning_nograd.core.plumbing.module_paths import NamePatterns, class_name
from lightning_nograd.core.reporting.findings import OnViolation
from lightning_nograd.errors import BrokenBackpropWarning

OUTSIDE_STEP_HOOKS = frozenset(
    {
        "on_train_batch_end",
        "on_train_epoch_end",
        "on_train_epoch_start",
        "on_train_batch_start",
        "on_validation_start",
        "on_validation_end",
        "on_validation_epoch_start",
        "on_validation_epoch_end",
        "on_validation_model_train",
        "on_before_zero_grad",
    }
)


class BackpropGuard(NoGradCallback):
    """Catches training steps that silently cut gradients off, while they happen.

    During ``trainer.fit`` (automatic and manual optimization, gradient accumulation, several
    optimizers) it finds and names:

    * ``no_grad_module``: a module with trainable parameters whose forward ran only with gradients
      disabled within a training step, and the parameters that therefore will not learn;
    * ``param_without_grad``: parameters that require grad, belong to the optimizer being stepped
      and reach its step with no gradient (``grad is None``, or, where gradients are zeroed with
      ``set_to_none=False``, all-zero for ``zero_grad_steps`` consecutive steps) at 32 steps in a row
      or at every step of a training epoch, so that conditional computation (expert routing, LayerDrop,
      a head used every few steps) is no finding (``lightning_nograd.core.checks.gradient_window``); under
      DDP without ``find_unused_parameters`` at once, before DDP's own error; frozen parameters
      (``requires_grad=False``, or in no optimizer) are never a finding; a skipped step
      (``training_step`` returned ``None``) is not checked;
    * ``eval_mode_leak``: modules that are not frozen, in eval mode during training steps although
      they were in train mode earlier in the fit (a hook or callback called ``.eval()`` and forgot to switch back);
    * ``eval_mode_at_start``: dropout / batch-norm layers in eval mode inside trainable blocks when
      training starts (``from_pretrained`` models arrive in eval mode);
    * ``stray_graph``: forwards outside the training step (``on_train_batch_end``,
      ``on_train_epoch_end``, callbacks) that record an autograd graph no backward will use;
    * ``inference_tensor``: buffers or tensor attributes created under ``torch.inference_mode``
      (e.g. a rotary-embedding cache filled during ``trainer.validate``) held when training
      starts, which would crash the next backward.

    Correct models report nothing: frozen backbones, GANs with manual optimization, EMA teachers
    updated without gradients, parameters in no optimizer, allow-listed modules.

    Cost: no module hooks in a clean run, and per step a few tests that do not grow with the model:
    modes are read only after some module's mode switched, gradients are checked for every stepped
    parameter at an epoch's first step and for a window of them every 16th step. A global forward
    pre-hook is installed for a single step only after parameters were found without gradients, to tell why.

    Logged metrics (every training epoch):
        ``nograd/train/no_grad_modules``, ``nograd/train/params_without_grad``,
        ``nograd/train/eval_mode_modules``.

    Args:
        on_violation: ``"warn"`` (a ``lightning_nograd.BrokenBackpropWarning`` per finding),
            ``"error"`` (``lightning_nograd.NoGradError`` at the first one), or ``"fix"``:
            modules whose eval mode leaked are put back in train mode; other findings are warned.
        allow: regular expressions (full match on ``named_modules()`` paths) of modules never to
            report; their submodules and parameters are allowed too.
        zero_grad_steps: consecutive steps (at the start of each epoch) a gradient must be all
            zero to count as missing when gradients are zeroed with ``set_to_none=False``.

    Raises:
        ValueError: bad ``on_violation``, malformed pattern, or ``zero_grad_steps < 1``.
        TypeError: ``allow`` is not a list of strings or ``zero_grad_steps`` not an integer.

    Examples:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[BackpropGuard(allow=[r"teacher"])])
    """

    _warning_category = BrokenBackpropWarning

    def __init__(self, on_violation: OnViolation = "warn", allow: Iterable[str] = (), zero_grad_steps: int = 3) -> None:
        super().__init__(on_violation)
        self.allow = NamePatterns("allow", allow)
        self.zero_grad_steps = check_int("zero_grad_steps", zero_grad_steps, 1)
        # each check sees in its own terms; `_found` writes what they see as findings, and counts them
        self._found = TrainingFindings(self._add_finding, self.allow, self._counts)
        self._eval_at_start = EvalModeAtStart(self._found.eval_at_start)
        check = GradientCheck(self.zero_grad_steps, self.allow.matches, self._eval_at_start.frozen_on_purpose)
        self._gradients = check
        self._missing = MissingGradients(
            check, self.allow.matches, functools.partial(self._switch_off, "no_grad_module")
        )
        self._leaks = EvalModeLeaks(self.allow.matches)
        self._unstepped = UnsteppedGradients(self.allow.matches)
        self._stray: StrayGraphWatch | None = None
        self._trained_ids: set[int] | None = None

    @override
    def _state_key_settings(self) -> dict[str, Any]:
        settings = super()._state_key_settings()
        return {**settings, "allow": self.allow.patterns, "zero_grad_steps": self.zero_grad_steps}

    # -- Lightning hooks: each runs the checks' cheap tests inline, and calls into a check (`_checked`, or a
    # -- `@guarded` method below) only when there is work: modes switched, a gap to explain, a graph to report

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # before the sanity check, which already runs forwards that may use the inference tensor
        self._set_rank_zero(trainer)
        self._found.root_type = class_name(pl_module)
        self._checked("inference_tensor", self._found.inference_tensors, pl_module, "on_fit_start")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._set_rank_zero(trainer)
        self._found.root_type = class_name(pl_module)
        self._found.epoch = int(trainer.current_epoch)
        self._trained_ids = trained_parameter_ids(getattr(trainer, "optimizers", []), pl_module)
        self._start_gradient_checks(pl_module)
        self._checked("eval_mode_at_start", self._eval_at_start.start, pl_module, self._trained_ids, self.allow.matches)
        self._missing.start(ddp_stops_on_unused_parameters(trainer))

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = int(trainer.current_epoch)
        self._found.new_epoch(epoch)
        self._missing.new_epoch(epoch, len(getattr(trainer, "optimizers", [])))
        if self._stray is not None:
            self._stray.close()
            self._stray.new_epoch()
        # frozen or unfrozen between epochs (BackboneFinetuning): what is trained is read again
        self._trained_ids = trained_parameter_ids(getattr(trainer, "optimizers", []), pl_module)
        if self._gradients.index is None:
            self._start_gradient_checks(pl_module)
        else:
            self._note_train_mode("on_train_epoch_start")
        self._checked("inference_tensor", self._found.inference_tensors, pl_module, "on_train_epoch_start")
        if self._gradients.index is not None:
            self._checked("grad_without_step", self._unstepped.start, self._gradients.index)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._stray is not None:
            self._stray.close()
        self._found.batch_idx = batch_idx
        missing = self._missing
        missing.batch_start(batch_idx)
        if not self._leaks.unchanged("on_train_batch_start"):
            self._read_modes("on_train_batch_start")
        if missing.pending_probe:
            self._checked("no_grad_module", missing.start_probe)

    @override
    def on_before_zero_grad(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._gradients.zero_grad(optimizer)

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if not self._gradients.before_backward():
            self._checked("params_without_grad", self._gradients.backward)
        if self._unstepped.armed:
            self._checked("grad_without_step", self._unstepped.before_backward, getattr(trainer, "optimizers", []))

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._gradients.passes_steady_step():
            self._checked("params_without_grad", self._report_gaps, self._missing.step, optimizer)
        if self._unstepped.armed:
            self._check_unstepped_gradients(getattr(trainer, "optimizers", []))
        self._missing.stepped()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._missing.probe is not None:
            self._checked("no_grad_module", self._report_gaps, self._missing.batch_end)
        if not self._leaks.unchanged("training_step"):
            self._read_modes("training_step")
        if self._stray is None or not self._stray.counting(pl_module):
            self._watch_stray_graphs(pl_module)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_at_start.close()  # the blocks no gradient check judged in the first epoch are reported
        self._checked("params_without_grad", self._report_gaps, self._missing.epoch_end)
        if self._stray is not None:  # the interval goes on: Lightning calls the module's epoch-end hook next
            self._checked("stray_graph", self._stray.flush)
        keys = list(COUNTS.values())
        self._emit_epoch_metrics(
            trainer, "train", lambda: (self._found.metrics(), {}), lambda t, m: reduce_present_max(t, keys, m)
        )

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._stray is not None:
            self._stray.close()

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._leaks.forget_modes()
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._watch_stray_graphs(pl_module, probe=True)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_at_start.close()
        self._checked("params_without_grad", self._missing.end)
        if self._stray is not None:
            self._stray.close()
        self._gather_findings(trainer)  # those of the last steps, from every rank, before the report is written
        self._release()

    @override
    def _release(self, check: str | None = None) -> None:
        if check in (None, "no_grad_module"):
            self._missing.stop_probe()
        if check in (None, "stray_graph"):
            stray, self._stray = self._stray, None
            if stray is not None:
                stray.release()
        if check in (None, "grad_without_step"):
            self._unstepped.close()
        if check is None:
            self._leaks.close()
            self._missing.close()

    # -- the checks' work, where more than one call ----------------------------------------------

    @guarded("index")
    def _start_gradient_checks(self, pl_module: nn.Module) -> None:
        self._gradients.start(pl_module)
        self._leaks.start(pl_module)
        self._note_train_mode("on_train_start")

    @guarded("eval_mode_leak")
    def _note_train_mode(self, hook: str) -> None:
        index = self._gradients.index
        self._leaks.note_train_mode(index.modules if index is not None else {}, self._trained_ids, hook)

    @guarded("eval_mode_leak")
    def _read_modes(self, hook: str) -> None:
        """Called only when some mode switched since the last reading (the batch hooks compare counts)."""
        leaked, leaks = self._leaks.read(hook, self._found.batch_idx)
        self._found.leaks(leaks, fixed=self._policy.fixes)
        if self._policy.fixes:
            for module in leaked:
                module.training = True

    def _report_gaps(self, find: Callable[..., Any], *args: Any) -> None:
        self._found.gaps(find(*args))

    @guarded("grad_without_step")
    def _check_unstepped_gradients(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self._found.unstepped(self._unstepped.step(optimizers), optimizers)

    @guarded("stray_graph")
    def _watch_stray_graphs(self, pl_module: nn.Module, probe: bool = False) -> None:
        """Start the interval outside the training step; ``probe`` watches it with the saved-tensor probe."""
        if self._stray is None:
            self._stray = StrayGraphWatch(
                self._new_graph_probe, on_error=functools.partial(self._switch_off, "stray_graph")
            )
        self._stray.open(pl_module, probe)

    def _new_graph_probe(self, pl_module: nn.Module, on_error: Callable[[BaseException], None]) -> GraphProbe:
        found = self._found.stray_graph
        return GraphProbe(
            pl_module, OUTSIDE_STEP_HOOKS, found, self.allow.matches, self._policy.raises, on_error=on_error
        )
