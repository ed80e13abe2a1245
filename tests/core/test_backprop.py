from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_nograd.core.checks.eval_mode_at_start import eval_mode_under_trainable
from lightning_nograd.core.checks.eval_mode_leaks import EvalModeLeaks
from lightning_nograd.core.checks.gradient_gaps import GradModeProbe, explain_gradient_gaps
from lightning_nograd.core.checks.gradients import GradientCheck, ZeroGradientStreaks
from lightning_nograd.core.checks.inference_tensors import inference_tensors
from lightning_nograd.core.plumbing.counters import ModeSwitches, mode_switches, visits
from lightning_nograd.core.plumbing.model_index import LearningModules, ParamIndex
from lightning_nograd.core.plumbing.module_paths import named_modules, parent_path


def test_gaps_are_explained_by_cause() -> None:
    net = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2), "c": nn.Linear(2, 2)})
    probe = GradModeProbe({id(m): p for p, m in net.named_modules()})
    probe.start()
    with torch.no_grad():
        ha = net["a"](torch.ones(1, 2))
    hb = net["b"](torch.ones(1, 2)).detach()
    (ha + hb).sum()
    probe.stop()
    params = [*net["a"].parameters(), *net["b"].parameters(), *net["c"].parameters()]
    gaps = {(g.kind, g.subject, g.cause) for g in explain_gradient_gaps(ParamIndex(net), params, probe)}
    assert gaps == {
        ("no_grad_module", "a", None),
        ("param_without_grad", "b", "detach"),  # the `.detach()` was seen
        ("param_without_grad", "c", "unused"),
    }


def test_frozen_block_in_eval_mode_and_inference_buffers() -> None:
    net = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), nn.Linear(2, 1))
    net[0].eval()
    assert eval_mode_under_trainable(net) == [("0", [("0.1", "BatchNorm1d")])]
    net[0].requires_grad_(False)
    assert eval_mode_under_trainable(net) == []
    with torch.inference_mode():
        net.register_buffer("table", torch.ones(2))
    assert inference_tensors(net) == [("table", "buffer")]


def test_layers_switched_to_eval_one_by_one_are_a_choice_blocks_are_not() -> None:
    net = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout()), nn.BatchNorm1d(2))
    leaks = EvalModeLeaks(allowed=lambda path: False)
    leaks.start(net)
    leaks.note_train_mode(dict(net.named_modules()), None, "on_train_start")
    try:
        for layer in (net[0][1], net[1]):
            layer.eval()  # frozen batch-norm statistics; their weights still learn
        assert leaks.read("training_step", 0) == ([], [])
        assert eval_mode_under_trainable(net) == []
        net[0].eval()  # now the block, with everything in it
        leaked, found = leaks.read("training_step", 1)
        assert [leak.path for leak in found] == ["0"]
        assert len(leaked) == 4  # the block and its three layers, put back under on_violation="fix"
        assert eval_mode_under_trainable(net) == [("0", [("0.1", "BatchNorm1d"), ("0.2", "Dropout")])]
    finally:
        leaks.close()


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
    from lightning_nograd.core.plumbing.counters import GRADIENT_EVERY, visits

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


def test_eval_mode_leaks_read_only_after_a_switch_and_name_the_topmost_module() -> None:
    net = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Dropout()), nn.Linear(2, 1)).train()
    leaks = EvalModeLeaks(allowed=lambda path: False)
    leaks.start(net)
    leaks.note_train_mode(dict(net.named_modules()), None, "on_train_start")
    try:
        assert leaks.read_at is None
        leaked, found = leaks.read("on_train_batch_start", 0)
        assert leaked == [] and found == [] and leaks.read_at == mode_switches.count
        net[0].eval()  # a callback evaluates the block and forgets to switch back
        assert leaks.read_at != mode_switches.count, "the switch is seen without reading any module"
        leaked, found = leaks.read("training_step", 0)
        assert [(leak.path, leak.where, leak.new) for leak in found] == [("0", "training_step", True)]
        assert len(leaked) == 3  # the block and its two layers: all put back under on_violation="fix"
        _, found = leaks.read("on_train_batch_start", 1)
        assert [leak.new for leak in found] == [False], "reported once per fit"
    finally:
        leaks.close()
    assert id(leaks) not in ModeSwitches._owners, "it stopped listening (others, e.g. doctests, may still)"


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


def _frozen_by_subtree(module: nn.Module, parent: nn.Module | None, trained: set[int] | None) -> bool:
    """The definition, asked of each module's whole subtree: what ``LearningModules`` answers in one pass."""
    params = list(module.parameters()) or (list(parent.parameters()) if parent is not None else [])
    return not any(p.requires_grad and (trained is None or id(p) in trained) for p in params)


def test_learning_answers_as_each_subtree_would_in_one_pass() -> None:
    shared = nn.Linear(2, 2)
    net = nn.ModuleDict(
        {
            "backbone": nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Sequential(nn.Dropout(), nn.Identity())),
            "head": nn.Sequential(shared, nn.Dropout()),
            "tied": nn.Sequential(shared, nn.GELU()),  # the same Linear under two parents
            "empty": nn.Sequential(nn.Dropout()),  # no parameter anywhere below
            "bare": nn.Identity(),
        }
    )
    net["backbone"].requires_grad_(False)
    modules = dict(named_modules(net))
    optimized = {id(p) for p in net["head"].parameters()}
    for trained in (None, optimized, set()):
        learning = LearningModules([net], trained)
        for path, module in modules.items():
            parent = modules.get(parent_path(path)) if path else None
            assert learning.frozen(module, parent) is _frozen_by_subtree(module, parent, trained), (path, trained)
    learning = LearningModules([net], None)
    assert [learning.frozen(net[k][1], net[k]) for k in ("backbone", "head", "tied")] == [True, False, False]
    # a module holding one of its ancestors (a cycle through `_modules`) is answered, not looped over
    loop = nn.Sequential(nn.Linear(1, 1), nn.Sequential(nn.ReLU()))
    loop[1].add_module("back", loop)
    assert LearningModules([loop], None).learns(loop) and not LearningModules([loop], None).frozen(loop[1][0], loop[1])


def test_frozen_modules_are_found_in_one_visit_each_under_a_deep_stack() -> None:
    # 4,000 activations each directly under a stack of 4,000 Linear layers: asking every activation's
    # parent for its parameters visited 32 million of them (80 s); each module and parameter once now
    layers = 4_000
    net = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(1, 1), nn.ReLU())])
    net[-4].requires_grad_(False)
    modules = dict(named_modules(net))
    leaks = EvalModeLeaks(lambda path: False)
    leaks.start(net)
    before = visits.total()
    try:
        leaks.note_train_mode(modules, None, "on_train_start")
        watched = {path for path, _, _ in leaks._watched}
    finally:
        leaks.close()
    params = 2 * layers
    assert visits.total() - before <= 2 * (len(modules) + params)
    assert str(2 * layers - 4) not in watched and "0" in watched and "1" in watched  # frozen Linear left out
    net.eval()
    before = visits.total()
    assert eval_mode_under_trainable(net) == []  # no dropout or batch-norm: nothing to report, every parent read
    assert visits.total() - before <= 2 * (len(modules) + params)


def test_eval_mode_at_start_judges_each_block_at_its_first_full_check() -> None:
    from lightning_nograd.core.checks.eval_mode_at_start import EvalModeAtStart

    def block() -> nn.Module:
        return nn.Sequential(nn.Linear(2, 2), nn.Dropout()).eval()  # arrives in eval mode, as from_pretrained

    net = nn.Sequential(block(), block(), block(), nn.Linear(2, 1)).train()
    net[0].eval()
    net[1].eval()
    net[2].eval()
    reported: list[tuple[str, list[str]]] = []
    check = EvalModeAtStart(lambda path, layers: reported.append((path, layers)))
    check.start(net, None, lambda path: False)
    # block 0 got no gradient at all (frozen on purpose: the extractor of transfer learning), block 1 did
    params0, params1 = list(net[0].parameters()), list(net[1].parameters())
    frozen = check.frozen_on_purpose(params0 + params1, missing=params0)
    assert frozen == {id(p) for p in params0}
    assert reported == [("1", [("1.1", "Dropout")])]
    # block 2 was never covered by a full check: reported when judging stops
    check.close()
    assert reported == [("1", [("1.1", "Dropout")]), ("2", [("2.1", "Dropout")])]
    assert check.frozen_on_purpose(list(net.parameters()), []) == set(), "judged once"
