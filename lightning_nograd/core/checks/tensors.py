"""Tensors that keep memory or autograd graphs alive: what step outputs and module attributes hold.

``tally_tensors`` counts the tensors in a value (graph-attached ones, their bytes, the graphs' saved
bytes); ``AttributeTensors`` watches a model's tensor attributes across an epoch for collections that
grow. Storages are counted once however many views share them.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

MIB = float(2**20)


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


def module_device(module: torch.nn.Module) -> torch.device:
    """The device ``module`` computes on: its ``device`` (a LightningModule's, a Hugging Face model's), else its
    first parameter's, else the CPU.

    Examples:
        >>> module_device(torch.nn.Linear(2, 2))
        device(type='cpu')
    """
    device = getattr(module, "device", None)
    if isinstance(device, (torch.device, str)):
        return torch.device(device)
    return next((p.device for p in module.parameters()), torch.device("cpu"))
