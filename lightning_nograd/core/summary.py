"""Per-stage summaries of a report, and their text rendering (rich when installed, plain otherwise).

Data first (:func:`summarise`), presentation second (:func:`render`), as a report's readers need
one or the other: dashboards the numbers, people the table.
"""

from __future__ import annotations

import io
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_nograd.core.findings import STAGE_WORDS
from lightning_nograd.core.report import Report


@dataclass
class StageSummary:
    """One stage's epochs boiled down: the numbers the end-of-stage table shows."""

    stage: str
    epochs: int
    run: str | None = None
    mean_epoch_time_s: float | None = None
    peak_memory_mib: float | None = None
    graph_memory_mib: float | None = None
    memory_saved_mib: float | None = None
    time_saved_pct: float | None = None
    time_saved_per_batch_iqr_s: list[float] | None = None
    savings_note: str | None = None
    timing_caveat: str | None = None
    counts: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


RUNS = ("fit", "validate", "test", "predict", None)


def summarise(report: Report) -> list[StageSummary]:
    """One :class:`StageSummary` per run kind and stage with epochs in ``report``, in a fixed order.

    Validation inside ``fit`` and a ``trainer.validate`` run are kept apart.

    Example:
        >>> r = Report()
        >>> r.record_epoch("val", 0, 5, {"nograd/val/epoch_time_s": 2.0}, run="fit")
        >>> r.record_epoch("val", 1, 10, {"nograd/val/epoch_time_s": 4.0}, run="validate")
        >>> [(s.run, s.stage, s.mean_epoch_time_s) for s in summarise(r)]
        [('fit', 'val', 2.0), ('validate', 'val', 4.0)]
    """
    summaries = []
    for run, stage in ((run, stage) for run in RUNS for stage in ("train", "val", "test")):
        epochs = [e for e in report.epochs if e.stage == stage and e.run == run]
        if not epochs:
            continue

        def values(key: str, epochs: list[Any] = epochs, stage: str = stage) -> list[float]:
            return [e.metrics[f"nograd/{stage}/{key}"] for e in epochs if f"nograd/{stage}/{key}" in e.metrics]

        peaks = values("peak_memory_mib")
        summary = StageSummary(
            stage=stage,
            epochs=len(epochs),
            run=run,
            mean_epoch_time_s=_mean(values("epoch_time_s")),
            peak_memory_mib=max(peaks) if peaks else None,
            graph_memory_mib=_mean(values("graph_memory_mib")),
            memory_saved_mib=_mean(values("memory_saved_mib")),
            time_saved_pct=_mean(values("time_saved_pct")),
        )
        for epoch in reversed(epochs):
            if "time_saved_per_batch_iqr_s" in epoch.details and summary.time_saved_per_batch_iqr_s is None:
                summary.time_saved_per_batch_iqr_s = list(epoch.details["time_saved_per_batch_iqr_s"])
            if "savings" in epoch.details and summary.savings_note is None:
                summary.savings_note = str(epoch.details["savings"])
            if "timing_caveat" in epoch.details and summary.timing_caveat is None:
                summary.timing_caveat = str(epoch.details["timing_caveat"])
        for key in ("violations", "no_grad_modules", "params_without_grad", "eval_mode_modules"):
            found = values(key)
            if found:
                summary.counts[key] = max(found)
        summaries.append(summary)
    return summaries


def _fmt(value: float | None, unit: str, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _savings(summary: StageSummary) -> str:
    if summary.time_saved_pct is not None:
        text = f"{summary.time_saved_pct:.1f}% time"
        if summary.savings_note and summary.savings_note.startswith("time difference within noise"):
            text += ", within noise"
        if summary.time_saved_per_batch_iqr_s is not None:
            low, high = summary.time_saved_per_batch_iqr_s
            text += f" (IQR {low * 1e3:+.2f}..{high * 1e3:+.2f} ms/batch)"
        return text
    if summary.savings_note and summary.savings_note != "measured":
        return summary.savings_note
    return "-"


def row_label(summary: StageSummary) -> str:
    """``validation`` inside ``fit``; ``validation (validate)`` for a ``trainer.validate`` run."""
    word = STAGE_WORDS.get(summary.stage, summary.stage)
    return f"{word} ({summary.run})" if summary.run == "validate" else word


def rows(report: Report) -> list[list[str]]:
    """The table's rows: stage, epochs, mean epoch time, peak memory, graph memory, savings."""
    return [
        [
            row_label(s),
            str(s.epochs),
            _fmt(s.mean_epoch_time_s, " s"),
            _fmt(s.peak_memory_mib, " MiB", 1),
            _fmt(s.graph_memory_mib, " MiB", 2),
            _fmt(s.memory_saved_mib, " MiB", 2),
            _savings(s),
            _problems(s),
        ]
        for s in summarise(report)
    ]


_COUNT_WORDS = {
    "violations": "violations",
    "no_grad_modules": "no-grad modules",
    "params_without_grad": "params without grad",
    "eval_mode_modules": "eval-mode leaks",
}


def _problems(summary: StageSummary) -> str:
    found = [f"{_COUNT_WORDS[k]}: {v:g}" for k, v in summary.counts.items() if v]
    return ", ".join(found) if found else ("none" if summary.counts else "-")


HEADER = [
    "stage",
    "epochs",
    "mean epoch time",
    "peak memory",
    "graph memory / batch",
    "memory saved",
    "time saved",
    "problems (max per epoch)",
]


def render(report: Report, use_rich: bool = True, incomplete: str | None = None) -> str:
    """The end-of-stage report as text: the per-stage table, then every finding with its fix.

    ``incomplete`` says why the run stopped early: then no clean bill of health is printed.
    """
    table_rows = rows(report)
    findings = [f"- {f.message}" for f in report.findings]
    if use_rich:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            use_rich = False
    if use_rich:
        buffer = io.StringIO()
        console = Console(file=buffer, width=140, force_terminal=False)
        table = Table(title="lightning-nograd report")
        for column in HEADER:
            table.add_column(column)
        for row in table_rows:
            table.add_row(*row)
        console.print(table)
        text = buffer.getvalue()
    else:
        widths = [max(len(str(c)) for c in column) for column in zip(HEADER, *table_rows, strict=False)]
        lines = ["lightning-nograd report"]
        for row in [HEADER, *table_rows]:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)))
        text = "\n".join(lines) + "\n"
    caveats = sorted({s.timing_caveat for s in summarise(report) if s.timing_caveat and s.time_saved_pct is not None})
    text += "".join(f"Note: {caveat}.\n" for caveat in caveats)
    if findings:
        text += f"{len(findings)} finding(s):\n" + "\n".join(findings) + "\n"
    elif incomplete is None:
        text += "No findings: evaluation ran in eval mode without gradients, and every trainable part learned.\n"
    if incomplete is not None:
        text += f"The audit could not finish: {incomplete}\n"
    return text
