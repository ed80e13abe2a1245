from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_nograd.core.recording import CallRecorder, replayable
from lightning_nograd.core.replay import Replay
from lightning_nograd.core.savings import ReplayResult, time_savings


def test_the_95_percent_interval_tells_a_real_difference_from_noise() -> None:
    clear = ReplayResult(time_on=[1.1] * 8, time_off=[1.0] * 8)
    assert not clear.within_noise() and clear.sign_test_p < 0.01
    noisy = ReplayResult(time_on=[1.1, 0.9, 1.1, 0.9, 1.0, 1.1], time_off=[1.0] * 6)
    assert noisy.within_noise()
    assert ReplayResult().within_noise()
    assert ReplayResult(time_on=[2.0], time_off=[1.0]).within_noise()  # one pair: no interval yet
    # the interval narrows as pairs accumulate: the same spread over four times the pairs
    few = ReplayResult(time_on=[1.2, 1.0, 1.3, 1.1], time_off=[1.0] * 4)
    many = ReplayResult(time_on=few.time_on * 4, time_off=few.time_off * 4)
    assert few.half_width is not None and many.half_width is not None and many.half_width < few.half_width / 2


def test_spread_is_the_interquartile_range_of_paired_differences() -> None:
    result = ReplayResult(time_on=[2.0, 3.0, 4.0, 5.0, 6.0], time_off=[1.0] * 5)
    low, high = result.spread
    assert low < result.saved_per_batch == 3.0 < high


def test_recorder_keeps_outermost_work_calls_only() -> None:
    backbone = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    head = nn.Linear(4, 1)
    recorder = CallRecorder({id(backbone), id(backbone[0]), id(head)})
    recorder.start()
    with torch.inference_mode():
        head(backbone(torch.ones(2, 4)))
    recorder.stop()
    assert [c.module for c in recorder.calls] == [backbone, head]
    assert all(c.inference_mode for c in recorder.calls)
    assert not torch.nn.modules.module._global_forward_pre_hooks


def test_replay_restores_modes_rng_and_batch_norm_stats() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout()).train()
    recorder = CallRecorder({id(net)})
    recorder.start()
    with torch.inference_mode():
        net.eval()
        net(torch.randn(8, 4))
        net.train()
    recorder.stop()
    stats = net[1].running_mean.clone()
    rng = torch.get_rng_state()
    session = Replay(replayable(recorder.calls), torch.device("cpu"), set())
    session.measure_memory()
    session.time_pairs(3)
    result = session.result
    assert len(result.time_on) == 3 and result.graph_bytes > 0
    session.time_pairs(2, deadline=0.0)  # a deadline already past: no pair is taken, none half-taken
    assert len(result.time_on) == len(result.time_off) == 3
    assert torch.equal(net[1].running_mean, stats)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in net.modules())


def test_time_savings_are_logged_within_noise_too() -> None:
    noisy = ReplayResult(time_on=[0.010, 0.011, 0.009, 0.010], time_off=[0.011, 0.009, 0.010, 0.010])
    metrics, details = time_savings(noisy, batches=5, epoch_seconds=0.05)
    assert set(metrics) == {"time_saved_s", "time_saved_pct", "time_saved_pct_err"}
    # the interval straddles 0: its half-width is larger than the estimate
    assert metrics["time_saved_pct_err"] > abs(metrics["time_saved_pct"])
    assert details["within_noise"] and details["savings"].startswith("time difference within noise")
    assert "sign test p=" in details["savings"]


def test_timed_replay_counts_freeing_the_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    # a real grad-enabled batch frees its graph before the next one: that host work is a cost of gradients
    from lightning_nograd.core import replay

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
    recorder = CallRecorder({id(net)})
    recorder.start()
    with torch.no_grad():
        net(torch.ones(1, 2))
    recorder.stop()
    monkeypatch.setattr(replay, "synchronize", lambda device: events.append("clock"))
    events.clear()
    times = replay._timed_runs(recorder.calls, grad=True, device=torch.device("cpu"), runs=2)
    assert len(times) == 2
    # each timed run frees its graph between the clock's start and stop; the settling runs are not timed
    assert events == ["graph freed"] * replay.SETTLING_RUNS + ["clock", "graph freed", "clock"] * 2
