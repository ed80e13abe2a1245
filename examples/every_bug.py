"""One model with every kind of bug lightning-nograd finds, and the report that names them.

    python examples/every_bug.py [--root-dir DIR]

Planted bugs:

* validation: dropout switched to train mode; part of the forward under ``torch.enable_grad()``;
  graph-attached outputs kept in ``self.validation_step_outputs`` and never cleared;
* training: the encoder's second block runs under ``torch.no_grad()``; an auxiliary head is
  never used; a normalisation layer gets gradients but the optimizer was built without it; the
  classifier head is put in eval mode in ``on_train_batch_end`` and left there; a stray forward with
  gradients on in ``on_train_epoch_end``; a cache filled under ``torch.inference_mode`` by
  ``trainer.validate`` before ``trainer.fit``.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_nograd import NoGradAuditor


class BuggyModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.block2 = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 2))
        self.aux_head = nn.Linear(32, 2)  # bug: never used in the loss
        self.norm = nn.LayerNorm(32)  # bug: trains in every backward, but the optimizer leaves it out
        self.validation_step_outputs: list[torch.Tensor] = []
        self.scale: torch.Tensor | None = None

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            self.scale = torch.full((32,), 0.5)  # bug: created under inference_mode by trainer.validate
        return x * self.scale

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = self.block1(x)
        with torch.no_grad():  # bug: block2 never learns
            h2 = self.block2(h)
        loss = nn.functional.cross_entropy(self.head(self.norm(h + h2)), y)
        self.log("train_loss", loss)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.head.eval()  # bug: eval mode leaks into training

    def on_train_epoch_end(self) -> None:
        self.head(self.block1(torch.randn(4, 16)))  # bug: a graph nobody uses

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.head[0].train()  # bug: MC-dropout code copied from a notebook
        with torch.enable_grad():  # bug: records a graph during validation
            h = self.scaled(self.block1(x))
        logits = self.head(h + self.block2(h))
        self.validation_step_outputs.append(logits)  # bug: keeps graphs, never cleared
        self.log("val_loss", nn.functional.cross_entropy(logits, y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for n, p in self.named_parameters() if not n.startswith("norm.")], lr=0.05)


def data(seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 16, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=32)


class BuggyData(pl.LightningDataModule):
    """The example's data as a datamodule, for `lightning-nograd audit`."""

    def train_dataloader(self) -> DataLoader:
        return data(0)

    def val_dataloader(self) -> DataLoader:
        return data(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root-dir", default=".")
    args = parser.parse_args()
    pl.seed_everything(0)
    model = BuggyModel()
    auditor = NoGradAuditor(report_path=f"{args.root_dir}/nograd_report.json")
    common: dict[str, Any] = dict(
        default_root_dir=args.root_dir,
        callbacks=[auditor],
        enable_progress_bar=False,
        enable_checkpointing=False,
        logger=False,
        limit_val_batches=4,
    )
    pl.Trainer(**common).validate(model, data(1))
    try:
        pl.Trainer(max_epochs=2, **common).fit(model, data(0), data(1))
    except RuntimeError as err:
        print(f"\nThe fit crashed, as the warning above said it would: {str(err).splitlines()[0]}\n")
    # apply the fix the warning gave, and go on to see the training findings
    with torch.inference_mode(False):
        model.scale = None
        model.validation_step_outputs = []
    pl.Trainer(max_epochs=2, **common).fit(model, data(0), data(1))
    print(f"\n{len(auditor.report.findings)} findings; kinds: {sorted({f.kind for f in auditor.report.findings})}")


if __name__ == "__main__":
    main()
