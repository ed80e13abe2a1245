from __future__ import annotations

import torch
from torch import nn

from lightning_nograd.core.backprop import (
    GradModeProbe,
    ParamIndex,
    ZeroGradientStreaks,
    eval_mode_under_trainable,
    explain_gradient_gaps,
    inference_tensors,
)


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
        ("param_without_grad", "b", "detached"),
        ("param_without_grad", "c", "unused"),
    }


def test_frozen_block_in_eval_mode_and_inference_buffers() -> None:
    net = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), nn.Linear(2, 1))
    net[0].eval()
    assert eval_mode_under_trainable(net) == [("0", ["0.1 (BatchNorm1d)"])]
    net[0].requires_grad_(False)
    assert eval_mode_under_trainable(net) == []
    with torch.inference_mode():
        net.register_buffer("table", torch.ones(2))
    assert inference_tensors(net) == [("table", "buffer")]


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
