from __future__ import annotations

from lightning_nograd.core.findings import Finding
from lightning_nograd.core.report import Report
from lightning_nograd.core.summary import render, summarise


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
        assert "validation" in text and "10.0% time" in text and "head ran" in text and "call eval()" in text
