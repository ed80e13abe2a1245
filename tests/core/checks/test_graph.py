from __future__ import annotations

import torch
from torch import nn

from lightning_nograd.core.checks.graph import SAVED_TENSOR_HOOKS, GraphEvent, GraphProbe
from lightning_nograd.core.checks.stray_graphs import StrayGraphWatch
from lightning_nograd.core.checks.tensors import tally_tensors, tensor_attributes


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


def test_two_probes_share_one_hook_entry_and_pause_hides_graphs() -> None:
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


def test_tally_and_tensor_attributes() -> None:
    module = nn.Linear(2, 2)
    attached = module(torch.ones(1, 2))
    module.kept = [attached, attached.detach()]
    module.name = "not a tensor"
    names = [name for name, _ in tensor_attributes(module)]
    assert names == ["kept"]
    tally = tally_tensors(module.kept)
    assert (tally.tensors, tally.attached) == (2, 1)
    assert tally.nbytes == 8, "two views of one storage count once"


def test_a_stray_graph_is_named_the_next_time_and_clean_intervals_cost_two_counter_reads() -> None:
    # what BackpropGuard does: while `counts_for` is the model an interval is only two counter reads;
    # a graph built in one arms the probe, which names it the next time and then steps aside again
    net = nn.Linear(2, 2)
    found: list[str] = []
    watch = StrayGraphWatch(lambda root, on_error: GraphProbe(root, frozenset(), lambda e, m: found.append(e.module),
                                                    lambda name: False))  # fmt: skip
    watch.new_epoch()
    assert watch.counts_for is None, "the epoch's first stretch is the probe's"
    fast = []
    for step in range(5):
        # the step's end
        if watch.counting(net):
            fast.append(step)
        else:
            watch.open(net)
        if step in (1, 2):
            net(torch.ones(1, 2))  # a forward outside the step
        # the next step's start
        watch.close()
    assert fast == [1, 3, 4], "probed: the epoch's first stretch and the one after the counter moved"
    assert found == [""]
    watch.failed = True
    assert watch.counts_for is None, "a failed watch takes no fast path"
    watch.release()
    assert not SAVED_TENSOR_HOOKS.pushed


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
