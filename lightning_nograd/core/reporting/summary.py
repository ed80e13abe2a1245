"""Per-stage summaries of a report, and their text rendering (rich when installed, plain otherwise).

Data first (``summarise``), presentation second (``render``), as a report's readers need
one or the other: dashboards the numbers, people the table.
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_nograd.core.reporting.findings import STAGE_WORDS
from lightning_nograd.core.reporting.report import Report
from lightning_nograd.core.savings.estimate import saved_share


@dataclass
class StageSummary:
    """One stage of one Trainer call boiled down: the numbers a row of the end-of-stage table shows."""

    stage: str
    epochs: int
    run: str | None = None
    call: int = 0
    mean_epoch_time_s: float | None = None
    peak_memory_mib: float | None = None
    peak_memory_of: str | None = None
    graph_memory_mib: float | None = None
    memory_saved_mib: float | None = None
    time_saved_s: float | None = None
    time_saved_pct: float | None = None
    time_saved_pct_err: float | None = None
    within_noise: bool | None = None
    savings_note: str | None = None
    savings_options: list[str] | None = None
    timing_caveat: str | None = None
    findings: int = 0
    counts: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


STAGES = ("train", "val", "test")


def summarise(report: Report, call: int | None = None) -> list[StageSummary]:
    """One ``StageSummary`` per Trainer call and stage with epochs in ``report`` (only ``call``'s, if
    given), in the order of the calls, then training, validation, test.

    Validation inside ``fit`` and a ``trainer.validate`` run are kept apart, and so are two calls of
    ``trainer.validate``.

    Examples:
        >>> r = Report()
        >>> r.start_call()
        1
        >>> r.record_epoch("val", 0, 5, {"nograd/val/epoch_time_s": 2.0}, run="fit")
        >>> r.start_call()
        2
        >>> r.record_epoch("val", 1, 10, {"nograd/val/epoch_time_s": 4.0}, run="validate")
        >>> [(s.call, s.run, s.stage, s.mean_epoch_time_s) for s in summarise(r)]
        [(1, 'fit', 'val', 2.0), (2, 'validate', 'val', 4.0)]
    """
    groups: dict[tuple[int, str], list[Any]] = {}
    for epoch in report.epochs:
        if epoch.stage in STAGES and (call is None or epoch.call == call):
            groups.setdefault((epoch.call, epoch.stage), []).append(epoch)
    summaries = []
    for (_, stage), epochs in sorted(groups.items(), key=lambda item: (item[0][0], STAGES.index(item[0][1]))):

        def values(key: str, epochs: list[Any] = epochs, stage: str = stage) -> list[float]:
            return [e.metrics[f"nograd/{stage}/{key}"] for e in epochs if f"nograd/{stage}/{key}" in e.metrics]

        peaks = values("peak_memory_mib")
        last = epochs[-1]
        summary = StageSummary(
            stage=stage,
            epochs=len(epochs),
            run=last.run,
            call=last.call,
            mean_epoch_time_s=_mean(values("epoch_time_s")),
            peak_memory_mib=max(peaks) if peaks else None,
            graph_memory_mib=_mean(values("graph_memory_mib")),
            memory_saved_mib=_mean(values("memory_saved_mib")),
            findings=sum(1 for f in report.findings if f.call == last.call and f.stage == stage),
        )
        _whole_call_time(summary, epochs)
        for epoch in reversed(epochs):  # the latest epoch that has each figure
            details = epoch.details
            if "peak_memory_of" in details and summary.peak_memory_of is None:
                summary.peak_memory_of = str(details["peak_memory_of"])
            if "savings" in details and summary.savings_note is None:
                summary.savings_note = str(details["savings"])
                options = details.get("savings_options")
                summary.savings_options = list(options) if options else None
            if "timing_caveat" in details and summary.timing_caveat is None:
                summary.timing_caveat = str(details["timing_caveat"])
        for key in ("violations", "no_grad_modules", "params_without_grad", "eval_mode_modules"):
            found = values(key)
            if found:
                summary.counts[key] = max(found)
        summaries.append(summary)
    return summaries


def _whole_call_time(summary: StageSummary, epochs: list[Any]) -> None:
    """The time saved over every epoch of the call that has a time figure: the sum of their ``time_saved_s``,
    as ``saved_share`` of the sum of their times, and its interval from the sum of theirs."""
    stage = summary.stage
    timed = [e for e in epochs if f"nograd/{stage}/time_saved_s" in e.metrics]
    if not timed:
        return
    saved = sum(e.metrics[f"nograd/{stage}/time_saved_s"] for e in timed)
    seconds = sum(e.metrics.get(f"nograd/{stage}/epoch_time_s", 0.0) for e in timed)
    if seconds <= 0:
        return
    summary.time_saved_s = saved
    summary.time_saved_pct = saved_share(saved, seconds)
    intervals = [e.details.get("time_saved_interval_s") for e in timed]
    if all(isinstance(i, (list, tuple)) and len(i) == 2 for i in intervals):
        low = saved_share(sum(i[0] for i in intervals), seconds)  # type: ignore[index]
        high = saved_share(sum(i[1] for i in intervals), seconds)  # type: ignore[index]
        summary.time_saved_pct_err = max(summary.time_saved_pct - low, high - summary.time_saved_pct)
        summary.within_noise = low <= 0 <= high
    else:
        summary.within_noise = True
    if summary.within_noise:
        summary.savings_note = next(
            (str(e.details["savings"]) for e in reversed(timed) if "within noise" in str(e.details.get("savings"))),
            None,
        )


def _fmt(value: float | None, unit: str, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _seconds(value: float) -> str:
    return f"{value:.3g} s" if abs(value) >= 1 else f"{value * 1e3:.3g} ms"


class Footnotes:
    """Long notes kept out of the table's cells: a cell shows ``[n]``, the note is printed below."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def mark(self, note: str) -> str:
        if note not in self.notes:
            self.notes.append(note)
        return f"[{self.notes.index(note) + 1}]"

    def lines(self) -> list[str]:
        return [f"[{i}] {note}" for i, note in enumerate(self.notes, 1)]


RSS_NOTE = (
    "peak memory on CPU is the process's peak resident set size (RSS): all the memory of the Python process, "
    "torch itself and the data included, not the model's tensors alone (on a GPU it is the CUDA allocator's peak)"
)
GRAPH_NOTE = (
    "graph/batch is the memory autograd would keep for backward for one batch had gradients been on; saved/batch "
    "is how much lower one batch's peak memory is without gradients. It is the smaller when some "
    "of the tensors kept for backward (a layer's output) are alive at the peak either way"
)


def _time_saved(summary: StageSummary, notes: Footnotes, option_names: Mapping[str, str]) -> str:
    if summary.time_saved_pct is None:
        if summary.savings_note and summary.savings_note != "measured":
            note = summary.savings_note
            if summary.savings_options:
                names = [f"`{option_names.get(o, o)}`" for o in summary.savings_options]
                note += f"; to measure it now, raise {names[0]}" + "".join(f" or set {n}" for n in names[1:])
            return "-" + notes.mark(f"{row_label(summary)}: {note}")
        return "-"
    text = f"{summary.time_saved_pct:.1f}%"
    if summary.time_saved_pct_err is not None:
        text += f" ± {summary.time_saved_pct_err:.1f}"
    if summary.time_saved_s is not None:
        text = f"{_seconds(summary.time_saved_s)} ({text})"
    if summary.within_noise:
        note = summary.savings_note or "the difference is within noise"
        text += " ~0" + notes.mark(f"{row_label(summary)}: {note}")
    return text


def row_label(summary: StageSummary, numbered: bool = False) -> str:
    """``validation`` inside ``fit``; ``validation (validate)`` for a ``trainer.validate`` run (with its call
    number when the table has two of them)."""
    word = STAGE_WORDS.get(summary.stage, summary.stage)
    if summary.run == "validate":
        return f"{word} (validate #{summary.call})" if numbered else f"{word} (validate)"
    return f"{word} (call #{summary.call})" if numbered else word


def _labels(summaries: list[StageSummary]) -> list[str]:
    plain = [row_label(s) for s in summaries]
    return [row_label(s, numbered=plain.count(label) > 1) for s, label in zip(summaries, plain, strict=True)]


def rows(
    report: Report,
    call: int | None = None,
    notes: Footnotes | None = None,
    option_names: Mapping[str, str] | None = None,
) -> list[list[str]]:
    """The table's rows (one per Trainer call and stage): stage, epochs, mean epoch time, peak memory,
    graph memory, memory saved, time saved, problems. Long notes go to ``notes`` as footnotes."""
    return _rows(summarise(report, call), notes if notes is not None else Footnotes(), option_names or {})


def _rows(summaries: list[StageSummary], notes: Footnotes, option_names: Mapping[str, str]) -> list[list[str]]:
    table = []
    for summary, label in zip(summaries, _labels(summaries), strict=True):
        peak = _fmt(summary.peak_memory_mib, " MiB", 1)
        if summary.peak_memory_mib is not None and summary.peak_memory_of == "process RSS":
            peak += notes.mark(RSS_NOTE)
        graph = _fmt(summary.graph_memory_mib, " MiB", 2)
        if summary.graph_memory_mib is not None:
            graph += notes.mark(GRAPH_NOTE)
        table.append(
            [
                label,
                str(summary.epochs),
                _fmt(summary.mean_epoch_time_s, " s"),
                peak,
                graph,
                _fmt(summary.memory_saved_mib, " MiB", 2),
                _time_saved(summary, notes, option_names),
                _problems(summary),
            ]
        )
    return table


def _problems(summary: StageSummary) -> str:
    """The findings first reported in this row's call and stage; those an earlier call reported and this one
    saw again (an evaluation's ``violations``) are said to be earlier ones."""
    if summary.findings:
        return f"{summary.findings} finding" + ("s" if summary.findings > 1 else "")
    again = int(summary.counts.get("violations", 0))
    if again:
        return f"{again} reported earlier"
    return "none" if summary.counts else "-"


HEADER = ["stage", "epochs", "epoch time", "peak memory", "graph/batch", "saved/batch", "time saved", "problems"]


def _clean_bill(summaries: list[StageSummary]) -> str:
    """ "No findings", saying what was checked: only the stages that ran."""
    ran = {s.stage for s in summaries}
    checked = []
    if ran & {"val", "test", "predict"}:
        checked.append("evaluation ran in eval mode without gradients")
    if "train" in ran:
        checked.append("every trainable part got its gradient")
    return "No findings" + (": " + ", and ".join(checked) if checked else "") + ".\n"


def render(
    report: Report,
    use_rich: bool = True,
    incomplete: str | None = None,
    call: int | None = None,
    findings_from: int = 0,
    option_names: Mapping[str, str] | None = None,
) -> str:
    """The end-of-stage report as text: the table (one row per Trainer call and stage; only ``call``'s
    when given), its footnotes, then every finding from ``findings_from`` on with its fix.

    ``incomplete`` says why the run stopped early: then no clean bill of health is printed.
    ``option_names`` spells the settings a note advises as the tool that ran takes them (the CLI's
    ``--budget`` for ``budget``).
    """
    notes = Footnotes()
    summaries = summarise(report, call)
    table_rows = _rows(summaries, notes, option_names or {})
    findings = [f"- {f.message}" for f in report.findings[findings_from:]]
    if use_rich:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            use_rich = False
    if use_rich:
        buffer = io.StringIO()
        console = Console(file=buffer, width=200, force_terminal=False)
        table = Table(title="lightning-nograd report")
        for column in HEADER:
            table.add_column(column, no_wrap=True)
        for row in table_rows:
            table.add_row(*row)
        console.print(table)
        text = buffer.getvalue()
    else:
        widths = [max(len(str(c)) for c in column) for column in zip(HEADER, *table_rows, strict=False)]
        lines = ["lightning-nograd report"]
        for row in [HEADER, *table_rows]:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())
        text = "\n".join(lines) + "\n"
    text += "".join(f"{line}\n" for line in notes.lines())
    caveats = sorted({s.timing_caveat for s in summaries if s.timing_caveat and s.time_saved_pct is not None})
    text += "".join(f"Note: {caveat}.\n" for caveat in caveats)
    if findings:
        text += f"{len(findings)} finding(s):\n" + "\n".join(findings) + "\n"
    elif incomplete is None and findings_from == 0:
        text += _clean_bill(summaries)
    elif incomplete is None:
        text += f"No new findings ({findings_from} earlier, listed in an earlier table and in `callback.report`).\n"
    if incomplete is not None:
        text += f"The audit could not finish: {incomplete}\n"
    return text
