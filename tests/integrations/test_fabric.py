"""NoGradFabricCallback on the Fabric loop of ``examples/fabric_loop.py`` (the shape of Fabric's docs)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric

from examples import fabric_loop
from lightning_nograd import BrokenBackpropWarning, NoGradWarning
from lightning_nograd.core.checks.graph import SAVED_TENSOR_HOOKS
from lightning_nograd.core.plumbing.counters import ModeSwitches
from lightning_nograd.integrations.fabric import NoGradFabricCallback
from tests.helpers import csv_values


def test_arguments_are_checked_at_construction() -> None:
    with pytest.raises(ValueError, match="on_violation"):
        NoGradFabricCallback(on_violation="stop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="budget"):
        NoGradFabricCallback(budget=-1.0)


def test_a_hook_before_setup_says_what_to_do() -> None:
    callback = NoGradFabricCallback()
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[callback])
    with pytest.raises(RuntimeError, match=r"fabric\.setup"):
        fabric.call("on_train_start")


def test_a_correct_loop_is_silent_and_its_metrics_reach_the_logger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoGradWarning)
        callback, _ = fabric_loop.main(str(tmp_path), callback=NoGradFabricCallback())
    assert callback is not None and callback.report.findings == []
    epochs = [e for e in callback.report.epochs if e.stage == "val"]
    assert len(epochs) == 3 and epochs[0].metrics["nograd/val/graph_memory_mib"] > 0
    assert csv_values(tmp_path, "nograd/val/graph_memory_mib") == pytest.approx(
        [e.metrics["nograd/val/graph_memory_mib"] for e in epochs]
    )
    assert csv_values(tmp_path, "nograd/train/params_without_grad") == [0.0, 0.0, 0.0]
    assert "No findings" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("bug", "category", "kinds", "subject", "fix"),
    [
        ("train-mode", NoGradWarning, ["train_mode"], "", "call `model.eval()`"),
        ("grad-enabled", NoGradWarning, ["grad_enabled", "graph_in_outputs"], "", "under `torch.no_grad()`"),
        ("no-grad-branch", BrokenBackpropWarning, ["no_grad_module"], "block2", "remove the `torch.no_grad()`"),
    ],
)
def test_seeded_bugs_are_found_and_named(
    tmp_path: Path, bug: str, category: type[Warning], kinds: list[str], subject: str, fix: str
) -> None:
    with pytest.warns(category, match="lightning-nograd"):
        callback, _ = fabric_loop.main(str(tmp_path), bug, epochs=2, callback=NoGradFabricCallback(verbose=False))
    assert callback is not None
    assert [f.kind for f in callback.report.findings] == kinds
    first = callback.report.findings[0]
    assert first.subject == subject and fix in first.fix
    assert "batch" in first.hook  # the loop's words: "validation batch", "training batch"


def test_weights_are_the_same_with_and_without_it(tmp_path: Path) -> None:
    _, plain = fabric_loop.main(str(tmp_path / "plain"), callback=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoGradWarning)
        _, watched = fabric_loop.main(
            str(tmp_path / "watched"), callback=NoGradFabricCallback(verbose=False, repeats=3)
        )
    for (name, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    losses = [csv_values(tmp_path / run, "val_loss") for run in ("plain", "watched")]
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_an_internal_failure_is_one_warning_and_the_loop_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_nograd.integrations._loop import LoopDriver

    def broken(self: LoopDriver, *args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(LoopDriver, "train_batch_end", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fabric_loop.main(str(tmp_path), callback=NoGradFabricCallback(verbose=False))
    said = [str(w.message) for w in caught if issubclass(w.category, NoGradWarning)]
    assert len(said) == 1 and "internal error in NoGradFabricCallback: RuntimeError: boom" in said[0]
    assert len(csv_values(tmp_path, "val_loss")) == 3  # every epoch ran
    # it let go: no hook of ours is left in the process
    assert not ModeSwitches.listening() and not SAVED_TENSOR_HOOKS.probes


def test_a_test_loop_outside_training_is_audited_and_gets_its_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    callback = NoGradFabricCallback()
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[callback])
    model = fabric.setup(fabric_loop.Classifier())
    _, val_loader = fabric_loop.loaders()
    model.eval()
    fabric.call("on_test_start", batches=len(val_loader))
    with pytest.warns(NoGradWarning, match="test batch"):
        for x, y in val_loader:  # forgot torch.no_grad()
            fabric.call("on_test_batch_start", (x, y))
            fabric.call("on_test_batch_end", torch.nn.functional.cross_entropy(model(x), y).detach(), (x, y))
        fabric.call("on_test_end")
    assert [(f.kind, f.stage) for f in callback.report.findings] == [("grad_enabled", "test")]
    assert [e.stage for e in callback.report.epochs] == ["test"]
    assert "lightning-nograd report" in capsys.readouterr().out
