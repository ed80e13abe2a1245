"""The check for stepped parameters that got no gradient (``params_without_grad``).

* ``GradientCheck`` finds them, step by step, at a cost per steady step that does not grow with the model.
* ``ZeroGradientStreaks`` counts consecutive steps with an all-zero gradient per parameter (where
  zeroing keeps zeros), without stalling a CUDA device (one asynchronous copy per step, read once it
  has landed).
"""

from __future__ import annotations

import itertools
import operator
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_nograd.core.checks.gradient_gaps import GradientGap
from lightning_nograd.core.checks.gradient_window import GradientWindow, HeldGap, has_gradient
from lightning_nograd.core.plumbing.counters import GRADIENT_EVERY, GRADIENT_WINDOW, visits
from lightning_nograd.core.plumbing.model_index import ParamIndex
from lightning_nograd.core.plumbing.torch_internals import max_abs


@dataclass
class _StepCheck:
    """One step's zero flags: per device, the parameters and one flag each, and the copy's event."""

    parts: list[tuple[list[nn.Parameter], torch.Tensor, Any]]

    def ready(self, wait: bool) -> bool:
        for _, _, event in self.parts:
            if event is None:
                continue
            if wait:
                event.synchronize()
            elif not event.query():
                return False
        return True


class ZeroGradientStreaks:
    """Consecutive observed steps in which each parameter's gradient was all zero.

    ``observe`` queues one step's check: per device and dtype, one reduction to the largest
    absolute value of each gradient (exact: a norm underflows to 0 for gradients around 1e-23 in
    float32), and on a CUDA device one asynchronous copy of one flag per parameter to pinned host
    memory. ``collect`` reads the checks whose copy has landed, in step order, so a training
    step never waits for the device; ``wait=True`` (at the end of training) reads them all.

    Args:
        steps: how many consecutive all-zero steps make a gradient count as missing.

    Examples:
        >>> weight, bias = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(1))
        >>> weight.grad, bias.grad = torch.zeros(2), torch.full((1,), 1e-23)
        >>> streaks = ZeroGradientStreaks(steps=2)
        >>> streaks.observe([weight, bias]); streaks.collect()
        []
        >>> streaks.observe([weight, bias]); streaks.collect() == [weight]
        True
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.streak: dict[int, int] = {}
        self.pending: deque[_StepCheck] = deque()  # observed steps not collected yet (true while any)

    def observe(self, params: Sequence[nn.Parameter]) -> None:
        """Queue the check of this step's gradients of ``params`` (those with a dense gradient)."""
        by_device: dict[torch.device, dict[torch.dtype, list[nn.Parameter]]] = {}
        for param in params:
            grad = param.grad
            if grad is not None and grad.layout == torch.strided:
                by_device.setdefault(grad.device, {}).setdefault(grad.dtype, []).append(param)
        parts: list[tuple[list[nn.Parameter], torch.Tensor, Any]] = []
        with torch.no_grad():
            for device, by_dtype in by_device.items():
                ordered = [param for group in by_dtype.values() for param in group]
                flags = torch.cat(
                    [
                        torch.stack(max_abs([p.grad for p in group if p.grad is not None])) == 0
                        for group in by_dtype.values()
                    ]
                )
                parts.append((ordered, *_to_host(flags, device)))
        if parts:
            self.pending.append(_StepCheck(parts))

    def collect(self, wait: bool = False) -> list[nn.Parameter]:
        """Parameters whose streak reached ``steps`` in the checks read now (each once)."""
        reached: dict[int, nn.Parameter] = {}
        while self.pending and self.pending[0].ready(wait):
            for params, flags, _ in self.pending.popleft().parts:
                for param, is_zero in zip(params, flags.tolist(), strict=True):
                    streak = self.streak.get(id(param), 0) + 1 if is_zero else 0
                    self.streak[id(param)] = streak
                    if streak >= self.steps:
                        reached[id(param)] = param
        return list(reached.values())

    def clear(self) -> None:
        """Forget every streak and every pending check."""
        self.streak = {}
        self.pending.clear()


def _to_host(flags: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Any]:
    """``flags`` on the host, and the CUDA event that says when the copy has landed (``None``: now)."""
    if device.type != "cuda":
        return flags.cpu(), None
    host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
    host.copy_(flags, non_blocking=True)
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(torch.cuda.current_stream(device))
    return host, event


_GRAD = operator.attrgetter("grad")


def without_gradient(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters of ``params`` that require grad and reached the step with no gradient.

    A step where every one has a gradient (the usual case) costs one pass in C, no Python loop.

    Examples:
        >>> a, b = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))
        >>> a.grad = torch.ones(1)
        >>> without_gradient([a, b]) == [b]
        True
    """
    if not any(map(operator.is_, map(_GRAD, params), itertools.repeat(None))):
        return []
    return [p for p in params if p.grad is None and p.requires_grad]


class GradientCheck:
    """Which parameters a stepped optimizer holds reach its step with no gradient, at a cost that does not grow
    with the model: every parameter at an epoch's first step, then ``GRADIENT_WINDOW`` of them every
    ``GRADIENT_EVERY``-th step, round robin (see ``lightning_nograd.core.plumbing.counters``).

    Where gradients are zeroed with ``set_to_none=False`` a missing gradient is all zeros: that is
    learnt right after ``zero_grad`` at the start of each epoch (``backward``: one parameter that
    had a gradient at the last full check is read, so one step decides it), and then
    ``zero_grad_steps`` consecutive all-zero steps make a gradient missing (``ZeroGradientStreaks``).
    With ``set_to_none=True`` (Lightning's default) a zero gradient is a real one (pruned weights).
    A step with no backward and no gradient at all was skipped (``training_step`` returned ``None``).
    At each full check ``frozen_on_purpose`` may name parameters that are frozen on purpose; they are not
    checked again.

    Parameters found missing become *suspects* until explained (``take_suspects``); a suspect
    is explained once per epoch.

    The loop calls one method per event: ``zero_grad`` before an optimizer's ``zero_grad``,
    ``before_backward`` (and ``backward`` when that returns ``False``), and ``passes_steady_step``
    before each optimizer step, then ``step`` unless that returned ``True``: a step that needs nothing
    (one optimizer, between two checks, zeroing already read) is only counted down. A steady step
    so costs three short calls, whatever the model's size; a checked one makes few calls (while the
    CPU caches hold the model, each costs microseconds).

    Args:
        zero_grad_steps: consecutive all-zero steps that make a kept-zero gradient missing.
        allowed: module paths whose parameters are never checked.
        frozen_on_purpose: asked at each full check with (checked, missing): the ``id``s of parameters
            never to check again (a block frozen on purpose); they are left out for the rest of the fit.
    """

    def __init__(
        self,
        zero_grad_steps: int,
        allowed: Callable[[str], bool],
        frozen_on_purpose: Callable[[list[nn.Parameter], list[nn.Parameter]], set[int]] | None = None,
    ) -> None:
        self.zero_grad_steps = zero_grad_steps
        self.allowed = allowed
        self.index: ParamIndex | None = None
        self.streaks = ZeroGradientStreaks(zero_grad_steps)
        self.suspects: dict[int, str] = {}
        self.explained: set[int] = set()
        self.keeps_zeros = False
        # the optimizer whose zero_grad ran last, kept only in a step that reads how zeroing works: while it is
        # not known for that optimizer (`zeroing_known`), in its first `zero_grad_steps` steps of an epoch
        self._zeroing: torch.optim.Optimizer | None = None
        self.zeroing_known: set[int] = set()  # optimizers (by id) whose zeroing was read in this epoch
        # per optimizer, a parameter that had a gradient at its last full check
        self._had_gradient: dict[int, nn.Parameter] = {}
        self._backward_seen = False
        self._params: dict[int, list[nn.Parameter]] = {}
        self.steps: dict[int, int] = {}  # per optimizer (by id), its steps in this epoch
        self._skip = 0  # steps that pass without a call of `step` (see the class doc)
        self.optimizers = 0  # how many optimizers the loop has this epoch (0: not known)
        self._zero_checks: dict[int, int] = {}
        self._window_at: dict[int, int] = {}
        self._frozen_on_purpose = frozen_on_purpose
        self.ignored: set[int] = set()
        self.window = GradientWindow()  # parameters found without a gradient, until the evidence is definite
        self._confirmed: list[HeldGap] = []
        self._first_step_missing: set[int] = set()  # without a gradient at the epoch's first full check
        self._stepped_ids: dict[int, set[int]] = {}

    def start(self, root: nn.Module) -> None:
        """Start watching ``root``: index its parameters (when training starts)."""
        self.index = ParamIndex(root)
        self._params = {}
        self._had_gradient = {}
        self.ignored = set()

    def new_epoch(self, optimizers: int = 0) -> None:
        """Start an epoch of a loop with ``optimizers`` optimizers (0: not known): its first step checks
        every parameter, and each suspect is explained again."""
        self.optimizers = optimizers
        self._skip = 0
        self._params = {}
        self._stepped_ids = {}
        self._first_step_missing = set()
        self.window.new_epoch()
        self.steps = {}
        self._zero_checks = {}
        self.zeroing_known = set()
        self.explained = set()

    @property
    def skip(self) -> int:
        """Steps that will pass without a check (counted down by ``passes_steady_step``)."""
        return self._skip

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.zero_grad`` is about to run: the backward after it reads how zeroing works, while
        that is not known (in a steady step, nothing to do)."""
        if self._skip or self.keeps_zeros:
            return
        if self.reads_zeroing(optimizer):
            self._zeroing = optimizer

    def before_backward(self) -> bool:
        """Note that a backward is about to run; ``False`` when ``backward`` has more to do (reading how
        zeroing works, after ``zero_grad`` said so), ``True`` in the usual step."""
        if self._zeroing is None:
            self._backward_seen = True
            return True
        return False

    def passes_steady_step(self) -> bool:
        """An optimizer step is about to run: ``True`` when it needs nothing (counted down here), ``False``
        when ``step`` must see it."""
        if self._skip:
            self._skip -= 1
            self._backward_seen = False
            return True
        return False

    def backward(self) -> None:
        """A backward is about to run: noted, and after a ``zero_grad`` that asked for it, how zeroing works
        is read from one parameter that had a gradient."""
        self._backward_seen = True
        optimizer, self._zeroing = self._zeroing, None
        if optimizer is None or self.keeps_zeros:  # (`zero_grad` kept it only where `reads_zeroing` said so)
            return
        key = id(optimizer)
        had = self._had_gradient.get(key)
        if had is not None:
            # right after zero_grad, a parameter that had a gradient: none now is `set_to_none=True`, one kept zeros
            self.keeps_zeros = had.grad is not None
            self.zeroing_known.add(key)
            return
        # no full check yet: a gradient still there means zeros are kept; none tells nothing (there may have
        # been no backward before this one)
        params = (p for group in optimizer.param_groups for p in group["params"] if p.requires_grad)
        if any(p.grad is not None for _, p in zip(range(8), params, strict=False)):
            self.keeps_zeros = True
            self.zeroing_known.add(key)

    def reads_zeroing(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether the backward after ``optimizer``'s ``zero_grad`` should read how zeroing works: not yet
        known in this epoch, in its first ``zero_grad_steps`` steps."""
        key = id(optimizer)
        return key not in self.zeroing_known and self.steps.get(key, 0) < self.zero_grad_steps

    def step(self, optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
        """Count a step of ``optimizer`` and check it when due: the parameters found without a gradient
        (missing, or all zero for ``zero_grad_steps`` steps), each counted in every step it is missing.

        Due: the epoch's first step (every parameter), every ``GRADIENT_EVERY``-th (the next window),
        and every step while kept zeros are checked or a zero check is pending. Then, with one
        optimizer, once zeroing is known and no zero check is due, ``skip`` says how many steps need
        nothing until the next check (``passes_steady_step`` counts them down)."""
        key = id(optimizer)
        steps = self.steps.get(key, 0) + 1
        self.steps[key] = steps
        if self.window.held:
            self._confirmed += self.window.step(self._stepped(key), self.keeps_zeros)
        zero_check = self.keeps_zeros and self._zero_checks.get(key, 0) < self.zero_grad_steps
        found: list[nn.Parameter] = []
        if steps == 1 or not steps % GRADIENT_EVERY or zero_check or self.streaks.pending:
            checked = self._check(key, optimizer, steps, zero_check)
            if checked is None:
                return found  # nothing to check, or a skipped step: no plan either
            found = checked
        else:
            self._backward_seen = False
        if self.optimizers != 1 or len(self.steps) != 1 or self.streaks.pending or self.window.held:
            return found
        if self.reads_zeroing(optimizer) or (self.keeps_zeros and self._zero_checks.get(key, 0) < self.zero_grad_steps):
            return found
        self._skip = GRADIENT_EVERY - 1 - steps % GRADIENT_EVERY
        self.steps[key] = steps + self._skip  # counted now: the skipped steps do not call this
        return found

    def _check(
        self, key: int, optimizer: torch.optim.Optimizer, steps: int, zero_check: bool
    ) -> list[nn.Parameter] | None:
        backward_seen, self._backward_seen = self._backward_seen, False
        index = self.index
        if index is None:
            return None
        params = self._params.get(key)
        if params is None or steps == 1:
            params = self._params[key] = self._unignored(index.stepped(optimizer, self.allowed))
        checked = params
        if steps != 1 and not zero_check and len(params) > GRADIENT_WINDOW:  # the next window, round robin
            start = self._window_at.get(key, 0) % len(params)
            self._window_at[key] = start + GRADIENT_WINDOW
            checked = params[start : start + GRADIENT_WINDOW]
            checked += params[: GRADIENT_WINDOW - len(checked)]
        visits.params += len(checked)
        missing = without_gradient(checked)
        if steps == 1:
            self._first_step_missing.update(id(p) for p in missing)
        if missing and not backward_seen and len(missing) == sum(p.requires_grad for p in checked):
            return None  # no backward and no gradient at all: a skipped step (`training_step` returned None)
        if checked is params and self._frozen_on_purpose is not None:
            ignored = self._frozen_on_purpose(params, missing)
            if ignored:
                self.ignored |= ignored
                checked = params = self._params[key] = self._unignored(params)
                missing = self._unignored(missing)
        if checked is params:  # a full check: the parameter that tells how the next zero_grad zeroes
            had = next((p for p in params if p.grad is not None), None)  # the first, as a rule
            if had is not None:
                self._had_gradient[key] = had
        if zero_check:
            self._zero_checks[key] = self._zero_checks.get(key, 0) + 1
            self.streaks.observe([p for p in params if p.requires_grad])
        # each call costs microseconds while the CPU caches hold the model: none where nothing was found
        return self._suspect(missing, self.streaks.collect()) if missing or self.streaks.pending else missing

    def _stepped(self, key: int) -> set[int] | None:
        """The ``id`` of each parameter the optimizer ``key`` steps (``None`` before its first check)."""
        ids = self._stepped_ids.get(key)
        if ids is None and key in self._params:
            ids = self._stepped_ids[key] = {id(p) for p in self._params[key]}
        return ids

    def missing_all_epoch(self, param: nn.Parameter) -> bool:
        """Whether ``param`` has had no gradient at any step of this epoch so far."""
        if id(param) in self._first_step_missing:
            return True
        # kept zeros: all-zero at every zero check of this epoch (they start at its first step)
        checks = max(self._zero_checks.values(), default=0)
        return self.keeps_zeros and checks > 0 and self.streaks.streak.get(id(param), 0) >= checks

    def hold(self, gap: GradientGap, params: list[nn.Parameter], batch_idx: int | None, epoch: int) -> None:
        """Hold ``gap``'s parameters in the window (see ``lightning_nograd.core.checks.gradient_window``);
        read now, at the step after the one that found them: those with a gradient already are let go."""
        index = self.index
        if index is None:
            return
        later = [p for p in params if not has_gradient(p, self.keeps_zeros)]
        if not later:
            return
        names = {id(p): index.name(p) for p in later}
        whole = all(self.missing_all_epoch(p) for p in later)
        self.window.hold(gap, later, names, batch_idx, epoch, whole, missed=2)
        if self._skip:  # held parameters are read at every step
            for key in self.steps:
                self.steps[key] -= self._skip
            self._skip = 0

    def take_confirmed(self, epoch_end: bool = False) -> list[HeldGap]:
        """The held groups whose evidence became definite (``epoch_end``: also those without a gradient
        for the whole epoch)."""
        confirmed, self._confirmed = self._confirmed, []
        return confirmed + (self.window.epoch_end() if epoch_end else [])

    def _unignored(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        ignored = self.ignored
        return [p for p in params if id(p) not in ignored] if ignored else params

    def collect(self, wait: bool) -> list[nn.Parameter]:
        """Parameters whose all-zero streak completed in checks read now (``wait``: all of them, at the end)."""
        return self._suspect([], self.streaks.collect(wait))

    def _suspect(self, missing: list[nn.Parameter], zero: list[nn.Parameter]) -> list[nn.Parameter]:
        if self.index is None:
            return []
        seen = {id(p) for p in missing}
        missing = missing + [p for p in zero if id(p) not in seen and p.requires_grad]
        self.suspects.update({id(p): self.index.name(p) for p in missing if id(p) not in self.explained})
        return missing

    def take_suspects(self) -> list[nn.Parameter]:
        """The suspects to explain now; they count as explained for the rest of the epoch."""
        if self.index is None:
            return []
        params = [self.index.params[key] for key in self.suspects if key in self.index.params]
        self.explained |= set(self.suspects)
        self.suspects = {}
        return params

    def close(self) -> None:
        """Forget the model (at the end of training)."""
        self.index = None
        self._params = {}
        self._had_gradient = {}
        self.suspects = {}
        self.ignored = set()
        self.streaks.clear()
        self.window.clear()
        self._confirmed = []
