"""When a parameter without a gradient is a finding: a branch that runs sometimes is not one that never runs.

Conditional computation leaves correct parameters without a gradient at many steps: a mixture of
experts routes no token to some expert, stochastic depth (LayerDrop) skips blocks, an auxiliary
head is used every few steps, a curriculum switches a branch on after a warm-up. One step without
a gradient tells such a branch apart from a dead one (a forgotten head, a `.detach()`) no better than
chance, so a parameter found without a gradient is *held* here, and checked at every later step of
its optimizer, until the evidence is definite:

* it got a gradient at some step: it learns, only not every step; dropped without a word;
* it got none at ``NO_GRADIENT_STEPS`` steps in a row: reported (an expert that gets a token
  in two steps of three misses 32 in a row with a chance of 5e-16, a block dropped three times in
  ten 2e-17, and a head used every 4th step never does);
* it got none at any step of a whole training epoch: reported at the epoch's end, so a branch that
  never runs is found within the first epoch even where an epoch is shorter than the window.

What the window cannot tell apart, by design, is a branch that first runs after a whole epoch (a
late curriculum stage) from a dead one: it is reported, and its fix names ``allow=``. Findings that
need no window are reported at once: a module whose forward ran only under ``no_grad``
(``no_grad_module``), and, under ``DistributedDataParallel`` without ``find_unused_parameters``, any
parameter without a gradient (DDP's reducer then stops the run at the next forward).

Checking a held parameter costs a ``.grad`` read per step (and, where gradients are zeroed with
``set_to_none=False``, one reduction); nothing is held in a run where every parameter learns.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

#: Consecutive steps of its optimizer a held parameter must go without a gradient to be reported.
NO_GRADIENT_STEPS = 32


@dataclass
class HeldGap:
    """Parameters found without a gradient, grouped as they will be reported, waiting for evidence.

    Args:
        gap: what will be reported (a ``GradientGap``: kind, module, parameter names, cause).
        params: the parameters still without a gradient (by ``id``); one that gets one leaves.
        batch_idx: the batch at which they were first found without one.
        epoch: the epoch in which they were first found.
        missed: steps of their optimizer without a gradient so far.
        whole_epoch: without a gradient at every step of the current epoch so far.
    """

    gap: Any
    params: dict[int, nn.Parameter]
    batch_idx: int | None
    epoch: int
    missed: int
    whole_epoch: bool
    names: dict[int, str] = field(default_factory=dict)

    def remaining_names(self) -> list[str]:
        """The names of the parameters that never got a gradient, in the order they were found."""
        return [self.names[key] for key in self.params if key in self.names]


def has_gradient(param: torch.Tensor, keeps_zeros: bool) -> bool:
    """Whether ``param`` got a gradient at this step (``keeps_zeros``: an all-zero one is none).

    Examples:
        >>> p = nn.Parameter(torch.ones(2))
        >>> p.grad = torch.zeros(2)
        >>> has_gradient(p, keeps_zeros=False), has_gradient(p, keeps_zeros=True)
        (True, False)
    """
    grad = param.grad
    if grad is None:
        return False
    if not keeps_zeros or grad.layout != torch.strided:
        return True
    with torch.no_grad():
        return bool(grad.ne(0).any())


class GradientWindow:
    """The held parameters (see the module's doc) and the evidence against each.

    Args:
        steps: consecutive steps without a gradient that make a held parameter a finding.

    Examples:
        >>> window = GradientWindow(steps=3)
        >>> used, dead = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))
        >>> window.hold("gap", [used, dead], {id(used): "used", id(dead): "dead"}, 0, 0, whole_epoch=False)
        >>> used.grad = torch.ones(1)  # the branch ran at the next step
        >>> window.step(None, keeps_zeros=False)
        []
        >>> [held.remaining_names() for held in window.step(None, keeps_zeros=False)]
        [['dead']]
    """

    def __init__(self, steps: int = NO_GRADIENT_STEPS) -> None:
        self.steps = steps
        self.held: list[HeldGap] = []

    def holds(self, param: torch.Tensor) -> bool:
        return any(id(param) in held.params for held in self.held)

    def hold(
        self,
        gap: Any,
        params: Iterable[nn.Parameter],
        names: dict[int, str],
        batch_idx: int | None,
        epoch: int,
        whole_epoch: bool,
        missed: int = 1,
    ) -> None:
        """Hold ``params`` (missing a gradient at ``missed`` steps so far) until the evidence is
        definite; those held already stay where they are."""
        fresh = {id(p): p for p in params if not self.holds(p)}
        if fresh:
            self.held.append(HeldGap(gap, fresh, batch_idx, epoch, missed, whole_epoch, dict(names)))

    def step(self, stepped: set[int] | None, keeps_zeros: bool) -> list[HeldGap]:
        """An optimizer stepped the parameters ``stepped`` (by ``id``; ``None``: all): those of them
        with a gradient leave; the groups whose evidence is now definite are returned (and leave)."""
        reported: list[HeldGap] = []
        for held in list(self.held):
            members = [key for key in held.params if stepped is None or key in stepped]
            if not members:
                continue
            for key in members:
                if has_gradient(held.params[key], keeps_zeros):
                    del held.params[key]
            if not held.params:
                self.held.remove(held)
                continue
            held.missed += 1
            if held.missed >= self.steps:
                self.held.remove(held)
                reported.append(held)
        return reported

    def epoch_end(self) -> list[HeldGap]:
        """The groups that went without a gradient for the whole epoch (they leave)."""
        reported = [held for held in self.held if held.whole_epoch]
        self.held = [held for held in self.held if not held.whole_epoch]
        return reported

    def new_epoch(self) -> None:
        """An epoch starts: what is still held is checked at each of its steps, so it may prove a whole epoch."""
        for held in self.held:
            held.whole_epoch = True

    def clear(self) -> None:
        self.held = []
