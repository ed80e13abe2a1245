"""NoGradTrainerCallback: lightning-nograd for the Hugging Face ``Trainer``.

``Trainer(..., callbacks=[NoGradTrainerCallback()])`` (or ``trainer.add_callback(...)``) gives a
Hugging Face run what ``NoGradAuditor`` gives a Lightning one: every evaluation and prediction batch
audited (modules in train mode, forwards that record a graph, outputs that keep one), the training
steps checked at each optimizer step (parameters without a gradient and why, trainable modules run
under ``no_grad``, eval mode leaking into training, stray graphs, inference tensors, gradients no
optimizer applies), and the savings of each evaluation measured and logged to every ``report_to``
integration. Checked against transformers 4.46 to 5.x.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from lightning_nograd.core.plumbing.stack import innermost_self
from lightning_nograd.integrations._loop import LoopDriver, LoopFrontEnd, LoopRun, Stage

__all__ = ["NoGradTrainerCallback", "hf_metric_name"]


def hf_metric_name(key: str) -> str:
    """The name a lightning-nograd metric gets in a Hugging Face run's logs.

    Evaluation metrics take the prefix the ``Trainer`` gives its own (``eval_``, ``test_``), so that its
    ``report_to`` integrations show them beside ``eval/loss``; training counts keep their name.

    Examples:
        >>> hf_metric_name("nograd/val/graph_memory_mib"), hf_metric_name("nograd/train/params_without_grad")
        ('eval_nograd/graph_memory_mib', 'nograd/params_without_grad')
    """
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == "nograd":
        prefix = {"val": "eval_", "test": "test_", "train": ""}.get(parts[1])
        if prefix is not None:
            return f"{prefix}nograd/{parts[2]}"
    return key


#: Where a finding happened, in the Hugging Face ``Trainer``'s words.
HOOK_NAMES = {
    "validation_step": "prediction_step",
    "test_step": "prediction_step",
    "predict_step": "prediction_step",
    "training_step": "compute_loss",
    "on_before_optimizer_step": "on_pre_optimizer_step",
    "on_train_batch_start": "training_step",
    "on_train_batch_end": "on_step_end",
    "on_train_epoch_start": "on_epoch_begin",
    "on_train_epoch_end": "on_epoch_end",
    "on_train_start": "on_train_begin",
    "on_fit_start": "on_train_begin",
    "on_validation_start": "evaluate",
    "on_validation_end": "evaluate",
    "on_validation_epoch_start": "evaluate",
    "on_validation_epoch_end": "evaluate",
}


class _TrainerLog:
    """Metrics into ``Trainer.log``: its ``log_history`` and every ``report_to`` integration (the trainer held
    weakly, as everything of ours it holds refers back to it)."""

    def __init__(self, trainer: Trainer) -> None:
        self._trainer = weakref.ref(trainer)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        trainer = self._trainer()
        if trainer is not None:
            trainer.log({hf_metric_name(key): value for key, value in metrics.items()})


def _weakly_bound(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` (a bound method) holding its object weakly: a bracket stored on the trainer that calls the
    trainer's own method must not keep the trainer, and with it the model, alive past the user's last reference."""
    func, owner = getattr(method, "__func__", None), getattr(method, "__self__", None)
    if func is None or owner is None:
        return method
    ref = weakref.ref(owner)

    @functools.wraps(func)
    def call(*args: Any, **kwargs: Any) -> Any:
        return func(ref(), *args, **kwargs)

    return call


def _find_trainer() -> Trainer | None:
    """The ``Trainer`` whose callback handler called this event: a ``self`` up the stack.

    ``TrainerCallback`` events get the model, the optimizer and the dataloaders but not the trainer
    (transformers 4.46 to 5.x); the trainer's methods that evaluate and train are where a batch begins
    and ends.
    """
    found = innermost_self(lambda candidate: isinstance(candidate, Trainer))
    return found if isinstance(found, Trainer) else None


class NoGradTrainerCallback(LoopFrontEnd, TrainerCallback):
    """lightning-nograd for the Hugging Face ``Trainer``: ``Trainer(..., callbacks=[NoGradTrainerCallback()])``.

    Runs the ``NoGradAuditor`` of a Lightning run on the Hugging Face ``Trainer``'s events:

    * every evaluation and prediction batch (``prediction_step``, the user's override included) is checked
      for modules in train mode, forwards that record an autograd graph, and outputs that keep one;
    * every training step (``training_step``) up to its optimizer step is checked for parameters that get no
      gradient and why, trainable modules run under ``no_grad``, eval mode leaking into training, stray graphs,
      inference tensors and gradients no optimizer applies;
    * each evaluation's time, peak memory and the measured savings of ``no_grad`` are logged through
      ``Trainer.log``, so every ``report_to`` integration shows them, as ``eval_nograd/<metric>``
      (TensorBoard and W&B show ``eval/nograd/<metric>``), the training counts as ``nograd/<metric>``;
    * at the end of ``train``, ``evaluate`` and ``predict`` rank zero prints the table a Lightning run prints,
      and ``report`` holds every measurement and finding;
    * under DDP (``torchrun``, ``accelerate launch``) every rank checks its own batches, and rank zero warns
      each finding once, naming the ranks that saw it.

    Its arguments are those of ``lightning_nograd.NoGradAuditor``, with the same meaning.

    Examples:
        >>> callback = NoGradTrainerCallback(allow=[r"teacher"])
        >>> callback.report.findings
        []
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._steps: _TrainerSteps | None = None
        self._epoch = 0

    def _attach(self) -> LoopDriver | None:
        """Find the trainer that called, once, and bracket its training and evaluation steps."""
        if self._driver is not None:
            return self._driver
        trainer = _find_trainer()
        if trainer is None:
            return None
        args = trainer.args
        run = LoopRun([_TrainerLog(trainer)], torch.device(args.device), HOOK_NAMES)
        run.world_size = int(args.world_size)
        run.global_rank = int(args.process_index)
        # the stock `prediction_step` runs the model under `no_grad`: a graph there means code inside enabled it
        run.eval_step_disables_grad = type(trainer).prediction_step is Trainer.prediction_step
        self._driver = LoopDriver(self.auditor, run)
        self._steps = _TrainerSteps(self, trainer, self._driver)
        return self._driver

    def _sync(self) -> None:
        if self._steps is not None:
            self._steps.sync()

    def _watching(self) -> LoopDriver | None:
        """The driver, while this callback watches (not after an internal failure of its own)."""
        return None if self._broken else self._driver

    # -- the Trainer's events (each one's work runs `_safely`: a failure of ours never reaches the run) ----

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._safely(self._attach)

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._safely(self._attach)  # added with `add_callback` just before `evaluate`: watching from the next loop on

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._safely(self._train_begin, args, kwargs.get("optimizer"))

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        driver = self._watching()
        if driver is not None and driver.fitting:
            self._safely(driver.train_epoch_start, self._epoch)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        driver = self._watching()
        trainer = self._steps.trainer() if self._steps is not None else None
        optimizer = trainer.optimizer if trainer is not None else None
        if driver is not None and driver.fitting and optimizer is not None:
            self._safely(driver.before_optimizer_step, optimizer)

    def on_substep_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        driver = self._watching()
        if driver is not None and driver.in_train_batch:
            self._safely(driver.train_batch_end)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        driver = self._watching()
        if driver is not None and driver.in_train_batch:
            self._safely(self._step_end, driver)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        driver = self._watching()
        if driver is not None and driver.fitting:
            self._safely(self._epoch_end, driver)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        driver = self._watching()
        if driver is not None:
            self._safely(self._train_end, driver)

    # -- what the events do -----------------------------------------------------------------------

    def _train_begin(self, args: TrainingArguments, optimizer: Any) -> None:
        driver = self._attach()
        if driver is None or self._steps is None:
            return
        self._sync()
        driver.run.max_epochs = int(args.num_train_epochs) if args.max_steps <= 0 else None
        driver.fit_start(self._steps.model(), [optimizer] if optimizer is not None else [])
        self._epoch = 0

    def _step_end(self, driver: LoopDriver) -> None:
        self._sync()
        driver.train_batch_end()

    def _epoch_end(self, driver: LoopDriver) -> None:
        if driver.in_train_batch:
            driver.train_batch_end()
        self._sync()
        driver.train_epoch_end()
        self._epoch += 1

    def _train_end(self, driver: LoopDriver) -> None:
        self._sync()
        driver.fit_end()


class _TrainerSteps:
    """Where a batch begins and ends on one Hugging Face ``Trainer``: its ``training_step``, ``compute_loss``,
    ``prediction_step`` and ``evaluation_loop``, bracketed on the instance (instance attributes over its
    class's methods, so that a user's override of any of them is bracketed too).

    The brackets tell the driver of the ``NoGradTrainerCallback`` that made them, while it watches; what they do
    runs through its ``_safely``.
    """

    def __init__(self, front: NoGradTrainerCallback, trainer: Trainer, driver: LoopDriver) -> None:
        self._front = front
        # held weakly: the trainer holds the brackets, which hold this, so a strong reference would be a cycle that
        # keeps the trainer and its (DDP-wrapped) model alive until the garbage collector finds it
        self.trainer = weakref.ref(trainer)
        self._driver = driver
        self._pending: Stage | None = None  # the evaluation loop begun, until its first batch
        self._eval_batches: int | None = None
        self._step_inputs: Any = None  # the training step under way, until `compute_loss` starts its batch
        # a `training_step` of the user's may never call `compute_loss`: its batch starts at the model's forward
        self._own_training_step = type(trainer).training_step is not Trainer.training_step
        for name, around in (
            ("training_step", self._around_training_step),
            ("compute_loss", self._around_compute_loss),
            ("prediction_step", self._around_prediction_step),
            ("evaluation_loop", self._around_evaluation_loop),
        ):
            setattr(trainer, name, around(_weakly_bound(getattr(trainer, name))))

    def sync(self) -> None:
        """What the auditor reads of the trainer, brought up to date."""
        trainer = self.trainer()
        if trainer is not None:
            self._driver.run.global_step = int(trainer.state.global_step)
            self._driver.run.strategy.model = getattr(trainer, "model_wrapped", None)

    def model(self) -> torch.nn.Module:
        return self.trainer().model  # type: ignore[union-attr,return-value]

    def _around_training_step(self, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def training_step(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            driver, safely = self._front._watching(), self._front._safely
            if driver is None or not driver.fitting:
                return method(model, inputs, *args, **kwargs)
            safely(self.sync)
            self._step_inputs = inputs  # the batch starts at `compute_loss`, once the step has called `model.train()`
            forward_hook = safely(self._at_forward, model) if self._own_training_step else None
            try:
                return method(model, inputs, *args, **kwargs)
            except BaseException as err:
                safely(driver.failed, err)
                raise
            finally:
                self._step_inputs = None
                if forward_hook is not None:
                    forward_hook.remove()

        return training_step

    def _around_compute_loss(self, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def compute_loss(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            self._start_train_batch()
            return method(model, inputs, *args, **kwargs)

        return compute_loss

    def _at_forward(self, model: Any) -> Any:
        """A forward pre-hook on ``model`` that starts the training batch, if ``compute_loss`` has not, at the
        step's first call of the model (after a ``model.train()`` of the step's own); its handle, or None."""
        if not isinstance(model, torch.nn.Module):
            return None
        return model.register_forward_pre_hook(lambda module, args: self._start_train_batch())

    def _start_train_batch(self) -> None:
        """Start the training batch, once, inside a training step the driver watches."""
        driver = self._front._watching()
        if driver is not None and self._step_inputs is not None and not driver.in_train_batch:
            self._front._safely(self._train_batch_start, driver)

    def _train_batch_start(self, driver: LoopDriver) -> None:
        driver.train_batch_start(self._step_inputs)
        driver.before_backward()  # (the step's backward follows `compute_loss` in `training_step`)

    def _around_prediction_step(self, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def prediction_step(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            driver, safely = self._front._watching(), self._front._safely
            if driver is None or (driver.stage is None and self._pending is None):
                return method(model, inputs, *args, **kwargs)
            safely(self._eval_batch_start, driver, inputs)
            try:
                outputs = method(model, inputs, *args, **kwargs)
            except BaseException as err:
                safely(driver.failed, err)
                raise
            safely(driver.eval_batch_end, outputs, inputs)
            return outputs

        return prediction_step

    def _eval_batch_start(self, driver: LoopDriver, inputs: Any) -> None:
        self.sync()
        if driver.stage is None and self._pending is not None:
            # the first batch: the loop has put the model in eval mode by now, as Lightning's has at its start
            stage, self._pending = self._pending, None
            driver.eval_start(stage, self.model(), self._eval_batches)
        driver.eval_batch_start(inputs)

    def _around_evaluation_loop(self, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def evaluation_loop(dataloader: Any, description: str, *args: Any, **kwargs: Any) -> Any:
            driver, safely = self._front._watching(), self._front._safely
            if driver is None:
                return method(dataloader, description, *args, **kwargs)
            prefix = str(kwargs.get("metric_key_prefix", args[2] if len(args) > 2 else "eval"))
            self._pending = "predict" if description == "Prediction" else "test" if prefix == "test" else "val"
            try:
                self._eval_batches = len(dataloader)
            except TypeError:
                self._eval_batches = None
            try:
                output = method(dataloader, description, *args, **kwargs)
            except BaseException as err:
                self._pending = None
                safely(driver.failed, err)
                raise
            self._pending = None
            safely(self._eval_end, driver)
            return output

        return evaluation_loop

    def _eval_end(self, driver: LoopDriver) -> None:
        self.sync()
        driver.eval_end()
