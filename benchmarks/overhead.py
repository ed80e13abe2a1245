"""What the lightning-nograd callbacks cost, measured side by side with plain runs.

Two experiments on the MLP, ResNet-style CNN and Transformer encoder of ``benchmarks.models``:

* ``validation``: one validation epoch (the ``no_grad`` context of validation inside ``fit``)
  with and without ``EvalModeAuditor``; the validation losses must be bit-identical, which also
  shows the fused Transformer path stayed on.
* ``training``: one training epoch from the same initial weights with and without
  ``BackpropGuard``; the final weights must be bit-identical.
* ``fit``: a whole one-epoch fit (training and validation) with and without ``NoGradAuditor()``
  at its defaults, savings replays included; the final weights must be bit-identical.

Each repetition runs both variants, alternating which goes first; the clock runs from the first
callback's start hook to the last callback's end hook, so trainer set-up is excluded. Reported:
the median and interquartile range of the paired time ratios, and the callback's own time inside
its hooks as a share of the epoch (in a clean run it installs no module hooks, so that is all
the time it adds; unlike the ratio it is not drowned in machine noise).

    python -m benchmarks.overhead [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning
import lightning.pytorch as pl
import torch

from benchmarks.models import MODELS
from benchmarks.timing import in_fresh_process, summarise, time_own_hooks
from lightning_nograd import BackpropGuard, EvalModeAuditor, NoGradAuditor


class Clock(pl.Callback):
    """Stamps the time at one hook (``start_hook`` or ``end_hook``)."""

    def __init__(self, hook: str, stamps: list[float]) -> None:
        setattr(self, hook, lambda *args: stamps.append(synchronized_clock()))


def synchronized_clock() -> float:
    """``time.perf_counter()`` once queued CUDA work is done (on a GPU the host runs ahead)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        torch.cuda.synchronize()
    return time.perf_counter()


def deterministic_on_cuda() -> None:
    """Deterministic CUDA kernels, so that "bit-identical" compares the callback, not atomics' order."""
    if torch.cuda.is_available():
        torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class Experiment:
    name: str
    callback: Callable[[], pl.Callback]
    start_hook: str
    end_hook: str
    trainer_args: dict[str, Any]

    def run(self, model: pl.LightningModule, data: Any, with_callback: bool) -> tuple[float, float, Any]:
        """Seconds of the epoch, seconds inside the callback's hooks, and the run's result."""
        stamps: list[float] = []
        middle = [self.callback()] if with_callback else []
        own = time_own_hooks(middle[0]) if middle else [0.0]
        trainer = pl.Trainer(
            callbacks=[Clock(self.start_hook, stamps), *middle, Clock(self.end_hook, stamps)],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            **self.trainer_args,
        )
        torch.manual_seed(0)
        if self.name == "validation":
            result: Any = trainer.validate(model, data, verbose=False)[0]["val_loss"]
        else:
            model = copy.deepcopy(model)
            trainer.fit(model, data, data if self.name == "fit" else None)
            result = torch.cat([p.detach().flatten() for p in model.parameters()])
        return stamps[1] - stamps[0], own[0], result


EXPERIMENTS = {
    "validation": Experiment(
        "validation", EvalModeAuditor, "on_validation_start", "on_validation_end", {"inference_mode": False}
    ),
    "training": Experiment(
        "training",
        BackpropGuard,
        "on_train_epoch_start",
        "on_train_epoch_end",
        {"max_epochs": 1, "limit_val_batches": 0},
    ),
    # the one line users write, at its defaults (savings replays included), over a whole fit
    "fit": Experiment(
        "fit",
        lambda: NoGradAuditor(verbose=False),
        "on_fit_start",
        "on_fit_end",
        {"max_epochs": 1, "num_sanity_val_steps": 0},
    ),
}


def measure(experiment: Experiment, model_name: str, repeats: int, batches: int) -> dict[str, Any]:
    factory, batch_size = MODELS[model_name]
    torch.manual_seed(0)
    model = factory()
    data = model.data(batches, batch_size)
    experiment.run(model, data, with_callback=False)  # warm-up: first forwards are slow on CPU
    times: dict[bool, list[float]] = {False: [], True: []}
    own_shares: list[float] = []
    results: dict[bool, list[Any]] = {False: [], True: []}
    for rep in range(repeats):
        for with_callback in (False, True) if rep % 2 == 0 else (True, False):
            seconds, own, result = experiment.run(model, data, with_callback)
            times[with_callback].append(seconds)
            results[with_callback].append(result)
            if with_callback:
                own_shares.append(own / seconds)
    identical = all(
        torch.equal(torch.as_tensor(a), torch.as_tensor(results[False][0])) for a in results[True] + results[False]
    )
    ratios = [a / b for a, b in zip(times[True], times[False], strict=True)]
    return {
        "experiment": experiment.name,
        "model": model_name,
        "batches": batches,
        "batch_size": batch_size,
        "repeats": repeats,
        "baseline_s_median": statistics.median(times[False]),
        "with_callback_s_median": statistics.median(times[True]),
        **summarise(ratios),
        "own_time_pct_median": 100 * statistics.median(own_shares),
        "bit_identical": identical,
    }


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| experiment | model | plain epoch (s) | with callback (s) | time ratio, median [IQR] "
        "| callback's own time | bit-identical |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['experiment']} | {r['model']} | {r['baseline_s_median']:.4f} | {r['with_callback_s_median']:.4f} "
            f"| {r['ratio_median']:.3f} [{r['ratio_q1']:.3f}, {r['ratio_q3']:.3f}] "
            f"| {r['own_time_pct_median']:.2f}% | {r['bit_identical']} |"
        )
    return lines


def environment() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    return (
        f"{device}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
        f"lightning {lightning.__version__}, Python {platform.python_version()}"
    )


def run_all(quick: bool) -> list[dict[str, Any]]:
    """Every experiment and model, each in a fresh process (in this one for a quick smoke run)."""
    if quick:
        return [measure(exp, name, 2, 4) for exp in EXPERIMENTS.values() for name in MODELS]
    return [
        in_fresh_process("benchmarks.overhead", "--experiment", exp, "--model", name)
        for exp in EXPERIMENTS
        for name in MODELS
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repeats, for CI")
    parser.add_argument("--experiment", choices=list(EXPERIMENTS), help="measure one experiment in this process")
    parser.add_argument("--model", choices=list(MODELS), help="measure one model in this process")
    parser.add_argument("--json", action="store_true", help="print the row(s) as JSON")
    args = parser.parse_args()
    deterministic_on_cuda()
    repeats, batches = (2, 4) if args.quick else (15, 30)
    if args.experiment == "fit" or torch.cuda.is_available():
        # whole fits are long, and a GPU check must fit its device time: fewer repeats keep the run short
        repeats = min(repeats, 7)
    if args.experiment and args.model:
        row = measure(EXPERIMENTS[args.experiment], args.model, repeats, batches)
        print(json.dumps(row) if args.json else "\n".join(table([row])))
        return
    rows = run_all(args.quick)
    print(json.dumps(rows) if args.json else "\n".join(table(rows)))


if __name__ == "__main__":
    main()
