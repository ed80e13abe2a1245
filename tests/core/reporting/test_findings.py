from __future__ import annotations

import json
import warnings

import pytest

from lightning_nograd import NoGradError, NoGradWarning
from lightning_nograd.core.reporting.findings import Finding, FindingLog, Policy, common_ancestor
from lightning_nograd.core.reporting.report import Report


def finding(subject: str = "head", stage: str = "val") -> Finding:
    return Finding("train_mode", subject, stage, "validation_step", 3, 0, "it ran in train mode", "call eval().")


def test_message_names_subject_stage_hook_batch_and_fix() -> None:
    assert finding().message == (
        "[lightning-nograd] it ran in train mode (validation, `validation_step`, first at batch 3). Fix: call eval()."
    )


def test_each_distinct_finding_is_warned_once_and_counted_per_epoch() -> None:
    log = FindingLog(Policy.of("warn"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        log.add(finding())
        log.add(finding())
        log.add(finding("tail"))
    assert [w.category for w in seen] == [NoGradWarning, NoGradWarning]
    log.start_epoch("val")
    log.add(finding())
    assert log.epoch_count("val") == 1, "an already-warned finding still counts in a new epoch"


def test_error_mode_raises_and_state_round_trips() -> None:
    with pytest.raises(NoGradError, match="train mode"):
        FindingLog(Policy.of("error")).add(finding())
    log = FindingLog(Policy.of("warn"))
    log.may_warn = False
    log.add(finding())
    restored = FindingLog(Policy.of("warn"))
    restored.load_state(json.loads(json.dumps(log.state())))
    assert restored.state() == log.state()
    assert not restored.add(finding()), "a restored run does not report (or warn) the finding again"


def test_a_finding_on_several_modules_names_their_deepest_common_module() -> None:
    assert common_ancestor(["a.b.c", "a.b.d"]) == "a.b"
    assert common_ancestor(["a", "b"]) == ""
    assert common_ancestor(["a.b"]) == "a.b"


def test_report_is_json_and_merges_one_epoch() -> None:
    report = Report()
    report.findings.append(finding())
    report.record_epoch("val", 1, 10, {"nograd/val/violations": 1.0})
    report.record_epoch("val", 1, 10, {"nograd/val/epoch_time_s": 0.5}, {"batches": 4})
    data = json.loads(json.dumps(report.to_dict()))
    assert len(data["epochs"]) == 1 and data["epochs"][0]["metrics"]["nograd/val/epoch_time_s"] == 0.5
    assert data["findings"][0]["message"].startswith("[lightning-nograd]")
