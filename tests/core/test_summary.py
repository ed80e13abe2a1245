from __future__ import annotations

from lightning_nograd.core.findings import Finding
from lightning_nograd.core.report import Report
from lightning_nograd.core.summary import render, rows, summarise


def report() -> Report:
    r = Report()
    r.record_epoch("val", 0, 4, {"nograd/val/epoch_time_s": 1.0, "nograd/val/time_saved_pct": 10.0})
    r.record_epoch("val", 1, 8, {"nograd/val/epoch_time_s": 3.0, "nograd/val/violations": 1.0})
    r.findings.append(Finding("train_mode", "head", "val", "validation_step", 0, 0, "head ran", "call eval()."))
    return r


def test_summary_numbers() -> None:
    (val,) = summarise(report())
    assert (val.epochs, val.mean_epoch_time_s, val.time_saved_pct, val.counts) == (2, 2.0, 10.0, {"violations": 1.0})


def test_plain_and_rich_tables_list_stages_and_findings() -> None:
    for use_rich in (False, True):
        text = render(report(), use_rich=use_rich)
        assert "validation" in text and "10.0%" in text and "head ran" in text and "call eval()" in text


def test_one_row_per_call_and_stage_and_long_notes_as_footnotes() -> None:
    r = Report()
    for call, run in ((1, "fit"), (2, "validate"), (3, "validate")):
        assert r.start_call() == call
        details = {"savings": "time not measured: a long reason " * 4, "peak_memory_of": "process RSS"}
        metrics = {"nograd/val/epoch_time_s": 1.0, "nograd/val/peak_memory_mib": 400.0 + call}
        metrics["nograd/val/graph_memory_mib"] = 2.0
        r.record_epoch("val", 0, 0, metrics, details, run=run)
    labels = [row[0] for row in rows(r)]
    assert labels == ["validation", "validation (validate #2)", "validation (validate #3)"]
    text = render(r, use_rich=True, call=2)
    table = text.split("\n[1] ", 1)[0]
    assert "401.0" not in text and "403.0" not in text and "402.0 MiB[1]" in table  # only call 2's row
    # no cell holds a note: each row is one line, the notes come after the table, each once
    assert sum("validation" in line for line in table.splitlines()) == 1
    assert max(len(line) for line in table.splitlines()) <= 120
    footnotes = [line for line in text.splitlines() if line.startswith("[")]
    assert [line[:3] for line in footnotes] == ["[1]", "[2]", "[3]"]
    assert "resident set size (RSS)" in footnotes[0] and "autograd would keep for backward" in footnotes[1]
    assert footnotes[2].startswith("[3] validation (validate): time not measured: a long reason")
