"""The step recorder: what one evaluation step ran, module calls and the functional code between them."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_nograd.core.plumbing import torch_internals
from lightning_nograd.core.savings.recording import Slot, StepRecorder, Tape, function_name, replayable, run_tape
from lightning_nograd.core.savings.replay import graph_bytes_of


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
