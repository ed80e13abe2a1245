"""DDP with 2 CPU processes (gloo): warnings once on rank zero, metrics once, no hang."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import csv_values

SCRIPT = Path(__file__).with_name("ddp_run.py")


def run_ddp(tmp_path: Path, strategy: str, scenario: str = "") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(SCRIPT.parents[1]))
    command = [sys.executable, str(SCRIPT), str(tmp_path), strategy, *([scenario] if scenario else [])]
    # its own session: on a hang every rank is killed, not only the launching one (Lightning starts
    # rank 1 itself, and a rank left alive holds our pipes open)
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=240)  # a collective on one rank only fails here
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_ddp_warns_once_on_rank_zero_and_logs_once(tmp_path: Path) -> None:
    # the model has a branch that never gets gradients: plain DDP would crash on it by design
    done = run_ddp(tmp_path, "ddp_find_unused_parameters_true")
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = json.loads((tmp_path / "warnings_rank0.json").read_text())
    rank1 = json.loads((tmp_path / "warnings_rank1.json").read_text())
    assert rank1 == []
    assert len(rank0) == len(set(rank0)) == 2
    assert any("`head.0` (Dropout)" in m for m in rank0)
    assert any("`head` has trainable parameters" in m for m in rank0)
    # every rank found the bugs; only rank zero said so
    assert json.loads((tmp_path / "findings_rank1.json").read_text()) == ["no_grad_module", "train_mode"]
    assert csv_values(tmp_path / "csv", "nograd/val/violations") == [1.0, 1.0]
    assert csv_values(tmp_path / "csv", "nograd/train/no_grad_modules") == [1.0, 1.0]
    assert len(csv_values(tmp_path / "csv", "nograd/val/epoch_time_s")) == 2


def test_fsdp_is_refused_on_cpu_by_lightning_before_any_callback_runs(tmp_path: Path) -> None:
    done = run_ddp(tmp_path, "fsdp")
    assert done.returncode != 0
    assert "The strategy `fsdp` requires a GPU accelerator" in done.stderr
    assert not (tmp_path / "warnings_rank0.json").exists()


@pytest.mark.parametrize(("strategy", "refused"), [("FSDPStrategy", True), ("DDPStrategy", False)])
def test_savings_replay_is_skipped_with_a_reason_under_sharded_strategies(strategy: str, refused: bool) -> None:
    # A trainer with FSDP cannot be built without a GPU; the strategy object itself can, and it
    # is all the refusal looks at.
    from types import SimpleNamespace

    import lightning.pytorch.strategies as strategies

    from lightning_nograd.callbacks.savings_monitor import _replay_refusal

    reason = _replay_refusal(SimpleNamespace(strategy=getattr(strategies, strategy)()), torch.device("cpu"))
    assert (reason is not None) is refused
    if refused:
        assert reason is not None and "replay skipped under FSDPStrategy" in reason


def test_a_check_failing_on_one_rank_does_not_leave_the_others_waiting(tmp_path: Path) -> None:
    # Every part's metric computation raises on rank 1 only. Before, rank 1 then skipped the
    # metric reductions and rank 0 waited for it in the next collective (a hang until the
    # process group's timeout); now rank 1 still takes part, sending nothing.
    done = run_ddp(tmp_path, "ddp_find_unused_parameters_true", "metrics_fail_on_rank1")
    assert done.returncode == 0, done.stderr[-3000:]
    switched = json.loads((tmp_path / "switched_off_rank1.json").read_text())
    assert switched == {"EvalModeAuditor": ["metrics"], "SavingsMonitor": ["metrics"], "BackpropGuard": ["metrics"]}
    assert json.loads((tmp_path / "switched_off_rank0.json").read_text()) == {
        "EvalModeAuditor": [],
        "SavingsMonitor": [],
        "BackpropGuard": [],
    }
    # rank 0's own values are logged every epoch (the maximum over the ranks that have them)
    assert csv_values(tmp_path / "csv", "nograd/val/violations") == [1.0, 1.0]
    assert csv_values(tmp_path / "csv", "nograd/train/no_grad_modules") == [1.0, 1.0]
    assert len(csv_values(tmp_path / "csv", "nograd/val/epoch_time_s")) == 2
    # and the internal error on rank 1 is not printed there (warnings are rank zero's)
    assert json.loads((tmp_path / "warnings_rank1.json").read_text()) == []
