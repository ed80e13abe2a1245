from __future__ import annotations

import torch
from torch import nn

from lightning_nograd.core.checks.gradient_gaps import GradModeProbe, explain_gradient_gaps
from lightning_nograd.core.plumbing.model_index import ParamIndex


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
