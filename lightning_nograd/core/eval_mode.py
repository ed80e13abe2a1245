"""The checks for eval mode during training: layers in eval mode as training starts, and leaks.

* ``eval_mode_under_trainable`` finds dropout / batch-norm layers left in eval mode inside
  trainable blocks (``from_pretrained`` models arrive that way).
* ``EvalModeAtStart`` reports them unless the block is frozen on purpose.
* ``EvalModeLeaks`` finds the modules an ``.eval()`` left in eval mode during training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from lightning_nograd.core.counters import ModeSwitches, mode_switches, visits
from lightning_nograd.core.model_index import LearningModules, is_trained, switched_alone
from lightning_nograd.core.modes import MODE_SENSITIVE_TYPES
from lightning_nograd.core.module_paths import ancestors, mode_modules, named_modules, parent_path


def eval_blocks(
    root: nn.Module, trained: set[int] | None = None, allowed: Callable[[str], bool] | None = None
) -> dict[str, set[int]]:
    """Blocks in eval mode that hold learning parameters: each topmost module in eval (the root, or one whose
    parent is in train mode; not a layer switched alone, ``switched_alone``), mapped to the ``id``s of
    its parameters that learn (``is_trained``). ``allowed`` paths are left out. The blocks are disjoint,
    so this reads each parameter once.

    Examples:
        >>> net = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Dropout()), nn.Linear(2, 1))
        >>> _ = net[0].eval()
        >>> {path: len(ids) for path, ids in eval_blocks(net).items()}
        {'0': 2}
    """
    modules = dict(named_modules(root))
    found: dict[str, set[int]] = {}
    for path, module in modules.items():
        if module.training:
            continue
        parent = modules.get(parent_path(path)) if path else None
        if (parent is not None and not parent.training) or switched_alone(module, parent):
            continue
        if allowed is not None and allowed(path):
            continue
        ids = {id(p) for p in module.parameters() if is_trained(p, trained)}
        if ids:
            found[path] = ids
    return found


def eval_mode_under_trainable(
    root: nn.Module, trained: set[int] | None = None, allowed: Callable[[str], bool] | None = None
) -> list[tuple[str, list[tuple[str, str]]]]:
    """Dropout / batch-norm layers in eval mode whose block has trainable parameters.

    Returns (topmost eval-mode module containing them, the layers as (path, class)), leaving out ``allowed``
    layers (a block whose layers are all allowed is not returned).
    A frozen backbone in eval mode (parameters that do not require grad, or that no optimizer in
    ``trained`` steps) has no trainable parameters around its layers and is not returned, nor is a
    layer switched to eval on its own (``switched_alone``: frozen batch-norm statistics).

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).eval()
        >>> eval_mode_under_trainable(net)
        [('', [('1', 'Dropout')])]
        >>> _ = net.requires_grad_(False)
        >>> eval_mode_under_trainable(net)
        []
    """
    modules = dict(named_modules(root))
    learning: LearningModules | None = None  # read only once a layer in eval mode asks
    groups: dict[str, list[tuple[str, str]]] = {}
    for path, module in modules.items():
        if module.training or not isinstance(module, MODE_SENSITIVE_TYPES):
            continue
        if allowed is not None and allowed(path):
            continue
        parent = modules.get(parent_path(path), module) if path else module
        if path and switched_alone(module, parent):
            continue
        if learning is None:
            learning = LearningModules([root], trained)
        if not learning.learns(parent):
            continue
        top = path
        for ancestor in reversed(ancestors(path)[:-1]):
            if modules[ancestor].training:
                break
            top = ancestor
        groups.setdefault(top, []).append((path, type(module).__name__))
    return list(groups.items())


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

    Modes are read only after some module's mode switched (``lightning_nograd.core.counters.ModeSwitches``);
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
        self.clean_at = hook
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


class EvalModeAtStart:
    """Dropout / batch-norm layers in eval mode inside trainable blocks as training starts
    (``eval_mode_at_start``; ``from_pretrained`` models arrive that way).

    Each block in eval mode that holds learning parameters is judged at its first full gradient
    check (``frozen_on_purpose``, which ``GradientCheck`` asks): a block whose checked parameters all
    reach that step without a gradient is frozen on purpose (Lightning's transfer-learning pattern
    with every parameter in the optimizer: the extractor in eval, its forward under ``no_grad``), so
    there is no finding and its parameters are not checked again. Otherwise its layers are reported
    then, or by ``close`` at the end of the first epoch if no check came.

    Args:
        report: receives each finding: the block's path and its layers in eval mode.
    """

    def __init__(self, report: Callable[[str, list[tuple[str, str]]], None]) -> None:
        self._report = report
        self._blocks: dict[str, set[int]] = {}  # block path -> the ids of its learning parameters
        self._layers: dict[str, list[tuple[str, str]]] = {}  # block path -> its layers in eval mode (path, class)

    def start(self, root: nn.Module, trained: set[int] | None, allowed: Callable[[str], bool]) -> None:
        """Note the blocks in eval mode as training starts (``trained``: the parameters some optimizer steps)."""
        self._layers = dict(eval_mode_under_trainable(root, trained, allowed))
        self._blocks = eval_blocks(root, trained, allowed)

    def frozen_on_purpose(self, checked: list[nn.Parameter], missing: list[nn.Parameter]) -> set[int]:
        """Judge the blocks a full gradient check covered: the ids of those frozen on purpose."""
        blocks = self._blocks
        if not blocks:
            return set()
        checked_ids = {id(p) for p in checked}
        missing_ids = {id(p) for p in missing}
        frozen: set[int] = set()
        for path in [path for path, ids in blocks.items() if not ids.isdisjoint(checked_ids)]:
            ids = blocks.pop(path)
            if ids & checked_ids <= missing_ids:
                frozen |= ids
                self._layers.pop(path, None)
            else:
                self._report_block(path)
        return frozen

    def close(self) -> None:
        """Judge no more: the blocks not judged yet are reported."""
        self._blocks = {}
        for path in list(self._layers):
            self._report_block(path)

    def _report_block(self, path: str) -> None:
        layers = self._layers.pop(path, None)
        if layers is not None:
            self._report(path, layers)
