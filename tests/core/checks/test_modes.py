from __future__ import annotations

import torch
from torch import nn

from lightning_nograd.core.checks.modes import ModeProbe
from lightning_nograd.core.plumbing.module_paths import NamePatterns


def make() -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Dropout(), nn.BatchNorm1d(2))).eval()


def test_a_model_all_in_eval_mode_costs_no_forward_hook() -> None:
    net = make()
    probe = ModeProbe(net, NamePatterns("a", ()), lambda *a: None, fix=False)
    probe.refresh()
    probe.before_batch()
    assert not nn.modules.module._global_forward_pre_hooks
    probe.close()


def test_topmost_train_mode_module_is_reported_once_per_epoch() -> None:
    net = make()
    net[1].train()
    seen: list[tuple[str, bool]] = []
    probe = ModeProbe(
        net, NamePatterns("a", ()), lambda path, module, confirmed, *_: seen.append((path, confirmed)), False
    )
    probe.refresh()
    for _ in range(3):
        probe.before_batch()
        net(torch.ones(4, 2))
        probe.after_batch()
    probe.close()
    assert seen == [("1", True)]
    assert not nn.modules.module._global_forward_pre_hooks


def test_an_allowed_module_is_not_reported_and_one_switched_inside_the_batch_is_reported_unconfirmed() -> None:
    net = make()
    net[1][0].train()
    seen: list[tuple[str, bool]] = []
    probe = ModeProbe(net, NamePatterns("a", [r"1\.0"]), lambda p, m, c, *_: seen.append((p, c)), False)
    probe.refresh()
    probe.before_batch()
    net(torch.ones(4, 2))
    net[0].train()  # switched inside the batch: reported unconfirmed at its end
    probe.after_batch()
    probe.close()
    assert seen == [("0", False)]


def test_a_module_whose_mode_sensitive_layers_are_all_allowed_is_not_reported() -> None:
    # `.train()` on the whole model: the Linear does the same in either mode, the dropout and batch norm do not
    net = make().train()
    seen: list[tuple[str, list[str]]] = []

    def report(path: str, module: nn.Module, confirmed: bool, layers: list[tuple[str, nn.Module]], *_: object) -> None:
        seen.append((path, [name for name, _ in layers]))

    for patterns, expected in (((), [("", ["1.1", "1.0"])]), ([r"1\.0|1\.1"], [])):
        probe = ModeProbe(net, NamePatterns("a", patterns), report, False)
        probe.refresh()
        probe.before_batch()
        x = net[0](torch.ones(4, 2))
        net[1][1](x)  # the batch norm runs before the dropout: the finding lists them in that order
        net[1][0](x)
        probe.after_batch()
        probe.close()
        assert seen == expected, patterns
        seen.clear()
