from __future__ import annotations

from torch import nn

from lightning_nograd.core.checks.eval_mode_at_start import eval_mode_under_trainable
from lightning_nograd.core.checks.eval_mode_leaks import EvalModeLeaks
from lightning_nograd.core.plumbing.counters import visits
from lightning_nograd.core.plumbing.model_index import LearningModules
from lightning_nograd.core.plumbing.module_paths import named_modules, parent_path


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
