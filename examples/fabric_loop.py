"""A Lightning Fabric loop in the shape of Fabric's docs, watched by NoGradFabricCallback.

    python examples/fabric_loop.py [--root-dir DIR] [--bug {none,train-mode,grad-enabled,no-grad-branch}]

With ``--bug none`` (the default) the loop is correct and the report says so. Each other ``--bug``
plants one mistake that a hand-written loop makes:

* ``train-mode``: the validation loop forgets ``model.eval()`` (dropout and batch norm stay active);
* ``grad-enabled``: the validation loop forgets ``torch.no_grad()``;
* ``no-grad-branch``: the training step runs the encoder's second block under ``torch.no_grad()``.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_nograd.integrations.fabric import NoGradFabricCallback

BUGS = ("none", "train-mode", "grad-enabled", "no-grad-branch")


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU())
        self.block2 = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(64, 2)
        self.cut_block2 = False  # the `no-grad-branch` bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block1(x)
        with torch.no_grad() if self.cut_block2 and torch.is_grad_enabled() else contextlib.nullcontext():
            h = self.block2(h)
        return self.head(h)


def loaders(seed: int = 0) -> tuple[DataLoader, DataLoader]:  # type: ignore[type-arg]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 16, generator=g)
    y = (x[:, 0] > 0).long()
    train = DataLoader(TensorDataset(x[:192], y[:192]), batch_size=32, shuffle=True, generator=g)
    val = DataLoader(TensorDataset(x[192:], y[192:]), batch_size=32)
    return train, val


def main(
    root_dir: str = "fabric_logs", bug: str = "none", epochs: int = 3, callback: NoGradFabricCallback | None = None
) -> tuple[NoGradFabricCallback | None, nn.Module]:
    """Train and validate with Fabric, watched by ``callback`` (``None``: not watched); returns it (its ``report``
    holds what it found) and the trained model."""
    if bug not in BUGS:
        raise ValueError(f"Expected argument `bug` to be one of {BUGS}, but got {bug!r}.")
    callbacks = [callback] if callback is not None else []
    fabric = Fabric(accelerator="cpu", devices=1, loggers=CSVLogger(root_dir), callbacks=callbacks)
    fabric.seed_everything(0)
    model = Classifier()
    model.cut_block2 = bug == "no-grad-branch"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = fabric.setup(model, optimizer)  # the callback learns the model and the loggers here
    train_loader, val_loader = fabric.setup_dataloaders(*loaders())

    fabric.call("on_train_start", optimizers=optimizer)
    for _ in range(epochs):
        fabric.call("on_train_epoch_start")
        model.train()
        for x, y in train_loader:
            fabric.call("on_train_batch_start", (x, y))
            loss = nn.functional.cross_entropy(model(x), y)
            fabric.backward(loss)
            fabric.call("on_before_optimizer_step", optimizer)
            optimizer.step()
            optimizer.zero_grad()
            fabric.call("on_train_batch_end", loss, (x, y))
        fabric.call("on_train_epoch_end")

        if bug != "train-mode":
            model.eval()
        fabric.call("on_validation_start", batches=len(val_loader))
        with torch.no_grad() if bug != "grad-enabled" else contextlib.nullcontext():
            for x, y in val_loader:
                fabric.call("on_validation_batch_start", (x, y))
                val_loss = nn.functional.cross_entropy(model(x), y)
                fabric.call("on_validation_batch_end", val_loss, (x, y))
        fabric.call("on_validation_end")
        fabric.log_dict({"val_loss": val_loss.item()})
    fabric.call("on_train_end")
    fabric.logger.finalize("success")  # the CSV logger writes its file here
    return callback, model


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root-dir", default="fabric_logs")
    parser.add_argument("--bug", default="none", choices=BUGS)
    parser.add_argument("--epochs", type=int, default=3)
    options = parser.parse_args()
    main(options.root_dir, options.bug, options.epochs, NoGradFabricCallback())
