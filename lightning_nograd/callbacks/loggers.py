"""The one place that writes to ``trainer.loggers`` and reduces metrics across ranks."""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from typing import Any

import torch

from lightning_nograd.callbacks._lightning import Trainer, is_global_zero, is_logger, world_size
from lightning_nograd.core.reporting.findings import user_stacklevel
from lightning_nograd.errors import NoGradWarning

log = logging.getLogger(__name__)


class MetricSink:
    """Sends metrics to every logger of the trainer, optionally holding them to send in one call.

    ``NoGradAuditor`` holds metrics while its parts handle a hook, then sends them together, so
    each logger gets one row per step rather than one per part.
    """

    def __init__(self, holding: bool = False) -> None:
        self.holding = holding
        self._held: dict[str, float] = {}
        self._held_step = 0
        self._held_trainer: Any = None
        self._failed: set[int] = set()

    def emit(self, trainer: Trainer, metrics: dict[str, float], step: int) -> None:
        """Log ``metrics`` at ``step`` to every logger (now, or at ``flush`` while holding)."""
        if not metrics:
            return
        if self.holding:
            if self._held and self._held_step != step:
                self.flush()
            self._held.update(metrics)
            self._held_step = step
            self._held_trainer = trainer
            return
        self._write(trainer, metrics, step)

    @property
    def held(self) -> bool:
        """Whether metrics wait for ``flush``."""
        return bool(self._held)

    def flush(self) -> None:
        """Send held metrics."""
        held, self._held = self._held, {}
        trainer, self._held_trainer = self._held_trainer, None
        if held and trainer is not None:
            self._write(trainer, held, self._held_step)

    def _write(self, trainer: Trainer, metrics: dict[str, float], step: int) -> None:
        """Log to each logger on its own: one that fails is warned about once and skipped after."""
        for logger in trainer.loggers:
            if id(logger) in self._failed:
                continue
            try:
                logger.log_metrics(metrics=dict(metrics), step=step)  # by keyword, as Lightning calls it
            except Exception as err:
                self._failed.add(id(logger))
                log.debug("log_metrics of %s failed", type(logger).__name__, exc_info=err)
                if is_global_zero(trainer):
                    warnings.warn(
                        f"[lightning-nograd] {type(logger).__name__}.log_metrics failed: {type(err).__name__}: {err}. "
                        "lightning-nograd sends it no more metrics in this run (the other loggers still get "
                        "them); the run goes on.",
                        NoGradWarning,
                        stacklevel=user_stacklevel(),
                    )


def reduce_present_max(trainer: Trainer, keys: list[str], metrics: dict[str, float]) -> dict[str, float]:
    """The largest value of each of ``keys`` over the ranks that have it; a collective.

    Every rank sends all ``keys`` in one reduction, a missing one as ``-inf``, so a rank whose
    check failed still takes part and the others do not wait for it.
    """
    values = reduce_vector(trainer, [metrics.get(k, -math.inf) for k in keys], "max")
    return {k: v for k, v in zip(keys, values, strict=True) if v != -math.inf}


def reduce_vector(trainer: Trainer, values: list[float], op: str) -> list[float]:
    """Element-wise ``op`` (``"sum"`` or ``"max"``) of ``values`` over all ranks; a collective."""
    if world_size(trainer) <= 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=trainer.strategy.root_device)
    reduced = trainer.strategy.reduce(tensor, reduce_op=op)
    return [float(v) for v in reduced.tolist()]


def gather_objects(trainer: Trainer, value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (plain data: lists, dicts, strings, numbers); a collective."""
    if world_size(trainer) <= 1:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def write_summaries(trainer: Trainer, summary: dict[str, Any], text: str) -> None:
    """Put the end-of-stage summary where each logger shows summaries.

    W&B: the run summary; TensorBoard: a text entry; MLflow: a JSON artifact and tags; CSV (and
    any other Lightning ``Logger`` with a ``log_dir`` path): ``nograd_summary.json`` next to its
    metrics. Only rank zero writes, as the loggers themselves do.
    """
    if not is_global_zero(trainer):
        return
    step = int(trainer.global_step)
    logger: Any
    for logger in trainer.loggers:
        kind = type(logger).__name__
        try:
            if is_logger(logger, "WandbLogger"):
                logger.experiment.summary.update({f"nograd_summary/{k}": v for k, v in summary.items()})
            elif is_logger(logger, "TensorBoardLogger"):
                logger.experiment.add_text("nograd/report", "```\n" + text + "\n```", global_step=step)
                logger.experiment.flush()
            elif is_logger(logger, "MLFlowLogger"):
                logger.experiment.log_dict(logger.run_id, summary, "nograd_summary.json")
                logger.experiment.set_tag(logger.run_id, "nograd.findings", str(summary.get("findings", 0)))
            else:
                log_dir = getattr(logger, "log_dir", None)
                # only a real logger's own folder: a test double answers any attribute with an object whose
                # text would become a folder in the working directory
                if log_dir and isinstance(log_dir, (str, os.PathLike)) and is_logger(logger, "Logger"):
                    from pathlib import Path

                    Path(log_dir).mkdir(parents=True, exist_ok=True)
                    (Path(log_dir) / "nograd_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        except Exception as err:  # a logger that refuses a summary must not break the run
            log.warning("could not write the lightning-nograd summary to %s: %s", kind, err)


def flat_summary(summaries: list[dict[str, Any]], findings: int) -> dict[str, Any]:
    """Flat key -> number form of stage summaries, as summary panels want it."""
    flat: dict[str, Any] = {"findings": findings}
    for s in summaries:
        # a `trainer.validate` run after `fit` gets keys of its own: `validate/val/...`
        prefix = f"validate/{s['stage']}" if s.get("run") == "validate" else s["stage"]
        for key, value in s.items():
            if key in ("stage", "run") or value is None:
                continue
            if isinstance(value, (int, float)):
                flat[f"{prefix}/{key}"] = value
            elif isinstance(value, dict):
                for inner, number in value.items():
                    flat[f"{prefix}/{inner}"] = number
    return flat
