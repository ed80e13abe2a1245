"""Which parameters a model has and which of its modules learn, each read in one pass.

* ``ParamIndex`` names parameters and groups them under the topmost module that lost them.
* ``LearningModules`` answers, per module, whether it learns or is frozen (no parameter below it is trained).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from lightning_nograd.core.plumbing.counters import visits
from lightning_nograd.core.plumbing.module_paths import ancestors, named_modules
from lightning_nograd.core.plumbing.torch_internals import child_modules, has_children, own_parameters


class ParamIndex:
    """Names of the trainable parameters of a model and the modules that own them.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> index = ParamIndex(net)
        >>> index.group([*net[0].parameters(), *net[2].parameters()])
        {'': ['0.weight', '0.bias', '2.weight', '2.bias']}
        >>> index.group(list(net[2].parameters()))
        {'2': ['2.weight', '2.bias']}
    """

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self._foreign: set[int] = set()  # optimizer parameters no module of the model holds
        self._read(root)

    def _read(self, root: nn.Module) -> None:
        self.params: dict[int, nn.Parameter] = {}
        self.names: dict[int, str] = {}
        self.owner: dict[int, str] = {}
        self.order: dict[int, int] = {}
        self.ancestors: dict[int, list[str]] = {}  # the owner's path and its ancestors, outermost first
        self.modules: dict[str, nn.Module] = {}
        for path, module in named_modules(root):
            self.modules[path] = module  # under torch.compile the wrapper and its _orig_mod share a path
            chain: list[str] | None = None
            for pname, param in own_parameters(module):
                if id(param) in self.names:
                    continue
                if chain is None:
                    chain = ancestors(path)
                key = id(param)
                self.params[key] = param
                self.names[key] = f"{path}.{pname}" if path else pname
                self.owner[key] = path
                self.order[key] = len(self.order)
                self.ancestors[key] = chain

    def stepped(self, optimizer: torch.optim.Optimizer | None, allowed: Callable[[str], bool]) -> list[nn.Parameter]:
        """The parameters whose gradient a step must produce, in the optimizer's order: those of
        ``optimizer`` (``None``: every parameter of the model) owned by a module that is not ``allowed``.
        Whether they require grad is read when they are checked (``without_gradient``)."""
        if optimizer is None:
            candidates: Iterable[nn.Parameter] = self.params.values()
        else:
            candidates = [p for group in optimizer.param_groups for p in group["params"]]
            unknown = {id(p) for p in candidates if id(p) not in self.owner} - self._foreign
            if unknown:
                # the model holds other parameter objects than when it was indexed: FSDP2 swaps the root's
                # sharded parameters for unsharded ones from a forward until the next backward
                self._read(self.root)
                self._foreign |= {key for key in unknown if key not in self.owner}
        owner = self.owner
        return [p for p in candidates if id(p) in owner and not allowed(owner[id(p)])]

    def name(self, param: torch.Tensor) -> str:
        """The ``named_parameters()`` path of ``param`` (or ``"<unnamed>"``)."""
        return self.names.get(id(param), "<unnamed>")

    def group(self, params: Iterable[torch.Tensor]) -> dict[str, list[str]]:
        """Group ``params`` under the topmost module all of whose trainable parameters are among them."""
        chosen = {id(p) for p in params if id(p) in self.owner}
        # per module: how many trainable parameters it holds, and how many of those are chosen;
        # O(parameters x depth), one pass each, where a subset test per parameter and ancestor is quadratic
        trainable: dict[str, int] = {}
        trainable_chosen: dict[str, int] = {}
        for key, param in self.params.items():
            if param.requires_grad:
                for ancestor in self.ancestors[key]:
                    trainable[ancestor] = trainable.get(ancestor, 0) + 1
                    if key in chosen:
                        trainable_chosen[ancestor] = trainable_chosen.get(ancestor, 0) + 1
        groups: dict[str, list[str]] = {}
        for key in sorted(chosen, key=self.order.__getitem__):
            top = self.owner[key]
            for ancestor in self.ancestors[key]:
                if trainable.get(ancestor, 0) and trainable_chosen.get(ancestor, 0) == trainable[ancestor]:
                    top = ancestor
                    break
            groups.setdefault(top, []).append(self.names[key])
        return groups


def trained_parameter_ids(
    optimizers: Iterable[torch.optim.Optimizer], model: nn.Module | None = None
) -> set[int] | None:
    """``id``s of the parameters some optimizer steps and that require grad; ``None`` without optimizers,
    or where ``model`` holds other parameter objects than its optimizers do (FSDP2 swaps the sharded
    parameters for unsharded ones between a forward and its backward): every parameter that requires
    grad then counts as trained.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> trained = trained_parameter_ids([torch.optim.SGD(net[1].parameters(), lr=0.1)])
        >>> sorted(i for i, p in enumerate(net.parameters()) if id(p) in trained)
        [2, 3]
    """
    optimizers = list(optimizers)
    if not optimizers:
        return None
    stepped = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    if model is not None:
        held = {id(p) for p in model.parameters()}
        if any(id(p) not in held for p in stepped):
            return None
    return {id(p) for p in stepped if p.requires_grad}


def is_trained(param: torch.Tensor, trained: set[int] | None) -> bool:
    """Whether ``param`` learns: it requires grad and (when the optimizers are known) one of them steps it."""
    return param.requires_grad and (trained is None or id(param) in trained)


class LearningModules:
    """Which modules learn: one pass over a model, then an answer per module in constant time.

    A module *learns* when a parameter anywhere below it learns (``is_trained``); it is *frozen*
    when none does, and a parameter-free one (dropout, an activation) goes with its parent. Each
    module's own parameters are read once, so a model of n modules and p parameters costs
    O(n + p), where asking every module's subtree costs O(n x p) (a deep ``nn.Sequential`` of
    activations, each under the whole stack, is the shape where that shows).

    Args:
        modules: the modules to answer for (their submodules are read too).
        trained: ``id``s of the parameters some optimizer steps (``None``: every one that requires grad).

    Examples:
        >>> block = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> LearningModules([block], None).frozen(block[1], block)
        False
        >>> LearningModules([block.requires_grad_(False)], None).frozen(block[1], block)
        True
    """

    def __init__(self, modules: Iterable[nn.Module], trained: set[int] | None) -> None:
        self._trained = trained
        self._learns: dict[int, bool] = {}
        self._has_params: dict[int, bool] = {}
        for module in modules:
            self._visit(module)

    def _visit(self, module: nn.Module) -> None:
        # depth-first with a stack (no recursion limit), each module once however often it is shared; a
        # module that holds one of its ancestors (a cycle) asks torch for its whole subtree instead.
        # `_modules` and `_parameters` are read directly: torch's generators cost more than the work here
        learns, has_params = self._learns, self._has_params
        stack: list[tuple[nn.Module, list[nn.Module] | None]] = [(module, None)]
        entered: set[int] = set()
        while stack:
            current, children = stack.pop()
            key = id(current)
            if key in learns:
                continue
            if children is None:
                entered.add(key)
                children = child_modules(current)
                stack.append((current, children))
                stack.extend((child, None) for child in children if id(child) not in entered)
                continue
            if any(id(c) not in learns for c in children):  # a child is an ancestor: a cycle
                own, children = list(current.parameters()), []
            else:
                own = [p for _, p in own_parameters(current)]
            visits.modules += 1
            visits.params += len(own)
            has_params[key] = bool(own) or any(has_params[id(c)] for c in children)
            learns[key] = any(is_trained(p, self._trained) for p in own) or any(learns[id(c)] for c in children)

    def learns(self, module: nn.Module) -> bool:
        """Whether a parameter below ``module`` learns."""
        if id(module) not in self._learns:
            self._visit(module)
        return self._learns[id(module)]

    def frozen(self, module: nn.Module, parent: nn.Module | None) -> bool:
        """Whether ``module`` is frozen (``parent``: its parent, for a parameter-free module)."""
        learns = self.learns(module)
        if not self._has_params[id(module)] and parent is not None:
            return not self.learns(parent)
        return not learns


def switched_alone(module: nn.Module, parent: nn.Module | None) -> bool:
    """Whether ``module``, in eval mode, was switched there on its own: it holds no submodule and its parent
    is in train mode. An ``.eval()`` on a block (a model from ``from_pretrained``, a forgotten
    ``self.backbone.eval()``) switches the block with everything in it; a layer alone in eval is a choice,
    the usual way to freeze batch-norm statistics while its weights and the rest of the model train.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> switched_alone(net[1].eval(), net)
        True
        >>> switched_alone(net[1], net.eval())  # the whole block is in eval
        False
    """
    return parent is not None and parent.training and not has_children(module)


def topmost_in(path: str, paths: set[str], through: set[str] | frozenset[str] = frozenset()) -> str:
    """The outermost ancestor of ``path`` reached through modules that are all in ``paths``; an ancestor in
    ``through`` (a ``ModuleList`` that is never called) is passed over on the way, never the answer itself.

    Examples:
        >>> topmost_in("net.blocks.0", {"net", "net.blocks.0"}, through={"net.blocks"})
        'net'
    """
    top = path
    for ancestor in reversed(ancestors(path)[:-1]):
        if ancestor in paths:
            top = ancestor
        elif ancestor not in through:
            break
    return top
