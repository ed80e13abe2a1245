"""Host-device synchronisations during a CUDA fit, and which of them lightning-nograd asked for.

A fit of a benchmark model runs under ``torch.cuda.set_sync_debug_mode("warn")``, once without
and once with ``NoGradAuditor()`` at its defaults. Every synchronising CUDA call warns; the Python
stack at that moment says who made it:

* ``per_batch``: one of our hooks that runs every batch or step (must be 0 after the first epoch);
* ``per_epoch``: one of our hooks that runs once per epoch or stage (the CUDA-synchronised epoch
  clock of ``nograd/{stage}/epoch_time_s``, which the contract promises);
* ``replay``: the budgeted savings replay, which must synchronise to time what it measures;
* ``not_ours``: Lightning, the model, the optimizer.

    python -m benchmarks.gpu_sync [--model resnet] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning_nograd
from lightning_nograd.callbacks.nograd_auditor import PER_BATCH_HOOKS as PER_BATCH_HOOKS_OF_THE_AUDITOR

PACKAGE = str(Path(lightning_nograd.__file__).resolve().parent)
# the hooks Lightning calls on every batch or step: the auditor's own list
PER_BATCH_HOOKS = frozenset(PER_BATCH_HOOKS_OF_THE_AUDITOR)


def origin(stack: list[traceback.FrameSummary]) -> str:
    """Who asked for a synchronisation, from the Python stack at that moment."""
    ours = [frame for frame in stack if str(Path(frame.filename).resolve()).startswith(PACKAGE)]
    if not ours:
        return "not_ours"
    if any(Path(frame.filename).name == "replay.py" for frame in ours):
        return "replay"
    if any(frame.name in PER_BATCH_HOOKS for frame in ours):
        return "per_batch"
    return "per_epoch"


@contextmanager
def recorded_syncs(epoch: Callable[[], int]) -> Iterator[list[tuple[int, str]]]:
    """Record ``(epoch(), origin)`` for every synchronising CUDA call made inside the block."""
    import torch

    events: list[tuple[int, str]] = []

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if "synchroniz" in str(message):
            events.append((epoch(), origin(traceback.extract_stack()[:-1])))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield events
        finally:
            torch.cuda.set_sync_debug_mode(0)


def count(model_name: str, epochs: int, with_callback: bool) -> dict[str, Any]:
    """Synchronisations of one fit, by origin, in the first epoch and in all later ones."""
    import lightning.pytorch as pl
    import torch

    from benchmarks.models import MODELS
    from lightning_nograd import NoGradAuditor

    factory, batch_size = MODELS[model_name]
    torch.manual_seed(0)
    model = factory()
    data = model.data(20, batch_size)
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        max_epochs=epochs,
        callbacks=[NoGradAuditor(verbose=False)] if with_callback else [],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with recorded_syncs(lambda: int(trainer.current_epoch)) as events:
        trainer.fit(model, data, data)
    first = Counter(o for e, o in events if e == 0)
    later = Counter(o for e, o in events if e > 0)
    return {
        "model": model_name,
        "callback": "NoGradAuditor()" if with_callback else "none",
        "epochs": epochs,
        "first_epoch": dict(first),
        "later_epochs": dict(later),
    }


def table(rows: list[dict[str, Any]]) -> list[str]:
    origins = ("per_batch", "per_epoch", "replay", "not_ours")
    lines = [
        "| model | callback | epochs | " + " | ".join(f"{o} (first / later epochs)" for o in origins) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in origins) + " |",
    ]
    for r in rows:
        cells = [f"{r['first_epoch'].get(o, 0)} / {r['later_epochs'].get(o, 0)}" for o in origins]
        lines.append(f"| {r['model']} | {r['callback']} | {r['epochs']} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = [count(args.model, args.epochs, with_callback) for with_callback in (False, True)]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
