"""The callbacks never change, break or stall the runs they watch."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import warnings
import weakref
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, default_collate

from lightning_nograd import BackpropGuard, EvalModeAuditor, NoGradAuditor, NoGradWarning, SavingsMonitor
from lightning_nograd.core.checks.gradient_gaps import GradModeProbe
from lightning_nograd.core.checks.graph import SAVED_TENSOR_HOOKS, GraphProbe
from lightning_nograd.core.checks.modes import ModeProbe
from lightning_nograd.core.savings.recording import StepRecorder
from tests.helpers import Regressor, csv_values, loader, nograd_warnings, set_head_dropout_train, trainer
from tests.test_backprop_guard import GAN, Net


class TwoValLoaders(Regressor):
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return super().validation_step(batch, batch_idx)


CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("fast_dev_run", {"fast_dev_run": True}),
    ("no_validation", {"limit_val_batches": 0}),
    ("no_sanity_check", {"num_sanity_val_steps": 0}),
    ("sanity_check", {"num_sanity_val_steps": 2}),
    ("mid_epoch_validation", {"val_check_interval": 0.5, "limit_train_batches": 4}),
    ("every_other_epoch", {"check_val_every_n_epoch": 2, "max_epochs": 3}),
    ("bf16_mixed", {"precision": "bf16-mixed"}),
    ("inference_mode_off", {"inference_mode": False}),
]


@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=[c[0] for c in CONFIGS])
def test_trainer_configurations_run_clean(tmp_path: Path, name: str, options: dict[str, Any]) -> None:
    auditor = NoGradAuditor(verbose=False, budget=1000.0)
    with nograd_warnings() as seen:
        trainer(tmp_path, [auditor], **options).fit(Regressor(), loader(), loader())
    assert seen == []
    assert auditor.report.findings == []


def test_several_validation_dataloaders(tmp_path: Path) -> None:
    auditor = NoGradAuditor(verbose=False, budget=1000.0)
    with nograd_warnings() as seen:
        t = trainer(tmp_path, [auditor])
        t.fit(TwoValLoaders(set_head_dropout_train), loader(), [loader(seed=1), loader(seed=2)])
    assert len(seen) == 1, "one finding, however many dataloaders show it"
    val = [e for e in auditor.report.epochs if e.stage == "val"]
    assert len(val) == 2 and all(e.metrics["nograd/val/violations"] == 1 for e in val)


@pytest.mark.parametrize("entry", ["validate", "test", "predict"])
@pytest.mark.parametrize("inference_mode", [True, False])
def test_evaluation_entry_points_alone(tmp_path: Path, entry: str, inference_mode: bool) -> None:
    auditor = NoGradAuditor(verbose=False, budget=1000.0)
    t = trainer(tmp_path, [auditor], inference_mode=inference_mode)
    with nograd_warnings() as seen:
        getattr(t, entry)(Regressor(), loader())
    assert seen == []


def test_compiled_model(tmp_path: Path) -> None:
    model = Regressor()
    model.backbone = torch.compile(model.backbone, backend="eager")  # type: ignore[assignment]
    auditor = NoGradAuditor(verbose=False, budget=1000.0)
    with nograd_warnings() as seen:
        trainer(tmp_path, [auditor]).fit(model, loader(), loader())
    assert seen == []


def test_pytorch_lightning_trainer(tmp_path: Path) -> None:
    pytorch_lightning = pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.demos.boring_classes import BoringModel

    auditor = NoGradAuditor(verbose=False, budget=1000.0)
    t = pytorch_lightning.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=2,
        callbacks=[auditor],
        enable_progress_bar=False,
        logger=False,
    )
    with nograd_warnings() as seen:
        t.fit(BoringModel())
    assert seen == []
    assert [e.stage for e in auditor.report.epochs].count("val") == 2


def test_two_instances_have_distinct_state_keys() -> None:
    keys = {
        NoGradAuditor().state_key,
        NoGradAuditor(on_violation="error").state_key,
        EvalModeAuditor().state_key,
        EvalModeAuditor(allow_grad=["x"]).state_key,
        BackpropGuard().state_key,
        BackpropGuard(zero_grad_steps=5).state_key,
        SavingsMonitor().state_key,
        SavingsMonitor(budget=0.5).state_key,
    }
    assert len(keys) == 8


def test_two_identical_instances_in_one_trainer_save_and_resume(tmp_path: Path) -> None:
    first, second = NoGradAuditor(verbose=False), NoGradAuditor(verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    with nograd_warnings():
        trainer(tmp_path, [first, second, ckpt], enable_checkpointing=True).fit(
            Regressor(set_head_dropout_train), loader(), loader()
        )
    assert first.state_key != second.state_key
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    assert first.state_key in saved and second.state_key in saved
    base = first.state_key.split("#")[0]
    assert second.state_key == f"{base}#2", "numbered by order in the trainer's list, as a resuming process repeats"


def test_keys_follow_the_trainers_list_not_creation_order(tmp_path: Path) -> None:
    created_first, created_second = NoGradAuditor(verbose=False), NoGradAuditor(verbose=False)
    _ = created_first.state_key, created_second.state_key  # claimed in creation order
    with nograd_warnings():
        trainer(tmp_path, [created_second, created_first]).fit(Regressor(), loader(), loader())
    assert created_first.state_key == created_second.state_key.split("#")[0] + "#2"


def test_a_fresh_instance_resumes_in_the_same_process(tmp_path: Path) -> None:
    # a notebook, or a script that resumes in the process that saved: the old instance is still alive
    old = NoGradAuditor(verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    with pytest.warns(NoGradWarning, match="switched to train mode"):
        trainer(tmp_path, [old, ckpt], enable_checkpointing=True, max_epochs=1).fit(
            Regressor(set_head_dropout_train), loader(), loader()
        )
    fresh = NoGradAuditor(verbose=False)
    with nograd_warnings() as seen, warnings.catch_warnings(record=True) as lightning_warnings:
        warnings.simplefilter("always")
        trainer(tmp_path, [fresh, ModelCheckpoint(dirpath=tmp_path)], enable_checkpointing=True, max_epochs=2).fit(
            Regressor(set_head_dropout_train), loader(), loader(), ckpt_path=tmp_path / "last.ckpt"
        )
    assert fresh.state_key == old.state_key
    assert not [w for w in lightning_warnings if "callbacks used to create the checkpoint" in str(w.message)]
    assert seen == [], "the warned findings were restored: nothing is warned twice"


def run_for_weights(tmp_path: Path, callbacks: list[pl.Callback], resume: bool = False, **kwargs: Any) -> dict:
    pl.seed_everything(11)
    model = Regressor()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    t = trainer(tmp_path, [*callbacks, ckpt], enable_checkpointing=True, max_epochs=2, **kwargs)
    t.fit(model, loader(n=48), loader(n=32))
    if resume:
        pl.seed_everything(11)
        model = Regressor()
        t = trainer(tmp_path, [*callbacks, ckpt], enable_checkpointing=True, max_epochs=3, **kwargs)
        t.fit(model, loader(n=48), loader(n=32), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("budget", [0.01, 1000.0], ids=["default_budget", "replays_forced"])
@pytest.mark.parametrize("resume", [False, True], ids=["fit", "resumed"])
def test_bit_identical_with_and_without_nograd_auditor(tmp_path: Path, budget: float, resume: bool) -> None:
    plain = run_for_weights(tmp_path / "plain", [], resume=resume, num_sanity_val_steps=2)
    auditor = NoGradAuditor(verbose=False, budget=budget)
    with nograd_warnings() as seen:
        watched = run_for_weights(tmp_path / "watched", [auditor], resume=resume, num_sanity_val_steps=2)
    assert seen == []
    for key in plain:
        assert torch.equal(plain[key], watched[key]), key


def test_bit_identical_manual_optimization(tmp_path: Path) -> None:
    def run(callbacks: list[pl.Callback]) -> dict:
        pl.seed_everything(5)
        model = GAN()
        trainer(tmp_path, callbacks, limit_val_batches=0).fit(model, loader())
        return model.state_dict()

    plain = run([])
    watched = run([NoGradAuditor(verbose=False)])
    assert all(torch.equal(plain[k], watched[k]) for k in plain)


def test_checkpoint_keeps_callback_state(tmp_path: Path) -> None:
    auditor = NoGradAuditor(verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    with nograd_warnings():
        trainer(tmp_path, [auditor, ckpt], enable_checkpointing=True).fit(
            Regressor(set_head_dropout_train), loader(), loader()
        )
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"][auditor.state_key]
    assert saved["EvalModeAuditor"]["warned"] == [["train_mode", "head.0", "val", "validation_step"]]


def test_every_hook_is_removed_and_nothing_keeps_the_model(tmp_path: Path) -> None:
    auditor = NoGradAuditor(verbose=False, budget=1000.0)
    model = Regressor(set_head_dropout_train)
    ref = weakref.ref(model)
    with nograd_warnings():
        t = trainer(tmp_path, [auditor])
        t.fit(model, loader(), loader())
        t.test(model, loader())
    assert not torch.nn.modules.module._global_forward_pre_hooks
    assert not torch.nn.modules.module._global_forward_hooks
    assert SAVED_TENSOR_HOOKS.probes == [] and not SAVED_TENSOR_HOOKS.pushed
    del model, t
    gc.collect()
    assert ref() is None
    assert auditor.report.findings, "the report outlives the model"


def test_internal_failure_switches_one_check_off_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: ModeProbe) -> None:
        raise KeyError("simulated bug in the train-mode check")

    # inside the check that every batch calls (the probe's methods isolate their own failures)
    monkeypatch.setattr(ModeProbe, "_train_mode_tops", broken)

    def body(model: Regressor, x: torch.Tensor) -> torch.Tensor:
        model.head[0].train()
        with torch.enable_grad():
            return model(x)

    auditor = EvalModeAuditor()
    with nograd_warnings() as seen:
        trainer(tmp_path, [auditor]).fit(Regressor(body), loader(), loader())
    internal = [w for w in seen if "internal error" in str(w.message)]
    assert len(internal) == 1 and "train_mode" in str(internal[0].message)
    assert "grad_enabled" in {f.kind for f in auditor.report.findings}, "the other checks still run"


class SlashFreeLogger(CSVLogger):
    """A real logger with a naming policy of its own: it refuses metric names with a slash."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        refused = [k for k in metrics if "/" in k]
        if refused:
            raise ValueError(f"metric names may not contain '/': {refused}")
        super().log_metrics(metrics, step)


def test_a_logger_that_fails_is_skipped_and_the_others_still_get_the_metrics(tmp_path: Path) -> None:
    strict, csv = SlashFreeLogger(tmp_path, name="strict"), CSVLogger(tmp_path, name="csv")
    auditor = NoGradAuditor(verbose=False)
    model = Regressor(set_head_dropout_train)
    with nograd_warnings() as seen:
        trainer(tmp_path, [auditor], logger=[strict, csv], max_epochs=3).fit(model, loader(), loader())
    failed = [str(w.message) for w in seen if "log_metrics failed" in str(w.message)]
    assert len(failed) == 1 and "SlashFreeLogger" in failed[0] and "metric names may not contain" in failed[0]
    assert any("`head.0` (Dropout)" in str(w.message) for w in seen), "the findings are still reported"
    assert not auditor._switched_off and not any(p._switched_off for p in auditor._parts)
    assert csv_values(tmp_path / "csv", "nograd/val/violations") == [1.0, 1.0, 1.0]
    assert csv_values(tmp_path / "csv", "nograd/train/no_grad_modules") == [0.0, 0.0, 0.0]
    # the strict logger still got Lightning's own metrics, and none of ours
    assert len(csv_values(tmp_path / "strict", "val_loss")) == 3
    assert not csv_values(tmp_path / "strict", "nograd/val/violations")


def test_warnings_point_at_the_users_call_not_at_library_code(tmp_path: Path) -> None:
    auditor = NoGradAuditor(verbose=False)
    with nograd_warnings() as seen:
        trainer(tmp_path, [auditor]).fit(Regressor(set_head_dropout_train), loader(), loader())  # this line
    assert seen
    line = next(i for i, text in enumerate(Path(__file__).read_text().splitlines(), 1) if text.endswith("# this line"))
    assert {(w.filename, w.lineno) for w in seen} == {(__file__, line)}


def test_logger_false_and_no_validation_step(tmp_path: Path) -> None:
    class NoValidation(Regressor):
        validation_step = None  # type: ignore[assignment]

    with nograd_warnings() as seen:
        trainer(tmp_path, [NoGradAuditor(verbose=False)], logger=False).fit(NoValidation(), loader())
    assert seen == []


ARGUMENT_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=50),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.text(max_size=4), max_size=3),
    st.sampled_from(["warn", "fix", "error", "(", "[a-", "head", ""]),
)

CONSTRUCTORS = {
    NoGradAuditor: [
        "on_violation",
        "verbose",
        "audit_eval",
        "monitor_savings",
        "guard_backprop",
        "allow_train_mode",
        "allow_grad",
        "allow",
        "budget",
        "report_path",
    ],
    EvalModeAuditor: ["on_violation", "allow_train_mode", "allow_grad"],
    BackpropGuard: ["on_violation", "allow", "zero_grad_steps"],
    SavingsMonitor: ["measure_batches", "repeats", "budget", "min_repeats", "max_repeats"],
}


@settings(max_examples=150, deadline=None)
@given(
    cls=st.sampled_from(list(CONSTRUCTORS)),
    data=st.data(),
)
def test_any_argument_gives_a_working_callback_or_a_clear_error(cls: type, data: st.DataObject) -> None:
    names = CONSTRUCTORS[cls]
    chosen = data.draw(st.lists(st.sampled_from(names), unique=True, max_size=3))
    kwargs = {name: data.draw(ARGUMENT_VALUES) for name in chosen}
    try:
        callback = cls(**kwargs)
    except (TypeError, ValueError) as err:
        assert any(f"`{name}`" in str(err) for name in ["budget", *names]), (kwargs, err)
        assert "but got" in str(err) or "Expected" in str(err)
        return
    assert isinstance(callback, pl.Callback)
    assert isinstance(callback.state_key, str)


def test_unpicklable_batch_and_odd_outputs_do_not_break(tmp_path: Path) -> None:
    class OddOutputs(Regressor):
        def validation_step(self, batch: Any, batch_idx: int) -> Any:
            x, y, handle = batch
            loss = torch.nn.functional.mse_loss(self(x), y)
            self.log("val_loss", loss)
            return {"nested": [object(), {"t": torch.ones(2)}], "text": "x", "handle": handle}

    def with_a_lambda(items: list[Any]) -> tuple[Any, ...]:
        return (*default_collate(items), lambda: None)  # a batch no pickle can copy

    val = DataLoader(loader().dataset, batch_size=8, collate_fn=with_a_lambda)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps(next(iter(val)))
    with nograd_warnings() as seen:
        trainer(tmp_path, [NoGradAuditor(verbose=False)]).fit(OddOutputs(), loader(), val)
    assert not [w for w in seen if issubclass(w.category, NoGradWarning)]


@pytest.mark.parametrize("separate_parts", [False, True], ids=["NoGradAuditor", "three-parts"])
def test_callbacks_pickle_and_deep_copy_after_every_stage(tmp_path: Path, separate_parts: bool) -> None:
    callbacks: list[Any] = (
        [SavingsMonitor(), EvalModeAuditor(), BackpropGuard()] if separate_parts else [NoGradAuditor(verbose=False)]
    )
    t = trainer(tmp_path, callbacks, max_epochs=1)
    model = Regressor()
    with nograd_warnings():
        for stage in ("fit", "validate", "test"):
            if stage == "fit":
                t.fit(model, loader(), loader())
            else:
                getattr(t, stage)(model, loader())
            copies = copy.deepcopy(t.callbacks)
            assert [type(c) for c in copies] == [type(c) for c in t.callbacks]
            pickle.loads(pickle.dumps(callbacks))
            torch.save(t, io.BytesIO())  # the whole trainer, as progress bars and checkpoint tools do


def _raise(*args: Any, **kwargs: Any) -> None:
    raise KeyError("simulated bug inside a hook that runs in the user's forward")


@pytest.mark.parametrize(
    ("target", "method", "check"),
    [
        (ModeProbe, "_pre_forward", "train_mode"),
        (GradModeProbe, "_pre_forward", "no_grad_module"),
        (StepRecorder, "_pre", "replay"),
        (StepRecorder, "_post", "replay"),
        (StepRecorder, "_record_function_unsafe", "replay"),
        (GraphProbe, "_record", "grad_enabled"),
    ],
    ids=lambda v: v if isinstance(v, str) else v.__name__,
)
def test_a_failing_hook_inside_the_users_forward_never_reaches_the_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: type, method: str, check: str
) -> None:
    monkeypatch.setattr(target, method, _raise)
    if target is GradModeProbe:  # its hook is installed for one step once parameters lacked gradients
        model: pl.LightningModule = Net("no_grad")
        callbacks: list[Any] = [BackpropGuard()]
    elif target is ModeProbe:  # its hook watches modules already in train mode when a batch starts
        model = DropoutOnAtEpochStart()
        callbacks = [EvalModeAuditor()]
    else:
        model = Regressor(grad_enabled_body)
        callbacks = [EvalModeAuditor(), SavingsMonitor(repeats=2, budget=1000.0)]
    with nograd_warnings() as seen:
        trainer(tmp_path, callbacks, limit_val_batches=3).fit(model, loader(), loader())
    internal = [str(w.message) for w in seen if "internal error" in str(w.message)]
    assert len(internal) == 1 and f"`{check}`" in internal[0], internal


def _each_training_check_step() -> list[tuple[type, str, str]]:
    from lightning_nograd.callbacks.training_findings import TrainingFindings
    from lightning_nograd.core.checks.eval_mode_at_start import EvalModeAtStart
    from lightning_nograd.core.checks.eval_mode_leaks import EvalModeLeaks
    from lightning_nograd.core.checks.missing_gradients import MissingGradients
    from lightning_nograd.core.checks.stray_graphs import StrayGraphWatch
    from lightning_nograd.core.checks.unstepped_gradients import UnsteppedGradients

    return [
        (TrainingFindings, "inference_tensors", "inference_tensor"),
        (EvalModeAtStart, "start", "eval_mode_at_start"),
        (UnsteppedGradients, "start", "grad_without_step"),
        (EvalModeLeaks, "read", "eval_mode_leak"),
        (StrayGraphWatch, "open", "stray_graph"),
        (MissingGradients, "step", "params_without_grad"),
        (MissingGradients, "epoch_end", "params_without_grad"),
        (TrainingFindings, "gaps", "params_without_grad no_grad_module"),  # both checks report gaps
    ]


@pytest.mark.parametrize(
    ("target", "method", "check"),
    _each_training_check_step(),
    ids=lambda v: v if isinstance(v, str) else v.__name__,
)
def test_a_failing_training_check_is_switched_off_alone_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: type, method: str, check: str
) -> None:
    monkeypatch.setattr(target, method, _raise)
    model = Net("no_grad")
    t = trainer(tmp_path, [BackpropGuard()])
    with nograd_warnings() as seen:
        t.fit(model, loader(), loader())
    assert t.state.finished and t.current_epoch == 2
    internal = [str(w.message) for w in seen if "internal error" in str(w.message)]
    # one warning for each check that failed, naming it
    assert sorted(m.split("`")[1] for m in internal) == sorted(check.split()), internal
    assert all(m.startswith("[lightning-nograd] internal error in BackpropGuard check") for m in internal)
    if "params_without_grad" not in check:  # the other checks still watch: the encoder run under no_grad is named
        assert ("no_grad_module", "encoder") in {(f.kind, f.subject) for f in t.callbacks[0].report.findings}


class DropoutOnAtEpochStart(Regressor):
    def on_validation_epoch_start(self) -> None:
        self.head[0].train()


def grad_enabled_body(model: Regressor, x: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        return model(x)


@pytest.mark.parametrize("where", ["_pre", "_post", "replay"])
def test_audit_never_raises_an_internal_failure_into_the_users_loop(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    from lightning_nograd import audit
    from lightning_nograd.core.savings.replay import Replay
    from lightning_nograd.plain_pytorch import _EvaluationAudit

    if where == "replay":
        monkeypatch.setattr(Replay, "measure_memory", _raise)
    else:
        monkeypatch.setattr(_EvaluationAudit, where, _raise)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)).eval()
    with nograd_warnings() as seen, audit(net, repeats=2) as report, torch.no_grad():
        for _ in range(3):
            net(torch.randn(4, 8))
    internal = [str(w.message) for w in seen if "internal error" in str(w.message)]
    assert len(internal) == 1, internal
    assert report.epochs, "the report is still filled"


NAMESPACE_SCRIPTS = {
    "import-alone": """
import sys
import lightning_nograd
assert not {"lightning", "lightning.pytorch", "pytorch_lightning"} & set(sys.modules), sorted(sys.modules)
""",
    "lightning-user": """
import sys
import lightning.pytorch as pl
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning_nograd import NoGradAuditor
pl.Trainer(callbacks=[NoGradAuditor(verbose=False)], max_epochs=1, limit_train_batches=2, limit_val_batches=2,
           logger=False, enable_progress_bar=False, enable_checkpointing=False).fit(BoringModel())
assert "pytorch_lightning" not in sys.modules, "Lightning's loggers and warning classes would be re-pointed"
""",
    "pytorch-lightning-user-imported-after": """
from lightning_nograd import NoGradAuditor  # isort puts it before pytorch_lightning
import pytorch_lightning as pl
from pytorch_lightning.demos.boring_classes import BoringModel
auditor = NoGradAuditor(verbose=False)
pl.Trainer(callbacks=[auditor], max_epochs=1, limit_train_batches=2, limit_val_batches=2,
           logger=False, enable_progress_bar=False, enable_checkpointing=False).fit(BoringModel())
assert [e.stage for e in auditor.report.epochs].count("train") == 1
import sys
assert "lightning.pytorch" not in sys.modules, "only the user's namespace is loaded"
""",
    "both-namespaces-in-one-process": """
import pickle, sys
import lightning.pytorch
from lightning_nograd import NoGradAuditor, SavingsMonitor
from lightning_nograd.callbacks._base import NoGradCallback
import pytorch_lightning  # after lightning_nograd: the built callback suits it too, no class is changed
bases_before = {cls: cls.__bases__ for cls in (NoGradAuditor, SavingsMonitor, NoGradCallback)}
auditor = NoGradAuditor(verbose=False)
assert isinstance(auditor, (lightning.pytorch.Callback, pytorch_lightning.Callback, NoGradAuditor))
assert isinstance(auditor, lightning.pytorch.Callback) and isinstance(auditor, pytorch_lightning.Callback)
assert type(auditor).__name__ == type(auditor).__qualname__ == "NoGradAuditor"
assert type(NoGradAuditor(verbose=False)) is type(auditor), "made once per class and namespace"
import inspect
assert inspect.signature(type(auditor)) == inspect.signature(NoGradAuditor)
assert not issubclass(NoGradAuditor, pytorch_lightning.Callback)
assert {cls: cls.__bases__ for cls in bases_before} == bases_before
copy = pickle.loads(pickle.dumps(auditor))  # as ddp_spawn sends it
assert type(copy) is type(auditor) and copy.state_key.startswith("NoGradAuditor")
for pl in (lightning.pytorch, pytorch_lightning):
    from importlib import import_module
    boring = import_module(pl.__name__ + ".demos.boring_classes").BoringModel
    auditor = NoGradAuditor(verbose=False)
    pl.Trainer(callbacks=[auditor], max_epochs=1, limit_train_batches=2, limit_val_batches=2,
               logger=False, enable_progress_bar=False, enable_checkpointing=False).fit(boring())
    assert [e.stage for e in auditor.report.epochs].count("train") == 1, pl.__name__
""",
}


@pytest.mark.parametrize("case", list(NAMESPACE_SCRIPTS))
def test_importing_loads_no_lightning_namespace_and_both_namespaces_work(case: str) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", NAMESPACE_SCRIPTS[case]], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_readmes_architecture_map_matches_the_package() -> None:
    import ast
    import re

    root = Path(__file__).resolve().parents[1]
    readme = (root / "docs" / "architecture.md").read_text()
    block = readme.split("# Architecture", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"([\w]+\.py)", block))
    package = root / "lightning_nograd"
    files = {p.name for p in package.rglob("*.py")}
    # every module is on the map (package __init__ and __main__ aside), and the map names no other
    assert files - named - {"__init__.py", "__main__.py"} == set()
    assert named <= files, named - files
    # the classes and functions the map names exist where it says
    for line in block.splitlines():
        module = re.search(r"([\w]+)\.py", line)
        if module is None or "/" in line:
            continue
        path = next(package.rglob(f"{module.group(1)}.py"))
        defined = {
            n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.ClassDef, ast.FunctionDef))
        }
        for name in re.findall(r"\b([A-Z][A-Za-z]+|[a-z_]+_finding|audit(?=\(\))|check_training_step)\b", line):
            if name != "Lightning":
                assert name in defined, (path.name, name)
    # "never Lightning": no core module imports it
    for path in (package / "core").rglob("*.py"):
        imported = {
            (n.module or "") if isinstance(n, ast.ImportFrom) else a.name
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in (n.names if isinstance(n, ast.Import) else [n])
        }
        assert not {m for m in imported if m.split(".")[0] in ("lightning", "pytorch_lightning")}, path.name


def test_the_declared_floors_are_the_versions_ci_tests() -> None:
    """pyproject's floors, the docs' matrix and the versions .ci/run installs are the same."""
    import re
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    floors = dict(re.fullmatch(r"([\w-]+)>=([\d.]+)", d).groups() for d in project["dependencies"])  # type: ignore[union-attr]
    ci = (root / ".ci" / "run").read_text()
    readme = (root / "docs" / "install.md").read_text()
    python_floor = project["requires-python"].removeprefix(">=")
    assert f'"$(pyenv_python {python_floor})" -m venv "$tmp/floor"' in ci
    assert f'install_torch "$floor" torch=={floors["torch"]}.0' in ci
    ci_floors = dict(re.findall(r'"([\w-]+)==([\d.]+)"', ci.split("floors=(", 1)[1].split(")", 1)[0]))
    assert ci_floors == {
        "lightning": f"{floors['lightning']}.0",
        "pytorch_lightning": f"{floors['lightning']}.0",
        "torchmetrics": f"{floors['torchmetrics']}.0",
        "psutil": f"{floors['psutil']}.0",
    }
    row = f"| {python_floor} | {floors['torch']}.0 (floor) | {floors['lightning']}.0 (floor) | "
    assert row + f"{floors['torchmetrics']}.0 (floor) | {floors['psutil']}.0 (floor) |" in readme
    assert f"Programming Language :: Python :: {python_floor}" in project["classifiers"]
    assert '"$(pyenv_python 3.13)" -m venv "$tmp/newest"' in ci and "| 3.13 | newest that pip resolves" in readme


def test_the_top_level_holds_only_what_the_layout_names() -> None:
    import subprocess

    root = Path(__file__).resolve().parents[1]
    listed = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
    if listed.returncode != 0:  # an sdist's test tree: no git
        pytest.skip("not a git checkout")
    top = {line.split("/", 1)[0] for line in listed.stdout.splitlines() if line}
    layout = {"pyproject.toml", "lightning_nograd", "tests", "examples", "benchmarks", "docs", "mkdocs.yml"}
    layout |= {"CHANGELOG.md", "README.md", "LICENSE", "MANIFEST.in", ".ci", ".gitignore"}
    assert top <= layout, top - layout
