"""The run report: every epoch's measurements and every finding, as plain data.

Presentation (tables, files, loggers) lives elsewhere; this module only holds and serialises.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lightning_nograd.core.reporting.findings import Finding


@dataclass
class EpochRecord:
    """Measurements of one epoch of one stage.

    Args:
        stage: ``"val"``, ``"test"``, ``"predict"`` or ``"train"``.
        epoch: the trainer's ``current_epoch`` when the epoch ended.
        global_step: the trainer's ``global_step`` (the step metrics were logged at).
        metrics: metric key (as logged) to value.
        details: JSON-serialisable extras (spreads, sample counts, reasons for skipping).
        run: the Trainer call (``"fit"``, ``"validate"``, ``"test"``, ``"predict"``); ``None`` outside Lightning.
        call: which Trainer call it was, counting from 1 in the order the callback saw them (two
            ``trainer.validate()`` calls give epoch 0 twice, as calls 1 and 2); 0 outside Lightning.
    """

    stage: str
    epoch: int
    global_step: int
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    run: str | None = None
    call: int = 0


@dataclass
class Report:
    """Everything a run found and measured.

    Examples:
        >>> report = Report()
        >>> report.record_epoch("val", 0, 10, {"nograd/val/violations": 0.0})
        >>> report.to_dict()["epochs"][0]["metrics"]
        {'nograd/val/violations': 0.0}
    """

    findings: list[Finding] = field(default_factory=list)
    epochs: list[EpochRecord] = field(default_factory=list)
    calls: int = 0

    def add_finding(self, finding: Finding) -> None:
        """Hold ``finding`` as one of the Trainer call under way (``Finding.call``)."""
        self.findings.append(finding if finding.call else replace(finding, call=self.calls))

    def update_finding(self, old: Finding, new: Finding) -> None:
        """Put ``new`` (the same finding, seen on more ranks) in the place of ``old``, in ``old``'s call."""
        for i, held in enumerate(self.findings):
            if held.key == old.key and held.ranks == old.ranks:
                self.findings[i] = new if new.call else replace(new, call=held.call)
                return

    def take_over(self, other: Report) -> None:
        """Hold what ``other`` holds instead (the same run's report, handed back by the worker that watched it)."""
        self.findings, self.epochs, self.calls = other.findings, other.epochs, other.calls

    def start_call(self) -> int:
        """Count one more Trainer call; epochs recorded from now on belong to it."""
        self.calls += 1
        return self.calls

    def record_epoch(
        self,
        stage: str,
        epoch: int,
        global_step: int,
        metrics: dict[str, float],
        details: dict[str, Any] | None = None,
        run: str | None = None,
    ) -> None:
        """Add measurements; those of the same Trainer call, stage, epoch and step are merged.

        Callbacks sharing this report (the parts of ``NoGradAuditor``) each record the epoch they
        watched; a second Trainer call (``start_call``) starts new records even where the
        epoch and step repeat.
        """
        last = self.epochs[-1] if self.epochs else None
        key = (self.calls, run, stage, epoch, global_step)
        if last is not None and (last.call, last.run, last.stage, last.epoch, last.global_step) == key:
            last.metrics.update(metrics)
            last.details.update(details or {})
            return
        self.epochs.append(EpochRecord(stage, epoch, global_step, dict(metrics), dict(details or {}), run, self.calls))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form of the whole report."""
        return {
            "findings": [f.to_dict() for f in self.findings],
            "epochs": [
                {
                    "run": e.run,
                    "call": e.call,
                    "stage": e.stage,
                    "epoch": e.epoch,
                    "global_step": e.global_step,
                    "metrics": dict(e.metrics),
                    "details": dict(e.details),
                }
                for e in self.epochs
            ],
        }

    def write_json(self, path: str | Path) -> None:
        """Write ``to_dict`` to ``path`` as JSON (parents created)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))


def unwritable_reason(path: Path) -> str | None:
    """Why a report can never be written at ``path``, or ``None`` when it can (missing parent folders
    are created when writing, as ``write_json`` does).

    Tried for real, by creating and removing a file, rather than read from permission bits: root passes
    every permission check, and pseudo file systems such as ``/proc`` refuse files whatever they report.
    """
    if path.is_dir():
        return "it is a directory"
    existing = path.absolute().parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{str(existing)!r} is not a directory"
    try:
        if path.exists():
            with path.open("a"):
                pass
        else:
            handle, probe = tempfile.mkstemp(dir=existing, prefix=".lightning-nograd-")
            os.close(handle)
            os.unlink(probe)
    except OSError as err:
        where = str(path) if path.exists() else str(existing)
        return f"{where!r} is not writable ({err.strerror or err})"
    return None
