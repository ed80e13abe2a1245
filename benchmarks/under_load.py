"""The quickstart's first-epoch time saved on an idle machine and with CPU-bound processes competing for it.

Each trial runs the quickstart's fit at its defaults (``NoGradAuditor()``, 20 epochs planned, so the
same budget decides the first validation epoch as in the real run) and stops after that epoch; it
reports ``time_saved_pct``, its 95% half-width and whether the saving was within noise. Trials
alternate idle and loaded (``--load`` busy processes started before the trial and stopped after it),
so both conditions see the same drift of the machine. Nothing is asserted: the figures are reported.

    python -m benchmarks.under_load [--trials 6] [--load 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from examples.quickstart import Classifier, SyntheticData
from lightning_nograd import NoGradAuditor


class _StopAfterFirstValidation(pl.Callback):
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            trainer.should_stop = True


def first_epoch() -> dict[str, Any]:
    """The quickstart's first validation epoch at the defaults: its time figures."""
    pl.seed_everything(0, verbose=False)
    auditor = NoGradAuditor(verbose=False)
    trainer = pl.Trainer(
        default_root_dir=tempfile.mkdtemp(),
        max_epochs=20,
        callbacks=[auditor, _StopAfterFirstValidation()],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Classifier(planted_bug=False), datamodule=SyntheticData())
    (epoch,) = [e for e in auditor.report.epochs if e.stage == "val"]
    return {
        "time_saved_pct": epoch.metrics.get("nograd/val/time_saved_pct"),
        "time_saved_pct_err": epoch.metrics.get("nograd/val/time_saved_pct_err"),
        "within_noise": epoch.details.get("within_noise"),
        "grad_on_ratio": epoch.details.get("grad_on_ratio"),
        "timed_blocks": epoch.details.get("timed_blocks"),
        "pairs": epoch.details.get("repeats"),
    }


def _spin() -> None:
    while True:
        pass


def trial(load: int) -> dict[str, Any]:
    busy = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(load)]
    for process in busy:
        process.start()
    try:
        row = first_epoch()
    finally:
        for process in busy:
            process.terminate()
            process.join()
    return {"load": load, "loadavg_1min": os.getloadavg()[0], **row}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6, help="trials per condition (default 6)")
    parser.add_argument("--load", type=int, default=2, help="busy processes in the loaded trials (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="write under_load.json here")
    args = parser.parse_args()
    rows = []
    for _ in range(args.trials):
        for load in (0, args.load):
            rows.append(trial(load))
            print(json.dumps(rows[-1]), flush=True)
    for load in (0, args.load):
        figures = [r for r in rows if r["load"] == load and r["time_saved_pct"] is not None]
        measured = [r["time_saved_pct"] for r in figures if not r["within_noise"]]
        print(
            f"load {load}: {len(figures)} of {args.trials} trials with a figure, {len(measured)} outside noise"
            + (f", median {statistics.median(measured):.1f}%" if measured else "")
        )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "under_load.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
