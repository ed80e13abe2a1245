"""Validation epoch time with and without EvalModeAuditor, measured side by side.

Each repetition runs one validation epoch per variant, alternating which goes first; the clock
runs from the first callback's ``on_validation_start`` to the last callback's
``on_validation_end``, so it includes all the auditor's work and none of the trainer set-up.
The validation losses of both variants are compared too: they must be bit-identical, which
also shows the fused Transformer path stayed on.

    python -m benchmarks.auditor_overhead [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import torch

from benchmarks.models import MODELS
from lightning_nograd import EvalModeAuditor


class Clock(pl.Callback):
    def __init__(self, start: bool, times: list[float]) -> None:
        self.start = start
        self.times = times

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.start:
            self.times.append(time.perf_counter())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.start:
            self.times.append(time.perf_counter())


def validation_time(model: pl.LightningModule, data: Any, audited: bool) -> tuple[float, float]:
    stamps: list[float] = []
    middle: list[pl.Callback] = [EvalModeAuditor()] if audited else []
    trainer = pl.Trainer(
        callbacks=[Clock(True, stamps), *middle, Clock(False, stamps)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        inference_mode=False,  # the no_grad context of validation inside fit
    )
    result = trainer.validate(model, data, verbose=False)
    return stamps[1] - stamps[0], float(result[0]["val_loss"])


def measure(name: str, repeats: int, batches: int) -> dict[str, Any]:
    factory, batch_size = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    data = model.data(batches, batch_size)
    validation_time(model, data, audited=False)  # warm-up: first forwards are slow on CPU
    times: dict[bool, list[float]] = {False: [], True: []}
    losses: dict[bool, set[float]] = {False: set(), True: set()}
    for rep in range(repeats):
        for audited in (False, True) if rep % 2 == 0 else (True, False):
            seconds, loss = validation_time(model, data, audited)
            times[audited].append(seconds)
            losses[audited].add(loss)
    ratios = [a / b for a, b in zip(times[True], times[False], strict=True)]
    return {
        "model": name,
        "batches": batches,
        "batch_size": batch_size,
        "repeats": repeats,
        "baseline_s_median": statistics.median(times[False]),
        "audited_s_median": statistics.median(times[True]),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "identical_losses": losses[True] == losses[False] and len(losses[False]) == 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repeats, for CI")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    repeats, batches = (3, 5) if args.quick else (11, 40)
    rows = [measure(name, repeats, batches) for name in MODELS]
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    versions = f"torch {torch.__version__}, lightning {lightning.__version__}, Python {platform.python_version()}"
    lines = [
        "# EvalModeAuditor overhead on validation epochs",
        "",
        f"Machine: {machine}; {versions}. Repeats: {repeats} interleaved, {batches} batches per epoch.",
        "",
        "| model | baseline epoch (s, median) | with auditor (s, median) | ratio median | ratio min-max "
        "| identical val loss |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['baseline_s_median']:.4f} | {r['audited_s_median']:.4f} | {r['ratio_median']:.3f} "
            f"| {r['ratio_min']:.3f}-{r['ratio_max']:.3f} | {r['identical_losses']} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (out / f"auditor_overhead{suffix}.md").write_text("\n".join(lines) + "\n")
    (out / f"auditor_overhead{suffix}.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
