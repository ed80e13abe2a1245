"""The graph probe: autograd graphs built while a model should be evaluating (``grad_enabled``)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_nograd.core.checks.graph import SAVED_TENSOR_HOOKS, GraphEvent, GraphProbe


def _started_probe(net: nn.Module) -> tuple[GraphProbe, list[GraphEvent]]:
    """A started probe of ``net`` that reports each graph at once, and the list it reports into."""
    events: list[GraphEvent] = []
    probe = GraphProbe(net, frozenset(), lambda event, modules: events.append(event), lambda name: False, True)
    probe.start()
    return probe, events


def test_probe_sees_graphs_only_and_names_the_deepest_common_module() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    probe, events = _started_probe(net)
    try:
        with torch.no_grad():
            net(torch.ones(2, 4))
        assert events == []
        net(torch.ones(2, 4))
        ((merged, modules),) = probe.grouped_events()
    finally:
        probe.close()
    assert merged.module == "" and modules == ["0", "1", "2"]
    assert merged.saved_bytes == 2 * 4 * 4 + 2 * 4 * 4  # the input, and the ReLU output (saved once)
    assert not SAVED_TENSOR_HOOKS.pushed


def test_a_stopped_audit_sees_no_graph_another_still_does_and_replays_are_never_seen() -> None:
    net = nn.Linear(2, 2)
    seen_a: list[GraphEvent] = []
    seen_b: list[GraphEvent] = []
    a = GraphProbe(net, frozenset(), lambda event, modules: seen_a.append(event), lambda n: False, True)
    b = GraphProbe(net, frozenset(), lambda event, modules: seen_b.append(event), lambda n: False, True)
    a.start()
    b.start()
    a.stop()  # stopping in any order leaves the other probe working
    with SAVED_TENSOR_HOOKS.paused():
        net(torch.ones(1, 2))
    net(torch.ones(1, 2))
    b.close()
    a.close()
    assert seen_a == [] and len(seen_b) == 1
    assert SAVED_TENSOR_HOOKS.probes == [] and not SAVED_TENSOR_HOOKS.pushed


def test_probe_reads_the_model_at_the_first_graph_not_at_start() -> None:
    # a correct run records no graph, so starting a probe reads nothing of the model (at 100,000
    # parameters, reading their storages took 0.4-0.8 s, at every validation loop's start)
    net = nn.Sequential(nn.Linear(2, 2))
    probe, events = _started_probe(net)
    try:
        with torch.no_grad():
            net(torch.ones(1, 2))
        net.add_module("late", nn.Linear(2, 2))  # added after the start, before the first graph
        net.late(torch.ones(1, 2))
        probe.stop()
        probe.rename()  # the model changed again: read again at the next graph
        net.add_module("later", nn.Linear(2, 2))
        probe.start()
        net.later(torch.ones(1, 2))
    finally:
        probe.close()
    assert [e.module for e in events] == ["late", "later"]
    # the parameters' own storages (read with the names) are no graph memory: only the saved input counts
    assert [e.saved_bytes for e in events] == [2 * 4, 2 * 4]
