"""NoGradTrainerCallback on real Hugging Face ``Trainer`` runs of tiny models built from configs."""

from __future__ import annotations

import contextlib
import copy
import gc
import warnings
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

from lightning_nograd import NoGradWarning
from lightning_nograd.core.checks.graph import SAVED_TENSOR_HOOKS
from lightning_nograd.core.plumbing.counters import ModeSwitches
from tests.helpers import read_tensorboard_scalars

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

from lightning_nograd.integrations.huggingface import NoGradTrainerCallback  # noqa: E402


class Tokens(Dataset):  # type: ignore[type-arg]
    """Random token ids; a class label (``lm=False``) or the ids themselves as causal-LM labels."""

    def __init__(self, n: int, lm: bool = False, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 100, (n, 16), generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g)
        self.lm = lm

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i] if self.lm else self.y[i]}


def bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def lora_llama(**lora: Any) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1, **lora))


def arguments(tmp_path: Path, **kwargs: Any) -> TrainingArguments:
    settings: dict[str, Any] = {
        "output_dir": str(tmp_path / "out"),
        "num_train_epochs": 2,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "logging_steps": 2,
    }
    settings.update(kwargs)
    if "logging_dir" in TrainingArguments.__dataclass_fields__:  # transformers 4 (5: TENSORBOARD_LOGGING_DIR)
        settings["logging_dir"] = str(tmp_path / "tb")
    strategy = "eval_strategy" if "eval_strategy" in TrainingArguments.__dataclass_fields__ else "evaluation_strategy"
    settings[strategy] = "epoch"
    return TrainingArguments(**settings)


def fit(
    tmp_path: Path,
    model: torch.nn.Module,
    trainer_class: type[Trainer] = Trainer,
    callback: NoGradTrainerCallback | None = None,
    lm: bool = False,
    **kwargs: Any,
) -> tuple[Trainer, NoGradTrainerCallback | None]:
    callbacks = [callback] if callback is not None else []
    trainer = trainer_class(
        model=model,
        args=arguments(tmp_path, **kwargs),
        train_dataset=Tokens(32, lm),
        eval_dataset=Tokens(16, lm, seed=1),
        callbacks=callbacks,
    )
    trainer.train()
    return trainer, callback


def test_arguments_are_checked_at_construction() -> None:
    with pytest.raises(ValueError, match="on_violation"):
        NoGradTrainerCallback(on_violation="ignore")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="verbose"):
        NoGradTrainerCallback(verbose="yes")  # type: ignore[arg-type]


def test_a_clean_classifier_is_silent_and_its_savings_reach_tensorboard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoGradWarning)
        trainer, callback = fit(tmp_path, bert(), callback=NoGradTrainerCallback(), report_to=["tensorboard"])
    assert callback is not None
    assert callback.report.findings == []
    epochs = [e for e in callback.report.epochs if e.stage == "val"]
    assert len(epochs) == 2
    assert epochs[0].metrics["nograd/val/graph_memory_mib"] > 0
    # the Trainer's own log and every `report_to` integration: TensorBoard shows them beside eval/loss
    history = [row for row in trainer.state.log_history if "eval_nograd/graph_memory_mib" in row]
    assert [row["step"] for row in history] == [row["step"] for row in trainer.state.log_history if "eval_loss" in row]
    scalars = read_tensorboard_scalars(tmp_path / "tb")  # (the folder `arguments` names, on transformers 4 and 5)
    assert [v for _, v in scalars["eval/nograd/graph_memory_mib"]] == pytest.approx(
        [e.metrics["nograd/val/graph_memory_mib"] for e in epochs]
    )
    assert "eval/nograd/violations" in scalars and "eval/loss" in scalars
    assert [v for _, v in scalars["train/nograd/params_without_grad"]] == [0.0, 0.0]
    assert "No findings" in capsys.readouterr().out


TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
REENTRANT = pytest.param(
    {"use_reentrant": True},
    marks=pytest.mark.skipif(
        not TRANSFORMERS_5, reason="transformers 4 leaves the checkpoints' inputs without grad: the run crashes"
    ),
)


@pytest.mark.parametrize("checkpointing", [None, {"use_reentrant": False}, REENTRANT])
def test_lora_with_and_without_gradient_checkpointing_is_silent(tmp_path: Path, checkpointing: Any) -> None:
    # (the Trainer makes the inputs of reentrant checkpoints require grad where it can: then nothing is wrong)
    extra: dict[str, Any] = {}
    if checkpointing is not None:
        extra = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": checkpointing}
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoGradWarning)
        _, callback = fit(tmp_path, lora_llama(), callback=NoGradTrainerCallback(verbose=False), lm=True, **extra)
    assert callback is not None and callback.report.findings == []


class NoGradBackbone(Trainer):
    """A ``compute_loss`` override that runs the encoder under ``no_grad``."""

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, **kwargs: Any) -> Any:
        with torch.no_grad():
            pooled = model.bert(inputs["input_ids"]).pooler_output
        logits = model.classifier(pooled)
        loss = torch.nn.functional.cross_entropy(logits, inputs["labels"])
        return (loss, {"logits": logits}) if return_outputs else loss


class GradInPrediction(Trainer):
    """A ``prediction_step`` override that forgets ``no_grad``."""

    def prediction_step(self, model: Any, inputs: Any, prediction_loss_only: bool, ignore_keys: Any = None) -> Any:
        out = model(**inputs)
        return out.loss.detach(), out.logits.detach(), inputs["labels"]


def reentrant_without_input_grads() -> torch.nn.Module:
    """LoRA in checkpointed layers whose inputs never require grad: transformers #26221 (``modules_to_save``
    keeps a trainable head, so the loss has a gradient and nothing crashes)."""
    model = lora_llama(modules_to_save=["lm_head"])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with contextlib.suppress(AttributeError):  # transformers 5 made the inputs require grad: undone
        model.disable_input_require_grads()
    return model


@pytest.mark.parametrize(
    ("make", "trainer_class", "lm", "kind", "subject", "hook", "fix"),
    [
        (bert, NoGradBackbone, False, "no_grad_module", "bert", "compute_loss", "remove the `torch.no_grad()`"),
        (bert, GradInPrediction, False, "grad_enabled", "", "prediction_step", "under `torch.no_grad()`"),
        (
            reentrant_without_input_grads,
            Trainer,
            True,
            "param_without_grad",
            "base_model.model.model.layers",
            "compute_loss",
            "model.enable_input_require_grads()",
        ),
    ],
    ids=["compute_loss-under-no_grad", "prediction_step-without-no_grad", "lora-reentrant-checkpoints"],
)
def test_seeded_bugs_are_found_and_named(
    tmp_path: Path, make: Any, trainer_class: type[Trainer], lm: bool, kind: str, subject: str, hook: str, fix: str
) -> None:
    with pytest.warns(NoGradWarning, match="lightning-nograd"):
        _, callback = fit(
            tmp_path, make(), trainer_class, NoGradTrainerCallback(verbose=False), lm=lm, num_train_epochs=1
        )
    assert callback is not None
    assert [(f.kind, f.subject, f.hook) for f in callback.report.findings] == [(kind, subject, hook)]
    assert fix in callback.report.findings[0].fix


class OwnTrainingStep(Trainer):
    """A ``training_step`` of the user's that never calls ``compute_loss``; ``forgets_train`` leaves out the
    ``model.train()`` the stock one starts with, so every epoch after an evaluation trains in eval mode."""

    forgets_train = False

    def training_step(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.forgets_train:
            model.train()
        out = model(**self._prepare_inputs(inputs))
        self.accelerator.backward(out.loss)
        return out.loss.detach()


class ForgetsTrainMode(OwnTrainingStep):
    forgets_train = True


def test_a_training_step_of_the_users_is_watched_from_the_models_forward(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoGradWarning)
        _, callback = fit(tmp_path / "own", bert(), OwnTrainingStep, NoGradTrainerCallback(verbose=False))
    assert callback is not None and callback.report.findings == []
    with pytest.warns(NoGradWarning, match="is in eval mode during training"):
        _, callback = fit(tmp_path / "forgets", bert(), ForgetsTrainMode, NoGradTrainerCallback(verbose=False))
    assert callback is not None
    assert [(f.kind, f.subject, f.stage) for f in callback.report.findings] == [("eval_mode_leak", "", "train")]
    assert "call `.train()` again" in callback.report.findings[0].fix


def test_the_reentrant_checkpoint_fix_names_both_ways_out(tmp_path: Path) -> None:
    with pytest.warns(NoGradWarning):
        _, callback = fit(tmp_path, reentrant_without_input_grads(), callback=NoGradTrainerCallback(verbose=False),
                          lm=True, num_train_epochs=1)  # fmt: skip
    assert callback is not None
    (finding,) = callback.report.findings
    assert "reentrant activation checkpoints" in finding.problem
    assert "use_reentrant" in finding.fix and "8 trainable parameter(s)" in finding.problem


def test_weights_and_losses_are_the_same_with_and_without_it(tmp_path: Path) -> None:
    model = bert()
    twin = copy.deepcopy(model)
    plain, _ = fit(tmp_path / "plain", model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoGradWarning)
        watched, _ = fit(tmp_path / "watched", twin, callback=NoGradTrainerCallback(verbose=False, repeats=3))
    for (name, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    losses = [[row["loss"] for row in t.state.log_history if "loss" in row] for t in (plain, watched)]
    assert losses[0] == losses[1] and losses[0]


def test_nothing_of_ours_keeps_the_trainer_alive_after_the_users_last_reference(tmp_path: Path) -> None:
    # a trainer left to the garbage collector keeps its DDP-wrapped model, and so the process group, until the
    # interpreter's exit, where gloo aborted a `torchrun` script that had finished
    gc.collect()
    gc.disable()
    try:
        trainer, callback = fit(tmp_path, bert(), callback=NoGradTrainerCallback(verbose=False), num_train_epochs=1)
        assert callback is not None and [e.stage for e in callback.report.epochs] == ["train", "val"]
        trainer.evaluate()
        freed = weakref.ref(trainer)
        del trainer
        assert freed() is None, "a reference cycle through the callback holds the trainer"
    finally:
        gc.enable()


def test_a_callback_added_after_construction_watches_evaluate(tmp_path: Path) -> None:
    trainer = GradInPrediction(model=bert(), args=arguments(tmp_path), eval_dataset=Tokens(16))
    callback = NoGradTrainerCallback(verbose=False)
    trainer.add_callback(callback)
    trainer.evaluate()  # the first event it hears comes after this loop: it is attached from the next one
    with pytest.warns(NoGradWarning, match="prediction_step"):
        trainer.evaluate()
    assert [f.kind for f in callback.report.findings] == ["grad_enabled"]
    assert [e.stage for e in callback.report.epochs] == ["val"]


def test_a_callback_added_after_construction_watches_train_from_its_start(tmp_path: Path) -> None:
    trainer = Trainer(model=bert(), args=arguments(tmp_path), train_dataset=Tokens(32), eval_dataset=Tokens(16))
    callback = NoGradTrainerCallback(verbose=False)
    trainer.add_callback(callback)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoGradWarning)
        trainer.train()
    assert [e.stage for e in callback.report.epochs] == ["train", "val", "train", "val"]


def test_predict_outside_training_is_audited_and_gets_its_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trainer = GradInPrediction(
        model=bert(), args=arguments(tmp_path), eval_dataset=Tokens(16), callbacks=[NoGradTrainerCallback()]
    )
    with pytest.warns(NoGradWarning, match="prediction_step"):
        trainer.predict(Tokens(16))
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, NoGradTrainerCallback))
    assert [(f.kind, f.stage, f.run) for f in callback.report.findings] == [("grad_enabled", "predict", "predict")]
    trainer.evaluate(Tokens(16))
    assert "lightning-nograd report" in capsys.readouterr().out


def test_importing_lightning_nograd_does_not_import_transformers() -> None:
    import subprocess
    import sys

    code = "import sys, lightning_nograd, lightning_nograd.integrations; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ddp_through_accelerate_brings_every_ranks_findings_to_rank_zero(tmp_path: Path) -> None:
    import json
    import os
    import signal
    import subprocess
    import sys

    script = Path(__file__).with_name("hf_ddp_run.py")
    env = dict(os.environ, PYTHONPATH=str(script.parents[2]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    with subprocess.Popen(
        [*command, str(script), str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    ) as process:  # fmt: skip
        try:
            _, stderr = process.communicate(timeout=300)  # a collective on one rank only would hang here
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            _, stderr = process.communicate()
    assert process.returncode == 0, stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # only rank 1 ran a dropout in train mode; rank 0 warned it once, naming rank 1, and rank 1 said nothing
    assert rank0["findings"] == rank1["findings"] == [["train_mode", "bert.embeddings.dropout", [1]]]
    assert len(rank0["warnings"]) == 1 and "on rank 1" in rank0["warnings"][0]
    assert rank1["warnings"] == []
    # the metrics of each evaluation, reduced over the ranks, at the evaluation's step
    assert [row["eval_nograd/violations"] for row in rank0["metrics"] if "eval_nograd/violations" in row] == [1.0, 1.0]


def test_the_savings_reach_wandb_beside_the_trainers_eval_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    from tests.helpers import read_wandb_offline

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "nograd-test")
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoGradWarning)
        _, callback = fit(tmp_path, bert(), callback=NoGradTrainerCallback(verbose=False), report_to=["wandb"])
    import wandb

    wandb.finish()
    assert callback is not None
    history, _ = read_wandb_offline(tmp_path)
    keys = {key for row in history for key in row}
    assert {"eval/nograd/graph_memory_mib", "eval/nograd/violations", "eval/loss"} <= keys, sorted(keys)


def test_an_internal_failure_is_one_warning_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_nograd.integrations._loop import LoopDriver

    def broken(self: LoopDriver, batch: Any = None) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(LoopDriver, "eval_batch_start", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(tmp_path, bert(), callback=NoGradTrainerCallback(verbose=False))
    said = [str(w.message) for w in caught if issubclass(w.category, NoGradWarning)]
    assert len(said) == 1 and "internal error in NoGradTrainerCallback: RuntimeError: boom" in said[0]
    assert [row["epoch"] for row in trainer.state.log_history if "eval_loss" in row] == [1.0, 2.0]
    # it let go: no hook of ours is left in the process
    assert not ModeSwitches.listening() and not SAVED_TENSOR_HOOKS.probes


@pytest.mark.parametrize("settings", [{"gradient_accumulation_steps": 2}, {"max_steps": 3}, {"eval_on_start": True}])
def test_accumulation_a_step_budget_and_an_evaluation_first_stay_silent(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    if "eval_on_start" in settings and "eval_on_start" not in TrainingArguments.__dataclass_fields__:
        pytest.skip("this transformers has no `eval_on_start`")
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoGradWarning)
        _, callback = fit(tmp_path, bert(), callback=NoGradTrainerCallback(verbose=False), **settings)
    assert callback is not None and callback.report.findings == []
    assert any(e.stage == "val" for e in callback.report.epochs)
