from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_nograd.core.plumbing import torch_internals
from lightning_nograd.core.savings.estimate import ReplayResult, TimedBlock, time_savings
from lightning_nograd.core.savings.recording import Slot, StepRecorder, Tape, function_name, replayable, run_tape
from lightning_nograd.core.savings.replay import Replay, graph_bytes_of


def blocks(*ratios: float, runs: int = 3, work: float = 0.01) -> list[TimedBlock]:
    """Timed blocks whose runs with gradients on take ``ratio`` times the runs without."""
    return [TimedBlock([work * r] * runs, [work] * runs, [work] * runs) for r in ratios]


def test_the_95_percent_interval_is_made_of_the_spread_between_blocks() -> None:
    clear = ReplayResult(blocks(1.21, 1.19, 1.2, 1.22))
    assert not clear.within_noise() and clear.ratio == pytest.approx(1.205, abs=0.002)
    # every run of a block agreeing tells nothing about the next block: the blocks disagree, so it is noise
    assert ReplayResult(blocks(1.6, 0.8, 1.3, 0.9, runs=10)).within_noise()
    assert ReplayResult().within_noise()
    assert ReplayResult(blocks(2.0, runs=20)).within_noise(), "one block: no interval yet"
    # the interval narrows as blocks accumulate: the same spread over four times the blocks
    few = ReplayResult(blocks(1.2, 1.0, 1.3, 1.1))
    many = ReplayResult(few.blocks * 4)
    assert few.ratio_interval is not None and many.ratio_interval is not None
    assert many.ratio_interval[1] - many.ratio_interval[0] < (few.ratio_interval[1] - few.ratio_interval[0]) / 2


@settings(max_examples=300, deadline=None)
@given(
    on=st.lists(st.floats(1e-6, 10.0), min_size=2, max_size=8),
    off=st.lists(st.floats(1e-6, 10.0), min_size=2, max_size=8),
    wall=st.floats(1e-6, 10.0),
    batches=st.integers(1, 1000),
    epoch_seconds=st.floats(1e-6, 1e4),
)
def test_the_percentage_stays_inside_100_and_a_batch_never_takes_negative_time(
    on: list[float], off: list[float], wall: float, batches: int, epoch_seconds: float
) -> None:
    first, second = len(on) // 2, len(off) // 2
    result = ReplayResult([TimedBlock(on[:first], off[:second], [wall]), TimedBlock(on[first:], off[second:], [wall])])
    metrics, details = time_savings(result, batches, epoch_seconds)
    assert -100 < metrics["time_saved_pct"] < 100
    # with gradients on, the epoch and each batch would still take a positive time
    assert epoch_seconds + metrics["time_saved_s"] > 0
    assert details["time_saved_per_batch_s"] > -epoch_seconds / batches
    err = metrics["time_saved_pct_err"]
    assert err >= 0
    if details["within_noise"]:  # the interval it stands for holds 0
        assert metrics["time_saved_pct"] - err <= 1e-9 <= metrics["time_saved_pct"] + err + 2e-9


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
    assert result.pairs == len(result.blocks) == 3 and result.graph_bytes > 0
    assert result.clock == "cpu"
    session.time_pairs(2, deadline=0.0)  # a deadline already past: no run is taken, no block half-taken
    assert result.pairs == len(result.blocks) == 3
    assert torch.equal(net[1].running_mean, stats)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in net.modules())
    assert net[3].last is kept, "the attribute the replay's forward set is put back"


def test_time_savings_are_logged_within_noise_too() -> None:
    metrics, details = time_savings(ReplayResult(blocks(1.1, 0.9, 1.05, 0.97)), batches=5, epoch_seconds=0.05)
    assert set(metrics) == {"time_saved_s", "time_saved_pct", "time_saved_pct_err"}
    # the interval straddles 0: its half-width is larger than the estimate
    assert metrics["time_saved_pct_err"] > abs(metrics["time_saved_pct"])
    assert details["within_noise"] and details["savings"].startswith("time difference within noise")
    assert "over 4 blocks" in details["savings"]


def test_a_saving_is_what_the_ratio_makes_of_the_work_never_more_than_the_epochs_own_time() -> None:
    # the replayed work took 10 ms a run; gradients make it 1.5 times as long: 5 ms a batch
    metrics, details = time_savings(ReplayResult(blocks(1.5, 1.5)), batches=10, epoch_seconds=0.2)
    assert details["time_saved_per_batch_s"] == pytest.approx(0.005)
    assert metrics["time_saved_pct"] == pytest.approx(100 * 0.05 / 0.25)
    # replays slowed by a busy machine (a run took 50 ms, the epoch's batches 20 ms): the batch's own time counts
    metrics, details = time_savings(ReplayResult(blocks(1.5, 1.5, work=0.05)), batches=10, epoch_seconds=0.2)
    assert details["replayed_work_s"] == pytest.approx(0.02)
    assert details["time_saved_per_batch_s"] == pytest.approx(0.01)


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
