from __future__ import annotations

import pytest

from lightning_nograd.core.reporting.findings import Finding
from lightning_nograd.core.reporting.report import Report
from lightning_nograd.core.reporting.summary import render, rows, summarise


def timed(seconds: float, saved: float, low: float, high: float) -> tuple[dict[str, float], dict[str, object]]:
    metrics = {"nograd/val/epoch_time_s": seconds, "nograd/val/time_saved_s": saved}
    metrics["nograd/val/time_saved_pct"] = 100 * saved / max(seconds + saved, seconds)
    return metrics, {"time_saved_interval_s": [low, high], "savings": "measured"}


def report() -> Report:
    r = Report()
    r.start_call()
    r.record_epoch("val", 0, 4, *timed(1.0, 0.5, 0.25, 0.75))
    metrics, details = timed(3.0, -0.5, -1.0, 0.0)
    r.record_epoch("val", 1, 8, {**metrics, "nograd/val/violations": 1.0}, details)
    r.add_finding(Finding("train_mode", "head", "val", "validation_step", 0, 0, "head ran", "call eval()."))
    return r


def test_the_table_shows_the_whole_calls_time_saved_with_its_interval() -> None:
    (val,) = summarise(report())
    assert (val.epochs, val.mean_epoch_time_s, val.counts, val.findings) == (2, 2.0, {"violations": 1.0}, 1)
    # the call saved 0 s of 4 s: each epoch's figure summed, not the last epoch's -14.3%
    assert val.time_saved_s == 0.0 and val.time_saved_pct == 0.0
    # the interval: -0.75 s (-0.75 / 4 = -18.75%) to 0.75 s (0.75 / 4.75 = 15.8%)
    assert val.time_saved_pct_err == pytest.approx(18.75) and val.within_noise


def test_plain_and_rich_tables_list_stages_and_findings() -> None:
    for use_rich in (False, True):
        text = render(report(), use_rich=use_rich)
        assert "validation" in text and "0 ms (0.0% ± 18.8)" in text and "head ran" in text and "call eval()" in text
        assert "1 finding" in text


def test_every_finding_counts_in_its_own_rows_problems_and_earlier_ones_are_said_to_be() -> None:
    r = Report()
    r.start_call()
    r.record_epoch("train", 0, 4, {"nograd/train/params_without_grad": 0.0}, run="fit")
    r.record_epoch("val", 0, 4, {"nograd/val/violations": 0.0}, run="fit")
    # a stray graph in `on_train_epoch_end`: no per-epoch count of its own, still a problem of the training row
    r.add_finding(Finding("stray_graph", "disc", "train", "on_train_epoch_end", None, 0, "a graph", "no_grad"))
    r.start_call()
    r.record_epoch("val", 0, 4, {"nograd/val/violations": 1.0}, run="validate")  # seen again, warned in call 1
    problems = [row[-1] for row in rows(r)]
    assert problems == ["1 finding", "none", "1 reported earlier"]


def test_no_clean_bill_for_what_did_not_run() -> None:
    r = Report()
    r.start_call()
    r.record_epoch("train", 0, 4, {"nograd/train/params_without_grad": 0.0}, run="fit")
    text = render(r)
    assert "No findings: every trainable part got its gradient." in text and "evaluation" not in text
    r.record_epoch("val", 0, 4, {"nograd/val/violations": 0.0}, run="fit")
    assert "No findings: evaluation ran in eval mode without gradients, and every trainable part" in render(r)


def test_a_note_advises_the_settings_of_the_tool_that_ran() -> None:
    r = Report()
    r.start_call()
    details = {"savings": "time not measured: too short", "savings_options": ["budget", "repeats"]}
    r.record_epoch("val", 0, 0, {"nograd/val/epoch_time_s": 1.0, "nograd/val/graph_memory_mib": 1.0}, details)
    assert "raise `budget` or set `repeats`" in render(r, use_rich=False)
    cli = render(r, use_rich=False, option_names={"budget": "--budget", "repeats": "--repeats"})
    assert "raise `--budget` or set `--repeats`" in cli and "`budget`" not in cli


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
