"""The three benchmark models: a small MLP, a ResNet-style CNN and a Transformer encoder.

Defined here (no downloads); each is a LightningModule with synthetic data of a fixed shape.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class BenchModule(pl.LightningModule):
    """Wraps a network with a classification loss and synthetic data."""

    def __init__(self, net: nn.Module, input_shape: tuple[int, ...], classes: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.net = net
        self.input_shape = input_shape
        self.classes = classes
        self.input_dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def data(self, batches: int, batch_size: int, seed: int = 0) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        n = batches * batch_size
        if self.input_dtype == torch.long:
            x = torch.randint(0, 1000, (n, *self.input_shape), generator=g)
        else:
            x = torch.randn(n, *self.input_shape, generator=g)
        y = torch.randint(0, self.classes, (n,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def mlp() -> BenchModule:
    net = nn.Sequential(
        nn.Linear(256, 512), nn.ReLU(), nn.Dropout(0.1), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    return BenchModule(net, (256,), 10, torch.float32)


class Block(nn.Module):
    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        out = channels * stride
        self.conv1 = nn.Conv2d(channels, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.shortcut: nn.Module = (
            nn.Identity()
            if stride == 1
            else nn.Sequential(nn.Conv2d(channels, out, 1, stride, bias=False), nn.BatchNorm2d(out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def resnet() -> BenchModule:
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        Block(16, 1),
        Block(16, 2),
        Block(32, 1),
        Block(32, 2),
        Block(64, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    return BenchModule(net, (3, 32, 32), 10, torch.float32)


class Encoder(nn.Module):
    def __init__(self, vocab: int = 1000, d_model: int = 128, layers: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=4 * d_model, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


def transformer() -> BenchModule:
    return BenchModule(Encoder(), (64,), 10, torch.long)


MODELS = {"mlp": (mlp, 256), "resnet": (resnet, 64), "transformer": (transformer, 32)}
