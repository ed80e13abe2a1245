"""How the callbacks' cost grows with the model: own time per batch from 50 to 50,000 modules.

    python -m benchmarks.scaling [--quick | --analyses-only] [--out benchmarks/results]

A model of N small parallel experts (``nn.Linear(8, 1)`` each, the module count of a mixture of
experts; 8-dim inputs, batch 8) is fitted for two epochs (17 training batches, 17 validation
batches each) with ``NoGradAuditor``, each of whose hooks is timed (``perf_counter`` around the
call). Reported per N, from the second epoch (the first pays once per fit: it learns how gradients
are zeroed, and Python 3.11 specialises a function's bytecode only after its first 8 calls): the
callback's own time per steady-state batch (the batches after the first of each loop, which reads
the whole model once), summing that batch's hooks: for training the mean over the 16 steady
batches (one of which checks a window of gradients, as one step in ``GRADIENT_EVERY`` does, and
one ends the stretch the epoch's first step opened for the stray-graph probe), for validation the
median (the batches that record and replay for the savings measurement are a budgeted
measurement, counted in the last column instead). Then the
same for an empty ``Callback`` in a run of its own: between a forward and the next hook the CPU
caches hold the model, so even an empty hook (and the clock around it) costs a microsecond or
more, growing with the model. Also the share of the batch, and the most module/parameter visits
of the checks in one such batch (``lightning_nograd.core.plumbing.counters.visits``). Twice: with the savings
replays off (``monitor_savings=False``) and at the defaults. Then the one-time analyses on the
largest model (indexing, grouping and explaining parameters without gradients, inference-tensor
and eval-mode scans, allow-list matching, the check of which modules are frozen that each epoch
start runs), each timed once; the frozen-module check also on a model of as many modules as one
``nn.Sequential`` of ``Linear`` and ``ReLU`` layers, where each activation's parent is the whole
stack. ``--analyses-only`` re-runs only these and keeps the fits of the last full run.

Each configuration is fitted ``--repeats`` times (2; interleaved with the others), and each
loop's figures come from the fit whose own time was least: on a shared machine, other work only
ever adds to a measured time, and single fits were seen to differ by a third.

Writes ``scaling.json``, ``scaling.png`` and ``SCALING.md`` under ``--out`` and the docs' Benchmarks page
scaling section (between ``<!-- scaling:start -->`` and ``<!-- scaling:end -->``).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_nograd import NoGradAuditor
from lightning_nograd.core.checks.eval_mode_at_start import eval_mode_under_trainable
from lightning_nograd.core.checks.eval_mode_leaks import EvalModeLeaks
from lightning_nograd.core.checks.gradient_gaps import explain_gradient_gaps
from lightning_nograd.core.checks.inference_tensors import inference_tensors
from lightning_nograd.core.plumbing.counters import GRADIENT_EVERY, visits
from lightning_nograd.core.plumbing.model_index import ParamIndex
from lightning_nograd.core.plumbing.module_paths import NamePatterns, named_modules

SIZES = (50, 500, 5_000, 50_000)
QUICK_SIZES = (50, 500)
TRAIN_BATCHES = VAL_BATCHES = GRADIENT_EVERY + 1  # the first batch, then one period of gradient windows
EPOCHS = 2  # figures from the last: the first pays once-per-fit work
TRAIN_HOOKS = ("on_train_batch_start", "on_before_zero_grad", "on_before_backward", "on_after_backward",
               "on_before_optimizer_step", "on_train_batch_end")  # fmt: skip
VAL_HOOKS = ("on_validation_batch_start", "on_validation_batch_end")
README = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
START, END = "<!-- scaling:start -->", "<!-- scaling:end -->"


class Experts(pl.LightningModule):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(8, 1) for _ in range(n))
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(x)
        return torch.cat([e(h) for e in self.experts], dim=1).mean(1, keepdim=True)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.mse_loss(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", nn.functional.mse_loss(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _BatchClock(pl.Callback):
    """Wall time of each batch (from its start hook to its end hook) and visits per batch."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {"train": [], "val": []}
        self.visits: dict[str, list[int]] = {"train": [], "val": []}
        self._t0 = 0.0
        self._v0 = 0

    def _start(self) -> None:
        self._t0, self._v0 = time.perf_counter(), visits.total()

    def _end(self, stage: str) -> None:
        self.times[stage].append(time.perf_counter() - self._t0)
        self.visits[stage].append(visits.total() - self._v0)

    def on_train_batch_start(self, *args: Any) -> None:
        self._start()

    def on_train_batch_end(self, *args: Any) -> None:
        self._end("train")

    def on_validation_batch_start(self, *args: Any) -> None:
        self._start()

    def on_validation_batch_end(self, *args: Any) -> None:
        self._end("val")


class _HookClock:
    """Times hooks of ``callback`` (instance attributes wrap what the instance would call)."""

    def __init__(self, callback: pl.Callback, hooks: tuple[str, ...]) -> None:
        self.callback = callback
        self.durations: dict[str, list[float]] = {}
        self.wrap(hooks)

    def wrap(self, hooks: tuple[str, ...]) -> None:
        for hook in hooks:
            into = self.durations.setdefault(hook, [])
            setattr(self.callback, hook, self._timed(getattr(self.callback, hook), into))

    @staticmethod
    def _timed(method: Any, into: list[float]) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                into.append(time.perf_counter() - start)

        return timed

    def per_batch(self, hooks: tuple[str, ...], batches: int) -> list[float]:
        """Per batch, the summed time of ``hooks`` (seconds)."""
        per_batch = [0.0] * batches
        for hook in hooks:
            durations = self.durations[hook]
            calls = max(1, len(durations) // batches)
            for i, d in enumerate(durations[: batches * calls]):
                per_batch[i // calls] += d
        return per_batch

    def total(self) -> float:
        return sum(sum(d) for d in self.durations.values())


ALL_HOOKS = tuple(name for name in dir(pl.Callback) if name.startswith("on_") or name in ("setup", "teardown"))


def measure(n: int, replays: bool | None, root: Path) -> dict[str, Any]:
    """One fit of ``Experts(n)`` with the auditor (``replays``: its savings replays on) or, for
    ``replays=None``, with an empty callback in its place."""
    torch.manual_seed(0)
    model = Experts(n)
    data = TensorDataset(torch.randn(8 * TRAIN_BATCHES, 8), torch.randn(8 * TRAIN_BATCHES, 1))
    clock = _BatchClock()
    # the batch clock goes first: a batch's time then includes every hook of the auditor
    auditor = pl.Callback() if replays is None else NoGradAuditor(monitor_savings=replays, verbose=False)
    hooks = _HookClock(auditor, ALL_HOOKS)
    trainer = pl.Trainer(default_root_dir=root, max_epochs=EPOCHS, limit_train_batches=TRAIN_BATCHES,
                         limit_val_batches=VAL_BATCHES, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[clock, auditor])  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    fit_s = time.perf_counter() - start
    row: dict[str, Any] = {"modules": len(list(model.modules())), "experts": n, "replays": replays, "fit_s": fit_s}
    for stage, stage_hooks, batches in (("train", TRAIN_HOOKS, TRAIN_BATCHES), ("val", VAL_HOOKS, VAL_BATCHES)):
        # steady state: after the first batch; training the mean (a gradient window every GRADIENT_EVERY
        # steps included), validation the median (a batch that replays is a budgeted measurement)
        average = statistics.mean if stage == "train" else statistics.median
        # the last epoch's batches after its first
        own = average(hooks.per_batch(stage_hooks, EPOCHS * batches)[-batches + 1 :])
        batch = statistics.median(clock.times[stage][-batches + 1 :])
        row[f"{stage}_own_us"] = own * 1e6
        row[f"{stage}_batch_ms"] = batch * 1e3
        row[f"{stage}_own_pct"] = 100 * own / batch
        row[f"{stage}_visits"] = max(clock.visits[stage][-batches + 1 :])
    row["fit_own_pct"] = 100 * hooks.total() / fit_s
    return row


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from fits of the same configuration: per loop, the fit whose own time was least (the time a
    shared machine's other work adds only ever adds), and the most visits any fit saw."""
    best = dict(min(runs, key=lambda r: r["fit_own_pct"]))
    for stage in ("train", "val"):
        fastest = min(runs, key=lambda r: r[f"{stage}_own_us"])
        for key in ("own_us", "batch_ms", "own_pct"):
            best[f"{stage}_{key}"] = fastest[f"{stage}_{key}"]
        best[f"{stage}_visits"] = max(r[f"{stage}_visits"] for r in runs)
    best["fits"] = len(runs)
    return best


def one_time_analyses(n: int) -> dict[str, Any]:
    """Each one-time analysis on the largest model, timed once (seconds), every parameter without a gradient."""
    model = Experts(n)
    params = list(model.parameters())
    timings: dict[str, Any] = {"experts": n, "parameters": len(params), "modules": len(list(model.modules()))}

    def timed(name: str, fn: Any) -> Any:
        start = time.perf_counter()
        result = fn()
        timings[name] = time.perf_counter() - start
        return result

    index = timed("index parameters (ParamIndex)", lambda: ParamIndex(model))
    timed("group parameters without a gradient", lambda: index.group(params))
    timed("explain parameters without a gradient", lambda: explain_gradient_gaps(index, params, None))
    timed("inference-tensor scan", lambda: inference_tensors(model))
    model.eval()
    timed("eval-mode-at-start scan", lambda: eval_mode_under_trainable(model))
    patterns = NamePatterns("allow", [r"experts\.1\d*", r"drop"])
    timed("allow-list matching, every module path", lambda: [patterns.matches(p) for p, _ in named_modules(model)])
    model.train()
    timed("frozen-module check, each epoch start", lambda: _note_train_mode(model))
    # the shape where asking each module's parent for its parameters would be quadratic: every activation
    # sits directly under the whole stack (n modules here too)
    stack = nn.Sequential(*[m for _ in range(n // 2) for m in (nn.Linear(8, 8), nn.ReLU())])
    timed(f"the same, {n:,} modules as one nn.Sequential of Linear and ReLU", lambda: _note_train_mode(stack))
    return timings


def _note_train_mode(model: nn.Module) -> None:
    leaks = EvalModeLeaks(lambda path: False)
    leaks.start(model)
    try:
        leaks.note_train_mode(dict(named_modules(model)), None, "on_train_epoch_start")
    finally:
        leaks.close()


def table(rows: list[dict[str, Any]], analyses: dict[str, Any]) -> list[str]:
    lines = ["| modules | savings replays | train: own µs/batch | an empty callback's | share of batch "
             "| most visits/batch | val: own µs/batch | an empty callback's | share of batch | most visits/batch "
             "| whole fit: own share, one-time work included |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    empty = {r["modules"]: r for r in rows if r["replays"] is None}
    for r in rows:
        if r["replays"] is None:
            continue
        e = empty[r["modules"]]
        lines.append(
            f"| {r['modules']:,} | {'on' if r['replays'] else 'off'} | {r['train_own_us']:.0f} | "
            f"{e['train_own_us']:.0f} | {r['train_own_pct']:.2f}% | {r['train_visits']} | {r['val_own_us']:.0f} | "
            f"{e['val_own_us']:.0f} | {r['val_own_pct']:.2f}% | {r['val_visits']} | {r['fit_own_pct']:.1f}% |"
        )
    lines += ["", f"One-time analyses at {analyses['modules']:,} modules / {analyses['parameters']:,} parameters "
              "(every parameter without a gradient), seconds:", "", "| analysis | s |", "| --- | --- |"]  # fmt: skip
    lines += [f"| {k} | {v:.3f} |" for k, v in analyses.items() if isinstance(v, float)]
    return lines


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for replays in (False, True):
        picked = [r for r in rows if r["replays"] is replays]
        xs = [r["modules"] for r in picked]
        for stage, marker in (("train", "o"), ("val", "s")):
            label = f"{stage}, replays {'on' if replays else 'off'}"
            ax.plot(xs, [r[f"{stage}_own_us"] for r in picked], marker=marker, label=label,
                    linestyle="-" if replays else "--")  # fmt: skip
    for stage, marker in (("train", "o"), ("val", "s")):
        picked = [r for r in rows if r["replays"] is None]
        ax.plot([r["modules"] for r in picked], [r[f"{stage}_own_us"] for r in picked], marker=marker,
                color="grey", linestyle=":", label=f"{stage}, an empty callback")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("modules in the model")
    ax.set_ylabel("callback's own time per steady-state batch, µs")
    ax.set_title("NoGradAuditor's per-batch cost against model size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two small sizes (CI's smoke run)")
    parser.add_argument("--repeats", type=int, default=2, help="fits per configuration; the best of them is kept")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--analyses-only", action="store_true",
                        help="re-run only the one-time analyses; the fits stay those of the last full run")  # fmt: skip
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    sizes = QUICK_SIZES if args.quick else SIZES
    start = time.perf_counter()
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
    machine += f"lightning {pl.__version__}"
    note = ""  # how this run differs from a full one
    if args.analyses_only:
        last = json.loads((out / "scaling.json").read_text())
        rows, header = last["rows"], last["header"]
        note = (" One-time analyses re-run alone (`--analyses-only`, in a fresh process: a first pass over"
                " a model costs more there than after the fits).")  # fmt: skip
    else:
        rows = []
        repeats = 1 if args.quick else max(1, args.repeats)
        with tempfile.TemporaryDirectory() as tmp:
            for n in sizes:
                runs: dict[bool | None, list[dict[str, Any]]] = {None: [], False: [], True: []}
                for _ in range(repeats):  # interleaved, so that a busy spell of the machine hits every configuration
                    for replays in runs:
                        runs[replays].append(measure(n, replays, Path(tmp)))
                        print(json.dumps(runs[replays][-1]), flush=True)
                rows.extend(best_of(same) for same in runs.values())
        minutes = (time.perf_counter() - start) / 60
        header = f"Machine: CPU ({machine}). Best of {repeats} fits per row. Took {minutes:.1f} min."
    analyses = one_time_analyses(max(row["experts"] for row in rows))
    lines = [header + note, "", *table(rows, analyses)]
    saved = {"rows": rows, "analyses": analyses, "machine": machine, "header": header}
    (out / "scaling.json").write_text(json.dumps(saved, indent=1))
    (out / "SCALING.md").write_text("# Scaling\n\n" + "\n".join(lines) + "\n")
    plot(rows, out)
    print("\n".join(lines))
    if not args.quick and START in README.read_text():
        before, rest = README.read_text().split(START, 1)
        _, after = rest.split(END, 1)
        try:
            shown = out.resolve().relative_to(README.parents[1]).as_posix()
        except ValueError:
            shown = out.as_posix()
        body = "\n".join([*lines, "", f"Plot: `{shown}/scaling.png` in the source tree."])
        README.write_text(before + START + "\n" + body + "\n" + END + after)


if __name__ == "__main__":
    main()
