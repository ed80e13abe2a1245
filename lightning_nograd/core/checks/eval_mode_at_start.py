"""Dropout and batch-norm layers in eval mode inside trainable blocks as training starts (``eval_mode_at_start``).

* ``eval_mode_under_trainable`` finds them (``from_pretrained`` models arrive that way);
* ``EvalModeAtStart`` reports them unless the block is frozen on purpose.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lightning_nograd.core.checks.modes import MODE_SENSITIVE_TYPES
from lightning_nograd.core.plumbing.model_index import LearningModules, is_trained, switched_alone
from lightning_nograd.core.plumbing.module_paths import ancestors, named_modules, parent_path


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
