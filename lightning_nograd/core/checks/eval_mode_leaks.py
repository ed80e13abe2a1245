"""Modules an ``.eval()`` left in eval mode during training (``eval_mode_leak``): ``EvalModeLeaks``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from lightning_nograd.core.checks.modes import MODE_SENSITIVE_TYPES
from lightning_nograd.core.plumbing.counters import ModeSwitches, mode_switches, visits
from lightning_nograd.core.plumbing.model_index import LearningModules, switched_alone
from lightning_nograd.core.plumbing.module_paths import ancestors, mode_modules, parent_path


@dataclass
class Leak:
    """A module that trained earlier in the fit and is in eval mode now (the topmost such)."""

    path: str
    module: nn.Module
    where: str  # the hook or step during which it was switched
    batch_idx: int | None
    new: bool  # not reported before in this fit
    layers: list[str]  # the layers in it that behave differently in train mode (and are not allowed to)


class EvalModeLeaks:
    """Modules in eval mode during training although they were in train mode earlier: an ``.eval()``
    (a callback's, a hook's) that was not undone.

    Modes are read only after some module's mode switched (``lightning_nograd.core.plumbing.counters.ModeSwitches``);
    at each check ``unchanged`` compares the count at the last read with ``mode_switches.count``, and
    only when they differ does ``read`` look at the modules. Frozen modules (no parameter of theirs
    learns) are left out: keeping them in eval is a choice. So is a layer switched to eval on its own
    (``switched_alone``: the usual way to freeze batch-norm statistics); it is not put back in train
    mode under ``on_violation="fix"`` either.

    Args:
        allowed: module paths never reported.
    """

    def __init__(self, allowed: Callable[[str], bool]) -> None:
        self.allowed = allowed
        self._read_at: int | None = None  # mode_switches.count when the modes were last read
        self.clean_at = "on_train_start"  # the last hook at which no trained module was in eval mode
        self._modules: list[tuple[str, nn.Module]] = []
        self._seen_training: set[str] = set()
        self._watched: list[tuple[str, nn.Module, nn.Module | None]] = []  # path, module, parent
        self._reported: set[str] = set()

    @property
    def read_at(self) -> int | None:
        """``mode_switches.count`` when the modes were last read (``None``: to be read at the next check)."""
        return self._read_at

    def unchanged(self, hook: str) -> bool:
        """Whether no module's mode switched since the modes were last read (then ``hook`` is noted as a clean
        check: the usual batch); otherwise ``read`` must look."""
        if self._read_at == mode_switches.count:
            self.clean_at = hook
            return True
        return False

    def forget_modes(self) -> None:
        """The modes may have changed without a counted switch (Lightning restores them by assignment after
        validation): the next check reads them."""
        self._read_at = None

    def start(self, root: nn.Module) -> None:
        """Start watching ``root``'s modules, once per fit."""
        self._modules = [(path, m) for path, m in mode_modules(root) if not self.allowed(path)]

    def note_train_mode(self, modules: dict[str, nn.Module], trained: set[int] | None, hook: str) -> None:
        """Remember modules in train mode now (at training and each epoch's start): from here on, eval mode in
        a training step is a leak. ``modules`` are all paths (for a module's parent), ``trained`` the
        parameters some optimizer steps."""
        self._seen_training |= {path for path, m in self._modules if m.training}
        modules = modules or dict(self._modules)
        learning = LearningModules(modules.values(), trained)
        parents = ((path, m, modules.get(parent_path(path)) if path else None) for path, m in self._modules)
        self._watched = [
            (path, m, parent)
            for path, m, parent in parents
            if path in self._seen_training and not learning.frozen(m, parent)
        ]
        if not any(not m.training and not switched_alone(m, parent) for _, m, parent in self._watched):
            self.clean_at = hook  # a check here was clean (a leak still there is one from before, named there)
        self._read_at = None
        ModeSwitches.listen(self)

    def read(self, hook: str, batch_idx: int | None) -> tuple[list[nn.Module], list[Leak]]:
        """Read the watched modules' modes at ``hook``: every leaked module, and the topmost ones as leaks."""
        self._read_at = mode_switches.count
        visits.modules += len(self._watched)
        leaked = [
            (path, module)
            for path, module, parent in self._watched
            if not module.training and not switched_alone(module, parent)
        ]
        leaks: list[Leak] = []
        if leaked:
            paths = {path for path, _ in leaked}
            # the check at the batch's end covers the training step; the one at its start covers what ran
            # since the last clean check (the previous batch's end hooks, validation, an epoch start)
            where = {"on_train_batch_start": "training_step", "training_step": "on_train_batch_end"}.get(
                self.clean_at, self.clean_at
            )
            if hook == "training_step":
                where = "training_step"
            seen_at = batch_idx - 1 if where == "on_train_batch_end" and batch_idx else batch_idx
            for path, module in leaked:
                if any(a in paths for a in ancestors(path)[:-1]):
                    continue
                sensitive = [
                    name for name, m in module.named_modules(prefix=path) if isinstance(m, MODE_SENSITIVE_TYPES)
                ]
                layers = [name for name in sensitive if not self.allowed(name)]
                if sensitive and not layers:
                    continue  # every layer in it that behaves differently in train mode is allowed to
                leaks.append(Leak(path, module, where, seen_at, path not in self._reported, layers))
                self._reported.add(path)
        self.clean_at = hook
        return [module for _, module in leaked], leaks

    def close(self) -> None:
        """Stop counting mode switches and forget the model (at the end of training)."""
        ModeSwitches.stop(self)
        self._read_at = None
        self._modules = []
        self._watched = []
