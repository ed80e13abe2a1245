"""What the per-batch checks cost, as counts rather than timings, and the mode-switch events they use.

* ``visits`` counts the modules and parameters every scan passes over. The scaling benchmark
  and the tests read it: in steady state (after the first batch of each stage) a batch costs a
  number of visits that does not grow with the model.
* ``ModeSwitches`` learns that some module's mode changed from the change itself: while any
  check listens, ``nn.Module.train`` (which ``eval()`` calls) is wrapped (``torch_internals.ModuleTrainPatch``,
  with the other torch patches) by a forwarder that counts
  the calls that change a module's mode (a model that puts its batch-norm layers in eval on every
  forward, already in eval, moves nothing). A check rescans the modules' modes only when the count
  moved (or when its owner knows that modes were assigned directly, as Lightning does when it
  restores them after an evaluation loop), not on every batch. The forwarder is removed when the last listener stops.
"""

from __future__ import annotations

import functools
import weakref
from typing import ClassVar

from torch import nn

from lightning_nograd.core.plumbing.torch_internals import ModuleTrainPatch

#: Once the first step of an epoch checked every parameter for a gradient, every ``GRADIENT_EVERY``-th
#: step checks the next ``GRADIENT_WINDOW`` of them, round robin. Between a forward and its backward
#: the CPU caches hold the model, not the callback: reading ``.grad`` then costs about 1 µs a
#: parameter, so a window of 32 every 16 steps is 2 parameters (a few µs) per step, at any model size.
GRADIENT_WINDOW = 32
GRADIENT_EVERY = 16


class Visits:
    """Running totals of modules and parameters visited by the checks (read, never reset, by tests)."""

    def __init__(self) -> None:
        self.modules = 0
        self.params = 0

    def total(self) -> int:
        return self.modules + self.params


visits = Visits()


class ModeSwitches:
    """A counter of the ``nn.Module.train`` calls that change a module's mode, alive while at least one
    owner listens. ``train()`` on a container calls it on each child, so a change anywhere is counted.

    The count is the slot ``count`` of the one instance, ``mode_switches``: every batch hook
    reads it, and on Python 3.11 a slot is read in a few cached steps where a class attribute takes a
    full lookup (about 2 µs a read when the CPU caches hold a large model).

    Examples:
        >>> owner = object()
        >>> ModeSwitches.listen(owner)
        >>> before = mode_switches.count
        >>> net = nn.Sequential(nn.Linear(1, 1)).eval()  # train(False) on the container and its child
        >>> mode_switches.count - before
        2
        >>> _ = net.eval()  # no mode changes
        >>> mode_switches.count - before
        2
        >>> ModeSwitches.stop(owner)
        >>> ModeSwitches.listening()
        False

    An owner that can be weakly referenced (any instance of a class without ``__slots__``) and is
    dropped without ``stop`` (a run that died between its set-up and its teardown) stops
    listening as it is freed.
    """

    __slots__ = ("count",)
    _owners: ClassVar[set[int]] = set()

    def __init__(self) -> None:
        self.count = 0

    @staticmethod
    def listen(owner: object) -> None:
        """Start counting (idempotent per owner). An owner collected without ``stop`` stops then."""
        key = id(owner)
        if key not in ModeSwitches._owners:
            ModeSwitches._owners.add(key)
            try:  # runs as the owner is freed, before its id can be reused; harmless after a stop
                weakref.finalize(owner, ModeSwitches._forget, key)
            except TypeError:  # not weakly referable (a bare `object()`): only stop() ends it
                pass
        ModuleTrainPatch.install(_counting_train)

    @staticmethod
    def stop(owner: object) -> None:
        """Stop counting for ``owner``; the last one out restores ``nn.Module.train`` (if still ours)."""
        ModeSwitches._forget(id(owner))

    @staticmethod
    def _forget(key: int) -> None:
        ModeSwitches._owners.discard(key)
        if not ModeSwitches._owners:
            ModuleTrainPatch.remove(_counting_train)

    @staticmethod
    def listening() -> bool:
        return ModuleTrainPatch.installed(_counting_train)


#: The counter every check reads (``mode_switches.count``).
mode_switches = ModeSwitches()


@functools.wraps(nn.Module.train)
def _counting_train(self: nn.Module, mode: bool = True) -> nn.Module:
    if self.training is not mode:  # (a mode that is not a bool is counted; `train` then refuses it)
        mode_switches.count += 1
    return ModuleTrainPatch.forward_to(self, mode)  # type: ignore[no-any-return]
