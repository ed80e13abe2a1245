from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from lightning_nograd import EvalModeAuditor, NoGradError, NoGradWarning
from tests.helpers import (
    Regressor,
    csv_values,
    forward_with_grad,
    loader,
    nograd_warnings,
    read_tensorboard_scalars,
    set_head_dropout_train,
    trainer,
)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"on_violation": "ignore"}, ValueError, r"`on_violation`.*'warn', 'fix', 'error'.*'ignore'"),
        ({"on_violation": None}, ValueError, r"`on_violation`.*None"),
        ({"allow_train_mode": 3}, TypeError, r"`allow_train_mode`.*got 3"),
        ({"allow_grad": ["ok", 5]}, TypeError, r"`allow_grad`.*got 5"),
        ({"allow_grad": ["(unclosed"]}, ValueError, r"`allow_grad`.*valid regular expression.*\(unclosed"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        EvalModeAuditor(**kwargs)


def run(entry: str, tmp_path: Path, model: pl.LightningModule, callback: EvalModeAuditor, **kwargs: object) -> None:
    t = trainer(tmp_path, [callback], **kwargs)
    if entry == "fit":
        t.fit(model, loader(), loader())
    elif entry == "validate":
        t.validate(model, loader())
    elif entry == "test":
        t.test(model, loader())
    else:
        t.predict(model, loader())


ENTRIES = ["fit", "validate", "test", "predict"]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("inference_mode", [True, False])
def test_correct_model_is_silent(tmp_path: Path, entry: str, inference_mode: bool) -> None:
    callback = EvalModeAuditor()
    with nograd_warnings() as seen:
        run(entry, tmp_path, Regressor(), callback, inference_mode=inference_mode)
    assert seen == []
    assert callback.report.findings == []


def test_frozen_backbone_is_silent(tmp_path: Path) -> None:
    model = Regressor(forward_with_grad)
    model.backbone.requires_grad_(False)
    model.head.requires_grad_(False)
    callback = EvalModeAuditor()
    with nograd_warnings() as seen:
        run("validate", tmp_path, model, callback, inference_mode=False)
    assert seen == []


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("inference_mode", [True, False])
def test_module_in_train_mode_is_named(tmp_path: Path, entry: str, inference_mode: bool) -> None:
    callback = EvalModeAuditor()
    with nograd_warnings() as seen:
        run(entry, tmp_path, Regressor(set_head_dropout_train), callback, inference_mode=inference_mode)
    assert len(seen) == 1
    message = str(seen[0].message)
    # the step switches the dropout to train mode before its forward: seen at the end of batch 0
    assert "`head.0` (Dropout) was switched to train mode during the step" in message
    stage = {"fit": "validation", "validate": "validation", "test": "test", "predict": "predict"}[entry]
    hook = {"fit": "validation_step", "validate": "validation_step"}.get(entry, f"{entry}_step")
    assert f"({stage}, `{hook}`, first at batch 0)" in message
    assert "allow_train_mode" in message
    assert [f.subject for f in callback.report.findings] == ["head.0"]


def test_whole_model_left_in_train_mode_names_the_root(tmp_path: Path) -> None:
    def body(model: Regressor, x: torch.Tensor) -> torch.Tensor:
        model.train()
        return model(x)

    with nograd_warnings() as seen:
        run("validate", tmp_path, Regressor(body), EvalModeAuditor())
    assert len(seen) == 1
    message = str(seen[0].message)
    assert "the whole Regressor was switched to train mode during the step" in message
    assert "backbone.1 (BatchNorm1d)" in message and "head.0 (Dropout)" in message


def test_mc_dropout_allow_listed_is_silent(tmp_path: Path) -> None:
    callback = EvalModeAuditor(allow_train_mode=[r"head\.0"])
    with nograd_warnings() as seen:
        run("fit", tmp_path, Regressor(set_head_dropout_train), callback)
    assert seen == []


@pytest.mark.parametrize(
    ("entry", "inference_mode", "expected"),
    [
        ("fit", True, True),
        ("validate", False, True),
        ("test", False, True),
        ("predict", False, True),
        # under inference_mode, `torch.enable_grad()` cannot record a graph: nothing is wasted
        ("validate", True, False),
        ("test", True, False),
    ],
)
def test_forward_with_gradients_enabled_is_named(
    tmp_path: Path, entry: str, inference_mode: bool, expected: bool
) -> None:
    callback = EvalModeAuditor()
    with nograd_warnings() as seen:
        run(entry, tmp_path, Regressor(forward_with_grad), callback, inference_mode=inference_mode)
    grad = [w for w in seen if "recorded an autograd graph" in str(w.message)]
    assert bool(grad) is expected
    if expected:
        assert len(grad) == 1
        message = str(grad[0].message)
        assert "the whole Regressor ran with gradients enabled" in message
        assert "backbone.0" in message and "head.1" in message
        assert "KiB saved for backward" in message
        assert "first at batch 0" in message


def test_grad_in_one_submodule_names_that_submodule(tmp_path: Path) -> None:
    def body(model: Regressor, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            features = model.backbone(x)
        return model.head(features)

    callback = EvalModeAuditor()
    with nograd_warnings():
        run("validate", tmp_path, Regressor(body), callback, inference_mode=False)
    grad = [f for f in callback.report.findings if f.kind == "grad_enabled"]
    assert [f.subject for f in grad] == ["backbone"]
    assert grad[0].details["saved_mib"] > 0


def test_saliency_allow_listed_is_silent(tmp_path: Path) -> None:
    def saliency(model: Regressor, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x.clone().requires_grad_(True)
            out = model(x)
            (grad,) = torch.autograd.grad(out.sum(), x)
        return out.detach() + 0 * grad.sum()

    with nograd_warnings() as seen:
        run(
            "validate",
            tmp_path,
            Regressor(saliency),
            EvalModeAuditor(allow_grad=[r"backbone|head"]),
            inference_mode=False,
        )
    assert seen == []
    with nograd_warnings() as seen:
        run("validate", tmp_path, Regressor(saliency), EvalModeAuditor(allow_grad=[r"head"]), inference_mode=False)
    assert [w for w in seen if "`backbone` ran with gradients enabled" in str(w.message)]


def test_fix_puts_module_in_eval_before_its_forward(tmp_path: Path) -> None:
    modes: list[bool] = []

    def body(model: Regressor, x: torch.Tensor) -> torch.Tensor:
        model.head[0].train()
        out = model(x)
        modes.append(model.head[0].training)
        return out

    model = Regressor(body)
    with pytest.warns(NoGradWarning, match=r"`head.0`.*it is kept in eval mode from the next batch on"):
        run("fit", tmp_path, model, EvalModeAuditor(on_violation="fix"), max_epochs=2)
    # sanity check (2 batches) then two validation epochs: only the very first forward ran in train mode
    assert modes == [True, False, False, False, False, False]
    assert model.training and model.head[0].training, "Lightning restores train mode after validation"


def test_fix_keeps_a_module_in_eval_when_user_code_flips_it_back(tmp_path: Path) -> None:
    modes: list[bool] = []

    def body(model: Regressor, x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        modes.append(model.head[0].training)
        model.head[0].train()
        return out

    with pytest.warns(NoGradWarning, match="head.0"):
        run("validate", tmp_path, Regressor(body), EvalModeAuditor(on_violation="fix"), limit_val_batches=4)
    assert modes == [False, False, False, False]


def test_warn_mode_does_not_change_modes(tmp_path: Path) -> None:
    modes: list[bool] = []

    def body(model: Regressor, x: torch.Tensor) -> torch.Tensor:
        model.head[0].train()
        out = model(x)
        modes.append(model.head[0].training)
        return out

    with pytest.warns(NoGradWarning):
        run("validate", tmp_path, Regressor(body), EvalModeAuditor())
    assert modes == [True, True]


def test_module_left_in_train_mode_before_the_stage_is_caught_before_its_forward(tmp_path: Path) -> None:
    class KeepsDropoutOn(Regressor):
        def on_validation_model_eval(self) -> None:
            super().on_validation_model_eval()
            self.head[0].train()

    modes: list[bool] = []

    def body(model: Regressor, x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        modes.append(model.head[0].training)
        return out

    model = KeepsDropoutOn(body)
    with pytest.warns(NoGradWarning, match=r"`head.0` \(Dropout\) ran its forward in train mode.*first at batch 0"):
        run("validate", tmp_path, model, EvalModeAuditor(on_violation="fix"))
    assert modes == [False, False]


@pytest.mark.parametrize(
    ("body", "match"),
    [(set_head_dropout_train, r"`head.0` \(Dropout\) was switched to train mode"), (forward_with_grad, "autograd")],
)
def test_error_mode_stops_at_first_violation(tmp_path: Path, body: object, match: str) -> None:
    callback = EvalModeAuditor(on_violation="error")
    with pytest.raises(NoGradError, match=match):
        run("validate", tmp_path, Regressor(body), callback, inference_mode=False)  # type: ignore[arg-type]
    assert callback._graph is None and callback._modes is None, "hooks are removed after the error"
    assert not torch.nn.modules.module._global_forward_pre_hooks


class KeepsOutputs(Regressor):
    def __init__(self, attached: bool, clear: bool) -> None:
        super().__init__(forward_with_grad if attached else None)
        self.validation_step_outputs: list[torch.Tensor] = []
        self.clear = clear

    def validation_step(self, batch: object, batch_idx: int) -> torch.Tensor:
        x, _ = batch  # type: ignore[misc]
        out = self.validation_body(self, x) if self.validation_body else self(x)
        self.validation_step_outputs.append(out)
        return out.mean().detach()

    def on_validation_epoch_end(self) -> None:
        if self.clear:
            self.validation_step_outputs.clear()


def test_collection_that_grows_across_epochs_is_named(tmp_path: Path) -> None:
    callback = EvalModeAuditor()
    with nograd_warnings() as seen:
        run("fit", tmp_path, KeepsOutputs(attached=False, clear=False), callback, max_epochs=3)
    assert len(seen) == 1
    message = str(seen[0].message)
    assert "`self.validation_step_outputs` keeps growing across epochs" in message
    assert "tensors" in message and "MiB on cpu" in message
    assert "self.validation_step_outputs.clear()" in message


def test_collection_cleared_every_epoch_is_silent(tmp_path: Path) -> None:
    with nograd_warnings() as seen:
        run("fit", tmp_path, KeepsOutputs(attached=False, clear=True), EvalModeAuditor(), max_epochs=3)
    assert seen == []


def test_graph_kept_in_attribute_is_named(tmp_path: Path) -> None:
    callback = EvalModeAuditor()
    with nograd_warnings():
        run("validate", tmp_path, KeepsOutputs(attached=True, clear=True), callback, inference_mode=False)
    kept = [f for f in callback.report.findings if f.kind == "graph_in_attribute"]
    assert len(kept) == 1
    assert kept[0].subject == "self.validation_step_outputs"
    assert kept[0].details["tensors"] == 2
    assert "2 tensor(s) still attached to an autograd graph" in kept[0].message


def test_graph_returned_from_step_is_named(tmp_path: Path) -> None:
    class ReturnsGraph(Regressor):
        def validation_step(self, batch: object, batch_idx: int) -> torch.Tensor:
            x, _ = batch  # type: ignore[misc]
            with torch.enable_grad():
                return self(x)

    callback = EvalModeAuditor()
    with nograd_warnings():
        run("fit", tmp_path, ReturnsGraph(), callback, max_epochs=1)
    kinds = {f.kind for f in callback.report.findings}
    assert kinds == {"grad_enabled", "graph_in_outputs"}
    returned = next(f for f in callback.report.findings if f.kind == "graph_in_outputs")
    assert "`validation_step` returned 1 tensor(s) still attached" in returned.message


@pytest.mark.parametrize("bug", [None, set_head_dropout_train])
def test_violations_metric_reaches_csv_and_tensorboard(tmp_path: Path, bug: object) -> None:
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    callback = EvalModeAuditor()
    with nograd_warnings():
        t = trainer(tmp_path, [callback], logger=loggers, max_epochs=3, num_sanity_val_steps=2)
        t.fit(Regressor(bug), loader(), loader())  # type: ignore[arg-type]
        t.test(Regressor(bug), loader())  # type: ignore[arg-type]
    expected = 1.0 if bug else 0.0
    assert csv_values(tmp_path / "csv", "nograd/val/violations") == [expected] * 3, "one per epoch, no sanity check"
    assert csv_values(tmp_path / "csv", "nograd/test/violations") == [expected]
    scalars = read_tensorboard_scalars(tmp_path / "tb")
    assert [v for _, v in scalars["nograd/val/violations"]] == [expected] * 3
    # at the step of the epoch's own val_loss (Lightning's count of batches that stepped)
    assert [step for step, _ in scalars["nograd/val/violations"]] == [step for step, _ in scalars["val_loss"]]
    assert len(scalars["val_loss"]) == 3


def test_works_with_pytorch_lightning_trainer(tmp_path: Path) -> None:
    pytorch_lightning = pytest.importorskip("pytorch_lightning")

    class Legacy(pytorch_lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 1), torch.nn.Dropout())

        def validation_step(self, batch: object, batch_idx: int) -> None:
            x, _ = batch  # type: ignore[misc]
            self.net[1].train()
            self.net(x)

    callback = EvalModeAuditor()
    t = pytorch_lightning.Trainer(
        default_root_dir=tmp_path, limit_val_batches=2, enable_progress_bar=False, logger=False
    )
    t.callbacks.append(callback)
    with pytest.warns(NoGradWarning, match="`net.1`"):
        t.validate(Legacy(), loader())


def test_nothing_keeps_the_model_alive_after_the_run(tmp_path: Path) -> None:
    callback = EvalModeAuditor()
    model = Regressor(set_head_dropout_train)
    ref = weakref.ref(model)
    with nograd_warnings():
        t = trainer(tmp_path, [callback])
        t.fit(model, loader(), loader())
    del model, t
    gc.collect()
    assert ref() is None
    assert not torch.nn.modules.module._global_forward_pre_hooks


@pytest.mark.parametrize(
    ("stored_in", "stage", "hook"),
    [
        ("training_step", "train", "training_step"),
        ("validation_step", "val", "on_validation_epoch_end"),
    ],
)
def test_graph_kept_on_the_model_is_named_where_it_was_stored(
    tmp_path: Path, stored_in: str, stage: str, hook: str
) -> None:
    class KeepsLosses(Regressor):
        def __init__(self) -> None:
            super().__init__()
            self.losses: list[torch.Tensor] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            if stored_in == "training_step":
                self.losses.append(loss)  # no .detach(): keeps every step's graph alive
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            with torch.enable_grad():
                loss = nn.functional.mse_loss(self(x), y)
            if stored_in == "validation_step":
                self.losses.append(loss)
            return loss.detach()

    auditor = EvalModeAuditor(allow_grad=[""] if stored_in == "validation_step" else ())  # every module, no attribute
    with nograd_warnings():
        trainer(tmp_path, [auditor], inference_mode=False).fit(KeepsLosses(), loader(), loader())
    found = {(f.stage, f.hook) for f in auditor.report.findings if f.kind == "graph_in_attribute"}
    assert found == {(stage, hook)}, [f.message for f in auditor.report.findings]


def test_compiled_submodule_is_named_as_the_user_wrote_it(tmp_path: Path) -> None:
    def switch_dropout_on(model: Regressor, x: torch.Tensor) -> torch.Tensor:
        model.head._orig_mod[0].train()  # type: ignore[index]
        return model(x)

    model = Regressor(switch_dropout_on)
    model.head = torch.compile(model.head, backend="aot_eager")  # type: ignore[assignment]
    auditor = EvalModeAuditor()
    with nograd_warnings():
        trainer(tmp_path, [auditor]).validate(model, loader())
    assert [(f.kind, f.subject) for f in auditor.report.findings] == [("train_mode", "head.0")]


class GradInValidation(Regressor):
    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        with torch.enable_grad():
            loss = nn.functional.mse_loss(self(x), y)
        return loss  # leaves the step attached to its graph


def _compiled_enable_grad_records_a_graph() -> bool:
    """Whether ``enable_grad()`` inside compiled code called under ``no_grad`` builds a graph on this torch
    (torch 2.4's dynamo does not)."""

    def step(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            return (x * w).sum()

    with torch.no_grad():
        out = torch.compile(step, backend="aot_eager")(torch.ones(2), torch.ones(2, requires_grad=True))
    return out.grad_fn is not None


def test_whole_compiled_module_reports_grad_enabled_validation(tmp_path: Path) -> None:
    # Lightning compiles validation_step itself (`from_compiled`), not only forward
    torch._dynamo.reset()
    records = _compiled_enable_grad_records_a_graph()
    model = torch.compile(GradInValidation(), backend="aot_eager")
    auditor = EvalModeAuditor()
    with nograd_warnings():
        trainer(tmp_path, [auditor], inference_mode=False).validate(model, loader())
    # where no graph is built, none is reported (a false alarm otherwise)
    expected = {("grad_enabled", ""), ("graph_in_outputs", "validation_step outputs")} if records else set()
    assert {(f.kind, f.subject) for f in auditor.report.findings} == expected


class Wide(pl.LightningModule):
    """A 1 MiB hidden activation per batch of 8 that ReLU saves for backward; outputs of 8 floats."""

    def __init__(self, keep: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32768), nn.ReLU(), nn.Linear(32768, 1))
        self.keep = keep
        self.kept: list[torch.Tensor] = []

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        with torch.enable_grad():
            out = self.net(batch[0])
        if self.keep:
            self.kept = [out]  # one graph kept on the model, replaced every batch
            return None
        return out


@pytest.mark.parametrize("keep", [False, True])
def test_graph_findings_give_the_size_of_the_graph_they_keep_alive(tmp_path: Path, keep: bool) -> None:
    callback = EvalModeAuditor()
    with nograd_warnings():
        run("validate", tmp_path, Wide(keep), callback, inference_mode=False, limit_val_batches=1)
    kind = "graph_in_attribute" if keep else "graph_in_outputs"
    (finding,) = [f for f in callback.report.findings if f.kind == kind]
    # ReLU's saved output (8 x 32768 float32 = 1 MiB, shared with the next Linear's saved input) plus the
    # first Linear's saved input and the output itself (32 bytes each); the weights are not counted
    assert finding.details["mib"] * 2**20 == 8 * 32768 * 4 + 8 * 8 * 4 + 8 * 4
    assert finding.details["tensor_mib"] * 2**20 == 8 * 4
    assert "1.000 MiB" in finding.message


def test_audit_gives_the_same_kept_graph_size() -> None:
    from lightning_nograd import audit

    model = Wide(keep=False).net.eval()
    with nograd_warnings(), audit(model, monitor_savings=False) as report, torch.enable_grad():
        model(torch.ones(8, 8))
    (finding,) = [f for f in report.findings if f.kind == "graph_in_outputs"]
    assert finding.details["mib"] * 2**20 == 8 * 32768 * 4 + 8 * 8 * 4 + 8 * 4


def test_findings_list_modules_in_the_order_the_forward_ran_them(tmp_path: Path) -> None:
    class Backwards(pl.LightningModule):
        """Modules named against the alphabet: the forward runs `zeta`, then `mid`, then `alpha`."""

        def __init__(self) -> None:
            super().__init__()
            self.zeta, self.mid, self.alpha = nn.Linear(8, 8), nn.Dropout(0.1), nn.Linear(8, 1)
            self.zeta_drop = nn.Dropout(0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.alpha(self.mid(self.zeta_drop(self.zeta(x))))

        def on_validation_epoch_start(self) -> None:
            self.train()  # every layer in train mode as the batches start

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            with torch.enable_grad():
                self(batch[0])

    auditor = EvalModeAuditor()
    with nograd_warnings():
        trainer(tmp_path, [auditor], inference_mode=False, num_sanity_val_steps=0).validate(Backwards(), loader())
    found = {f.kind: f for f in auditor.report.findings}
    assert found["grad_enabled"].details["modules"] == ["zeta", "zeta_drop", "mid", "alpha"]  # not alphabetical
    assert found["train_mode"].details["mode_sensitive_layers"] == ["zeta_drop (Dropout)", "mid (Dropout)"]
    assert "zeta_drop (Dropout), mid (Dropout)" in found["train_mode"].problem
