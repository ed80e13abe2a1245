"""The one place that writes to ``trainer.loggers`` and reduces metrics across ranks."""

from __future__ import annotations

import logging
from typing import Any

import torch

from lightning_nograd.callbacks._lightning import Trainer, world_size

log = logging.getLogger(__name__)


class MetricSink:
    """Sends metrics to every logger of the trainer, optionally holding them to send in one call.

    ``NoGradAuditor`` holds metrics while its parts handle a hook, then sends them together, so
    each logger gets one row per step rather than one per part.
    """

    def __init__(self) -> None:
        self.holding = False
        self._held: dict[str, float] = {}
        self._held_step = 0
        self._held_trainer: Any = None

    def emit(self, trainer: Trainer, metrics: dict[str, float], step: int) -> None:
        """Log ``metrics`` at ``step`` to every logger (now, or at :meth:`flush` while holding)."""
        if not metrics:
            return
        if self.holding:
            if self._held and self._held_step != step:
                self.flush()
            self._held.update(metrics)
            self._held_step = step
            self._held_trainer = trainer
            return
        _write(trainer, metrics, step)

    def flush(self) -> None:
        """Send held metrics."""
        held, self._held = self._held, {}
        trainer, self._held_trainer = self._held_trainer, None
        if held and trainer is not None:
            _write(trainer, held, self._held_step)


def _write(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


def reduce_max(trainer: Trainer, value: float) -> float:
    """The largest ``value`` over all ranks; a collective, so every rank must call it."""
    if world_size(trainer) <= 1:
        return value
    tensor = torch.tensor(float(value), device=trainer.strategy.root_device)
    reduced = trainer.strategy.reduce(tensor, reduce_op="max")
    return float(reduced.item())


def reduce_vector(trainer: Trainer, values: list[float], op: str) -> list[float]:
    """Element-wise ``op`` (``"sum"`` or ``"max"``) of ``values`` over all ranks; a collective."""
    if world_size(trainer) <= 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=trainer.strategy.root_device)
    reduced = trainer.strategy.reduce(tensor, reduce_op=op)
    return [float(v) for v in reduced.tolist()]
