"""The Lightning-suite check (``python -m tests.lightning_suite``): its plugin, comparison and allow-list.

CI runs the real slice of Lightning's tests; here the same machinery runs on two small test files.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lightning_suite.__main__ import HERE, compare, load_allowlist, run_both

TESTS = """
import lightning.pytorch as pl
import torch
from torch import nn

class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(2, 1)
    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).sum()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

def loader():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)

def test_exact_callbacks(tmp_path):
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[])
    trainer.fit(Model(), loader())
    assert [type(c).__name__ for c in trainer.callbacks] == []

def test_two_trainers(tmp_path):
    for _ in range(2):
        pl.Trainer(default_root_dir=tmp_path, logger=False)

def test_no_trainer():
    assert True
"""


def test_the_plugin_injects_into_every_trainer_and_the_runner_sees_the_difference(tmp_path: Path) -> None:
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_small.py").write_text(TESTS)
    work = tmp_path / "work"
    work.mkdir()
    baseline, injected = run_both(tests, work, timeout=120, selection=("test_small.py",))
    ids = {f"test_small.py::{name}" for name in ("test_exact_callbacks", "test_two_trainers", "test_no_trainer")}
    assert set(baseline["outcomes"]) == set(injected["outcomes"]) == ids
    assert set(baseline["outcomes"].values()) == {"passed"}
    assert injected["outcomes"]["test_small.py::test_exact_callbacks"] == "failed"  # the auditor is in the list
    assert (
        baseline["trainers"]
        == injected["trainers"]
        == {
            "test_small.py::test_exact_callbacks": 1,
            "test_small.py::test_two_trainers": 2,
        }
    )
    result = compare(baseline, injected, {})
    assert not result.ok and result.unexplained == {"test_small.py::test_exact_callbacks": ("passed", "failed")}
    allowed = compare(baseline, injected, {"test_small.py::test_exact_callbacks": "asserts the callback list"})
    assert allowed.ok and list(allowed.allowed) == ["test_small.py::test_exact_callbacks"]


def test_a_trainer_without_an_auditor_and_stale_entries_are_reported() -> None:
    baseline = {"outcomes": {"a": "passed", "b": "passed"}, "trainers": {"a": 2}}
    injected = {"outcomes": {"a": "passed", "b": "passed"}, "trainers": {"a": 1}}
    result = compare(baseline, injected, {"b": "used to differ"})
    assert not result.ok
    assert result.missing_auditor == {"a": (2, 1)} and result.stale == ["b"]


def test_the_allowlist_gives_a_reason_for_every_entry(tmp_path: Path) -> None:
    allowed = load_allowlist(HERE / "allowlist.toml")
    assert allowed and all(len(reason) > 20 for reason in allowed.values())
    bad = tmp_path / "allowlist.toml"
    bad.write_text('[[allowed]]\ntest = "x::y"\n')
    with pytest.raises(ValueError, match="reason"):
        load_allowlist(bad)


def test_the_readme_names_as_many_allowed_tests_as_the_allowlist_holds() -> None:
    readme = (HERE.parents[1] / "docs" / "guarantees.md").read_text()
    count = len(load_allowlist(HERE / "allowlist.toml"))
    assert f"except {count} tests that" in " ".join(readme.split())
    assert f"the {count}." in " ".join(readme.split())
