"""What BackpropGuard's checks find, written as findings: the text, the step it happened at, and the
per-epoch counts logged as ``nograd/train/*``.

The checks (``lightning_nograd.core.checks``) say what they saw in their own terms (a gap, a leak, a
graph, a group of unstepped gradients); ``TrainingFindings`` turns each into the ``Finding`` users read,
with the model's class in the fix and the epoch and batch it happened at.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lightning_nograd.core.checks.eval_mode_leaks import Leak
from lightning_nograd.core.checks.graph import GraphEvent
from lightning_nograd.core.checks.inference_tensors import inference_tensors
from lightning_nograd.core.checks.missing_gradients import GapFound
from lightning_nograd.core.checks.unstepped_gradients import UnsteppedGroup, describe_groups
from lightning_nograd.core.plumbing.module_paths import NamePatterns
from lightning_nograd.core.reporting import messages
from lightning_nograd.core.reporting.findings import Finding

COUNTS = {
    "no_grad_modules": "nograd/train/no_grad_modules",
    "params_without_grad": "nograd/train/params_without_grad",
    "eval_mode_modules": "nograd/train/eval_mode_modules",
}
"""The per-epoch counts (what is counted -> the metric key): each counts distinct modules or parameters."""


class TrainingFindings:
    """Turns what the training checks saw into findings, and counts them per epoch.

    Args:
        add: reports a finding under the callback's ``on_violation``.
        allow: the modules never to report.
        counts: the named counts to fill (``COUNTS``' names -> members); the callback shares them over
            the ranks with its findings.

    Attributes:
        root_type: the model's class name, which the fixes name.
        epoch: the training epoch under way.
        batch_idx: the training batch under way (``None`` outside one).
    """

    def __init__(self, add: Callable[[Finding], bool], allow: NamePatterns, counts: dict[str, set[str]]) -> None:
        self._add = add
        self._allow = allow
        self.counts = counts
        for name in COUNTS:
            counts.setdefault(name, set())
        self.root_type = "LightningModule"
        self.epoch = 0
        self.batch_idx: int | None = None
        self._inference_reported: set[str] = set()

    def new_epoch(self, epoch: int) -> None:
        """A training epoch starts: its counts start from zero."""
        self.epoch = epoch
        for members in self.counts.values():
            members.clear()

    def metrics(self) -> dict[str, float]:
        """The epoch's counts, under their metric keys."""
        return {key: float(len(self.counts[name])) for name, key in COUNTS.items()}

    def _finding(
        self, kind: str, subject: str, hook: str, text: messages.Explanation, at: tuple[int | None, int] | None = None
    ) -> None:
        """Report a training finding, at the batch and epoch under way unless ``at`` says where it was first seen."""
        batch_idx, epoch = (self.batch_idx, self.epoch) if at is None else at
        self._add(Finding(kind, subject, "train", hook, batch_idx, epoch, *text))

    def inference_tensors(self, model: nn.Module, hook: str) -> None:
        """Buffers and tensor attributes of ``model`` made under ``torch.inference_mode`` (each named once a fit)."""
        for path, kind in inference_tensors(model, self._allow.matches):
            if path not in self._inference_reported:
                self._inference_reported.add(path)
                self._finding("inference_tensor", path, hook, messages.inference_tensor(path, kind))

    def eval_at_start(self, path: str, layers: list[tuple[str, str]]) -> None:
        """A trainable block with layers in eval mode as training started."""
        text = messages.eval_mode_at_start(path, layers, self.root_type)
        self._finding("eval_mode_at_start", path, "on_train_start", text, at=(None, self.epoch))

    def leaks(self, leaks: list[Leak], fixed: bool) -> None:
        """Modules that trained earlier and are in eval mode now (``fixed``: they are put back in train mode)."""
        for leak in leaks:
            self.counts["eval_mode_modules"].add(leak.path)
            if leak.new:
                text = messages.eval_mode_leak(leak.path, leak.module, self.root_type, fixed, leak.layers)
                self._finding("eval_mode_leak", leak.path, leak.where, text, at=(leak.batch_idx, self.epoch))

    def gaps(self, found: list[GapFound]) -> None:
        """Parameters without a gradient, and the regions that cut them off."""
        for gap, batch_idx, epoch in found:
            if self._allow.matches(gap.subject):  # the pattern its fix names: a region kept on purpose
                continue
            if gap.kind == "no_grad_module":
                self.counts["no_grad_modules"].add(gap.subject)
            self.counts["params_without_grad"].update(gap.parameters)
            hook = "training_step" if gap.definite else "on_before_optimizer_step"
            self._finding(gap.kind, gap.subject, hook, gap.explanation(self.root_type), at=(batch_idx, epoch))

    def unstepped(self, groups: list[UnsteppedGroup], optimizers: list[torch.optim.Optimizer]) -> None:
        """Gradients computed for parameters no optimizer steps."""
        described = describe_groups(optimizers)
        for group in groups:
            text = messages.grad_without_step(
                group.subject, group.parameters, group.modules, group.kinds, group.mib, described, self.root_type
            )
            self._finding("grad_without_step", group.subject, "on_before_optimizer_step", text)

    def stray_graph(self, event: GraphEvent, modules: list[str]) -> None:
        """A forward outside the training step that recorded a graph."""
        hook = event.hook or "on_train_batch_end"
        text = messages.stray_graph(event, modules, hook, self.root_type)
        self._finding("stray_graph", event.module, hook, text)
