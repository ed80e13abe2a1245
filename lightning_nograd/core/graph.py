"""Detects autograd graphs built where none should be, and tensors that keep graphs alive.

``GraphProbe`` installs ``torch.autograd.graph.saved_tensors_hooks`` for a whole evaluation
stage. Autograd calls the pack hook only when it saves a tensor for backward, i.e. only when a
graph is really being built, so a correct model pays nothing and no module hook is needed. When
the hook does fire, the Python stack names the innermost module whose forward is running and the
Lightning hook that called it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch
from torch import nn

from lightning_nograd.core import torch_internals
from lightning_nograd.core.faults import Probe, isolated, isolated_method, report_fault
from lightning_nograd.core.findings import common_ancestor
from lightning_nograd.core.module_paths import named_modules
from lightning_nograd.errors import NoGradError

MIB = float(2**20)

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


def format_bytes(nbytes: float) -> str:
    """``1536`` -> ``"1.5 KiB"``; MiB from 1 MiB up.

    Examples:
        >>> format_bytes(1536), format_bytes(3 * 2**20)
        ('1.5 KiB', '3.00 MiB')
    """
    if nbytes < MIB:
        return f"{nbytes / 1024:.1f} KiB"
    return f"{nbytes / MIB:.2f} MiB"


def _storage(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    """The storage that holds ``tensor``'s data on this process: a ``DTensor``'s (FSDP2, tensor
    parallel) is its local shard's; ``None`` for a tensor subclass with no storage at all."""
    to_local = getattr(tensor, "to_local", None)
    if callable(to_local):
        with torch.no_grad():
            tensor = to_local()
    try:
        storage = tensor.untyped_storage()
        storage.data_ptr()  # a wrapper subclass may hand out a storage it cannot back
    except (RuntimeError, NotImplementedError):
        return None
    return storage


def storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    """Identity of the storage behind ``tensor`` (views of one storage share it; a tensor without
    one is its own identity)."""
    storage = _storage(tensor)
    if storage is None:
        return (str(tensor.device), -id(tensor))
    return (str(tensor.device), storage.data_ptr())


def weight_storages(module: nn.Module) -> set[tuple[str, int]]:
    """Storage keys of ``module``'s parameters and buffers: memory that exists anyway, left out of
    graph and kept-graph sizes."""
    return {storage_key(t) for t in [*module.parameters(), *module.buffers()] if t.numel() > 0}


def storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the whole storage behind ``tensor`` (not just the view)."""
    storage = _storage(tensor)
    return int(storage.nbytes()) if storage is not None else tensor.numel() * tensor.element_size()


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
        HUB.register(self)
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
            HUB.unregister(self)
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
        """This batch's graphs, one per hook, named by the deepest module containing all of them."""
        by_hook: dict[str | None, list[GraphEvent]] = {}
        for event in self._batch_events.values():
            by_hook.setdefault(event.hook, []).append(event)
        grouped = []
        for hook, events in by_hook.items():
            modules = sorted({e.module for e in events})
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
        while frame is not None:
            if frame.f_code.co_filename.endswith(REPARAMETRIZATION_FILES):
                return None, None
            if module is None and frame.f_code is torch_internals.CALL_IMPL_CODE:
                module = self._names.get(id(frame.f_locals.get("self")))
            code_name = frame.f_code.co_name
            if code_name in self.hook_names:
                return (module if module is not None else ""), code_name
            frame = frame.f_back
        return (module if module is not None else ""), None


class StrayGraphWatch(Probe):
    """Watches the intervals between training steps for forwards that record an autograd graph.

    A ``GraphProbe`` names the module and hook, but installing and removing its saved-tensor
    hooks around every training step costs a few microseconds a batch, more as the model grows (the
    CPU caches then hold the model). So the probe watches the first interval of each epoch and the
    interval after each validation; every other interval is watched by autograd's own node counter
    (``lightning_nograd.core.torch_internals.node_counter``), read once as it starts and once
    as it ends; on a torch without that counter the probe watches every interval. When the counter
    moved, the probe watches the intervals that follow until it names the graph: a forward outside
    the step is named the first time it runs in a watched interval, or the next time it runs after that.

    A loop's fast path is ``counting(model)`` as an interval begins (``open`` when it answers ``False``)
    and ``close`` as it ends: under the counter alone, each reads the counter once.

    Args:
        new_probe: builds the probe for a model (its ``report`` receives the graphs found).

    Examples:
        >>> net = nn.Linear(2, 2)
        >>> found = []
        >>> def new_probe(root, on_error):
        ...     return GraphProbe(root, frozenset(), lambda e, m: found.append(e.module), lambda name: False)
        >>> watch = StrayGraphWatch(new_probe)
        >>> watch.new_epoch()
        >>> for step in range(4):
        ...     watch.open(net)  # a training step ended
        ...     if step == 1:
        ...         _ = net(torch.ones(1, 2))  # a forward outside the step, under the counter only
        ...     if step == 2:
        ...         _ = net(torch.ones(1, 2))  # again: the probe watches since the counter moved
        ...     watch.close()  # the next training step starts
        >>> found, watch.probing
        ([''], False)
    """

    def __init__(
        self,
        new_probe: Callable[[nn.Module, Callable[[BaseException], None]], GraphProbe],
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.on_error = on_error
        self._new_probe = new_probe
        self.probe: GraphProbe | None = None
        self._probe_root: nn.Module | None = None  # the probe's model
        self._counter_at: int | None = None  # the node counter as the current interval began, if counting
        self._counts_for: nn.Module | None = None  # the model whose next interval the counter alone watches
        self._failed = False
        self._graph_unnamed = False  # the counter moved: probe until the graph is named
        self._probe_next = True  # the first interval of an epoch, the one after a validation

    @property  # type: ignore[override]
    def failed(self) -> bool:
        return self._failed

    @failed.setter
    def failed(self, value: bool) -> None:
        self._failed = value
        self._decide_fast_path()

    def _decide_fast_path(self) -> None:
        """Decide which model's next interval the counter alone watches (``counting``'s one test)."""
        probe_needed = (
            self._graph_unnamed or self._probe_next or self._failed or not torch_internals.available("node_counter")
        )
        self._counts_for = None if probe_needed else self._probe_root

    @property
    def counts_for(self) -> nn.Module | None:
        """The model whose next interval the counter alone watches (``None``: the probe watches)."""
        return self._counts_for

    @property
    def probing(self) -> bool:
        """Whether the probe watches the current interval."""
        return self.probe is not None and self.probe.active

    def new_epoch(self) -> None:
        """Probe the next interval, and name modules anew (the model may have changed)."""
        self._probe_next = True
        self._decide_fast_path()
        if self.probe is not None:
            self.probe.rename()

    def counting(self, root: nn.Module) -> bool:
        """Begin a interval under the counter alone, if the probe need not watch it; whether it did."""
        if self._counts_for is not root:
            return False
        self._counter_at = torch_internals.node_counter()
        return True

    def open(self, root: nn.Module, probe: bool = False) -> None:
        """A interval outside the training step begins; ``probe`` watches it with the probe."""
        if not self._failed and (probe or not self.counting(root)):
            self._start_probe(root)

    @isolated_method
    def _start_probe(self, root: nn.Module) -> None:
        self._probe_next = False
        current = self.probe
        if current is None or current.root is not root:
            self._drop_probe()
            current = self.probe = self._new_probe(root, self._probe_failed)
            self._probe_root = root
        self._decide_fast_path()
        current.start()

    def close(self) -> None:
        """The interval ends: report what the probe saw, or arm the probe if the counter moved."""
        counter_at, self._counter_at = self._counter_at, None
        if counter_at is not None:
            if torch_internals.node_counter() != counter_at:
                self._graph_unnamed = True
                self._decide_fast_path()
            return
        if not self._failed and self.probing:
            self._stop_probe()

    @isolated_method
    def _stop_probe(self) -> None:
        probe = self.probe
        assert probe is not None
        if probe.has_events:
            self._graph_unnamed = False
            self._decide_fast_path()
        try:
            probe.flush()  # reports this interval's graphs (may stop the run, under on_violation="error")
        finally:
            probe.stop()

    def flush(self) -> None:
        """Report what the probe saw so far; the interval goes on."""
        if not self.failed and self.probe is not None:
            isolated(self.probe.flush, self)()

    def release(self) -> None:
        """Stop, report what is left, and drop every reference to the model."""
        self._counter_at = None
        try:
            self.close()
        finally:
            self._drop_probe()

    def _drop_probe(self) -> None:
        probe, self.probe = self.probe, None
        self._probe_root = None
        self._decide_fast_path()
        if probe is not None:
            probe.close()

    def _probe_failed(self, err: BaseException) -> None:
        report_fault(self, err)


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
        frame = sys._getframe(1)
        for probe in list(self.probes):
            probe.receive(tensor, frame)
        return tensor.detach()


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


HUB = _SavedTensorsHub()


@dataclass
class TensorTally:
    """Tensors found inside a value: how many, how many still attached to a graph, their size."""

    tensors: int = 0
    attached: int = 0
    nbytes: int = 0
    attached_bytes: int = 0
    devices: frozenset[str] = frozenset()
    graph_roots: list[Any] = field(default_factory=list)  # the attached tensors' grad_fn nodes
    attached_storages: set[tuple[str, int]] = field(default_factory=set)

    def kept_bytes(self, exclude: AbstractSet[tuple[str, int]] = frozenset()) -> int:
        """What the attached tensors keep alive: their own storages plus the tensors their graphs saved
        for backward (each storage once; ``exclude`` holds parameter and buffer storages)."""
        return self.attached_bytes + graph_saved_bytes(self.graph_roots, self.attached_storages | exclude)

    @property
    def attached_mib(self) -> float:
        """Size of the graph-attached tensors' storages in MiB."""
        return self.attached_bytes / MIB


CONTAINERS = (list, tuple, dict, set)


def graph_saved_bytes(
    roots: Iterable[Any], exclude: AbstractSet[tuple[str, int]] = frozenset(), node_limit: int = 100_000
) -> int:
    """Bytes of the tensors that the autograd graphs behind ``roots`` saved for backward.

    Walks each graph once (at most ``node_limit`` nodes) and reads every node's ``_saved_*``
    tensors, each storage counted once, storages in ``exclude`` (parameters, buffers) left out.
    A graph already used by a backward has freed what it saved, and adds nothing.

    Examples:
        >>> w = torch.ones(4, 4, requires_grad=True)
        >>> y = (torch.ones(256, 4) @ w).relu()  # the matmul saves its 256x4 input, relu its output
        >>> graph_saved_bytes([y.grad_fn], {storage_key(w)})  # 2 x 4 KiB; the weight is left out
        8192
    """
    # the nodes themselves are kept: torch 2.4 makes a new Python object for a node each time it is
    # reached and frees it after, so a bare id could be taken by another node and that node skipped
    seen_nodes: dict[int, Any] = {}
    seen_storages: set[tuple[str, int]] = set(exclude)
    total = 0
    stack = [r for r in roots if r is not None]
    while stack and len(seen_nodes) < node_limit:
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes[id(node)] = node
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            try:
                value = getattr(node, name)
            except RuntimeError:  # freed by a backward
                continue
            for tensor in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(tensor, torch.Tensor) and tensor.numel() > 0:
                    key = storage_key(tensor)
                    if key not in seen_storages:
                        seen_storages.add(key)
                        total += storage_bytes(tensor)
        stack.extend(next_node for next_node, _ in getattr(node, "next_functions", ()) if next_node is not None)
    return total


def tally_tensors(value: Any, limit: int = 100_000) -> TensorTally:
    """Count the tensors in ``value`` (nested lists, tuples, dicts, sets), at most ``limit`` items.

    Examples:
        >>> t = torch.ones(4, requires_grad=True) * 2
        >>> tally = tally_tensors({"a": [t, t.detach()]})
        >>> tally.tensors, tally.attached
        (2, 1)
    """
    tally = TensorTally()
    seen: set[tuple[str, int]] = set()
    devices: set[str] = set()
    stack = [value]
    visited = 0
    while stack and visited < limit:
        item = stack.pop()
        visited += 1
        if isinstance(item, torch.Tensor):
            if isinstance(item, nn.Parameter):
                continue
            tally.tensors += 1
            devices.add(item.device.type)
            key = storage_key(item)
            fresh = key not in seen
            seen.add(key)
            size = storage_bytes(item) if fresh else 0
            tally.nbytes += size
            if item.grad_fn is not None:
                tally.attached += 1
                tally.attached_bytes += size
                tally.graph_roots.append(item.grad_fn)
                tally.attached_storages.add(key)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, CONTAINERS):
            stack.extend(item)
    tally.devices = frozenset(devices)
    return tally


_MODULE_INTERNALS = frozenset(
    {"_parameters", "_buffers", "_modules", "_trainer", "_fabric", "_device_mesh", "_metric_attributes"}
)


def tensor_attributes(module: nn.Module) -> Iterable[tuple[str, Any]]:
    """Plain attributes of ``module`` that hold tensors directly or in containers.

    Parameters, buffers and submodules are not attributes in this sense (they live in
    ``_parameters``, ``_buffers`` and ``_modules``).
    """
    for name, value in vars(module).items():
        if name in _MODULE_INTERNALS or name.startswith("__"):
            continue
        if isinstance(value, torch.Tensor) or (isinstance(value, CONTAINERS) and value):
            yield name, value


@dataclass
class KeptTensors:
    """What an attribute of the model holds at an evaluation epoch's end."""

    name: str
    tally: TensorTally
    attached_between: bool  # its attached tensors appeared between two evaluation epochs (in training)
    grows: bool  # a collection that grew since the last epoch of this stage and was never cleared


class AttributeTensors:
    """Tensors a model keeps in plain attributes across evaluation epochs (``self.outputs.append(...)``).

    ``epoch_start`` and ``epoch_end`` are called around each evaluation epoch. A collection
    *grows* when it was not cleared since the last epoch of the same stage ended (it holds at least
    as many tensors at this epoch's start) and gained more than one tensor, or 1 MiB, in this epoch.

    Examples:
        >>> net, watch = nn.Linear(1, 1), AttributeTensors()
        >>> net.outputs = []
        >>> for epoch in range(3):
        ...     watch.epoch_start(net)
        ...     net.outputs.extend(torch.ones(1) for _ in range(4))
        ...     kept = watch.epoch_end(net, "val")
        >>> [(k.name, k.tally.tensors, k.grows) for k in kept]
        [('outputs', 12, True)]
    """

    def __init__(self) -> None:
        self._tensors_at_start: dict[str, int] = {}
        self._attached_between: set[str] = set()
        self._attached_at_end: dict[str, int] = {}
        self._at_end: dict[tuple[str, str], tuple[int, int]] = {}

    def epoch_start(self, root: nn.Module) -> None:
        tallies = {name: tally_tensors(value) for name, value in tensor_attributes(root)}
        self._tensors_at_start = {name: tally.tensors for name, tally in tallies.items()}
        # graphs that appeared since the last evaluation epoch ended were stored in between: in training
        self._attached_between = {
            name for name, tally in tallies.items() if tally.attached > self._attached_at_end.get(name, 0)
        }

    def epoch_end(self, root: nn.Module, stage: str) -> list[KeptTensors]:
        kept = []
        for name, value in tensor_attributes(root):
            tally = tally_tensors(value)
            self._attached_at_end[name] = tally.attached
            at_start = self._tensors_at_start.get(name, 0)
            previous = self._at_end.get((stage, name))
            self._at_end[(stage, name)] = (tally.tensors, tally.nbytes)
            grows = (
                previous is not None
                and previous[0] > 0
                and at_start >= previous[0]  # not cleared since the last epoch ended
                and (tally.tensors - at_start > 1 or tally.nbytes - previous[1] >= 2**20)
            )
            kept.append(KeptTensors(name, tally, name in self._attached_between, grows))
        return kept
