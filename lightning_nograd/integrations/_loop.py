"""One loop's events, in the words ``NoGradAuditor`` understands, for loops that are not Lightning's.

``NoGradAuditor`` reads a handful of a trainer's attributes (its epoch and step, its optimizers, its
loggers, its ranks); ``LoopRun`` holds them for a loop that has no Lightning ``Trainer``, and
``LoopDriver`` turns a loop's events (a training step starts, an optimizer is about to step, an evaluation
batch ends, ...) into the auditor's hooks in the order Lightning calls them. A front end only says
when its framework's events happen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, Protocol

import torch
from torch import nn

from lightning_nograd.callbacks.nograd_auditor import NoGradAuditor
from lightning_nograd.core.plumbing.faults import fault_message
from lightning_nograd.core.reporting.findings import user_stacklevel
from lightning_nograd.core.reporting.report import Report
from lightning_nograd.errors import NoGradError, NoGradWarning

Stage = Literal["val", "test", "predict"]
_RUN = {"val": "validate", "test": "test", "predict": "predict"}


class _EvalHooks(NamedTuple):
    start: str
    epoch_start: str
    batch_start: str
    batch_end: str
    epoch_end: str
    end: str


#: The auditor's hooks of each evaluation loop, by name (a search for a hook's name lands here).
_EVAL_HOOKS = {
    "val": _EvalHooks(
        "on_validation_start", "on_validation_epoch_start", "on_validation_batch_start", "on_validation_batch_end",
        "on_validation_epoch_end", "on_validation_end",
    ),
    "test": _EvalHooks(
        "on_test_start", "on_test_epoch_start", "on_test_batch_start", "on_test_batch_end", "on_test_epoch_end",
        "on_test_end",
    ),
    "predict": _EvalHooks(
        "on_predict_start", "on_predict_epoch_start", "on_predict_batch_start", "on_predict_batch_end",
        "on_predict_epoch_end", "on_predict_end",
    ),
}  # fmt: skip


class MetricWriter(Protocol):
    """Where a front end's metrics go: ``log_metrics(metrics=..., step=...)``, as a Lightning logger takes them."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


@dataclasses.dataclass
class _State:
    fn: str | None = None


class LoopStrategy:
    """The ranks of a loop run with ``torch.distributed`` (or alone): a reduction over them, the model."""

    def __init__(self, root_device: torch.device, model: nn.Module | None = None) -> None:
        self.root_device = root_device
        self.model = model

    def reduce(self, tensor: torch.Tensor, reduce_op: str = "sum") -> torch.Tensor:
        """Element-wise ``reduce_op`` (``"sum"`` or ``"max"``) of ``tensor`` over every rank; a collective."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return tensor
        op = dist.ReduceOp.MAX if reduce_op == "max" else dist.ReduceOp.SUM
        # gloo reduces CPU tensors, NCCL CUDA ones: the tensor goes where the process group reduces
        backend_device = torch.device("cpu") if dist.get_backend() == "gloo" else self.root_device
        reduced = tensor.to(backend_device)
        dist.all_reduce(reduced, op=op)
        return reduced.to(tensor.device)


class LoopRun:
    """What ``NoGradAuditor`` reads of a trainer, for a loop that has none: kept up to date by its front end."""

    def __init__(self, loggers: list[MetricWriter], device: torch.device, hook_names: dict[str, str]) -> None:
        self.loggers = loggers
        self.hook_names = hook_names  # Lightning's hook names -> the loop's, for the findings
        self.current_epoch = 0
        self.global_step = 0
        self.optimizers: list[torch.optim.Optimizer] = []
        self.max_epochs: int | None = None
        self.num_val_batches: list[float] = []
        self.num_test_batches: list[float] = []
        self.sanity_checking = False
        self.state = _State()
        self.world_size = 1
        self.global_rank = 0
        self.strategy = LoopStrategy(device)
        self.callbacks: list[Any] = []
        # the loop's evaluation step switches gradients off itself (the batch starts before it does)
        self.eval_step_disables_grad = False

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0


class LoopDriver:
    """Calls ``auditor``'s hooks for one loop's events, in Lightning's order.

    ``run`` is the loop's view for the auditor; ``model`` is what the loop trains and evaluates. A training
    run is ``fit_start`` ... ``fit_end``; an evaluation inside it or alone is ``eval_start`` ... ``eval_end``
    (alone, it is a run of its own, with its own table).
    """

    def __init__(self, auditor: NoGradAuditor, run: LoopRun) -> None:
        self.auditor = auditor
        self._hooks: Any = auditor  # its Lightning hooks, given `run` where they take a Trainer
        self.run = run
        self.model: nn.Module | None = None
        self.fitting = False
        self.stage: Stage | None = None
        self.eval_batch = -1
        self.train_batch = -1
        self.in_train_batch = False
        self.run.callbacks = [auditor]

    def _hook(self, name: str) -> Callable[..., Any]:
        return getattr(self._hooks, name)  # type: ignore[no-any-return]

    # -- training ----------------------------------------------------------------------------------

    def fit_start(self, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
        self.model = model
        self.fitting = True
        self.run.state.fn = "fit"
        self.run.optimizers = optimizers
        self._hooks.setup(self.run, model, "fit")
        self._hook("on_fit_start")(self.run, model)
        self._hook("on_train_start")(self.run, model)

    def train_epoch_start(self, epoch: int) -> None:
        self.run.current_epoch = epoch
        self.train_batch = -1
        self._hook("on_train_epoch_start")(self.run, self.model)

    def train_batch_start(self, batch: Any = None) -> None:
        """A batch's forward and backward are about to run (the backward's own event is ``before_backward``)."""
        self.train_batch += 1
        self.in_train_batch = True
        self._hook("on_train_batch_start")(self.run, self.model, batch, self.train_batch)

    def before_backward(self, loss: Any = None) -> None:
        self._hook("on_before_backward")(self.run, self.model, loss)

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._hook("on_before_optimizer_step")(self.run, self.model, optimizer)

    def train_batch_end(self, outputs: Any = None, batch: Any = None) -> None:
        self.in_train_batch = False
        self._hook("on_train_batch_end")(self.run, self.model, outputs, batch, self.train_batch)

    def train_epoch_end(self) -> None:
        self._hook("on_train_epoch_end")(self.run, self.model)

    def fit_end(self) -> None:
        if not self.fitting:
            return
        self.fitting = False
        self._hook("on_train_end")(self.run, self.model)
        self._hook("on_fit_end")(self.run, self.model)
        self._hooks.teardown(self.run, self.model, "fit")
        self._let_go()

    # -- evaluation --------------------------------------------------------------------------------

    def eval_start(self, stage: Stage, model: nn.Module, batches: int | None) -> None:
        if self.model is None or not self.fitting:
            self.model = model
            self.run.state.fn = _RUN[stage]
            self._hooks.setup(self.run, model, _RUN[stage])
        self.stage = stage
        self.eval_batch = -1
        counts = [float(batches) if batches is not None else math.inf]
        if stage == "val":
            self.run.num_val_batches = counts
        elif stage == "test":
            self.run.num_test_batches = counts
        hooks = _EVAL_HOOKS[stage]
        self._hook(hooks.start)(self.run, model)
        self._hook(hooks.epoch_start)(self.run, model)

    def eval_batch_start(self, batch: Any = None) -> None:
        if self.stage is None:
            return
        self.eval_batch += 1
        self._hook(_EVAL_HOOKS[self.stage].batch_start)(self.run, self.model, batch, self.eval_batch)

    def eval_batch_end(self, outputs: Any, batch: Any = None) -> None:
        if self.stage is None:
            return
        self._hook(_EVAL_HOOKS[self.stage].batch_end)(self.run, self.model, outputs, batch, self.eval_batch)

    def eval_end(self) -> None:
        stage, self.stage = self.stage, None
        if stage is None:
            return
        hooks = _EVAL_HOOKS[stage]
        self._hook(hooks.epoch_end)(self.run, self.model)
        self._hook(hooks.end)(self.run, self.model)
        if not self.fitting:
            self._hooks.teardown(self.run, self.model, _RUN[stage])
            self.run.state.fn = None
            self._let_go()

    def failed(self, exception: BaseException) -> None:
        """The loop raised: the auditor lets go of the model (and writes its report)."""
        if self.model is not None:
            self._hooks.on_exception(self.run, self.model, exception)
        self.fitting = False
        self.stage = None
        self._let_go()

    def _let_go(self) -> None:
        """The loop's call is over: nothing of ours keeps its model (or the DDP wrapper, and with it the process
        group) alive; the next call hands them in again."""
        self.model = None
        self.run.strategy.model = None


class LoopFrontEnd:
    """What the front ends of other loops share: the ``NoGradAuditor`` they drive, built from the same arguments.

    Its arguments are those of ``lightning_nograd.NoGradAuditor``, with the same meaning (and the same errors
    for bad ones, naming the argument).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.auditor = NoGradAuditor(*args, **kwargs)
        self._driver: LoopDriver | None = None
        self._broken = False  # an internal failure of this front end: it stopped watching, the run goes on

    def _safely(self, work: Callable[..., Any], *args: Any) -> Any:
        """``work(*args)``, where a failure of ours never reaches the user's loop: ``NoGradError`` passes (the user
        asked to stop), anything else is one warning and this front end watches no more."""
        if self._broken:
            return None
        try:
            return work(*args)
        except NoGradError:
            raise
        except Exception as err:
            self._broken = True
            warnings.warn(fault_message(type(self).__name__, err), NoGradWarning, stacklevel=user_stacklevel())
            self._let_go(err)
            return None

    def _let_go(self, err: BaseException) -> None:
        """After a failure of ours: the auditor removes every hook and lets go of the model."""
        driver = self._driver
        if driver is not None:
            with contextlib.suppress(Exception):
                driver.failed(err)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # the signature a reader (and `help()`, and the docs) sees is NoGradAuditor's, written once
        cls.__init__.__signature__ = inspect.signature(NoGradAuditor.__init__)  # type: ignore[misc,attr-defined]

    @property
    def report(self) -> Report:
        """Every evaluation's measurements and every finding (``lightning_nograd.core.reporting.report.Report``)."""
        return self.auditor.report
