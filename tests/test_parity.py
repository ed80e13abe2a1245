"""One table of seeded bugs through every front end: Lightning's Trainer, the Hugging Face Trainer, Lightning
Fabric and the plain-PyTorch API find the same kinds, on the same subjects, with the same fixes, and measure
the same graph memory."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric import Fabric
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_nograd import NoGradAuditor, NoGradWarning, audit, check_training_step
from lightning_nograd.core.reporting.report import Report
from lightning_nograd.integrations.fabric import NoGradFabricCallback

# the findings about the model; what a loop does with the step's outputs (Lightning and Fabric hand them to a
# hook, the Hugging Face Trainer detaches them, `audit()` sees the model's) differs by framework
MODEL_KINDS = {"train_mode", "grad_enabled", "no_grad_module", "param_without_grad"}


class Net(pl.LightningModule):
    """The model every front end runs: a LightningModule is also a plain ``nn.Module``."""

    def __init__(self, bug: str = "none") -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU())
        self.block2 = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(64, 2)
        self.bug = bug

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.block1(x)
        if self.bug == "train-mode" and not self.training:
            self.block2[2].train()  # a dropout switched on while evaluating
        region: Any = contextlib.nullcontext()
        if self.bug == "grad-enabled" and not self.training:
            region = torch.enable_grad()
        elif self.bug == "no-grad-branch" and self.training:
            region = torch.no_grad()
        with region:
            h = self.block2(h)
        logits = self.head(h)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(**batch)["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(**batch)["loss"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Samples(Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 16, generator=g)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def loaders() -> tuple[DataLoader, DataLoader]:  # type: ignore[type-arg]
    return DataLoader(Samples(96, 0), batch_size=32), DataLoader(Samples(96, 1), batch_size=32)


def with_lightning(model: Net, tmp_path: Path) -> Report:
    callback = NoGradAuditor(verbose=False)
    train, val = loaders()
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_epochs=1, callbacks=[callback], enable_progress_bar=False,
        enable_checkpointing=False, logger=False, num_sanity_val_steps=0, inference_mode=False,
    )  # fmt: skip
    trainer.fit(model, train, val)
    return callback.report


def with_huggingface(model: Net, tmp_path: Path) -> Report:
    pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    from lightning_nograd.integrations.huggingface import NoGradTrainerCallback

    fields = transformers.TrainingArguments.__dataclass_fields__
    strategy = "eval_strategy" if "eval_strategy" in fields else "evaluation_strategy"
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=32, per_device_eval_batch_size=32,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, learning_rate=0.1, **{strategy: "epoch"},
    )  # fmt: skip
    callback = NoGradTrainerCallback(verbose=False)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Samples(96, 0), eval_dataset=Samples(96, 1), callbacks=[callback]
    )
    trainer.train()
    return callback.report


def with_fabric(model: Net, tmp_path: Path) -> Report:
    callback = NoGradFabricCallback(verbose=False)
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[callback])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped, optimizer = fabric.setup(model, optimizer)
    train, val = loaders()
    # (no keyword arguments: Fabric before 2.5 hands them to the LightningModule's own hooks too)
    fabric.call("on_train_start")
    fabric.call("on_train_epoch_start")
    wrapped.train()
    for batch_idx, batch in enumerate(train):  # (Fabric calls the LightningModule's hooks too: Lightning's arguments)
        fabric.call("on_train_batch_start", batch, batch_idx)
        loss = wrapped(**batch)["loss"]
        fabric.backward(loss)
        fabric.call("on_before_optimizer_step", optimizer)
        optimizer.step()
        optimizer.zero_grad()
        fabric.call("on_train_batch_end", loss, batch, batch_idx)
    fabric.call("on_train_epoch_end")
    wrapped.eval()
    fabric.call("on_validation_start")
    with torch.no_grad():
        for batch_idx, batch in enumerate(val):
            fabric.call("on_validation_batch_start", batch, batch_idx)
            fabric.call("on_validation_batch_end", wrapped(**batch)["loss"], batch, batch_idx)
    fabric.call("on_validation_end")
    fabric.call("on_train_end")
    return callback.report


def with_plain_pytorch(model: Net, tmp_path: Path) -> Report:
    train, val = loaders()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    training = check_training_step(model, next(iter(train)), lambda m, b: m(**b)["loss"], optimizer)
    model.eval()
    with audit(model) as report, torch.no_grad():
        for batch in val:
            model(**batch)
    for finding in training.findings:
        report.add_finding(finding)
    return report


FRONT_ENDS: dict[str, Callable[[Net, Path], Report]] = {
    "lightning": with_lightning,
    "huggingface": with_huggingface,
    "fabric": with_fabric,
    "plain-pytorch": with_plain_pytorch,
}


def run(front_end: str, bug: str, tmp_path: Path) -> Report:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoGradWarning)
        return FRONT_ENDS[front_end](Net(bug), tmp_path / front_end)


@pytest.mark.parametrize(
    ("bug", "expected"),
    [
        ("none", []),
        ("train-mode", [("train_mode", "block2.2")]),
        ("grad-enabled", [("grad_enabled", "block2")]),
        ("no-grad-branch", [("no_grad_module", "block2")]),
    ],
)
def test_every_front_end_finds_the_same_bug_the_same_way(
    tmp_path: Path, bug: str, expected: list[tuple[str, str]]
) -> None:
    found = {}
    for front_end in FRONT_ENDS:
        report = run(front_end, bug, tmp_path)
        found[front_end] = [(f.kind, f.subject, f.fix) for f in report.findings if f.kind in MODEL_KINDS]
    assert [(kind, subject) for kind, subject, _ in found["lightning"]] == expected
    for front_end, findings in found.items():
        assert findings == found["lightning"], front_end  # the same kinds, subjects and fix texts


def test_every_front_end_measures_the_same_graph_memory(tmp_path: Path) -> None:
    measured = {}
    for front_end in FRONT_ENDS:
        report = run(front_end, "none", tmp_path)
        measured[front_end] = next(e for e in report.epochs if e.stage == "val").metrics["nograd/val/graph_memory_mib"]
    assert measured["lightning"] > 0
    for front_end, mib in measured.items():
        assert mib == pytest.approx(measured["lightning"], rel=0.01), (front_end, measured)
