from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_nograd.core.checks.gradients import GradientCheck, ZeroGradientStreaks
from lightning_nograd.core.plumbing.counters import visits


def test_zero_gradient_streaks_reset_and_skip_sparse_gradients() -> None:
    dense = nn.Parameter(torch.ones(3))
    half = nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    sparse = nn.Parameter(torch.ones(4))
    sparse.grad = torch.zeros(4).to_sparse()
    streaks = ZeroGradientStreaks(steps=2)
    seen = []
    for dense_grad in (0.0, 1.0, 0.0, 0.0):
        dense.grad, half.grad = torch.full((3,), dense_grad), torch.zeros(2, dtype=torch.bfloat16)
        streaks.observe([dense, half, sparse])
        seen.append({id(p) for p in streaks.collect()})
    assert seen == [set(), {id(half)}, {id(half)}, {id(dense), id(half)}]
    assert id(sparse) not in streaks.streak
    streaks.clear()
    assert streaks.collect(wait=True) == [] and streaks.streak == {}


def _train_step(net: nn.Module, optimizer: torch.optim.Optimizer, check: GradientCheck, cut: bool = False) -> list:
    """One plain training step with the check's calls where a loop makes them; what the check found."""
    check.zero_grad(optimizer)
    optimizer.zero_grad(set_to_none=True)
    h = net[0](torch.randn(4, 2))
    loss = net[1](h.detach() if cut else h).sum()
    if not check.before_backward():
        check.backward()
    loss.backward()
    if check.passes_steady_step():  # as BackpropGuard does: a steady step only counts down
        return []
    return check.step(optimizer)


def test_gradient_check_first_step_then_windows_and_suspects_once_per_epoch() -> None:
    from lightning_nograd.core.plumbing.counters import GRADIENT_EVERY

    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    check = GradientCheck(zero_grad_steps=3, allowed=lambda path: False)
    check.start(net)
    check.new_epoch()
    missing = _train_step(net, optimizer, check, cut=True)
    assert sorted(check.index.name(p) for p in missing) == ["0.bias", "0.weight"]
    assert sorted(check.take_suspects(), key=id) == sorted(net[0].parameters(), key=id)
    # explained for the rest of the epoch: found again (counted), but no new suspect
    before = visits.params
    for _ in range(GRADIENT_EVERY - 1):
        missing = _train_step(net, optimizer, check, cut=True)
    assert visits.params - before == 4, "steps 2..15 check nothing, the 16th a window (all 4 here)"
    assert len(missing) == 2 and check.suspects == {}
    check.new_epoch()
    assert len(_train_step(net, optimizer, check, cut=True)) == 2 and len(check.suspects) == 2


def test_gradient_check_skipped_step_allow_list_and_kept_zeros() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    check = GradientCheck(zero_grad_steps=2, allowed=lambda path: path == "0")
    check.start(net)
    check.new_epoch()
    assert _train_step(net, optimizer, check, cut=True) == [], "the allowed module's parameters are not checked"
    check.new_epoch()
    optimizer.zero_grad(set_to_none=True)
    assert check.step(optimizer) == [], "no backward, no gradient: a skipped step"
    # zeroing that keeps zeros: an all-zero gradient two steps running is missing
    check = GradientCheck(zero_grad_steps=2, allowed=lambda path: False)
    check.start(net)
    check.new_epoch()
    found: list = []
    for _ in range(3):
        check.zero_grad(optimizer)
        optimizer.zero_grad(set_to_none=False)
        check.backward()
        net[1](net[0](torch.randn(4, 2)).detach()).sum().backward()
        found += check.step(optimizer)
    assert check.keeps_zeros
    assert {check.index.name(p) for p in found} == {"0.weight", "0.bias"}


def test_with_one_optimizer_steady_steps_are_skipped_on_the_same_schedule() -> None:
    from lightning_nograd.core.plumbing.counters import GRADIENT_EVERY

    def checked_steps(optimizers: int) -> list[int]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        check = GradientCheck(zero_grad_steps=3, allowed=lambda path: False)
        check.start(net)
        check.new_epoch(optimizers)
        checked = []
        for step in range(1, 3 * GRADIENT_EVERY + 1):
            if _train_step(net, optimizer, check, cut=True):
                checked.append(step)
        return checked

    expected = [1] + [GRADIENT_EVERY * k for k in (1, 2, 3)]
    assert checked_steps(0) == checked_steps(1) == expected
    check = GradientCheck(zero_grad_steps=3, allowed=lambda path: False)
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    check.start(net)
    check.new_epoch(1)
    skips = []
    for _ in range(GRADIENT_EVERY):
        _train_step(net, optimizer, check)
        skips.append(check.skip)
    # the first step's read tells nothing (no gradient yet); the second reads a parameter the first step's full
    # check saw with a gradient, which decides it; the steps up to the 16th then pass by counting down
    assert skips[:3] == [0, GRADIENT_EVERY - 3, GRADIENT_EVERY - 4] and skips[-2:] == [0, GRADIENT_EVERY - 1]
    assert check.zeroing_known == {id(optimizer)} and not check.keeps_zeros


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zeroing_is_decided_by_one_parameter_that_had_a_gradient(set_to_none: bool) -> None:
    # the optimizer's first parameters never get a gradient (an unused embedding): the parameter read is the first
    # parameter that had one at the full check, so the second step decides either way
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 1))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    check = GradientCheck(zero_grad_steps=3, allowed=lambda path: False)
    check.start(net)
    check.new_epoch(1)
    read = []
    for _ in range(4):
        if not check.skip and not check.keeps_zeros and check.reads_zeroing(optimizer):
            read.append(check.steps.get(id(optimizer), 0) + 1)
        check.zero_grad(optimizer)
        optimizer.zero_grad(set_to_none=set_to_none)
        if not check.before_backward():
            check.backward()
        net[2](net[1](torch.randn(4, 2))).sum().backward()  # net[0] unused
        if check.passes_steady_step():
            continue
        check.step(optimizer)
    assert read == [1, 2], "read at the first step (nothing to tell) and the second (decided), never again"
    assert check.keeps_zeros is (not set_to_none)
    assert check.zeroing_known == {id(optimizer)}
