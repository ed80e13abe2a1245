"""The report of a run in worker processes (``ddp_spawn``, ``ddp_notebook``), handed back to the launching one.

Lightning runs such a fit in processes it starts; the callback object the user holds lives in the
launching process and never sees the run. Rank zero's worker leaves what its copy of the callback
gathered in a file named for that object; the object reads it the next time its ``report`` is asked for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import tempfile
import uuid
import weakref

from lightning_nograd.core.reporting.findings import FindingLog
from lightning_nograd.core.reporting.report import Report

log = logging.getLogger(__name__)


class ReportHandoff:
    """A file, named once for one callback object in the launching process, through which a worker hands back
    that callback's report (no file exists until a worker writes one)."""

    def __init__(self) -> None:
        self.origin_pid = os.getpid()
        self.path = os.path.join(tempfile.gettempdir(), f"lightning-nograd-{self.origin_pid}-{uuid.uuid4().hex}")
        weakref.finalize(self, _remove_unread, self.path, self.origin_pid)

    @property
    def in_worker(self) -> bool:
        """Whether this process is a worker (a copy of the callback was pickled or forked into it)."""
        return os.getpid() != self.origin_pid

    def take(self, report: Report, logs: list[FindingLog]) -> None:
        """In the launching process: ``report`` and ``logs`` take over what a worker left for them, once
        (nothing when it left nothing, or nothing readable)."""
        if self.in_worker or not os.path.exists(self.path):
            return
        try:
            with open(self.path, "rb") as handle:
                payload = pickle.load(handle)  # written by rank zero's worker of this very callback
            os.remove(self.path)
        except (OSError, pickle.UnpicklingError, EOFError) as err:
            log.debug("could not read the report from the worker processes", exc_info=err)
            return
        if not isinstance(payload, dict) or not isinstance(payload.get("report"), Report):
            return
        report.take_over(payload["report"])
        for log_, (findings, warned) in zip(logs, payload.get("logs", []), strict=False):
            log_.adopt(findings, warned)

    def leave(self, report: Report, logs: list[FindingLog]) -> None:
        """In rank zero's worker: leave ``report`` and what ``logs`` found and warned for the launching process
        (whole, or not at all; a failure to write it is logged, never raised into the run's teardown)."""
        try:
            payload = {"report": report, "logs": [(log_.findings, log_.state()) for log_ in logs]}
            partial = f"{self.path}.{os.getpid()}"
            with open(partial, "wb") as handle:
                pickle.dump(payload, handle)
            os.replace(partial, self.path)
        except Exception as err:  # the report stays in `report_path` and the loggers
            log.debug("could not hand the report to the launching process", exc_info=err)


def _remove_unread(path: str, origin_pid: int) -> None:
    """A report no one read: removed when the callback in the launching process goes (not in a forked worker)."""
    if os.getpid() == origin_pid:
        with contextlib.suppress(OSError):
            os.remove(path)
