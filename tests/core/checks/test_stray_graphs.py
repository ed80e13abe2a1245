"""Forwards between training steps that build a graph nobody uses (``stray_graph``)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_nograd.core.checks.graph import SAVED_TENSOR_HOOKS, GraphProbe
from lightning_nograd.core.checks.stray_graphs import StrayGraphWatch


def test_a_forward_outside_the_step_is_named_at_the_next_step_and_clean_intervals_cost_two_counter_reads() -> None:
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
