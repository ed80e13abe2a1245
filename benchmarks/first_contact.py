"""What ``NoGradAuditor()`` costs at its defaults, as Lightning's ``SimpleProfiler`` counts it.

Two runs of the benchmark Transformer encoder (``benchmarks.models``): a 6-epoch ``fit`` (64
training and 16 validation batches an epoch) and a 60-batch ``trainer.validate``. Reported: the
time the profiler records inside the callback's hooks (savings replays and one-time work
included) as a share of the run the profiler records, and whether the first validation epoch
already logged the time saved. Timings are reported, never asserted.

    python -m benchmarks.first_contact [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.profilers import SimpleProfiler

from benchmarks.models import transformer
from lightning_nograd import NoGradAuditor


def profiled(run: str) -> dict[str, Any]:
    """One run (``"fit"`` or ``"validate"``) with ``NoGradAuditor()`` and the profiler."""
    torch.manual_seed(0)
    model = transformer()
    profiler = SimpleProfiler()
    auditor = NoGradAuditor(verbose=False)
    trainer = pl.Trainer(
        callbacks=[auditor],
        profiler=profiler,
        max_epochs=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if run == "fit":
            trainer.fit(model, model.data(64, 32), model.data(16, 32, seed=1))
        else:
            trainer.validate(model, model.data(60, 32, seed=1), verbose=False)
    total = time.perf_counter() - profiler.start_time  # the profiler's own "Total" row
    durations = profiler.recorded_durations
    own = sum(sum(v) for k, v in durations.items() if "NoGradAuditor" in k)
    epochs = [e for e in auditor.report.epochs if e.stage == "val"]
    first = epochs[0].metrics if epochs else {}
    return {
        "run": run,
        "profiled_seconds": total,
        "callback_seconds": own,
        "callback_pct": 100 * own / total if total else None,
        "first_epoch_time_saved_pct": first.get("nograd/val/time_saved_pct"),
        "first_epoch_time_saved_pct_err": first.get("nograd/val/time_saved_pct_err"),
        "pairs": [e.details.get("repeats") for e in epochs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="write first_contact.json here")
    args = parser.parse_args()
    rows = [profiled("fit"), profiled("validate")]
    for row in rows:
        print(json.dumps(row))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "first_contact.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
