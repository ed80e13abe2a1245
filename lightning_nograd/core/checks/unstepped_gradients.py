"""Gradients computed for nothing: parameters that get a gradient in training but that no optimizer steps.

``UnsteppedGradients`` reads, at the first step of each epoch, which trainable parameters no optimizer
holds (in any of its parameter groups), notes their gradients before that step's backward and finds
those the backward gave one. Backward spends time and memory on them every step, and they never
change: typically ``requires_grad=True`` on a layer the optimizer was built without (Lightning's
fine-tuning callbacks with ``train_bn=False`` unfreeze batch-norm layers they then leave out of the
optimizer). A parameter that gets no gradient (a target network or an EMA teacher used under
``no_grad``) is no finding, nor is one any optimizer steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from lightning_nograd.core.checks.tensors import MIB
from lightning_nograd.core.plumbing.model_index import ParamIndex
from lightning_nograd.core.reporting.findings import common_ancestor


@dataclass
class UnsteppedGroup:
    """Parameters a backward gave a gradient that no optimizer steps.

    Attributes:
        subject: the deepest module that holds them all.
        parameters: their names, in the model's order.
        modules: the modules that own them, and ``kinds``, how many of each class.
        mib: the memory of their gradients.
    """

    subject: str
    parameters: list[str]
    modules: list[str]
    kinds: dict[str, int]
    mib: float


def describe_groups(optimizers: Iterable[torch.optim.Optimizer]) -> list[str]:
    """Each optimizer's parameter groups in a few words: ``"Adam group 0: 4 parameters, lr 0.001"``.

    Examples:
        >>> from torch import nn
        >>> net = nn.Linear(2, 1)
        >>> describe_groups([torch.optim.SGD(net.parameters(), lr=0.1)])
        ['SGD group 0: 2 parameters, lr 0.1']
    """
    described = []
    for optimizer in optimizers:
        for i, group in enumerate(optimizer.param_groups):
            lr = group.get("lr")
            rate = f", lr {lr:g}" if isinstance(lr, (int, float)) else ""
            described.append(f"{type(optimizer).__name__} group {i}: {len(group['params'])} parameters{rate}")
    return described


class UnsteppedGradients:
    """Finds trainable parameters that a backward gives a gradient and that no optimizer steps.

    Args:
        allowed: module paths never reported.

    Examples:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> optimizers = [torch.optim.SGD(net[1].parameters(), lr=0.1)]
        >>> check = UnsteppedGradients(lambda path: False)
        >>> check.start(ParamIndex(net))
        >>> check.before_backward(optimizers)
        >>> net(torch.ones(1, 2)).sum().backward()
        >>> [(group.subject, group.parameters, group.kinds) for group in check.step(optimizers)]
        [('0', ['0.weight', '0.bias'], {'Linear': 1})]
    """

    def __init__(self, allowed: Callable[[str], bool]) -> None:
        self.allowed = allowed
        self.index: ParamIndex | None = None
        self._before: dict[int, tuple[int, int] | None] | None = None  # grads noted before the armed backward
        self.armed = False  # the next step is checked (an attribute: the batch hooks read it)

    def start(self, index: ParamIndex) -> None:
        """Arm the check for the next step (at each epoch's start: the optimizers' groups may grow then)."""
        self.index = index
        self.armed = True
        self._before = None

    def before_backward(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Before the armed step's backward: read which parameters no optimizer holds (now, after every hook
        of the epoch's start has added its groups) and note their gradients (their object and version)."""
        if not self.armed or self._before is not None or self.index is None:
            return
        stepped = _stepped(optimizers)
        if stepped is None or not stepped <= set(self.index.params):
            # no optimizer, or parameter objects the model does not hold (FSDP2 swaps them): nothing to compare
            self.armed = False
            return
        index = self.index
        self._before = {
            key: _grad_state(p)
            for key, p in index.params.items()
            if key not in stepped and p.requires_grad and not self.allowed(index.owner[key])
        }

    def step(self, optimizers: Iterable[torch.optim.Optimizer]) -> list[UnsteppedGroup]:
        """At the armed step's optimizer step: the parameters its backward gave a gradient and no optimizer
        steps, as one group (one cause: the optimizers were built without them), named by the deepest module
        that holds them all; then disarmed."""
        before, self._before = self._before, None
        index = self.index
        if not self.armed or before is None or index is None:
            return []
        self.armed = False
        stepped = _stepped(optimizers) or set()
        got = [
            key
            for key, noted in before.items()
            if key not in stepped and _grad_state(index.params[key]) not in (None, noted)
        ]
        if not got:
            return []
        owners = list(dict.fromkeys(index.owner[key] for key in got))
        kinds: dict[str, int] = {}
        for owner in owners:
            kind = type(index.modules[owner]).__name__ if owner in index.modules else "Module"
            kinds[kind] = kinds.get(kind, 0) + 1
        mib = sum(_nbytes(index.params[key].grad) for key in got) / MIB
        return [UnsteppedGroup(common_ancestor(owners), [index.names[key] for key in got], owners, kinds, mib)]

    def close(self) -> None:
        self.index, self._before, self.armed = None, None, False


def _grad_state(param: torch.Tensor) -> tuple[int, int] | None:
    """What tells a new gradient from an old one: the gradient tensor and its version (a backward adds in place)."""
    grad = param.grad
    return None if grad is None else (id(grad), grad._version)


def _stepped(optimizers: Iterable[torch.optim.Optimizer]) -> set[int] | None:
    """``id``s of the parameters some optimizer holds, in any group (``None`` without optimizers)."""
    optimizers = list(optimizers)
    if not optimizers:
        return None
    return {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}


def _nbytes(grad: Any) -> int:
    return int(grad.numel() * grad.element_size()) if grad is not None else 0
