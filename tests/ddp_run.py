"""Run by tests/test_distributed.py in a subprocess: a 2-process CPU DDP fit with NoGradAuditor.

Each rank writes the lightning-nograd warnings it emitted to ``warnings_rank{N}.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_nograd import NoGradAuditor, NoGradWarning, SavingsMonitor
from lightning_nograd.callbacks.training_findings import TrainingFindings
from lightning_nograd.core.reporting.findings import FindingLog
from tests.helpers import Regressor, loader, set_head_dropout_train
from tests.test_nograd_auditor import EveryBug


def break_metrics_on_rank_one() -> None:
    """Make every part's metric computation fail on rank 1 only, as an internal bug would."""
    if os.environ.get("LOCAL_RANK") != "1":
        return

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated bug on rank 1")

    FindingLog.epoch_count = broken  # type: ignore[method-assign]  # EvalModeAuditor's violations
    SavingsMonitor._epoch_metrics = broken  # type: ignore[method-assign,assignment]
    TrainingFindings.metrics = broken  # type: ignore[method-assign,assignment]


def grad_on_rank_one(model: Regressor, x: torch.Tensor) -> torch.Tensor:
    """A validation forward with gradients enabled on rank 1 only (e.g. a code path only one rank's data takes)."""
    with torch.enable_grad() if model.global_rank == 1 else contextlib.nullcontext():
        return model(x).detach()


class Spare(Regressor):
    """A regressor with a layer no step uses: plain DDP stops the run on it at the second step."""

    def __init__(self) -> None:
        super().__init__()
        self.spare = torch.nn.Linear(16, 1)


class Sharded(Regressor):
    """The regressor sharded with FSDP2's ``fully_shard`` (each layer, then the whole), with one bug of each
    kind: gradients on and dropout in train mode in validation, a layer under ``no_grad`` in training, a
    layer never used, a forward outside the training step, a block left in eval mode, an inference
    tensor kept from validation. Rank 1's own budget would not time the savings replay: rank zero decides
    for all."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen_by_mistake = torch.nn.Linear(16, 16)
        self.spare = torch.nn.Linear(16, 1)

    def configure_model(self) -> None:
        from lightning_nograd.core.savings.budget import ReplayBudget

        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch 2.4
            from torch.distributed._composable.fsdp import fully_shard
        for layer in (self.backbone[0], self.frozen_by_mistake, self.head[1]):
            fully_shard(layer)
        fully_shard(self)
        if self.global_rank == 1:
            ReplayBudget.allowed = lambda budget, *args: 0.0  # type: ignore[method-assign]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.backbone(x)
        with torch.no_grad():
            extra = self.frozen_by_mistake(h)
        return self.head(h + extra)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self(batch[0])  # a forward outside the training step, with gradients on: a graph no backward uses
        if batch_idx == 1:
            self.backbone.eval()  # left in eval mode for the rest of training (e.g. after computing a metric)

    def on_validation_epoch_end(self) -> None:
        with torch.inference_mode():
            self.cache = torch.ones(2)  # an inference tensor the training that follows would trip over

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.head[0].train()
        with torch.enable_grad():
            loss = self._eval_step(batch)
        self.log("val_loss", loss.detach())
        return loss.detach()


def two_process_trainer(out: Path, strategy: Any, auditor: NoGradAuditor, batches: int) -> pl.Trainer:
    """Two CPU processes, two epochs of ``batches`` training and validation batches, a CSV logger."""
    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        default_root_dir=out,
        max_epochs=2,
        limit_train_batches=batches,
        limit_val_batches=batches,
        callbacks=[auditor],
        logger=CSVLogger(out, name="csv"),
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )


def main(out: Path, strategy: str, scenario: str = "") -> None:
    if scenario == "metrics_fail_on_rank1":
        break_metrics_on_rank_one()
    if scenario in ("grad_on_rank1", "unused", "fsdp2"):
        run_scenario(out, strategy, scenario)
        return
    pl.seed_everything(0)
    auditor = NoGradAuditor(verbose=False, budget=1000.0)
    trainer = two_process_trainer(out, strategy, auditor, batches=3)
    model = EveryBug()
    model.validation_body = set_head_dropout_train
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.fit(model, loader(n=48), loader(n=48))
    messages = [str(w.message) for w in seen if issubclass(w.category, NoGradWarning)]
    rank = trainer.global_rank
    (out / f"warnings_rank{rank}.json").write_text(json.dumps(messages))
    (out / f"findings_rank{rank}.json").write_text(json.dumps(sorted({f.kind for f in auditor.report.findings})))
    switched = {type(p).__name__: sorted(p._switched_off) for p in auditor._parts}
    (out / f"switched_off_rank{rank}.json").write_text(json.dumps(switched))
    # Lightning leaves the process group up; PyTorch asks every process to destroy it before exit,
    # else gloo's worker threads are torn down with the interpreter and abort it now and then
    # ("terminate called without an active exception", pytorch/pytorch#190489).
    # Both ranks meet first: on torch 2.4 a rank destroying its gloo group after the other rank exited
    # could block for good.
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_scenario(out: Path, strategy: str, scenario: str) -> None:
    """A run whose report the test reads from disk: each rank's warnings and report, and, after the Trainer
    call returns in the launching process, that process's view of the callback."""
    pl.seed_everything(0)
    models = {"grad_on_rank1": Regressor, "unused": Spare, "fsdp2": Sharded}
    model = models.get(scenario, Regressor)()
    if scenario == "grad_on_rank1":
        model.validation_body = grad_on_rank_one
    if strategy == "model_parallel":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)  # type: ignore[assignment]
    auditor = NoGradAuditor(report_path=out / "report.json", budget=1000.0)  # rank 0's budget times the replays
    trainer = two_process_trainer(out, strategy, auditor, batches=4)
    failure = ""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            trainer.fit(model, loader(n=64), loader(n=64))
            if strategy == "ddp_spawn":
                trainer.validate(model, loader(n=64))  # a second Trainer call, in new workers
        except Exception as err:  # DDP's own error, for the test to read
            failure = f"{type(err).__name__}: {err}"
    messages = [str(w.message) for w in seen if issubclass(w.category, NoGradWarning)]
    rank = trainer.global_rank
    process = "main" if strategy == "ddp_spawn" else f"rank{rank}"  # spawn: only the launching process is here
    (out / f"{process}.json").write_text(
        json.dumps({"warnings": messages, "report": auditor.report.to_dict(), "failure": failure}, default=str)
    )
    if dist.is_initialized() and not failure:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
