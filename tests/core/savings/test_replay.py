"""The replay: a recorded step re-run with gradients on and off, leaving the model as it found it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_nograd.core.savings.recording import StepRecorder, replayable
from lightning_nograd.core.savings.replay import Replay
from tests.core.savings.test_recording import record


def test_replay_restores_modes_rng_batch_norm_stats_and_attributes() -> None:
    class KeepsLast(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.last = x * 2  # a forward that keeps a tensor for later (attention maps, say)
            return self.last

    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(), KeepsLast()).train()
    recorder = StepRecorder({id(net)})
    recorder.start()
    with torch.inference_mode():
        net.eval()
        net(torch.randn(8, 4))
        net.train()
    tape = recorder.stop()
    assert tape is not None
    kept = net[3].last
    stats = net[1].running_mean.clone()
    rng = torch.get_rng_state()
    session = Replay(replayable(tape), torch.device("cpu"), set())
    session.measure_memory()
    session.time_pairs(3)
    result = session.result
    assert result.pairs == len(result.blocks) == 3 and result.graph_bytes > 0
    assert result.clock == "cpu"
    session.time_pairs(2, deadline=0.0)  # a deadline already past: no run is taken, no block half-taken
    assert result.pairs == len(result.blocks) == 3
    assert torch.equal(net[1].running_mean, stats)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in net.modules())
    assert net[3].last is kept, "the attribute the replay's forward set is put back"


def test_timed_replay_counts_freeing_the_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    # a real grad-enabled batch frees its graph before the next one: that host work is a cost of gradients
    from lightning_nograd.core.savings import replay

    events: list[str] = []

    class Noted:
        def __del__(self) -> None:
            events.append("graph freed")

    class Keep(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            ctx.note = Noted()  # lives exactly as long as the graph node
            return x * 2

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            return grad * 2

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return Keep.apply(self.linear(x))

    net = Net()
    tape = record(lambda: net(torch.ones(1, 2)), net, inference=False)
    monkeypatch.setattr(replay, "synchronize", lambda device: events.append("clock"))
    events.clear()
    cpu, wall = replay._timed_runs(tape, grad=True, device=torch.device("cpu"), runs=2)
    assert len(cpu) == len(wall) == 2
    # each timed run frees its graph between the clock's start and stop; the settling runs are not timed
    assert events == ["graph freed"] * replay.SETTLING_RUNS + ["clock", "graph freed", "clock"] * 2
