"""NoGradFabricCallback: lightning-nograd for a Lightning Fabric loop.

``Fabric(callbacks=[NoGradFabricCallback()])``, and the loop calls its hooks with ``fabric.call(...)`` where
Fabric's docs put them. It runs the ``NoGradAuditor`` of a Lightning run on those events.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_nograd.integrations._loop import LoopDriver, LoopFrontEnd, LoopRun, Stage

__all__ = ["NoGradFabricCallback"]

#: Where a finding happened, in a Fabric loop's words (it has no step methods, only its batches).
HOOK_NAMES = {
    "validation_step": "validation batch",
    "test_step": "test batch",
    "predict_step": "predict batch",
    "training_step": "training batch",
}


def _original(module: nn.Module) -> nn.Module:
    """The user's module inside Fabric's wrapper (``_FabricModule.module``): its paths are the user's."""
    inner = getattr(module, "module", None)
    return inner if isinstance(inner, nn.Module) and hasattr(module, "_forward_module") else module


class NoGradFabricCallback(LoopFrontEnd):
    """lightning-nograd for a Lightning Fabric loop: ``Fabric(callbacks=[NoGradFabricCallback()])``.

    The loop calls the hooks below with ``fabric.call(...)``; each does what the Lightning hook of the same
    name does for ``NoGradAuditor``. A loop in the shape of Fabric's docs::

        fabric = Fabric(callbacks=[NoGradFabricCallback()])
        model, optimizer = fabric.setup(model, optimizer)  # the callback learns the model and the loggers here
        fabric.call("on_train_start")
        for epoch in range(epochs):
            fabric.call("on_train_epoch_start")
            model.train()
            for batch in train_loader:
                fabric.call("on_train_batch_start")
                loss = ...
                fabric.backward(loss)
                fabric.call("on_before_optimizer_step", optimizer)
                optimizer.step()
                optimizer.zero_grad()
                fabric.call("on_train_batch_end")
            fabric.call("on_train_epoch_end")
            model.eval()
            fabric.call("on_validation_start", batches=len(val_loader))
            with torch.no_grad():
                for batch in val_loader:
                    fabric.call("on_validation_batch_start")
                    outputs = ...
                    fabric.call("on_validation_batch_end", outputs)
            fabric.call("on_validation_end")
        fabric.call("on_train_end")

    Each hook takes (and passes over) whatever else the loop hands the other callbacks with the same call.
    The same findings, fixes, metrics (through ``fabric.log_dict`` to ``fabric.loggers``), table and
    ``report`` as ``NoGradAuditor``. ``on_test_start`` ... ``on_test_end`` audit a test loop; called outside
    training, an evaluation is a run of its own with its own table.

    Its arguments are those of ``lightning_nograd.NoGradAuditor``, with the same meaning.

    Examples:
        >>> from lightning.fabric import Fabric
        >>> fabric = Fabric(accelerator="cpu", callbacks=[NoGradFabricCallback()])
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._model: nn.Module | None = None
        self._epoch = -1
        self._stepped = False

    def _run(self) -> LoopDriver:
        if self._driver is None:
            raise RuntimeError(
                "NoGradFabricCallback heard a loop's hook before `fabric.setup(model, ...)`: set the model up with "
                "the Fabric object this callback was given first."
            )
        return self._driver

    def _model_of(self, model: nn.Module | None) -> nn.Module:
        if model is not None:
            return _original(model)
        if self._model is None:
            raise RuntimeError("NoGradFabricCallback has no model: pass `model=` to the hook or `fabric.setup` one.")
        return self._model

    # -- Fabric's own event (each hook's work runs `_safely`: a failure of ours never reaches the loop) ----

    def on_after_setup(self, fabric: Any, module: nn.Module, **kwargs: Any) -> None:
        """``fabric.setup`` calls it: the model to watch (the first one set up), its device and the loggers."""
        self._safely(self._set_up, fabric, module)

    def _set_up(self, fabric: Any, module: nn.Module) -> None:
        if self._model is None:
            self._model = _original(module)
        if self._driver is None:
            run = LoopRun(list(fabric.loggers), torch.device(fabric.device), HOOK_NAMES)
            run.world_size = int(fabric.world_size)
            run.global_rank = int(fabric.global_rank)
            self._driver = LoopDriver(self.auditor, run)
        if self._driver.run.strategy.model is None:
            self._driver.run.strategy.model = getattr(module, "_forward_module", None)

    # -- training ---------------------------------------------------------------------------------

    def on_train_start(self, model: nn.Module | None = None, optimizers: Any = None, **kwargs: Any) -> None:
        driver = self._run()
        if isinstance(optimizers, torch.optim.Optimizer):
            optimizers = [optimizers]
        self._epoch = -1
        self._safely(driver.fit_start, self._model_of(model), list(optimizers or []))

    def on_train_epoch_start(self, epoch: int | None = None, **kwargs: Any) -> None:
        driver = self._run()
        self._epoch = self._epoch + 1 if epoch is None else int(epoch)
        self._safely(driver.train_epoch_start, self._epoch)

    def on_train_batch_start(self, batch: Any = None, *args: Any, **kwargs: Any) -> None:
        self._safely(self._train_batch_start, self._run(), batch)

    def _train_batch_start(self, driver: LoopDriver, batch: Any) -> None:
        driver.train_batch_start(batch)
        driver.before_backward()  # (Fabric's `backward` calls no hook: the backward follows in this batch)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        self._safely(self._before_optimizer_step, self._run(), optimizer)

    def _before_optimizer_step(self, driver: LoopDriver, optimizer: torch.optim.Optimizer) -> None:
        self._stepped = True
        if optimizer not in driver.run.optimizers:  # an optimizer not passed to `on_train_start`
            driver.run.optimizers.append(optimizer)
        driver.before_optimizer_step(optimizer)

    def on_train_batch_end(self, outputs: Any = None, batch: Any = None, *args: Any, **kwargs: Any) -> None:
        self._safely(self._train_batch_end, self._run(), outputs, batch)

    def _train_batch_end(self, driver: LoopDriver, outputs: Any, batch: Any) -> None:
        if self._stepped:  # (Lightning's `global_step` counts the batches that stepped)
            driver.run.global_step += 1
            self._stepped = False
        driver.train_batch_end(outputs, batch)

    def on_train_epoch_end(self, *args: Any, **kwargs: Any) -> None:
        self._safely(self._run().train_epoch_end)

    def on_train_end(self, *args: Any, **kwargs: Any) -> None:
        self._safely(self._run().fit_end)

    # -- evaluation -------------------------------------------------------------------------------

    def _eval_start(self, stage: Stage, model: nn.Module | None, batches: int | None) -> None:
        self._safely(self._run().eval_start, stage, self._model_of(model), batches)

    def on_validation_start(self, model: nn.Module | None = None, batches: int | None = None, **kwargs: Any) -> None:
        self._eval_start("val", model, batches)

    def on_test_start(self, model: nn.Module | None = None, batches: int | None = None, **kwargs: Any) -> None:
        self._eval_start("test", model, batches)

    def on_validation_batch_start(self, batch: Any = None, *args: Any, **kwargs: Any) -> None:
        self._safely(self._run().eval_batch_start, batch)

    on_test_batch_start = on_validation_batch_start

    def on_validation_batch_end(self, outputs: Any = None, batch: Any = None, *args: Any, **kwargs: Any) -> None:
        self._safely(self._run().eval_batch_end, outputs, batch)

    on_test_batch_end = on_validation_batch_end

    def on_validation_end(self, *args: Any, **kwargs: Any) -> None:
        self._safely(self._run().eval_end)

    on_test_end = on_validation_end
