"""Run by tests/test_distributed.py in a subprocess: a 2-process CPU DDP fit with NoGradAuditor.

Each rank writes the lightning-nograd warnings it emitted to ``warnings_rank{N}.json``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_nograd import BackpropGuard, NoGradAuditor, NoGradWarning, SavingsMonitor
from lightning_nograd.core.findings import FindingLog
from tests.helpers import loader, set_head_dropout_train
from tests.test_nograd_auditor import EveryBug


def break_metrics_on_rank_one() -> None:
    """Make every part's metric computation fail on rank 1 only, as an internal bug would."""
    if os.environ.get("LOCAL_RANK") != "1":
        return

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated bug on rank 1")

    FindingLog.epoch_count = broken  # type: ignore[method-assign]  # EvalModeAuditor's violations
    SavingsMonitor._epoch_metrics = broken  # type: ignore[method-assign,assignment]
    BackpropGuard._epoch_counts = broken  # type: ignore[method-assign,assignment]


def main(out: Path, strategy: str, scenario: str = "") -> None:
    if scenario == "metrics_fail_on_rank1":
        break_metrics_on_rank_one()
    pl.seed_everything(0)
    auditor = NoGradAuditor(verbose=False, budget=1000.0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        default_root_dir=out,
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=3,
        callbacks=[auditor],
        logger=CSVLogger(out, name="csv"),
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
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


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
