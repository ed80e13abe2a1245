"""A pytest plugin for Lightning's own test suite (``-p lightning_suite.plugin``, with ``tests/`` on the path).

It records every test's outcome and how many ``Trainer`` objects it built to the JSON file named by
``NOGRAD_SUITE_OUTCOMES`` and, when ``NOGRAD_SUITE_INJECT=1``, appends a ``NoGradAuditor()`` (default
settings) to the callbacks of every ``Trainer`` the tests build (``lightning.pytorch``, and
``pytorch_lightning`` when it is loaded). The same plugin runs in the baseline (counting, not
injecting), so the two runs differ only in the injection, and the runner can check that every
Trainer of the baseline got an auditor.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
from collections import defaultdict
from typing import Any

import pytest

_outcomes: dict[str, str] = {}
_trainers: defaultdict[str, int] = defaultdict(int)
_current: list[str] = [""]


def _wrap_trainer(module_name: str, inject: bool) -> None:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return
    trainer_cls = module.Trainer
    original = trainer_cls.__init__
    if getattr(original, "_nograd_injected", False):
        return

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if inject:
            from lightning_nograd import NoGradAuditor

            callbacks = kwargs.get("callbacks")
            if callbacks is None:
                callbacks = []
            elif not isinstance(callbacks, (list, tuple)):
                callbacks = [callbacks]
            # a new list: a test that reuses its own list must not see ours in it
            kwargs["callbacks"] = [*callbacks, NoGradAuditor()]
        _trainers[_current[0]] += 1
        original(self, *args, **kwargs)

    __init__._nograd_injected = True  # type: ignore[attr-defined]
    trainer_cls.__init__ = __init__


def pytest_configure(config: pytest.Config) -> None:
    inject = os.environ.get("NOGRAD_SUITE_INJECT") == "1"
    _wrap_trainer("lightning.pytorch.trainer.trainer", inject)
    # only if already loaded: importing `pytorch_lightning` re-points Lightning's rank-zero logger
    # (tests that read `caplog` for "lightning.pytorch" records then fail, with or without us)
    if "pytorch_lightning" in sys.modules:
        _wrap_trainer("pytorch_lightning.trainer.trainer", inject)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _current[0] = item.nodeid


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    report = outcome.get_result()
    previous = _outcomes.get(item.nodeid)
    if report.when == "call" or report.outcome != "passed":
        result = "xfailed" if hasattr(report, "wasxfail") and report.skipped else report.outcome
        if hasattr(report, "wasxfail") and report.passed:
            result = "xpassed"
        # the first failure (setup, call or teardown) decides; a later "passed" does not overwrite it
        if previous in (None, "passed"):
            _outcomes[item.nodeid] = result


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get("NOGRAD_SUITE_OUTCOMES")
    if path:
        with open(path, "w") as f:
            json.dump({"outcomes": _outcomes, "trainers": dict(_trainers)}, f, indent=1, sort_keys=True)
