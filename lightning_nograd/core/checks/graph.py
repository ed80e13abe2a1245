"""Detects autograd graphs built where none should be (the ``grad_enabled`` check and the probe of ``stray_graph``).

``GraphProbe`` installs ``torch.autograd.graph.saved_tensors_hooks`` for a whole evaluation
stage. Autograd calls the pack hook only when it saves a tensor for backward, i.e. only when a
graph is really being built, so a correct model pays nothing and no module hook is needed. When
the hook does fire, the Python stack names the innermost module whose forward is running and the
Lightning hook that called it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

import torch
from torch import nn

from lightning_nograd.core.checks.tensors import _storage, storage_bytes, storage_key, weight_storages
from lightning_nograd.core.plumbing import stack, torch_internals
from lightning_nograd.core.plumbing.faults import Probe, isolated_method, report_fault
from lightning_nograd.core.plumbing.module_paths import named_modules
from lightning_nograd.core.reporting.findings import common_ancestor
from lightning_nograd.errors import NoGradError

REPARAMETRIZATION_FILES = tuple(
    os.path.join("torch", "nn", "utils", name)
    for name in ("prune.py", "parametrize.py", "parametrizations.py", "weight_norm.py", "spectral_norm.py")
)


"""PyTorch's re-parametrisation code: the graphs it records (``weight_orig * mask``) are not forwards."""


@dataclass
class GraphEvent:
    """A graph recorded while a probe was active: where, and how many bytes it saves for backward."""

    module: str
    hook: str | None
    saved_bytes: int


class GraphProbe(Probe):
    """Reports every (module, hook) that records an autograd graph while the probe is active.

    Args:
        root: the model; modules are named by their ``named_modules()`` path in it.
        hook_names: names of the functions that count as hooks (``validation_step``, ...).
        report: receives each graph found, with the modules that recorded it; may raise to stop
            the run. Called from ``flush`` with one merged graph per hook and batch, or, with
            ``report_at_once``, as soon as a (module, hook) first records in a batch.
        is_allowed: modules for which building a graph is legitimate (saliency, physics).
        report_at_once: report while the forward runs (``on_violation="error"`` stops there).

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> events = []
        >>> probe = GraphProbe(net, frozenset(), lambda e, m: events.append(e), lambda name: False, True)
        >>> probe.start()
        >>> with torch.no_grad():
        ...     _ = net(torch.ones(1, 2))
        >>> _ = net(torch.ones(1, 2))
        >>> probe.stop()
        >>> [(e.module, e.saved_bytes > 0) for e in events]
        [('0', True)]
    """

    def __init__(
        self,
        root: nn.Module,
        hook_names: frozenset[str],
        report: Callable[[GraphEvent, list[str]], None],
        is_allowed: Callable[[str], bool],
        report_at_once: bool = False,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.on_error = on_error
        self.root = root
        self.hook_names = hook_names
        self.report = report
        self.is_allowed = is_allowed
        self.report_at_once = report_at_once
        self._names: dict[int, str] = {}
        self._param_storages: set[tuple[str, int]] = set()
        self._model_read = False  # names and storages are read at the first graph: none, in a correct run
        self.active = False
        self.has_events = False  # a graph was recorded since the last flush (an attribute: read every batch)
        self._batch_storages: set[tuple[str, int]] = set()
        self._batch_events: dict[tuple[str, str | None], GraphEvent] = {}

    def start(self) -> None:
        """Start receiving saved tensors (idempotent). Reads nothing of the model: a correct run records
        no graph, and the first graph recorded reads the module names and parameter storages."""
        if self.active:
            return
        if self._batch_events:
            self.new_batch()
        SAVED_TENSOR_HOOKS.register(self)
        self.active = True

    def rename(self) -> None:
        """The model may have changed: its module names and parameter storages are read again at the next graph."""
        self._model_read = False

    def _read_model(self) -> None:
        self._names = {id(m): name for name, m in named_modules(self.root)}
        self._param_storages = weight_storages(self.root)
        self._model_read = True

    def stop(self) -> None:
        """Stop receiving saved tensors (forgetting what was not flushed); ``start`` resumes cheaply."""
        if self.active:
            SAVED_TENSOR_HOOKS.unregister(self)
            self.active = False
        if self._batch_events:  # (a storage is only counted together with its event)
            self.new_batch()

    def close(self) -> None:
        """Stop and drop every reference to the model."""
        self.stop()
        self._names = {}
        self._param_storages = set()
        self._model_read = False
        self.root = nn.Module()

    @isolated_method
    def new_batch(self) -> None:
        """Start counting saved bytes for a new batch."""
        self._batch_storages = set()
        self._batch_events = {}
        self.has_events = False

    @isolated_method
    def flush(self) -> None:
        """Report this batch's graphs (one per hook, see ``grouped_events``) and reset."""
        if not self._batch_events:
            return
        grouped = self.grouped_events()
        self.new_batch()
        for event, modules in grouped:
            self.report(event, modules)

    def grouped_events(self) -> list[tuple[GraphEvent, list[str]]]:
        """This batch's graphs, one per hook, named by the deepest module containing all of them, with the modules
        that recorded them in the order the forward ran them (the order their first tensor was saved)."""
        by_hook: dict[str | None, list[GraphEvent]] = {}
        for event in self._batch_events.values():
            by_hook.setdefault(event.hook, []).append(event)
        grouped = []
        for hook, events in by_hook.items():
            modules = list(dict.fromkeys(e.module for e in events))
            total = sum(e.saved_bytes for e in events)
            grouped.append((GraphEvent(common_ancestor(modules), hook, total), modules))
        return grouped

    def receive(self, tensor: torch.Tensor, frame: FrameType | None) -> None:
        """Handle one tensor autograd is saving for backward; ``frame`` is the op's caller."""
        if self.failed:
            return
        try:
            self._record(tensor, frame)
        except NoGradError:
            raise
        except Exception as err:  # a probe failure must not break the user's forward
            report_fault(self, err)

    def _record(self, tensor: torch.Tensor, frame: FrameType | None) -> None:
        if not self._model_read:
            self._read_model()
        if _storage(tensor) is None:
            return  # a compiler's fake tensor while it traces (torch 2.4's dynamo): nothing is kept at run time
        key = storage_key(tensor)
        if key in self._param_storages:
            return
        module, hook = self._locate(frame)
        if module is None or self.is_allowed(module):
            return
        new_storage = key not in self._batch_storages
        self._batch_storages.add(key)
        event_key = (module, hook)
        event = self._batch_events.get(event_key)
        if event is None:
            event = GraphEvent(module, hook, 0)
            self._batch_events[event_key] = event
            self.has_events = True
            if new_storage:
                event.saved_bytes += storage_bytes(tensor)
            if self.report_at_once:
                self.report(event, [event.module])
        elif new_storage:
            event.saved_bytes += storage_bytes(tensor)

    def _locate(self, frame: FrameType | None) -> tuple[str | None, str | None]:
        """The innermost known module whose forward is running, and the hook that called it.

        ``(None, None)`` for a graph recorded by a parameter re-parametrisation (pruning, weight and
        spectral norm, parametrizations computing ``weight = weight_orig * mask``): that is no forward.
        """
        module: str | None = None
        for outer in stack.outward(frame):
            if outer.f_code.co_filename.endswith(REPARAMETRIZATION_FILES):
                return None, None
            if module is None and outer.f_code is torch_internals.CALL_IMPL_CODE:
                module = self._names.get(id(outer.f_locals.get("self")))
            code_name = outer.f_code.co_name
            if code_name in self.hook_names:
                return (module if module is not None else ""), code_name
        return (module if module is not None else ""), None


class _SavedTensorsHub:
    """Owns the one ``saved_tensors_hooks`` entry all probes share.

    Autograd uses only the innermost pair of saved-tensor hooks, and the hooks form a stack that
    must be popped in order; probes of different callbacks start and stop in any order, so they
    register here instead and this hub pushes one entry while any probe is active.
    """

    def __init__(self) -> None:
        self.probes: list[GraphProbe] = []
        self.pushed = False
        self._paused = 0
        self._hooks = torch_internals.SavedTensorsHooks(self._pack, _unpack)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Probes see nothing inside this block: our own grad-enabled replays are not the user's."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def register(self, probe: GraphProbe) -> None:
        if probe not in self.probes:
            self.probes.append(probe)
        if not self.pushed:
            self._hooks.push()
            self.pushed = True

    def unregister(self, probe: GraphProbe) -> None:
        if probe in self.probes:
            self.probes.remove(probe)
        if not self.probes and self.pushed:
            self.pushed = False
            self._hooks.pop()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._paused:
            return tensor.detach()
        frame = stack.caller()  # the autograd op that saves the tensor
        for probe in list(self.probes):
            probe.receive(tensor, frame)
        return tensor.detach()


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


SAVED_TENSOR_HOOKS = _SavedTensorsHub()
