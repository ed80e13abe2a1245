from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import torch.nn.functional as F

from lightning_nograd.core import torch_internals
from lightning_nograd.core.recording import Slot, StepRecorder, Tape, function_name, replayable, run_tape
from lightning_nograd.core.replay import Replay, graph_bytes_of
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


def record(run: Any, *modules: nn.Module, inference: bool = True) -> Tape:
    recorder = StepRecorder({id(m) for m in modules})
    recorder.start()
    with torch.inference_mode() if inference else torch.no_grad():
        run()
    tape = recorder.stop()
    assert tape is not None
    return tape


def names(tape: Tape) -> list[str]:
    return [type(e.fn).__name__ if e.module is not None else function_name(e.fn) for e in tape.entries]


def saved_bytes(run: Any, exclude: set[int]) -> int:
    """The independent count: saved-tensor hooks around the real code with gradients on, each storage once."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in exclude:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    return sum(seen.values())


def test_recorder_keeps_outermost_work_calls_only() -> None:
    backbone = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    head = nn.Linear(4, 1)
    tape = record(lambda: head(backbone(torch.ones(2, 4))), backbone, backbone[0], head)
    assert [e.fn for e in tape.entries] == [backbone, head]
    assert all(e.inference_mode for e in tape.entries)
    assert tape.entries[1].args == (Slot(0),), "the head's input is the backbone's output, linked"
    assert not torch.nn.modules.module._global_forward_pre_hooks


class Glued(nn.Module):
    """A forward that joins its children with parameter-free functions (a small UNet's shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU())
        self.up = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.down(x)
        low = F.max_pool2d(skip, 2)
        return self.up(torch.cat([F.interpolate(low, scale_factor=2.0), skip], 1))


def test_the_glue_between_calls_is_recorded_linked_and_counted_once() -> None:
    net = Glued().eval()
    x, y = torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)

    def step() -> torch.Tensor:  # a step that calls the children itself, then a loss
        skip = net.down(x)
        out = net.up(torch.cat([F.interpolate(F.max_pool2d(skip, 2), scale_factor=2.0), skip], 1))
        return F.mse_loss(torch.sigmoid(out) * out, y)

    tape = record(step, net.down, net.down[0], net.up)
    assert names(tape) == ["Sequential", "max_pool2d", "interpolate", "cat", "Conv2d", "sigmoid", "mul", "mse_loss"]
    weights = {t.untyped_storage().data_ptr() for t in net.parameters()}
    with torch.enable_grad():
        expected = saved_bytes(step, weights)
    assert graph_bytes_of(replayable(tape), {("cpu", w) for w in weights}) == expected
    # the model's own forward, called as a whole: one entry, the glue inside replayed by running it
    tape = record(lambda: F.mse_loss(net(x), y), net, net.down, net.up)
    assert names(tape) == ["Glued", "mse_loss"]
    with torch.enable_grad():
        expected = saved_bytes(lambda: F.mse_loss(net(x), y), weights)
    assert graph_bytes_of(replayable(tape), {("cpu", w) for w in weights}) == expected


def test_what_autograd_would_not_record_is_left_out() -> None:
    frozen = nn.Linear(4, 4).requires_grad_(False)
    head = nn.Linear(4, 2)
    buffer = torch.zeros(2)

    def step() -> None:
        mask = torch.ones(3, 4) > 0  # data: taken as it is
        features = frozen(torch.randn(3, 4) * mask)  # a frozen module on data: no graph either way
        logits = head(features)
        buffer.add_(logits.mean(0))  # writes into a tensor of the user's: never replayed
        logits.detach().argmax(1)  # cut from the graph
        logits.relu_()  # in place on a tensor the tape made: replayed

    tape = record(step, frozen, head)
    assert names(tape) == ["Linear", "mean", "relu_"]
    assert tape.entries[0].fn is head
    before = buffer.clone()
    run_tape(replayable(tape), grad=True)
    assert torch.equal(buffer, before)


def test_the_mode_stack_is_left_as_found_and_compiled_code_sees_its_own() -> None:
    net = nn.Linear(2, 2)
    seen: list[int] = []

    class Watches(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch._C._len_torch_function_stack())
            return x * 2

    watch = Watches()
    depth = torch._C._len_torch_function_stack()
    recorder = StepRecorder({id(net), id(watch)})
    recorder.start()
    with torch.no_grad():
        out = watch(net(torch.ones(1, 2)))
        with torch.device("cpu"):  # a mode of the user's, entered while ours is on and left open at the end
            out = out + 1
            tape = recorder.stop()
            assert torch._C._len_torch_function_stack() == depth + 1
    assert torch._C._len_torch_function_stack() == depth
    if torch_internals.function_modes_available():
        assert seen == [depth], "inside a recorded call the recorder's mode is off the stack"
    assert tape is not None and names(tape) == ["Linear", "Watches", "add"]


def test_a_redirected_step_is_looked_into_not_recorded_whole() -> None:
    # Lightning runs `validation_step` through a strategy wrapper by patching the module's own `forward`
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x)

        def step(self, x: torch.Tensor) -> torch.Tensor:
            return self(x).sum()

    model = Model()
    recorder = StepRecorder({id(model), id(model.linear)}, root=model)
    original = model.forward
    recorder.start()
    with torch.no_grad():

        def redirected(x: torch.Tensor) -> torch.Tensor:
            model.forward = original  # type: ignore[method-assign]
            return model.step(x)

        model.forward = redirected  # type: ignore[method-assign]
        model(torch.ones(1, 2))
    tape = recorder.stop()
    assert tape is not None and names(tape) == ["Model", "sum"]


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
    assert len(result.time_on) == 3 and result.graph_bytes > 0
    session.time_pairs(2, deadline=0.0)  # a deadline already past: no pair is taken, none half-taken
    assert len(result.time_on) == len(result.time_off) == 3
    assert torch.equal(net[1].running_mean, stats)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in net.modules())
    assert net[3].last is kept, "the attribute the replay's forward set is put back"


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
    tape = record(lambda: net(torch.ones(1, 2)), net, inference=False)
    monkeypatch.setattr(replay, "synchronize", lambda device: events.append("clock"))
    events.clear()
    times = replay._timed_runs(tape, grad=True, device=torch.device("cpu"), runs=2)
    assert len(times) == 2
    # each timed run frees its graph between the clock's start and stop; the settling runs are not timed
    assert events == ["graph freed"] * replay.SETTLING_RUNS + ["clock", "graph freed", "clock"] * 2
