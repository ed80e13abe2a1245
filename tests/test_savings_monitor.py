from __future__ import annotations

import csv
import gc
import shutil
import time
import weakref
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from lightning_nograd import NoGradAuditor, NoGradWarning, SavingsMonitor
from lightning_nograd.core.reporting.summary import render
from lightning_nograd.core.savings.epoch_measures import SETTLED_MALLOC_ENV, cpu_timing_caveat
from tests.helpers import Regressor, csv_values, loader, nograd_warnings, read_tensorboard_scalars, trainer

KEYS = [
    "epoch_time_s",
    "peak_memory_mib",
    "graph_memory_mib",
    "memory_saved_mib",
    "time_saved_s",
    "time_saved_pct",
    "time_saved_pct_err",
]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"measure_batches": 0}, ValueError, r"`measure_batches`.*>= 1.*got 0"),
        ({"repeats": -1}, ValueError, r"`repeats`.*got -1"),
        ({"repeats": "many"}, TypeError, r"`repeats`.*'many'"),
        ({"budget": -0.1}, ValueError, r"`budget`.*got -0.1"),
        ({"budget": float("nan")}, ValueError, r"`budget`.*nan"),
        (
            {"min_repeats": 5, "max_repeats": 2},
            ValueError,
            r"`max_repeats`.*`min_repeats`.*max_repeats=2.*min_repeats=5",
        ),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        SavingsMonitor(**kwargs)


class SlowWithGrad(nn.Module):
    """Costs 3 ms more per call with gradients on, so the saving is unmistakable in a test."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            time.sleep(0.003)
        return x * self.scale


class Stack(pl.LightningModule):
    """Linear + ReLU stack: its autograd graph can be computed by hand."""

    def __init__(self, slow: bool = False, dropout_bn: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)]
        self.net = nn.Sequential(*layers)
        self.extra = SlowWithGrad() if slow else None
        self.regulariser = nn.Sequential(nn.BatchNorm1d(8), nn.Dropout(0.3)) if dropout_bn else None
        self.validation_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.regulariser is not None:
            x = self.regulariser(x)
        out = self.net(x)
        return self.extra(out) if self.extra is not None else out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.validation_seen += 1
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def graph_bytes_by_hand(batch: int) -> int:
    # Linear(8,16) saves its input (batch x 8); each ReLU saves its output, which the next Linear
    # saves again as its input (one storage, counted once); weights are parameters, left out. The
    # step's loss is part of what it runs: mse_loss saves its input (the last Linear's batch x 1
    # output) and its target (batch x 1).
    return 4 * batch * (8 + 16 + 32 + 1 + 1)


@pytest.mark.parametrize("entry", ["fit", "validate"])
def test_graph_memory_is_exact(tmp_path: Path, entry: str) -> None:
    monitor = SavingsMonitor(repeats=2, budget=1000.0)
    t = trainer(tmp_path, [monitor], limit_val_batches=3)
    model = Stack()
    if entry == "fit":
        t.fit(model, loader(n=64, batch_size=8), loader(n=64, batch_size=8))
    else:
        t.validate(model, loader(n=64, batch_size=8))
    epochs = [e for e in monitor.report.epochs if e.stage == "val"]
    assert epochs
    for epoch in epochs:
        assert epoch.metrics["nograd/val/graph_memory_mib"] * 2**20 == graph_bytes_by_hand(8)
        assert epoch.metrics["nograd/val/memory_saved_mib"] > 0


def test_every_metric_reaches_csv_and_tensorboard(tmp_path: Path) -> None:
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    monitor = SavingsMonitor(repeats=9, budget=1000.0)
    t = trainer(tmp_path, [monitor], logger=loggers, max_epochs=2, limit_val_batches=4, num_sanity_val_steps=2)
    model = Stack(slow=True)
    t.fit(model, loader(), loader())
    t.test(model, loader())
    scalars = read_tensorboard_scalars(tmp_path / "tb")
    for stage, epochs in (("val", 2), ("test", 1)):
        for key in KEYS:
            values = csv_values(tmp_path / "csv", f"nograd/{stage}/{key}")
            assert len(values) == epochs, (stage, key)  # once per epoch, never for the sanity check
            assert [v for _, v in scalars[f"nograd/{stage}/{key}"]] == pytest.approx(values)
    # time figures are logged every epoch once measured, within noise or not (no timing is asserted here)
    pct = csv_values(tmp_path / "csv", "nograd/val/time_saved_pct")
    assert all(p < 100 for p in pct)
    assert all(v > 0 for v in csv_values(tmp_path / "csv", "nograd/val/peak_memory_mib"))


@pytest.mark.skipif(cpu_timing_caveat({}) is None, reason="the caveat is about glibc's malloc")
@pytest.mark.parametrize("settled", [False, True])
def test_cpu_times_carry_a_caveat_unless_the_allocator_is_settled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settled: bool
) -> None:
    for name, value in SETTLED_MALLOC_ENV.items():
        if settled:
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name, raising=False)
    for name in ("GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    monitor = SavingsMonitor(repeats=6, budget=1000.0)
    trainer(tmp_path, [monitor], max_epochs=1, num_sanity_val_steps=0).fit(Stack(slow=True), loader(), loader())
    (epoch,) = [e for e in monitor.report.epochs if e.stage == "val"]
    text = render(monitor.report, use_rich=False)
    if settled:
        assert "timing_caveat" not in epoch.details and "Note:" not in text
    else:
        assert "glibc's default malloc thresholds" in epoch.details["timing_caveat"]
        assert "Note: CPU times were measured with glibc's default malloc thresholds" in text
        assert text.count("Note:") == 1


def test_no_user_code_rerun_and_measurement_reused(tmp_path: Path) -> None:
    monitor = SavingsMonitor(repeats=3, budget=1000.0)
    model = Stack()
    t = trainer(tmp_path, [monitor], max_epochs=3, limit_val_batches=4, num_sanity_val_steps=0)
    t.fit(model, loader(), loader())
    assert model.validation_seen == 12, "validation_step runs once per batch"
    assert [e.details["repeats"] for e in monitor.report.epochs] == [3, 3, 3]


def test_short_run_measures_memory_and_says_why_time_waits(tmp_path: Path) -> None:
    monitor = SavingsMonitor(budget=0.0)  # no time budget at all: whatever the machine's speed
    t = trainer(tmp_path, [monitor], limit_val_batches=2)
    t.validate(Stack(), loader())
    (epoch,) = monitor.report.epochs
    assert {"nograd/val/graph_memory_mib", "nograd/val/memory_saved_mib"} <= set(epoch.metrics)
    assert "nograd/val/time_saved_s" not in epoch.metrics
    assert "0% time budget" in epoch.details["savings"] and epoch.details["savings_options"] == ["budget", "repeats"]
    assert "tried again" not in epoch.details["savings"], "a validate run has no later epoch to promise"
    assert "nograd/val/epoch_time_s" in epoch.metrics


def test_memory_figures_from_the_first_epoch_of_a_default_fit(tmp_path: Path) -> None:
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    auditor = NoGradAuditor(verbose=False)  # the defaults: a 1.5% time budget
    with nograd_warnings():
        trainer(tmp_path, [auditor], logger=loggers, max_epochs=2).fit(Stack(), loader(), loader())
    scalars = read_tensorboard_scalars(tmp_path / "tb")
    for key in ("graph_memory_mib", "memory_saved_mib"):
        assert len(csv_values(tmp_path / "csv", f"nograd/val/{key}")) == 2, key  # epochs 0 and 1
        assert len(scalars[f"nograd/val/{key}"]) == 2, key
    assert all(v > 0 for v in csv_values(tmp_path / "csv", "nograd/val/graph_memory_mib"))


def test_repeats_forces_the_time_measurement(tmp_path: Path) -> None:
    monitor = SavingsMonitor(repeats=4, budget=0.0)
    trainer(tmp_path, [monitor], max_epochs=1).fit(Stack(), loader(), loader())
    (epoch,) = [e for e in monitor.report.epochs if e.stage == "val"]
    assert {"nograd/val/time_saved_s", "nograd/val/time_saved_pct"} <= set(epoch.metrics)
    assert epoch.details["repeats"] == 4


def test_fit_is_bit_identical_with_replays(tmp_path: Path) -> None:
    def run(callbacks: list[pl.Callback]) -> dict[str, torch.Tensor]:
        pl.seed_everything(3)
        model = Stack(dropout_bn=True)
        t = trainer(tmp_path, callbacks, max_epochs=2, limit_train_batches=4, val_check_interval=0.5)
        t.fit(model, loader(n=64), loader(n=32))
        return model.state_dict()

    plain = run([])
    monitor = SavingsMonitor(repeats=3, budget=1000.0)
    watched = run([monitor])
    assert any("nograd/val/graph_memory_mib" in e.metrics for e in monitor.report.epochs), "replays did run"
    for key in plain:
        assert torch.equal(plain[key], watched[key]), key


def test_grad_replay_out_of_memory_is_a_finding_and_the_run_goes_on(tmp_path: Path) -> None:
    # A real out-of-memory needs a GPU; on CPU this module raises the same error type with
    # gradients on, which is exactly the path the replay takes on a GPU.
    class DoesNotFitWithGrad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled():
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
            return x * self.weight

    model = Stack()
    model.extra = DoesNotFitWithGrad()  # type: ignore[assignment]
    monitor = SavingsMonitor(repeats=2, budget=1000.0)
    with pytest.warns(NoGradWarning, match="with gradients on, this batch does not fit in memory"):
        trainer(tmp_path, [monitor], limit_val_batches=3).validate(model, loader())
    (epoch,) = monitor.report.epochs
    assert "nograd/val/epoch_time_s" in epoch.metrics
    assert "does not fit" in epoch.details["savings"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_memory_and_savings(tmp_path: Path) -> None:
    monitor = SavingsMonitor(repeats=5, budget=1000.0)
    t = trainer(tmp_path, [monitor], accelerator="gpu", devices=1, limit_val_batches=4)
    t.validate(Stack(), loader(n=64, batch_size=8))
    (epoch,) = monitor.report.epochs
    assert epoch.metrics["nograd/val/peak_memory_mib"] > 0
    assert epoch.metrics["nograd/val/graph_memory_mib"] * 2**20 == graph_bytes_by_hand(8)
    assert epoch.metrics["nograd/val/memory_saved_mib"] > 0


def test_sanity_check_is_not_measured(tmp_path: Path) -> None:
    monitor = SavingsMonitor(repeats=2, budget=1000.0)
    with nograd_warnings() as seen:
        trainer(tmp_path, [monitor], max_epochs=1, num_sanity_val_steps=2).fit(Stack(), loader(), loader())
    assert seen == []
    assert [e.stage for e in monitor.report.epochs] == ["val"]


class UnloggedRegressor(Regressor):
    """Steps without `self.log`: Lightning's logging does not compile when the whole module is compiled."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)


def _compiled_fit(
    tmp_path: Path, callbacks: list[Any], fullgraph: bool, whole: bool
) -> tuple[torch.Tensor, dict[str, dict[str, int]]]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = UnloggedRegressor()
    if whole:  # as Lightning's docs show; Lightning then compiles the steps too
        compiled: Any = torch.compile(model, backend="aot_eager", fullgraph=fullgraph)
    else:
        model.head = torch.compile(model.head, fullgraph=fullgraph)  # type: ignore[assignment]
        compiled = model
    torch.manual_seed(1)
    trainer(tmp_path, callbacks, max_epochs=2, limit_train_batches=3).fit(compiled, loader(), loader())
    # an empty counter is no event (dynamo's first compile in a process can leave `graph_break: {}` behind)
    watched = ("stats", "graph_break", "recompiles", "unimplemented")
    seen = {k: dict(v) for k, v in counters.items() if k in watched and v}
    return torch.cat([p.detach().flatten() for p in model.parameters()]), seen


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor needs a C++ compiler on CPU")
@pytest.mark.parametrize(("whole", "fullgraph"), [(False, False), (False, True), (True, False)])
def test_compiled_modules_are_replayed_eagerly_and_the_run_is_unchanged(
    tmp_path: Path, whole: bool, fullgraph: bool
) -> None:
    plain, plain_dynamo = _compiled_fit(tmp_path / "plain", [], fullgraph, whole)
    for name, callback in [
        ("auditor", NoGradAuditor(verbose=False)),
        ("monitor", SavingsMonitor(repeats=2, budget=1000.0)),
    ]:
        watched, watched_dynamo = _compiled_fit(tmp_path / name, [callback], fullgraph, whole)
        assert torch.equal(plain, watched), name
        # no recompile and no graph break of the user's compiled code: dynamo counted the same
        assert watched_dynamo == plain_dynamo, (name, watched_dynamo, plain_dynamo)
    val = [e for e in callback.report.epochs if e.stage == "val"]
    if whole:  # Lightning compiles the steps themselves: module calls inside them cannot be recorded
        assert all("compiled whole" in e.details["savings"] for e in val), [e.details for e in val]
    else:
        measured = [e for e in val if "nograd/val/graph_memory_mib" in e.metrics]
        assert measured and all("replayed eagerly" in e.details["compiled"] for e in measured)


class KeepsGraphRefs(nn.Module):
    """ReLU saves its own output for backward; weak references tell whether the replay's graphs are freed."""

    def __init__(self, refs: list[weakref.ref[torch.Tensor]], oom: bool) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1), nn.ReLU())
        self.refs = refs
        self.oom = oom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(x)
        if torch.is_grad_enabled():
            self.refs.append(weakref.ref(y))
            if self.oom:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return y


@pytest.mark.parametrize("oom", [False, True], ids=["measured", "out-of-memory"])
def test_replayed_graphs_are_freed(tmp_path: Path, oom: bool) -> None:
    refs: list[weakref.ref[torch.Tensor]] = []
    model = Stack()
    model.extra = KeepsGraphRefs(refs, oom)  # type: ignore[assignment]
    with nograd_warnings():
        trainer(tmp_path, [SavingsMonitor(repeats=2, budget=1000.0)], limit_val_batches=3).validate(model, loader())
    gc.collect()
    assert refs, "the replay did not run the module with gradients on"
    assert [r() for r in refs if r() is not None] == []


def test_replays_fire_none_of_the_users_hooks(tmp_path: Path) -> None:
    def run(callbacks: list[Any]) -> dict[str, int]:
        counts = {"forward": 0, "pre": 0, "global": 0}
        model = Stack()
        handles = [
            model.net[2].register_forward_hook(lambda *a: counts.__setitem__("forward", counts["forward"] + 1)),
            model.net[0].register_forward_pre_hook(lambda *a: counts.__setitem__("pre", counts["pre"] + 1)),
            nn.modules.module.register_module_forward_hook(
                lambda *a: counts.__setitem__("global", counts["global"] + 1)
            ),
        ]
        with nograd_warnings():
            trainer(tmp_path, callbacks, limit_val_batches=3).validate(model, loader())
        for handle in handles:  # the user's handles still work: replays put the same hook dicts back
            handle.remove()
        assert not model.net[2]._forward_hooks and not model.net[0]._forward_pre_hooks
        assert not nn.modules.module._global_forward_hooks
        return counts

    monitor = SavingsMonitor(repeats=3, budget=1000.0)
    assert run([monitor]) == run([]) == {"forward": 3, "pre": 3, "global": run([])["global"]}
    (epoch,) = monitor.report.epochs
    assert "nograd/val/graph_memory_mib" in epoch.metrics  # the replays did run


@pytest.mark.parametrize("accumulate", [1, 2])
def test_metrics_sit_at_the_step_of_the_users_epoch_metrics(tmp_path: Path, accumulate: int) -> None:
    class LogsEpochLoss(Regressor):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss_epoch_mean", loss, on_step=False, on_epoch=True)
            return loss

    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    t = trainer(tmp_path, [NoGradAuditor(verbose=False)], logger=loggers, max_epochs=2, limit_train_batches=4,
                accumulate_grad_batches=accumulate)  # fmt: skip
    with nograd_warnings():
        t.fit(LogsEpochLoss(), loader(), loader())
    scalars = read_tensorboard_scalars(tmp_path / "tb")

    def steps(key: str) -> list[int]:
        return [step for step, _ in scalars[key]]

    assert len(steps("val_loss")) == 2
    for key in ("nograd/val/epoch_time_s", "nograd/val/graph_memory_mib", "nograd/val/violations"):
        assert steps(key) == steps("val_loss"), key
    assert steps("nograd/train/params_without_grad") == steps("train_loss_epoch_mean")
    rows = [r for r in csv.DictReader((next((tmp_path / "csv").rglob("metrics.csv"))).open())]
    val_steps = {r["step"] for r in rows if r.get("val_loss")}
    assert {r["step"] for r in rows if r.get("nograd/val/epoch_time_s")} == val_steps


class _ResidualConv(nn.Module):  # a ResNet-18-like block
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class _InvertedResidual(nn.Module):  # an EfficientNet-like block: expand, depthwise, project
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, 4 * width, 1, bias=False),
            nn.BatchNorm2d(4 * width),
            nn.SiLU(),
            nn.Conv2d(4 * width, 4 * width, 3, padding=1, groups=4 * width, bias=False),
            nn.BatchNorm2d(4 * width),
            nn.SiLU(),
            nn.Conv2d(4 * width, width, 1, bias=False),
            nn.BatchNorm2d(width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(32, 64, num_layers=2, batch_first=True)
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def _stem_and(block: Any, width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), *[block(width) for _ in range(4)])


FAMILIES: dict[str, tuple[Any, tuple[int, ...]]] = {
    "conv_resnet": (lambda: _stem_and(_ResidualConv, 32), (8, 3, 32, 32)),
    "conv_efficientnet": (lambda: _stem_and(_InvertedResidual, 16), (8, 3, 32, 32)),
    "attention": (
        lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 2),
        (8, 50, 64),
    ),
    "recurrent": (_Recurrent, (8, 40, 32)),
}


class _Family(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        (x,) = batch
        self.log("val_mean", self.net(x).float().mean())


def _profiler_peak(net: nn.Module, x: torch.Tensor, grad: bool) -> int:
    """The reference: torch.profiler's CPU allocation timeline for one forward (outputs freed)."""
    from torch.profiler import ProfilerActivity, profile

    def forward() -> None:
        with torch.set_grad_enabled(grad):
            out = net(x)
        del out

    forward()  # kernels' first-call set-up is not the batch's memory
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        forward()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cpu_memory_saved_matches_the_profilers_allocation_timeline(tmp_path: Path, family: str) -> None:
    # what kernels allocate inside (convolution columns, attention buffers, LSTM workspaces) counts too
    factory, shape = FAMILIES[family]
    torch.manual_seed(0)
    net = factory()
    x = torch.randn(*shape)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=shape[0])
    monitor = SavingsMonitor(measure_batches=1)
    t = trainer(tmp_path, [monitor], logger=CSVLogger(tmp_path, name="csv"), limit_val_batches=1)
    t.validate(_Family(net), data, verbose=False)
    (logged,) = csv_values(tmp_path / "csv", "nograd/val/memory_saved_mib")

    net.eval()
    reference = (_profiler_peak(net, x, grad=True) - _profiler_peak(net, x, grad=False)) / 2**20
    assert reference > 0.5
    assert logged == pytest.approx(reference, rel=0.05), f"{family}: logged {logged:.3f} MiB, profiler {reference:.3f}"


def test_cpu_memory_measure_prints_nothing_and_gives_way_to_the_users_profiler(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from torch.profiler import ProfilerActivity, profile

    factory, shape = FAMILIES["attention"]
    x = torch.randn(*shape)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=shape[0])
    monitor = SavingsMonitor(measure_batches=1)
    t = trainer(tmp_path, [monitor], limit_val_batches=1)
    with nograd_warnings() as seen:
        t.validate(_Family(factory()), data, verbose=False)
    # the profiler's start and stop print "USDT: ... profiler_start" to the process's stderr
    assert "profiler_start" not in capfd.readouterr().err

    with profile(activities=[ProfilerActivity.CPU]) as users_profiler, nograd_warnings() as seen_profiled:
        t.validate(_Family(factory()), data, verbose=False)
    assert seen == [] and seen_profiled == []
    assert any(e.name == "aten::addmm" for e in users_profiler.events())  # theirs ran undisturbed
    assert [e.metrics["nograd/val/memory_saved_mib"] > 0 for e in monitor.report.epochs] == [True, True]


class _SlowsDownWithGradients(nn.Module):
    """Fast for the replays that size the timing (one grad-on run to measure memory, three in the
    warm-up pair), then 0.2 s a grad-on run: a machine that got busy after the warm-up."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 1)
        self.grad_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.grad_calls += 1
            if self.grad_calls > 4:
                time.sleep(0.2)
        return self.linear(x)


def test_timed_pairs_stop_at_the_budget_when_they_cost_more_than_the_warm_up_said(tmp_path: Path) -> None:
    net = _SlowsDownWithGradients()
    model = _Family(net)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 8)), batch_size=8)
    monitor = SavingsMonitor(measure_batches=1, budget=0.05)
    trainer(tmp_path, [monitor], limit_val_batches=8).validate(model, data, verbose=False)
    (epoch,) = monitor.report.epochs
    # each timed pair costs 0.6 s: the 5% budget of a run this short stops them after one or two
    assert (net.grad_calls - 4) // 3 <= 2, f"{(net.grad_calls - 4) // 3} slow pairs taken"
    assert "nograd/val/time_saved_s" not in epoch.metrics  # fewer than min_repeats pairs: no time figure
    assert {"nograd/val/graph_memory_mib", "nograd/val/memory_saved_mib"} <= set(epoch.metrics)
    assert "time not measured" in epoch.details["savings"]


class SmallCNN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 2))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", nn.functional.cross_entropy(self.net(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("limits", [{"fast_dev_run": True}, {"limit_val_batches": 1, "max_epochs": 1}])
def test_an_epoch_shorter_than_measure_batches_is_measured(tmp_path: Path, limits: dict[str, Any]) -> None:
    """`fast_dev_run` runs one validation batch: the savings are measured on it, not refused."""
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(0, 2, (16,)))
    dataloader = torch.utils.data.DataLoader(data, batch_size=8)
    auditor = NoGradAuditor(verbose=False)
    options = {"limit_train_batches": 2, **limits} if "fast_dev_run" not in limits else limits
    with nograd_warnings():
        pl.Trainer(
            callbacks=[auditor], logger=False, enable_progress_bar=False, enable_checkpointing=False, **options
        ).fit(SmallCNN(), dataloader, dataloader)
    (epoch,) = [e for e in auditor.report.epochs if e.stage == "val"]
    assert epoch.details["batches_replayed"] == 1, epoch.details
    # the conv's input and the ReLU's output, at least: 8 samples of 3 and 8 channels of 8 x 8 floats
    assert epoch.metrics["nograd/val/graph_memory_mib"] * 2**20 >= 4 * 8 * (3 + 8) * 64
    assert "no module calls" not in str(epoch.details.get("savings"))


def test_time_is_a_running_estimate_over_the_fit_with_its_interval(tmp_path: Path) -> None:
    # a budget no run can exhaust, so that every epoch adds its pairs whatever the machine's speed
    monitor = SavingsMonitor(budget=1000.0, min_repeats=2, max_repeats=3)
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [monitor], logger=logger, max_epochs=4, num_sanity_val_steps=0).fit(
        Stack(slow=True), loader(), loader()
    )
    epochs = [e for e in monitor.report.epochs if e.stage == "val"]
    # each epoch's pairs join the earlier ones, up to five measurements' worth (15 pairs here)
    assert [e.details["repeats"] for e in epochs] == [3, 6, 9, 12]
    assert all(e.details.get("pairs_this_epoch", 3) == 3 for e in epochs)
    errors = csv_values(Path(logger.log_dir), "nograd/val/time_saved_pct_err")
    assert len(errors) == 4 and all(err >= 0 for err in errors)


class _Shape(pl.LightningModule):
    """A model as users write it; ``evaluate`` is its whole evaluation step (forward and loss)."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.evaluate(batch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self.evaluate(batch))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.evaluate(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def evaluate(self, batch: Any) -> torch.Tensor:
        raise NotImplementedError


def _conv_block(width_in: int, width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(width_in, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
    )


class UNet(_Shape):
    """Its own forward joins its children with parameter-free functions: pooling, upsampling, skip concatenations."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1, self.enc2, self.mid = _conv_block(3, 8), _conv_block(8, 16), _conv_block(16, 32)
        self.dec2, self.dec1 = _conv_block(32 + 16, 16), _conv_block(16 + 8, 8)
        self.out = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = torch.relu(self.enc1(x))
        x2 = torch.relu(self.enc2(nn.functional.max_pool2d(x1, 2)))
        mid = torch.relu(self.mid(nn.functional.max_pool2d(x2, 2)))
        d2 = self.dec2(torch.cat([nn.functional.interpolate(mid, scale_factor=2.0), x2], 1))
        return self.out(self.dec1(torch.cat([nn.functional.interpolate(d2, scale_factor=2.0), x1], 1)))

    def evaluate(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)


class ViT(_Shape):
    """Patch embedding, class token and position embedding joined functionally, then encoder layers."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + 16, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, 4, 2 * dim, batch_first=True, norm_first=True) for _ in range(2)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])

    def evaluate(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


class CallsItsParts(_Shape):
    """The step calls submodules directly, with functional code between them (a gate, a residual)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64))
        self.gate = nn.Linear(64, 64)
        self.head = nn.Linear(64, 5)

    def evaluate(self, batch: Any) -> torch.Tensor:
        x, y = batch
        h = self.encoder(x)
        h = nn.functional.gelu(h) * torch.sigmoid(self.gate(h)) + h
        return nn.functional.cross_entropy(self.head(nn.functional.layer_norm(h, (64,))), y)


SHAPES: dict[str, tuple[type[_Shape], tuple[int, ...], Any]] = {
    "unet": (UNet, (3, 16, 16), lambda n: torch.randn(n, 1, 16, 16)),
    "vit": (ViT, (3, 16, 16), lambda n: torch.randint(0, 5, (n,))),
    "step-calls-its-parts": (CallsItsParts, (16,), lambda n: torch.randint(0, 5, (n,))),
}


def saved_tensor_bytes(model: _Shape, batch: Any) -> int:
    """The independent count: saved-tensor hooks around the real evaluation step with gradients on, each
    storage once at its full size, parameters and buffers left out."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in weights:
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model.eval()
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model.evaluate(batch)
    del loss
    return sum(kept.values())


@pytest.mark.parametrize("shape", list(SHAPES))
def test_graph_memory_is_what_the_step_keeps_the_same_in_every_entry_point_and_in_audit(
    tmp_path: Path, shape: str
) -> None:
    from lightning_nograd import audit

    cls, sample, target = SHAPES[shape]
    torch.manual_seed(0)
    model = cls()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(24, *sample), target(24)), 8)
    expected = saved_tensor_bytes(model, next(iter(data)))
    monitor = SavingsMonitor(repeats=2, budget=1000.0)
    t = trainer(tmp_path, [monitor], max_epochs=1, limit_train_batches=2, limit_val_batches=3, limit_test_batches=3)
    t.fit(model, data, data)
    t.validate(model, data, verbose=False)
    t.test(model, data, verbose=False)
    figures = {
        entry: (e.metrics[f"nograd/{e.stage}/graph_memory_mib"], e.metrics[f"nograd/{e.stage}/memory_saved_mib"])
        for entry, e in zip(["fit", "validate", "test"], monitor.report.epochs, strict=True)
    }
    if shape != "step-calls-its-parts":  # a loop around the model's own calls, with the same loss
        model.eval()
        with audit(model, repeats=2) as report, torch.no_grad():
            for batch in data:
                model.evaluate(batch)
        (epoch,) = report.epochs
        figures["audit"] = (epoch.metrics["nograd/val/graph_memory_mib"], epoch.metrics["nograd/val/memory_saved_mib"])
    for entry, (graph, saved) in figures.items():
        assert graph * 2**20 == pytest.approx(expected, rel=0.01), (entry, graph * 2**20, expected)
        assert 0 < saved <= graph + 1, entry
    assert len({saved for _, saved in figures.values()}) == 1, figures


class FineTuned(_Shape):
    """A backbone and a head; ``unfreeze_at`` unfreezes the backbone by hand at that epoch's start."""

    def __init__(self, unfreeze_at: int | None = None) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))
        self.unfreeze_at = unfreeze_at
        if unfreeze_at is not None:
            self.backbone.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def evaluate(self, batch: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == self.unfreeze_at:
            self.backbone.requires_grad_(True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # as BackboneFinetuning's docs show: it adds the backbone as a parameter group when it unfreezes it
        trainable = self.parameters() if self.unfreeze_at is not None else self.head.parameters()
        return torch.optim.SGD(trainable, lr=0.01)


class CountsEachEpoch(pl.Callback):
    """The independent count, taken at each validation epoch's end with the flags the model has then."""

    def __init__(self, batch: Any) -> None:
        self.batch = batch
        self.counts: list[int] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.counts.append(saved_tensor_bytes(pl_module, self.batch))  # type: ignore[arg-type]


@pytest.mark.parametrize("schedule", ["BackboneFinetuning", "by-hand"])
def test_graph_memory_follows_layers_that_fine_tuning_unfreezes(tmp_path: Path, schedule: str) -> None:
    from lightning.pytorch.callbacks import BackboneFinetuning

    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(16, 3, 16, 16), torch.randint(0, 2, (16,))), batch_size=8
    )
    monitor, reference = SavingsMonitor(repeats=2, budget=1000.0), CountsEachEpoch(next(iter(data)))
    callbacks: list[Any] = [monitor, reference]
    if schedule == "BackboneFinetuning":  # Lightning's own: frozen at the start (batch norm trainable), then all
        callbacks.append(BackboneFinetuning(unfreeze_backbone_at_epoch=2, train_bn=False))
        model = FineTuned()
    else:
        model = FineTuned(unfreeze_at=2)
    trainer(tmp_path, callbacks, max_epochs=3, num_sanity_val_steps=0).fit(model, data, data)
    logged = [round(e.metrics["nograd/val/graph_memory_mib"] * 2**20) for e in monitor.report.epochs]
    assert logged == reference.counts
    assert logged[0] == logged[1] < logged[2], "the unfrozen backbone's graph is measured from its first epoch"


def test_graph_memory_is_measured_again_for_another_dtype_batch_shape_or_autocast(tmp_path: Path) -> None:
    model = FineTuned()

    def validate(batch_size: int, dtype: torch.dtype = torch.float32, **options: Any) -> tuple[float, int]:
        x = torch.randn(16, 3, 16, 16, dtype=dtype)
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.randint(0, 2, (16,))), batch_size)
        monitor = SavingsMonitor(repeats=2, budget=1000.0)
        trainer(tmp_path, [monitor], limit_val_batches=2, **options).validate(model, data, verbose=False)
        batch = next(iter(data))
        precision = options.get("precision") == "bf16-mixed"
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision):
            expected = saved_tensor_bytes(model, batch)
        return monitor.report.epochs[0].metrics["nograd/val/graph_memory_mib"] * 2**20, expected

    figures = [validate(8), validate(4), validate(8, precision="bf16-mixed")]
    model.double()
    figures.append(validate(8, torch.float64))
    for logged, expected in figures:
        assert logged == pytest.approx(expected, rel=0.01)
    assert len({round(logged) for logged, _ in figures}) == 4, figures
