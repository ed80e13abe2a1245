"""Quickstart: a small convolutional classifier on synthetic images, with ``NoGradAuditor()``.

20 epochs; the quickstart itself about 40 s on 2 CPU cores. Writes TensorBoard logs to
``./lightning_logs``.
``NoGradAuditor()`` is at its defaults. A batch of this model keeps about 12 MiB for backward when
gradients are on, so the memory figures show what running validation without gradients saves, and
the time figures come with them in the first validation epoch wherever the timing replays fit in
the budget (1.5% of the fit; on our 2-core machine they do).
The model has one planted bug (its dropout is switched to train mode during validation) so the
report has something to show; ``--clean`` runs it without the bug.

    python examples/quickstart.py [--clean] [--root-dir DIR]
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_nograd import NoGradAuditor


def synthetic_data(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=generator)
    y = (x[:, 0, 4:12, 4:12].mean(dim=(1, 2)) > 0).long()  # is the centre of the first channel bright?
    return TensorDataset(x, y)


class SyntheticData(pl.LightningDataModule):
    """Synthetic 16 x 16 RGB images in train / validation / test splits, generated on the fly."""

    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(synthetic_data(2048, seed=0), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(synthetic_data(512, seed=1), batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(synthetic_data(512, seed=2), batch_size=self.batch_size)


class Classifier(pl.LightningModule):
    def __init__(self, planted_bug: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(
            *(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Dropout(0.1)),
            *(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()),
            *(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()),
            *(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 2)),
        )
        self.planted_bug = planted_bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        if self.planted_bug:
            self.net[3].train()  # the bug: MC-dropout code copied from a notebook
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(dim=1) == y).float().mean())

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(dim=1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clean", action="store_true", help="run without the planted bug")
    parser.add_argument("--root-dir", default=".", help="where lightning_logs/ goes")
    args = parser.parse_args()

    pl.seed_everything(0)
    auditor = NoGradAuditor()
    trainer = pl.Trainer(
        default_root_dir=args.root_dir,
        max_epochs=20,
        callbacks=[auditor],
        logger=TensorBoardLogger(args.root_dir, name="lightning_logs"),
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    model = Classifier(planted_bug=not args.clean)
    trainer.fit(model, datamodule=SyntheticData())  # NoGradAuditor prints its report table when fit ends
    print(f"\nOpen the dashboard with:  tensorboard --logdir {trainer.logger.log_dir if trainer.logger else '.'}")


if __name__ == "__main__":
    main()
