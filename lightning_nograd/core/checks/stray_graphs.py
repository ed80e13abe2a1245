"""The check for forwards outside the training step that build a graph nobody uses (``stray_graph``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lightning_nograd.core.checks.graph import GraphProbe
from lightning_nograd.core.plumbing import torch_internals
from lightning_nograd.core.plumbing.faults import Probe, isolated, isolated_method, report_fault


class StrayGraphWatch(Probe):
    """Watches the intervals between training steps for forwards that record an autograd graph.

    A ``GraphProbe`` names the module and hook, but installing and removing its saved-tensor
    hooks around every training step costs a few microseconds a batch, more as the model grows (the
    CPU caches then hold the model). So the probe watches the first interval of each epoch and the
    interval after each validation; every other interval is watched by autograd's own node counter
    (``lightning_nograd.core.plumbing.torch_internals.node_counter``), read once as it starts and once
    as it ends; on a torch without that counter the probe watches every interval. When the counter
    moved, the probe watches the intervals that follow until it names the graph: a forward outside
    the step is named the first time it runs in a watched interval, or the next time it runs after that.

    A loop's fast path is ``counting(model)`` as an interval begins (``open`` when it answers ``False``)
    and ``close`` as it ends: under the counter alone, each reads the counter once.

    Args:
        new_probe: builds the probe for a model (its ``report`` receives the graphs found).

    Examples:
        >>> import torch
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
