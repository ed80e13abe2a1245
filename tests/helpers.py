"""Small real models and loggers read back from disk, shared by the tests."""

from __future__ import annotations

import csv
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_nograd import NoGradWarning


def loader(n: int = 32, features: int = 8, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, features, generator=g), torch.randn(n, 1, generator=g)), batch_size)


class Regressor(pl.LightningModule):
    """An MLP with dropout and batch norm; ``validation_body`` lets a test plant one bug."""

    def __init__(self, validation_body: Callable[[Regressor, torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, 1))
        self.validation_body = validation_body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def _eval_step(self, batch: Any) -> torch.Tensor:
        x, y = batch
        out = self.validation_body(self, x) if self.validation_body is not None else self(x)
        return nn.functional.mse_loss(out, y)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._eval_step(batch)
        self.log("val_loss", loss)
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._eval_step(batch)
        self.log("test_loss", loss)
        return loss

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        return self.validation_body(self, x) if self.validation_body is not None else self(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def trainer(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        default_root_dir=tmp_path,
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=2,
        limit_test_batches=2,
        limit_predict_batches=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


@contextmanager
def nograd_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record every lightning-nograd warning raised inside the block."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        found: list[warnings.WarningMessage] = []
        yield found
    found.extend(w for w in seen if issubclass(w.category, NoGradWarning))


def read_csv_metrics(log_dir: Path) -> list[dict[str, str]]:
    """Rows of every ``metrics.csv`` under ``log_dir``."""
    rows: list[dict[str, str]] = []
    for path in sorted(log_dir.rglob("metrics.csv")):
        with path.open() as handle:
            rows.extend(csv.DictReader(handle))
    return rows


def csv_values(log_dir: Path, key: str) -> list[float]:
    return [float(row[key]) for row in read_csv_metrics(log_dir) if row.get(key) not in (None, "")]


def read_tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``log_dir``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for event_file in sorted(log_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return scalars


def set_head_dropout_train(model: Regressor, x: torch.Tensor) -> torch.Tensor:
    model.head[0].train()
    return model(x)


def forward_with_grad(model: Regressor, x: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        return model(x)


def fit_logged_to_wandb_offline(tmp_path: Path, monkeypatch: Any, model: pl.LightningModule) -> None:
    """Two epochs of ``model`` with ``NoGradAuditor(verbose=False)``, logged by Lightning's ``WandbLogger``
    in offline mode under ``tmp_path`` (the run finished, so its files are complete)."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from lightning_nograd import NoGradAuditor

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), project="nograd-test", offline=True)
    with nograd_warnings():
        trainer(tmp_path, [NoGradAuditor(verbose=False)], logger=logger, max_epochs=2).fit(model, loader(), loader())
    wandb.finish()


def read_wandb_offline(root: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """History rows and the final summary of the W&B offline run under ``root``, read from its
    ``.wandb`` transaction log with W&B's own reader (``wandb leet inspect --json``)."""
    import json
    import subprocess
    import sys

    (run_file,) = sorted(root.rglob("offline-run-*/run-*.wandb"))
    wandb_cli = Path(sys.executable).with_name("wandb")
    lines = subprocess.run(
        [str(wandb_cli), "leet", "inspect", "--json", str(run_file)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for line in lines:
        record = json.loads(line)
        if record.get("type") == "history":
            history.append(record["history"]["item"])
        elif record.get("type") == "summary":
            summary.update(record["summary"]["update"])
    return history, summary


def read_tensorboard_text(log_dir: Path, tag: str) -> list[str]:
    """Text entries of ``tag`` in the TensorBoard event files under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    texts: list[str] = []
    for event_file in sorted(log_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(event_file), size_guidance={"tensors": 0})
        accumulator.Reload()
        if f"{tag}/text_summary" in accumulator.Tags().get("tensors", []):
            for event in accumulator.Tensors(f"{tag}/text_summary"):
                texts.extend(v.decode() for v in event.tensor_proto.string_val)
    return texts
