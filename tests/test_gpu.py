"""The CUDA paths, on a real GPU (skipped without one), and the CPU-side logic of the GPU check."""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from benchmarks.gpu_sync import PACKAGE, count, origin, table
from lightning_nograd import NoGradAuditor, NoGradWarning, SavingsMonitor
from tests.helpers import Regressor, loader, nograd_warnings, trainer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def frame(path: str, name: str) -> traceback.FrameSummary:
    return traceback.FrameSummary(path, 1, name)


def test_sync_origins_are_attributed_from_the_stack() -> None:
    lightning = frame("/site-packages/lightning/pytorch/loops/fit_loop.py", "run")
    hook = frame(f"{PACKAGE}/callbacks/nograd_auditor.py", "on_before_optimizer_step")
    check = frame(f"{PACKAGE}/core/checks/gradients.py", "observe")
    epoch = frame(f"{PACKAGE}/callbacks/savings_monitor.py", "on_validation_epoch_end")
    clock = frame(f"{PACKAGE}/core/savings/epoch_measures.py", "stop")
    replay = frame(f"{PACKAGE}/core/savings/replay.py", "_timed")
    assert origin([lightning]) == "not_ours"
    assert origin([lightning, hook, check]) == "per_batch"
    assert origin([lightning, epoch, clock]) == "per_epoch"
    assert origin([lightning, frame(f"{PACKAGE}/x.py", "on_validation_batch_end"), replay]) == "replay"


def test_sync_table_has_one_row_per_run() -> None:
    rows = [
        {"model": "resnet", "callback": "none", "epochs": 3, "first_epoch": {"not_ours": 4}, "later_epochs": {}},
        {
            "model": "resnet",
            "callback": "NoGradAuditor()",
            "epochs": 3,
            "first_epoch": {"replay": 2},
            "later_epochs": {},
        },
    ]
    lines = table(rows)
    assert len(lines) == 4
    assert lines[2] == "| resnet | none | 3 | 0 / 0 | 0 / 0 | 0 / 0 | 4 / 0 |"
    assert lines[3] == "| resnet | NoGradAuditor() | 3 | 0 / 0 | 0 / 0 | 2 / 0 | 0 / 0 |"


@pytest.fixture
def cuda_memory_cap() -> Iterator[None]:
    yield
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()


class Deep(pl.LightningModule):
    """64 linear layers: without gradients a batch needs ~1 GiB, with gradients ~32 GiB of saved activations."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(*[nn.Sequential(nn.Linear(1024, 1024), nn.ReLU()) for _ in range(64)])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        (x,) = batch
        self.log("val_mean", self.net(x.expand(65536, 1024)).mean())


@needs_cuda
def test_cuda_oom_with_gradients_is_a_finding_and_the_run_goes_on(tmp_path: Path, cuda_memory_cap: None) -> None:
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(4 * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(3, 1024)), batch_size=1)
    monitor = SavingsMonitor(repeats=2, budget=1000.0)
    t = trainer(tmp_path, [monitor], accelerator="gpu", devices=1, limit_val_batches=3)
    before = torch.cuda.memory_allocated()
    model = Deep()
    with pytest.warns(NoGradWarning, match="with gradients on, this batch does not fit in memory"):
        t.validate(model, data)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    left = torch.cuda.memory_allocated() - before - weights
    assert left < 2**20, f"{left / 2**20:.0f} MiB of the failed replay still allocated"
    del model
    t.validate(Deep(), data)  # the process and the trainer are still usable
    first, second = monitor.report.epochs
    for epoch in (first, second):
        assert epoch.details["batches"] == 3
        assert 0 < epoch.metrics["nograd/val/peak_memory_mib"] < 4096
        assert "does not fit" in epoch.details["savings"]
    assert {f.kind for f in monitor.report.findings} == {"grad_replay_oom"}


class SpikeThenSleep(Regressor):
    """Allocates 512 MiB in the first validation epoch only, and queues GPU work the host never waits for."""

    def __init__(self, sleep_cycles: int) -> None:
        super().__init__()
        self.sleep_cycles = sleep_cycles

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if self.current_epoch == 0:
            spike = torch.empty(512 * 2**20, dtype=torch.uint8, device=self.device)
            del spike
        torch.cuda._sleep(self.sleep_cycles)  # type: ignore[attr-defined]


def seconds_of(cycles: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.cuda._sleep(cycles)  # type: ignore[attr-defined]
    torch.cuda.synchronize()
    return time.perf_counter() - start


@needs_cuda
def test_cuda_epoch_peak_is_reset_and_epoch_time_is_synchronised(tmp_path: Path) -> None:
    cycles = 50_000_000
    asleep = min(seconds_of(cycles) for _ in range(3))
    monitor = SavingsMonitor()
    t = trainer(tmp_path, [monitor], accelerator="gpu", devices=1, num_sanity_val_steps=0, limit_val_batches=4)
    t.fit(SpikeThenSleep(cycles), loader(), loader())
    first, second = (e for e in monitor.report.epochs if e.stage == "val")
    # the peak is the allocator's, absolute: only the first epoch carries the 512 MiB spike
    assert first.metrics["nograd/val/peak_memory_mib"] - second.metrics["nograd/val/peak_memory_mib"] >= 500
    # the host never waits for the sleeps: only a synchronised clock sees them
    for epoch in (first, second):
        assert epoch.metrics["nograd/val/epoch_time_s"] >= 0.9 * 4 * asleep


@needs_cuda
def test_no_sync_from_per_batch_checks_after_the_first_epoch() -> None:
    row = count("resnet", epochs=3, with_callback=True)
    assert row["later_epochs"].get("per_batch", 0) == 0, row


def _bf16_compiled_fit(tmp_path: Path, callbacks: list[Any]) -> torch.Tensor:
    torch.manual_seed(0)
    model = Regressor()
    model.backbone = torch.compile(model.backbone)  # type: ignore[assignment]
    torch.manual_seed(1)
    t = trainer(tmp_path, callbacks, accelerator="gpu", devices=1, precision="bf16-mixed", limit_train_batches=4)
    t.fit(model, loader(n=64), loader(n=64))
    return torch.cat([p.detach().flatten().cpu() for p in model.parameters()])


@needs_cuda
@pytest.mark.parametrize("budget", [None, 1000.0], ids=["defaults", "replays-forced"])
def test_bf16_compiled_model_is_silent_and_bit_identical(tmp_path: Path, budget: float | None) -> None:
    torch._dynamo.reset()
    plain = _bf16_compiled_fit(tmp_path / "plain", [])
    auditor = NoGradAuditor(verbose=False) if budget is None else NoGradAuditor(verbose=False, budget=budget)
    with nograd_warnings() as seen:
        watched = _bf16_compiled_fit(tmp_path / "watched", [auditor])
    assert seen == [] and auditor.report.findings == []
    assert torch.equal(plain, watched)
    if budget is not None:
        assert any("nograd/val/graph_memory_mib" in e.metrics for e in auditor.report.epochs)


def test_report_names_the_parts_a_stopped_run_did_not_measure() -> None:
    from benchmarks.run import report

    grad_row = {"model": "mlp", "mode": "grad", "ms_median": 1.0, "ms_q1": 0.9, "ms_q3": 1.1}
    grad_row |= {"saved_vs_grad_pct": 0.0, "graph_mib": 2.0, "peak_mib": 1.0}
    results = {"machine": "NVIDIA H100", "commit": "abc1234", "minutes": 5.0, "grad_modes": [grad_row]}
    lines = report(results, quick=False, cuda=True)
    assert "Not measured in this run (it was stopped first): overhead, accuracy, gpu_sync." in lines
    assert "## What gradients cost in evaluation" in lines and "## What the callbacks cost" not in lines
    assert any(line.startswith("Machine: NVIDIA H100. Took 5.0 min, code at commit abc1234") for line in lines)


def test_parts_kept_from_an_earlier_run_are_labelled_with_their_commit(tmp_path: Path) -> None:
    import json

    from benchmarks.run import commit, kept_from, measure, report

    grad_row = {"model": "mlp", "mode": "grad", "ms_median": 1.0, "ms_q1": 0.9, "ms_q3": 1.1}
    grad_row |= {"saved_vs_grad_pct": 0.0, "graph_mib": 2.0, "peak_mib": 1.0}
    accuracy_row = {"model": "mlp", "ab_time_saved_pct": 20.0, "ab_iqr_pct": [18.0, 22.0]}
    accuracy_row |= {"estimate_time_saved_pct": 19.0, "estimate_iqr_pct": [18.5, 19.5], "difference_pp": -1.0}
    accuracy_row |= {"within_noise": True}
    path = tmp_path / "results.json"
    earlier = {"machine": "NVIDIA H100", "commit": "0ld0ld0", "minutes": 5.0, "grad_modes": [grad_row]}
    path.write_text(json.dumps(earlier))
    assert kept_from(path, "NVIDIA H200", ["grad_modes"]) == {}  # another machine: nothing is kept
    kept = kept_from(path, "NVIDIA H100", ["grad_modes", "overhead"])
    assert kept == {"grad_modes": [grad_row], "commits": {"grad_modes": "0ld0ld0"}}

    results = {"machine": "NVIDIA H100", "commit": commit(), "minutes": 0.0, **kept}
    measure(results, {"accuracy": lambda: [accuracy_row]}, path)
    assert json.loads(path.read_text())["accuracy"] == [accuracy_row]
    lines = report(results, quick=False, cuda=True)
    header = next(line for line in lines if line.startswith("Machine:"))
    assert header.startswith("Machine: NVIDIA H100. The last run (accuracy) took 0.0 min")
    assert f"code at commit 0ld0ld0 (grad modes); {commit()} (accuracy)" in header
    assert "Not measured in this run (it was stopped first): overhead, gpu_sync." in lines


@needs_cuda
def test_replay_and_check_training_step_restore_the_cuda_generator_too() -> None:
    # dropout on the GPU draws from the CUDA generator, which the CPU-side RNG tests never see
    from lightning_nograd import check_training_step
    from lightning_nograd.core.savings.recording import StepRecorder, replayable
    from lightning_nograd.core.savings.replay import Replay

    device = torch.device("cuda")
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(), nn.Linear(4, 1)).to(device).train()
    recorder = StepRecorder({id(net)})
    recorder.start()
    with torch.inference_mode():
        net.eval()
        net(torch.randn(8, 4, device=device))
        net.train()
    tape = recorder.stop()
    assert tape is not None
    cpu, cuda = torch.get_rng_state(), torch.cuda.get_rng_state_all()
    session = Replay(replayable(tape), device, set())
    session.measure_memory()
    session.time_pairs(2)
    assert torch.equal(torch.get_rng_state(), cpu)
    assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda, strict=True))

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.mse_loss(model(batch[0]), batch[1])

    batch = (torch.randn(8, 4, device=device), torch.randn(8, 1, device=device))
    check_training_step(net, batch, loss_fn, torch.optim.SGD(net.parameters(), lr=0.1))
    assert torch.equal(torch.get_rng_state(), cpu)
    assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda, strict=True))


@needs_cuda
def test_fsdp1_names_modules_and_parameters_as_the_user_wrote_them(tmp_path: Path) -> None:
    # Lightning's FSDPStrategy (FSDP1, GPU only) wraps each Linear: the paths hold `_fsdp_wrapped_module`
    # segments and, without `use_orig_params`, the parameters would be one `_flat_param`
    from lightning.pytorch.strategies import FSDPStrategy

    from tests.ddp_run import Sharded

    class Wrapped(Sharded):
        def configure_model(self) -> None:  # the strategy wraps instead
            pass

    auditor = NoGradAuditor(verbose=False, budget=1000.0)
    run = trainer(
        tmp_path, [auditor], accelerator="cuda", devices=1, max_epochs=2, limit_train_batches=4, limit_val_batches=4,
        strategy=FSDPStrategy(auto_wrap_policy={nn.Linear}),
    )  # fmt: skip
    with nograd_warnings() as seen:
        run.fit(Wrapped(), loader(n=64), loader(n=64))
    found = {(f.kind, f.subject) for f in auditor.report.findings}
    assert found == {
        ("train_mode", "head.0"),
        ("grad_enabled", ""),
        ("inference_tensor", "cache"),
        ("stray_graph", ""),
        ("no_grad_module", "frozen_by_mistake"),
        ("eval_mode_leak", "backbone"),
        ("param_without_grad", "spare"),
    }, [str(w.message) for w in seen]
    text = " ".join(f.message for f in auditor.report.findings)
    assert "_fsdp_wrapped_module" not in text and "_flat_param" not in text and "FullyShardedDataParallel" not in text
    assert not any("internal error" in str(w.message) for w in seen)
