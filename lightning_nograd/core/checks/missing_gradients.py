"""Trainable parameters that reach the optimizer step without a gradient, and why (``param_without_grad``,
``no_grad_module``): when gradients are checked, when a step is watched to tell why, and when a gap is a finding.

``GradientCheck`` finds the parameters without a gradient at an optimizer step; a step after that is
watched by ``GradModeProbe``, and ``explain_gradient_gaps`` groups them by root cause. A cause that one step
proves (a module run only under ``no_grad``, a reentrant checkpoint) is a finding at once, and so is any gap
where DDP without ``find_unused_parameters`` stops the run at the next step; any other is held until the
evidence is in (``gradient_window``). ``MissingGradients`` runs that sequence on a loop's events and hands
back each gap to report, with the batch and epoch where its parameters were first found without a gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from lightning_nograd.core.checks.gradient_gaps import GradientGap, GradModeProbe, explain_gradient_gaps
from lightning_nograd.core.checks.gradients import GradientCheck


class GapFound(NamedTuple):
    """A gap to report: its parameters were first found without a gradient at ``batch_idx`` of ``epoch``."""

    gap: GradientGap
    batch_idx: int | None
    epoch: int


class MissingGradients:
    """The gradient checks of one training run, on its events.

    Args:
        check: the gradient check (which parameters reach a step without a gradient).
        allowed: module paths never to watch (the allow-list).
        on_probe_error: where an internal failure of the watched step goes.
    """

    def __init__(
        self,
        check: GradientCheck,
        allowed: Callable[[str], bool],
        on_probe_error: Callable[[BaseException], None],
    ) -> None:
        self.check = check
        self.allowed = allowed
        self.on_probe_error = on_probe_error
        self.probe: GradModeProbe | None = None
        self.pending_probe = False
        self.ddp_stops = False  # under DDP without `find_unused_parameters`, a gap ends the run at the next step
        self.epoch = 0
        self.batch_idx: int | None = None
        # the first batch whose gradients the next optimizer step reads (with gradient accumulation, the first of
        # the accumulated batches): a parameter found without a gradient there has had none since
        self._window_first_batch: int | None = None
        self._missing_since: dict[int, int] = {}  # parameter id -> the batch it was first found without one

    def start(self, ddp_stops: bool) -> None:
        """Training starts; under DDP that stops at a gap, its first step is watched, to explain one at once."""
        self.ddp_stops = ddp_stops
        if ddp_stops:
            self.pending_probe = True

    def new_epoch(self, epoch: int, optimizers: int) -> None:
        self.epoch = epoch
        self.check.new_epoch(optimizers)

    def batch_start(self, batch_idx: int) -> None:
        """A training batch starts (every batch pays for this: two assignments; ``pending_probe`` then says
        whether ``start_probe`` should watch it, after an earlier step found a parameter without a gradient)."""
        self.batch_idx = batch_idx
        if self._window_first_batch is None:
            self._window_first_batch = batch_idx

    def step(self, optimizer: torch.optim.Optimizer) -> list[GapFound]:
        """``optimizer`` is about to step and the check's schedule says to check it (``check.passes_steady_step``
        said no): its parameters' gradients are checked."""
        found: list[GapFound] = []
        missing = self.check.step(optimizer)
        if missing:
            self._note_missing(missing)
            if self.ddp_stops and self.probe is not None:
                found += self.finish_probe()  # now: DDP's reducer would stop the run before the batch ends
        return found + self._held(epoch_end=False)

    def stepped(self) -> None:
        """An optimizer step is done, checked or not: the next batch opens the next step's window."""
        self._window_first_batch = None

    def batch_end(self) -> list[GapFound]:
        """A training batch ended: a watched step tells why its suspects got no gradient."""
        return self.finish_probe() if self.probe is not None else []

    def epoch_end(self) -> list[GapFound]:
        """An epoch ended: parameters without a gradient at every step of it are findings."""
        self._note_missing(self.check.collect(wait=False))
        found = self._unexplained()
        return found + self._held(epoch_end=True)

    def end(self) -> None:
        """Training ended: the zero-gradient reads still under way are collected (no finding is definite)."""
        self._note_missing(self.check.collect(wait=True))

    def stop_probe(self) -> None:
        if self.probe is not None:
            self.probe.stop()
            self.probe = None

    def close(self) -> None:
        self.stop_probe()
        self.check.close()

    # -- the watched step ---------------------------------------------------------------------------

    def _note_missing(self, missing: list[nn.Parameter]) -> None:
        """Note when parameters were first found without a gradient; new suspects get the next step watched.

        Also under on_violation="error": the watched step names the cause (a `no_grad` branch is
        `no_grad_module`) before the run is stopped, one step later than the gap was seen."""
        if not missing or self.check.index is None:
            return
        for param in missing:  # (counted once reported: a branch that learns on some steps is no finding)
            self._missing_since.setdefault(id(param), self._window_first)
        if self.check.suspects and self.probe is None:
            self.pending_probe = True

    def start_probe(self) -> None:
        """Watch the batch under way with ``GradModeProbe``, to tell why its suspects get no gradient."""
        index = self.check.index
        if not self.pending_probe or index is None:
            return
        self.pending_probe = False
        watched = {id(m): path for path, m in index.modules.items() if not self.allowed(path)}
        self.probe = GradModeProbe(watched, on_error=self.on_probe_error)
        self.probe.start()

    def finish_probe(self) -> list[GapFound]:
        probe, self.probe = self.probe, None
        index = self.check.index
        if probe is None or index is None:
            return []
        probe.stop()
        suspects = self.check.take_suspects()
        gaps = explain_gradient_gaps(index, suspects, probe)
        probe.release()
        return self._judge(gaps, suspects)

    # -- when a gap is a finding ------------------------------------------------------------------

    def _judge(self, gaps: list[GradientGap], params: list[nn.Parameter]) -> list[GapFound]:
        """A gap one step proves is a finding at once, and so is any gap under DDP without
        ``find_unused_parameters`` (its reducer stops the run at the next forward); any other is held until
        the evidence is (``lightning_nograd.core.checks.gradient_window``)."""
        index = self.check.index
        by_name = {index.name(p): p for p in params} if index is not None else {}
        found: list[GapFound] = []
        for gap in gaps:
            members = [by_name[name] for name in gap.parameters if name in by_name]
            found_at = self._found_at(gap, by_name)
            if gap.definite or self.ddp_stops:
                stops = self.ddp_stops and not gap.definite
                found.append(GapFound(dataclasses.replace(gap, ddp_stops=stops), found_at, self.epoch))
            else:
                self.check.hold(gap, members, found_at, self.epoch)
        return found

    def _unexplained(self) -> list[GapFound]:
        """The suspects no watched step explained, without a gradient since the epoch's first step (an epoch of
        one step)."""
        check = self.check
        index = check.index
        if index is None or not check.suspects:
            return []
        suspects = [p for p in check.take_suspects() if check.missing_all_epoch(p)]
        by_name = {index.name(p): p for p in suspects}
        return [
            GapFound(dataclasses.replace(gap, evidence="at every step of a whole epoch"), self._found_at(gap, by_name),
                     self.epoch)
            for gap in explain_gradient_gaps(index, suspects, None)
        ]  # fmt: skip

    def _held(self, epoch_end: bool) -> list[GapFound]:
        found: list[GapFound] = []
        for held in self.check.take_confirmed(epoch_end):
            in_a_row = held.missed >= self.check.window.steps
            evidence = f"at each of its last {held.missed} steps" if in_a_row else "at every step of a whole epoch"
            gap = dataclasses.replace(held.gap, parameters=held.remaining_names(), evidence=evidence)
            found.append(GapFound(gap, held.batch_idx, held.epoch))
        return found

    @property
    def _window_first(self) -> int:
        first = self._window_first_batch if self._window_first_batch is not None else self.batch_idx
        return first or 0

    def _found_at(self, gap: GradientGap, by_name: dict[str, nn.Parameter]) -> int | None:
        """The batch at which the first of ``gap``'s parameters was found without a gradient."""
        members = [by_name[name] for name in gap.parameters if name in by_name]
        return min((self._missing_since.get(id(p), self.batch_idx or 0) for p in members), default=self.batch_idx)
