"""Per-batch work that does not grow with the model, counted (never timed): ``core.counters.visits``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from benchmarks.scaling import Experts  # the scaling benchmark's model: N parallel experts
from lightning_nograd import NoGradAuditor
from lightning_nograd.core.checks.gradient_window import NO_GRADIENT_STEPS
from lightning_nograd.core.plumbing.counters import GRADIENT_EVERY, GRADIENT_WINDOW, ModeSwitches, visits
from lightning_nograd.core.plumbing.model_index import ParamIndex
from lightning_nograd.core.plumbing.torch_internals import ModuleTrainPatch

from .helpers import loader, nograd_warnings, trainer


class VisitsPerBatch(pl.Callback):
    """Visits counted from one batch's end to the next (placed after the auditor in the list)."""

    def __init__(self) -> None:
        self.train: list[int] = []
        self.val: list[int] = []
        self._last = 0

    def _mark(self, into: list[int]) -> None:
        into.append(visits.total() - self._last)
        self._last = visits.total()

    def on_train_batch_end(self, *args: Any) -> None:
        self._mark(self.train)

    def on_validation_batch_end(self, *args: Any) -> None:
        self._mark(self.val)

    def on_train_batch_start(self, *args: Any) -> None:
        if args[-1] == 0:  # the first batch of an epoch reads everything once
            self._last = visits.total()

    def on_validation_batch_start(self, *args: Any) -> None:
        if args[-1] == 0:
            self._last = visits.total()


class FreezesNormOnEveryForward(Experts):
    """Puts its batch-norm layer in eval at every forward (frozen statistics, the DeepLab way)."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.norm = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.norm.eval()  # already in eval after the first call: no mode changes
        return super().forward(self.norm(x))


@pytest.mark.parametrize(("experts", "model_type"), [(10, Experts), (1000, Experts), (10, FreezesNormOnEveryForward)])
def test_steady_state_batches_visit_a_bounded_number_of_modules_and_parameters(
    tmp_path: Path, experts: int, model_type: type[Experts]
) -> None:
    counter = VisitsPerBatch()
    model = model_type(experts)
    batches = GRADIENT_EVERY + 2  # one gradient window falls after the first batch of each epoch
    run = trainer(tmp_path, [NoGradAuditor(monitor_savings=False), counter], limit_train_batches=batches,
                  limit_val_batches=4, num_sanity_val_steps=0)  # fmt: skip
    with nograd_warnings() as seen:
        run.fit(model, loader(8 * batches), loader(32))
    assert not seen, [str(w.message) for w in seen]
    params = sum(1 for _ in model.parameters())
    # the first batch of each epoch reads the whole model once; every later batch a bounded amount:
    # nothing, or one window of parameters every GRADIENT_EVERY steps
    assert len(counter.train) == 2 * batches and len(counter.val) == 8
    for epoch in range(2):
        train = counter.train[epoch * batches : (epoch + 1) * batches]
        assert train[0] > len(list(model.modules())), "the first batch of an epoch reads every module"
        windows = {i: visited for i, visited in enumerate(train) if i and visited}
        assert windows == {GRADIENT_EVERY - 1: min(params, GRADIENT_WINDOW)}  # the GRADIENT_EVERY-th step
    assert counter.val[1:4] + counter.val[5:8] == [0] * 6


def test_a_mode_switch_during_training_is_seen_at_once(tmp_path: Path) -> None:
    class SwitchesOff(Experts):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if batch_idx == 3:
                self.experts.eval()  # a leak in the middle of an epoch, after steady state was reached
            return super().training_step(batch, batch_idx)

    auditor = NoGradAuditor(monitor_savings=False)
    run = trainer(tmp_path, [auditor], max_epochs=1, limit_train_batches=6, limit_val_batches=0)
    with nograd_warnings():
        run.fit(SwitchesOff(4), loader(48))
    (leak,) = [f for f in auditor.report.findings if f.kind == "eval_mode_leak"]
    assert (leak.subject, leak.hook, leak.batch_idx) == ("experts", "training_step", 3)


def test_the_mode_switch_counter_is_gone_after_the_run(tmp_path: Path) -> None:
    run = trainer(tmp_path, [NoGradAuditor()], max_epochs=1)
    run.fit(Experts(3), loader(), loader())
    run.validate(Experts(3), loader(), verbose=False)
    assert not ModeSwitches.listening()
    assert nn.Module.train is ModuleTrainPatch.forward_to


def test_an_owner_dropped_without_stop_stops_listening_as_it_is_freed() -> None:
    import gc

    class Owner:
        pass

    kept, dropped = Owner(), Owner()
    ModeSwitches.listen(kept)
    ModeSwitches.listen(dropped)
    ModeSwitches.listen(dropped)  # idempotent
    del dropped
    gc.collect()
    assert ModeSwitches.listening(), "the other owner still listens"
    ModeSwitches.stop(kept)
    assert not ModeSwitches.listening()
    assert nn.Module.train is ModuleTrainPatch.forward_to
    lost = Owner()
    ModeSwitches.listen(lost)
    del lost  # the last owner, never stopped
    gc.collect()
    assert nn.Module.train is ModuleTrainPatch.forward_to, "no trace in the process"


def test_a_gap_mid_epoch_is_found_by_the_rotating_window(tmp_path: Path) -> None:
    class LosesAnExpert(Experts):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            experts = self.experts if self.global_step < 3 else self.experts[:-1]  # the last stops learning
            return torch.stack([e(x) for e in experts]).mean(0)

    auditor = NoGradAuditor(monitor_savings=False)
    experts = 4 * GRADIENT_WINDOW  # 8 windows of parameters: found only when the windows come round to it
    # found when a window comes round to it, reported once it then went NO_GRADIENT_STEPS steps without one
    steps = GRADIENT_EVERY * (2 * experts // GRADIENT_WINDOW + 1) + 3 + NO_GRADIENT_STEPS
    run = trainer(tmp_path, [auditor], max_epochs=1, limit_train_batches=steps, limit_val_batches=0)
    with nograd_warnings():
        run.fit(LosesAnExpert(experts), loader(8 * steps))
    found = [f for f in auditor.report.findings if f.kind in ("param_without_grad", "no_grad_module")]
    assert {f.subject for f in found} == {f"experts.{experts - 1}"}
    assert all(f.batch_idx is not None and f.batch_idx > 3 for f in found)  # mid-epoch, by a window


def test_grouping_parameters_is_not_quadratic() -> None:
    # 40,000 parameters, every one without a gradient: a quadratic grouping would take minutes
    net = nn.ModuleList(nn.ModuleList(nn.Linear(1, 1) for _ in range(100)) for _ in range(200))
    index = ParamIndex(net)
    start = visits.total()
    groups = index.group(list(net.parameters()))
    assert groups == {"": [n for n, _ in net.named_parameters()]}
    assert visits.total() == start  # grouping is not a per-batch scan
    half = [p for i, block in enumerate(net) if i % 2 == 0 for p in block.parameters()]
    assert set(index.group(half)) == {str(i) for i in range(0, 200, 2)}
    # (its cost is measured, not asserted, in benchmarks/scaling.py)
