from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from lightning_nograd import BackpropGuard, EvalModeAuditor, NoGradAuditor, NoGradWarning, SavingsMonitor
from lightning_nograd.core.reporting.summary import render
from tests.helpers import (
    Regressor,
    csv_values,
    fit_logged_to_wandb_offline,
    loader,
    nograd_warnings,
    read_tensorboard_scalars,
    read_tensorboard_text,
    read_wandb_offline,
    set_head_dropout_train,
    trainer,
)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"on_violation": "strict"}, ValueError, r"`on_violation`.*'warn', 'fix', 'error'.*'strict'"),
        ({"verbose": "yes"}, TypeError, r"`verbose`.*bool.*'yes'"),
        ({"guard_backprop": 1}, TypeError, r"`guard_backprop`.*bool.*1"),
        ({"report_path": 3}, TypeError, r"`report_path`.*got 3"),
        ({"allow_grad": ["("]}, ValueError, r"`allow_grad`"),
        ({"budget": -1}, ValueError, r"`budget`.*got -1"),
        ({"repeats": 0}, ValueError, r"`repeats`.*got 0"),
        ({"repeats": 2.5}, TypeError, r"`repeats`.*2.5"),
        # checked whatever the switches say
        ({"budget": -1, "monitor_savings": False}, ValueError, r"`budget`.*got -1"),
        ({"allow_grad": "[", "audit_eval": False}, ValueError, r"`allow_grad`.*'\['"),
        ({"allow": ["("], "guard_backprop": False}, ValueError, r"`allow`.*'\('"),
        # iterables that are not lists of patterns are refused whole
        ({"allow_grad": b"enc"}, TypeError, r"`allow_grad`.*b'enc' of type bytes"),
        ({"allow": {"a": 1}}, TypeError, r"`allow`.*\{'a': 1\} of type dict"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        NoGradAuditor(**kwargs)


class EveryBug(Regressor):
    """Dropout switched on in validation and a head that never learns (its forward under no_grad)."""

    def __init__(self) -> None:
        super().__init__(set_head_dropout_train)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        features = self.backbone(x)
        with torch.no_grad():
            out = self.head(features)
        return nn.functional.mse_loss(out + features.mean(dim=1, keepdim=True), y)


def test_parts_share_one_report_and_pass_on_violation_through(tmp_path: Path) -> None:
    auditor = NoGradAuditor(on_violation="fix", verbose=False)
    expected = (EvalModeAuditor, SavingsMonitor, BackpropGuard)
    assert len(auditor._parts) == 3 and all(isinstance(p, k) for p, k in zip(auditor._parts, expected, strict=True))
    assert all(p.report is auditor.report for p in auditor._parts)
    assert auditor.part(EvalModeAuditor).on_violation == "fix"  # type: ignore[union-attr]
    with nograd_warnings() as seen:
        trainer(tmp_path, [auditor]).fit(EveryBug(), loader(), loader())
    kinds = {f.kind for f in auditor.report.findings}
    assert kinds == {"train_mode", "no_grad_module"}
    assert len(seen) == 2


def test_parts_can_be_switched_off(tmp_path: Path) -> None:
    auditor = NoGradAuditor(guard_backprop=False, monitor_savings=False, verbose=False)
    assert len(auditor._parts) == 1 and isinstance(auditor._parts[0], EvalModeAuditor)
    with nograd_warnings():
        trainer(tmp_path, [auditor]).fit(EveryBug(), loader(), loader())
    assert {f.kind for f in auditor.report.findings} == {"train_mode"}


def test_report_table_json_file_and_no_logger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ci" / "nograd.json"
    auditor = NoGradAuditor(report_path=path)
    with nograd_warnings():
        t = trainer(tmp_path, [auditor], logger=False)
        model = EveryBug()
        t.fit(model, loader(), loader())
        t.test(model, loader())
    printed = capsys.readouterr().out
    assert "lightning-nograd report" in printed and "validation" in printed and "test" in printed
    assert "`head` has trainable parameters but its forward ran only with gradients disabled" in printed
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(auditor.report.to_dict()))
    assert {f["kind"] for f in data["findings"]} == {"train_mode", "no_grad_module"}
    assert {e["stage"] for e in data["epochs"]} == {"train", "val", "test"}


def test_report_json_is_written_after_predict_too(tmp_path: Path) -> None:
    # CI gates on the file: a finding of `trainer.predict` (dropout switched on in predict_step) must be in it
    class DropoutInPredict(Regressor):
        def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.head[0].train()
            return super().predict_step(batch, batch_idx)

    path = tmp_path / "nograd.json"
    auditor = NoGradAuditor(report_path=path, verbose=False)
    with nograd_warnings():
        trainer(tmp_path, [auditor]).predict(DropoutInPredict(), loader())
    data = json.loads(path.read_text())
    assert [(f["kind"], f["stage"], f["subject"]) for f in data["findings"]] == [("train_mode", "predict", "head.0")]


def test_verbose_false_prints_nothing_but_still_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with nograd_warnings() as seen:
        trainer(tmp_path, [NoGradAuditor(verbose=False)]).fit(EveryBug(), loader(), loader())
    assert "lightning-nograd report" not in capsys.readouterr().out
    assert len(seen) == 2


def test_metrics_and_summary_reach_csv_and_tensorboard(tmp_path: Path) -> None:
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    with nograd_warnings():
        t = trainer(tmp_path, [NoGradAuditor(verbose=False)], logger=loggers, max_epochs=2)
        t.fit(EveryBug(), loader(), loader())
    for key, expected in [
        ("nograd/val/violations", [1.0, 1.0]),
        ("nograd/train/no_grad_modules", [1.0, 1.0]),
        ("nograd/train/params_without_grad", [2.0, 2.0]),
        ("nograd/train/eval_mode_modules", [0.0, 0.0]),
    ]:
        assert csv_values(tmp_path / "csv", key) == expected, key
    assert len(csv_values(tmp_path / "csv", "nograd/val/epoch_time_s")) == 2
    scalars = read_tensorboard_scalars(tmp_path / "tb")
    assert [v for _, v in scalars["nograd/val/violations"]] == [1.0, 1.0]
    assert "nograd/val/peak_memory_mib" in scalars
    (text,) = read_tensorboard_text(tmp_path / "tb", "nograd/report")
    assert "lightning-nograd report" in text and "head" in text
    summary = json.loads(next((tmp_path / "csv").rglob("nograd_summary.json")).read_text())
    assert summary["findings"] == 2 and summary["val/violations"] == 1.0


def test_metrics_and_summary_reach_wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    fit_logged_to_wandb_offline(tmp_path, monkeypatch, EveryBug())
    history, summary = read_wandb_offline(tmp_path)
    violations = [row["nograd/val/violations"] for row in history if "nograd/val/violations" in row]
    assert violations == [1, 1]
    assert [row["nograd/train/no_grad_modules"] for row in history if "nograd/train/no_grad_modules" in row] == [1, 1]
    assert any("nograd/val/epoch_time_s" in row for row in history)
    assert summary["nograd_summary/findings"] == 2
    assert summary["nograd_summary/val/violations"] == 1


def test_metrics_and_summary_reach_mlflow_file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    logger = MLFlowLogger(experiment_name="nograd", tracking_uri=uri)
    with nograd_warnings():
        trainer(tmp_path, [NoGradAuditor(verbose=False)], logger=logger, max_epochs=2).fit(
            EveryBug(), loader(), loader()
        )
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(logger.run_id, "nograd/val/violations")
    assert [m.value for m in history] == [1.0, 1.0]
    run = client.get_run(logger.run_id)
    assert run.data.tags["nograd.findings"] == "2"
    artifact = Path(client.download_artifacts(logger.run_id, "nograd_summary.json", str(tmp_path / "dl")))
    assert json.loads(artifact.read_text())["findings"] == 2


def test_checkpoint_state_round_trip(tmp_path: Path) -> None:
    first = NoGradAuditor(verbose=False)
    with nograd_warnings():
        trainer(tmp_path, [first]).fit(EveryBug(), loader(), loader())
    second = NoGradAuditor(verbose=False)
    second.load_state_dict(first.state_dict())
    assert json.loads(json.dumps(first.state_dict())) == second.state_dict()
    with nograd_warnings() as seen:
        trainer(tmp_path, [second]).fit(EveryBug(), loader(), loader())
    assert seen == [], "findings already warned before the checkpoint are not warned again after resuming"


LIGHTNING_CLI_SCRIPT = """
from lightning.pytorch.cli import LightningCLI

from examples.quickstart import Classifier, SyntheticData

LightningCLI(Classifier, SyntheticData)
"""

LIGHTNING_CLI_CONFIG = """
trainer:
  max_epochs: 1
  limit_train_batches: 2
  limit_val_batches: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  callbacks:
    - class_path: lightning_nograd.NoGradAuditor
      init_args:
        budget: 0.2
        verbose: false
        report_path: {report}
"""


@pytest.mark.parametrize("form", ["yaml", "flags"])
def test_lightning_cli_builds_the_auditor(tmp_path: Path, form: str) -> None:
    pytest.importorskip("jsonargparse")
    script, report = tmp_path / "train.py", tmp_path / "report.json"
    script.write_text(LIGHTNING_CLI_SCRIPT)
    if form == "yaml":
        (tmp_path / "config.yaml").write_text(LIGHTNING_CLI_CONFIG.format(report=report))
        args = ["--config", str(tmp_path / "config.yaml")]
    else:
        args = [
            *("--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2"),
            *("--trainer.logger=false", "--trainer.enable_checkpointing=false"),
            "--trainer.callbacks+=lightning_nograd.NoGradAuditor",
            f"--trainer.callbacks.report_path={report}",
            "--trainer.callbacks.budget=0.2",
            "--trainer.callbacks.verbose=false",
        ]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(script), "fit", f"--trainer.default_root_dir={tmp_path / 'run'}", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(root)),
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(report.read_text())
    assert sorted(e["stage"] for e in data["epochs"]) == ["train", "val"]
    assert data["findings"] == []


def test_report_path_that_can_never_be_written_is_refused_at_construction(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"`report_path`.*a_file.*not a directory"):
        NoGradAuditor(report_path=blocker / "report.json")
    with pytest.raises(ValueError, match=r"`report_path` to be a file path, but got the directory"):
        NoGradAuditor(report_path=tmp_path)
    NoGradAuditor(report_path=tmp_path / "not" / "yet" / "there.json")  # parents are created when writing
    # tried for real: root passes every permission check, and /proc takes no files whatever its bits say
    with pytest.raises(ValueError, match=r"`report_path` to be a writable file path, but got '/proc/x.json'"):
        NoGradAuditor(report_path="/proc/x.json")
    assert not list(tmp_path.glob(".lightning-nograd-*")), "the probe file is removed"


class CrashesInSecondEpoch(Regressor):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.current_epoch == 1:
            raise RuntimeError("the user's own bug")
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("crash", [False, True], ids=["clean-run", "crashing-run"])
def test_report_path_failing_at_run_time_never_costs_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], crash: bool
) -> None:
    report = tmp_path / "reports" / "nograd.json"
    auditor = NoGradAuditor(report_path=report)
    (tmp_path / "reports").write_text("a file where the report folder should be")  # made after construction
    logger = CSVLogger(tmp_path, name="csv")
    t = trainer(tmp_path, [auditor], logger=logger, log_every_n_steps=1)
    model = CrashesInSecondEpoch() if crash else Regressor()
    with pytest.warns(NoGradWarning, match=r"could not write the report to `report_path`") as seen:
        if crash:
            with pytest.raises(RuntimeError, match="the user's own bug"):
                t.fit(model, loader(), loader())
        else:
            t.fit(model, loader(), loader())
    assert len([w for w in seen if "report_path" in str(w.message)]) == 1
    if not crash:
        assert "lightning-nograd report" in capsys.readouterr().out  # the table is still printed
    # the loggers were finalized: the CSV log has the first epoch's training losses
    assert csv_values(Path(logger.log_dir), "train_loss")


@pytest.mark.parametrize("front_end", ["NoGradAuditor", "SavingsMonitor"])
def test_savings_messages_name_the_budget_argument_both_front_ends_share(tmp_path: Path, front_end: str) -> None:
    # a zero budget refuses every measurement, whatever the machine's speed
    callback = NoGradAuditor(verbose=False, budget=0.0) if front_end == "NoGradAuditor" else SavingsMonitor(budget=0.0)
    with nograd_warnings():
        trainer(tmp_path, [callback], max_epochs=1).fit(Regressor(), loader(), loader())
    (epoch,) = [e for e in callback.report.epochs if e.stage == "val"]
    assert "within its 0% time budget" in epoch.details["savings"], epoch.details
    assert "tried again" not in epoch.details["savings"], "a one-epoch fit has no later epoch to promise"
    text = render(callback.report, use_rich=False)
    assert "raise `budget` or set `repeats`" in text  # one name in both
    # every argument the note names is one the class the user built takes
    import inspect
    import re

    note = next(line for line in text.splitlines() if "time not measured" in line)
    named = re.findall(r"`(\w+)`", note)
    assert named and set(named) <= set(inspect.signature(type(callback)).parameters), named
    # memory is measured at any budget; only time waits for it
    assert "nograd/val/graph_memory_mib" in epoch.metrics and "nograd/val/time_saved_s" not in epoch.metrics
    # and `repeats`, as the message says, measures time now, whatever the budget
    kind = type(callback)
    callback = kind(verbose=False, budget=0.0, repeats=3) if kind is NoGradAuditor else kind(budget=0.0, repeats=3)
    with nograd_warnings():
        trainer(tmp_path, [callback], max_epochs=1).fit(Regressor(), loader(), loader())
    (epoch,) = [e for e in callback.report.epochs if e.stage == "val"]
    assert "nograd/val/time_saved_s" in epoch.metrics and epoch.details["repeats"] == 3, epoch.details


def test_the_readme_shows_the_real_defaults() -> None:
    import inspect
    import re

    readme = (Path(__file__).resolve().parents[1] / "docs" / "reference" / "nograd-auditor.md").read_text()
    block = readme.split("NoGradAuditor(\n", 1)[1].split("\n)\n", 1)[0]
    shown = dict(re.findall(r"^\s+(\w+)=(.+?),\s+#", block, flags=re.M))
    parameters = inspect.signature(NoGradAuditor).parameters.values()
    real = {p.name: repr(p.default) for p in parameters}
    assert shown and {k: shown[k].replace('"', "'") for k in shown} == {k: real[k] for k in shown}
    assert set(shown) == set(real)


def test_fit_validate_and_test_runs_get_rows_of_their_own(tmp_path: Path) -> None:
    from lightning_nograd.core.reporting.summary import rows, summarise

    class BuggyOnlyInFit(Regressor):
        def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if self.trainer.state.fn == "fit":
                self.head[0].train()  # dropout on while evaluating, only during fit
            return super().validation_step(batch, batch_idx)

    auditor = NoGradAuditor(verbose=False)
    model = BuggyOnlyInFit()
    t = trainer(tmp_path, [auditor], max_epochs=2, num_sanity_val_steps=0)
    with nograd_warnings():
        t.fit(model, loader(), loader())
        t.validate(model, loader(), verbose=False)
        t.test(model, loader(), verbose=False)
    summary = [(s.run, s.stage, s.epochs, s.counts.get("violations")) for s in summarise(auditor.report)]
    assert summary == [("fit", "train", 2, None), ("fit", "val", 2, 1.0), ("validate", "val", 1, 0.0),
                       ("test", "test", 1, 0.0)]  # fmt: skip
    labels = [row[0] for row in rows(auditor.report)]
    assert labels == ["training", "validation", "validation (validate)", "test"]
    assert [row[-1] for row in rows(auditor.report)][1:] == ["1 finding", "none", "none"]
    data = auditor.report.to_dict()
    assert {(e["run"], e["stage"]) for e in data["epochs"]} == {("fit", "train"), ("fit", "val"),
                                                                ("validate", "val"), ("test", "test")}  # fmt: skip
    assert {f["run"] for f in data["findings"]} == {"fit"}


@pytest.mark.parametrize("cls", [NoGradAuditor, SavingsMonitor])
def test_repeated_trainer_calls_keep_an_epoch_record_each(tmp_path: Path, cls: type) -> None:
    # found on the H100: two `trainer.validate()` calls (epoch 0, step 0 both times) left one record
    callback = cls(verbose=False) if cls is NoGradAuditor else cls(repeats=2, budget=1000.0)
    t = trainer(tmp_path, [callback])
    for _ in range(2):
        t.validate(Regressor(), loader(), verbose=False)
    t.test(Regressor(), loader(), verbose=False)
    epochs = callback.report.epochs
    assert [(e.call, e.run, e.stage, e.epoch, e.global_step) for e in epochs] == [
        (1, "validate", "val", 0, 0),
        (2, "validate", "val", 0, 0),
        (3, "test", "test", 0, 0),
    ]
    for record in epochs:  # the epoch's own measurements, from every part of NoGradAuditor, in one record
        stage = record.stage
        assert {f"nograd/{stage}/epoch_time_s", f"nograd/{stage}/graph_memory_mib"} <= set(record.metrics)
        if cls is NoGradAuditor:
            assert f"nograd/{stage}/violations" in record.metrics
    assert [e["call"] for e in callback.report.to_dict()["epochs"]] == [1, 2, 3]


def test_a_subclassed_logger_gets_the_summary_of_its_base_class(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    class TeamTensorBoard(TensorBoardLogger):  # a company's own logger, as many teams have
        pass

    t = trainer(tmp_path, [NoGradAuditor(verbose=False)], logger=TeamTensorBoard(tmp_path, name="tb"), max_epochs=1)
    t.fit(Regressor(), loader(), loader())
    (text,) = read_tensorboard_text(tmp_path / "tb", "nograd/report")
    assert "lightning-nograd report" in text


@pytest.mark.parametrize("cls", [NoGradAuditor, EvalModeAuditor, SavingsMonitor, BackpropGuard])
def test_public_names_are_the_documented_ones(cls: type) -> None:
    import inspect

    callback_names = set(dir(pl.Callback()))
    public = {n for n in dir(cls()) if not n.startswith("_") and n not in callback_names}
    documented = set(inspect.signature(cls).parameters) | {"report", "on_violation"}
    if cls is NoGradAuditor:
        documented.add("part")
    assert public <= documented, public - documented


def test_quickstart_shows_the_memory_savings_from_its_first_epoch_at_the_defaults(tmp_path: Path) -> None:
    # the README's first command, run as a user runs it; NoGradAuditor() at its defaults (1.5% budget).
    # Its time figures come once the run is long enough for the timing replays, which depends on the
    # machine's load: not asserted here (`test_repeats_forces_the_time_measurement` forces them).
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(root / "examples" / "quickstart.py"), "--root-dir", str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "lightning-nograd report" in done.stdout
    scalars = read_tensorboard_scalars(tmp_path / "lightning_logs")
    steps = [step for step, _ in scalars["val_loss"]]
    assert len(steps) == 20
    for key in ("epoch_time_s", "peak_memory_mib", "graph_memory_mib", "memory_saved_mib"):
        assert [step for step, _ in scalars[f"nograd/val/{key}"]] == steps, key  # every epoch, the first too
    # a model where gradients cost something real: more than 10 MiB kept for backward per batch
    assert all(value > 10 for _, value in scalars["nograd/val/graph_memory_mib"])
    assert all(value > 5 for _, value in scalars["nograd/val/memory_saved_mib"])
    time_steps = [step for step, _ in scalars.get("nograd/val/time_saved_pct", [])]
    assert time_steps == steps[len(steps) - len(time_steps) :]  # once measured, every epoch after


def test_every_hook_a_part_overrides_is_forwarded_by_the_auditor() -> None:
    # a hook a part overrides but NoGradAuditor does not forward would silently never fire in it
    import copy
    import inspect
    import pickle

    from lightning_nograd.callbacks._base import NoGradCallback
    from lightning_nograd.callbacks.nograd_auditor import _CallEach, _watches, implements

    hooks = [name for name in vars(pl.Callback) if not name.startswith("_") and callable(getattr(pl.Callback, name))]
    assert len(hooks) > 25 and "on_validation_batch_end" in hooks
    parts = (EvalModeAuditor, SavingsMonitor, BackpropGuard, NoGradCallback)
    # (the classes derive from Lightning's `Callback` only where Lightning was imported before them)
    ours = [c for cls in parts for c in cls.__mro__ if c.__module__.startswith("lightning_nograd.")]
    overridden = sorted({h for h in hooks for c in ours if h in vars(c)})
    assert {"setup", "on_validation_batch_start", "on_before_optimizer_step"} <= set(overridden)
    auditor = NoGradAuditor(verbose=False)
    for built in (auditor, copy.deepcopy(auditor), pickle.loads(pickle.dumps(auditor))):  # as ddp_spawn sends it
        unforwarded = []
        for hook in overridden:
            if hook not in NoGradAuditor.__slots__:
                # a method of its own (setup, teardown, on_exception, state_dict, ...): it calls every part
                source = inspect.getsource(vars(NoGradAuditor)[hook])
                if f'_each("{hook}"' not in source and not ("self._parts" in source and f".{hook}(" in source):
                    unforwarded.append(hook)
                continue
            # a slot: the handlers of exactly the parts that implement the hook and watch its loop, in order
            route = getattr(built, hook)
            handlers = list(route.handlers) if isinstance(route, _CallEach) else [route]
            expected = [getattr(p, hook) for p in built._parts if implements(p, hook) and _watches(p, hook)]
            if not expected or handlers != expected:
                unforwarded.append(hook)
        assert unforwarded == []


def test_summaries_go_only_into_real_loggers_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Lightning's own tests hand the Trainer test doubles as loggers; one answers `log_dir` with an object
    # whose text would have become a folder in the working directory
    from unittest.mock import MagicMock

    from lightning.pytorch.loggers import Logger

    monkeypatch.chdir(tmp_path)
    double = MagicMock(spec=Logger)
    real = CSVLogger(tmp_path / "csv")
    run = trainer(tmp_path / "root", [NoGradAuditor(verbose=False)], logger=[double, real], max_epochs=1)
    run.fit(Regressor(), loader(), loader())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["csv"]  # root stays empty: no checkpoints, no logs
    assert len(list((tmp_path / "csv").rglob("nograd_summary.json"))) == 1
    assert double.log_metrics.called  # the double is a logger Lightning used; only no folder is made from it


def test_each_trainer_call_prints_its_own_rows_and_new_findings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class BuggyOnlyInFit(Regressor):
        def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if self.trainer.state.fn == "fit":
                self.head[0].train()
            return super().validation_step(batch, batch_idx)

    model = BuggyOnlyInFit()
    t = trainer(tmp_path, [NoGradAuditor()], max_epochs=2, num_sanity_val_steps=0)
    printed = []
    with nograd_warnings():
        for run in (lambda: t.fit(model, loader(), loader()), lambda: t.validate(model, loader(), verbose=False),
                    lambda: t.test(model, loader(), verbose=False)):  # fmt: skip
            run()
            printed.append(capsys.readouterr().out)
    fit, validate, test = (text[text.index("lightning-nograd report") :] for text in printed)
    assert "│ training " in fit and "│ validation " in fit and "1 finding(s)" in fit and "`head.0`" in fit
    assert "(validate)" in validate and "│ training " not in validate and "│ test " not in validate
    assert "│ test " in test and "validation" not in test.split("\n[1]")[0] and "│ training " not in test
    for text in (validate, test):  # the fit's finding is not printed again
        assert "`head.0`" not in text and "No new findings (1 earlier" in text


def _allow_from_fix(fix: str) -> tuple[str, str]:
    """The option and pattern a fix says silence its finding: ``pass `allow_grad=[r"head\\.1"]` ...``."""
    import re

    found = re.search(r'pass `(allow\w*)=\[r"(.*?)"\]`', fix)
    assert found is not None, fix
    return found.group(1), found.group(2)


def _every_bug_run(tmp_path: Path, **allowed: list[str]) -> NoGradAuditor:
    """The every-bug example's sequence (a validate that leaves an inference tensor, a fit it crashes, a fit)."""
    from examples.every_bug import BuggyModel, data

    pl.seed_everything(0)
    model = BuggyModel()
    auditor = NoGradAuditor(verbose=False, **allowed)
    with nograd_warnings():
        trainer(tmp_path, [auditor], limit_val_batches=4).validate(model, data(1), verbose=False)
        try:
            trainer(tmp_path, [auditor], max_epochs=2, limit_val_batches=4).fit(model, data(0), data(1))
        except RuntimeError:  # "Inference tensors cannot be saved for backward", as its finding said
            with torch.inference_mode(False):
                model.scale, model.validation_step_outputs = None, []
            trainer(tmp_path, [auditor], max_epochs=2, limit_val_batches=4).fit(model, data(0), data(1))
    return auditor


class EvaluationExtras(Regressor):
    """What the every-bug example does not plant: attached outputs and attributes, a batch too big for
    gradients, and `.train()` on the whole model (which names its layers, not the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: torch.Tensor | None = None
        self.big = TooBigWithGradients()

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.train()
        x, y = batch
        self.big(x)  # without gradients, as Lightning runs it; the savings replay runs it with them
        with torch.enable_grad():
            out = self(x)
            loss = nn.functional.mse_loss(out, y)
        self.kept = out  # still attached
        return loss  # attached too


class TooBigWithGradients(nn.Module):
    """A real out-of-memory needs a GPU; this raises the same error where the replay turns gradients on."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise torch.OutOfMemoryError("CUDA out of memory (with gradients on, in the replay)")
        return x * self.scale


@pytest.fixture(scope="module")
def every_finding(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str, str, str]]:
    """(model, kind, subject, fix) of every finding the two models give at the defaults."""
    found = [
        ("every_bug", f.kind, f.subject, f.fix) for f in _every_bug_run(tmp_path_factory.mktemp("bugs")).report.findings
    ]
    extras = EvaluationExtras()
    auditor = NoGradAuditor(verbose=False, repeats=1)
    with nograd_warnings():
        trainer(tmp_path_factory.mktemp("extras"), [auditor], inference_mode=False).validate(extras, loader())
    found += [("extras", f.kind, f.subject, f.fix) for f in auditor.report.findings]
    return found


ALL_KINDS = {
    "train_mode", "grad_enabled", "graph_in_outputs", "graph_in_attribute", "growing_collection", "grad_replay_oom",
    "inference_tensor", "eval_mode_at_start", "eval_mode_leak", "no_grad_module", "param_without_grad",
    "grad_without_step", "stray_graph",
}  # fmt: skip


def test_every_kind_is_found_by_the_runs_the_silencing_test_uses(
    every_finding: list[tuple[str, str, str, str]],
) -> None:
    import re

    from tests.test_docs import DOCS

    documented = set(re.findall(r"^## `([a-z_]+)`$", (DOCS / "reference" / "findings.md").read_text(), flags=re.M))
    assert {kind for _, kind, _, _ in every_finding} == ALL_KINDS == documented
    # `.train()` on the whole model is named once, by its class, and its pattern names its layers, not ""
    (whole,) = [fix for model, kind, subject, fix in every_finding if model == "extras" and kind == "train_mode"]
    assert _allow_from_fix(whole) == ("allow_train_mode", "backbone\\.1|head\\.0")


@pytest.mark.parametrize("kind", sorted(ALL_KINDS))
def test_every_finding_is_silenced_by_the_pattern_its_fix_names(
    tmp_path: Path, every_finding: list[tuple[str, str, str, str]], kind: str
) -> None:
    for model, found_kind, subject, fix in [f for f in every_finding if f[1] == kind][:1]:
        option, pattern = _allow_from_fix(fix)
        assert pattern != "", fix  # never "allow everything"
        if model == "every_bug":
            auditor = _every_bug_run(tmp_path, **{option: [pattern]})
        else:
            extras = EvaluationExtras()
            auditor = NoGradAuditor(verbose=False, repeats=1, **{option: [pattern]})
            with nograd_warnings():
                trainer(tmp_path, [auditor], inference_mode=False).validate(extras, loader())
        left = {(f.kind, f.subject) for f in auditor.report.findings}
        assert (found_kind, subject) not in left, (fix, left)
