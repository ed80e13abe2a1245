"""DDP, ddp_spawn and FSDP2 with 2 CPU processes (gloo): findings of every rank on rank zero, warnings
once there, metrics once, no hang."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

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


@pytest.mark.parametrize(("strategy", "sharded"), [("FSDPStrategy", True), ("DDPStrategy", False)])
def test_sharded_strategies_replay_in_lockstep_and_others_alone(strategy: str, sharded: bool) -> None:
    # A trainer with FSDP cannot be built without a GPU; the strategy object itself can, and it is
    # all these two look at (the FSDP2 run above replays in lockstep for real)
    from types import SimpleNamespace

    import lightning.pytorch.strategies as strategies

    from lightning_nograd.callbacks.savings_monitor import _replay_refusal, _shards_parameters

    run = SimpleNamespace(strategy=getattr(strategies, strategy)())
    assert _replay_refusal(run, torch.device("cpu")) is None
    assert _shards_parameters(run) is sharded


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


def read(tmp_path: Path, process: str) -> dict[str, Any]:
    return json.loads((tmp_path / f"{process}.json").read_text())


def test_a_finding_seen_only_on_rank_one_reaches_rank_zero_and_the_launching_process(tmp_path: Path) -> None:
    # ddp_spawn: the ranks are worker processes; the validation step records a graph on rank 1 only
    done = run_ddp(tmp_path, "ddp_spawn", "grad_on_rank1")
    assert done.returncode == 0, done.stderr[-3000:]
    main = read(tmp_path, "main")  # the callback object in the launching process, after `fit` returned
    assert [(f["kind"], f["ranks"]) for f in main["report"]["findings"]] == [("grad_enabled", [1])]
    assert "on rank 1" in main["report"]["findings"][0]["message"]
    runs = [(e["run"], e["metrics"]["nograd/val/violations"]) for e in main["report"]["epochs"] if e["stage"] == "val"]
    assert runs == [("fit", 1), ("fit", 1), ("validate", 1)]  # after `fit`, and after `validate` too
    # the CI gate (report_path), the dashboard and the table say the same
    gate = json.loads((tmp_path / "report.json").read_text())
    assert [(f["kind"], f["subject"], f["ranks"]) for f in gate["findings"]] == [("grad_enabled", "", [1])]
    assert csv_values(tmp_path / "csv", "nograd/val/violations") == [1.0, 1.0, 1.0]
    assert "1 finding(s):" in done.stdout and "No findings" not in done.stdout
    # warned once, by rank zero's worker, naming the rank that saw it
    warned = [line for line in done.stderr.splitlines() if "[lightning-nograd]" in line]
    assert len(warned) == 1 and "recorded an autograd graph" in warned[0] and "on rank 1)" in warned[0]


def test_under_ddp_a_parameter_without_gradient_is_reported_before_ddp_stops_the_run(tmp_path: Path) -> None:
    run_ddp(tmp_path, "ddp", "unused")  # the script records DDP's error and exits
    rank0 = read(tmp_path, "rank0")
    assert "parameters that were not used in producing the loss" in rank0["failure"]  # DDP's own error, at batch 1
    [warning] = rank0["warnings"]
    assert "`spare` reached the optimizer step with no gradient (spare.weight, spare.bias)" in warning
    assert "first at batch 0" in warning and "DistributedDataParallel (without `find_unused_parameters`)" in warning
    assert "ddp_find_unused_parameters_true" in warning and 'pass `allow=[r"spare"]`' in warning
    gate = json.loads((tmp_path / "report.json").read_text())  # written as the run failed
    assert [(f["kind"], f["subject"], f["batch_idx"]) for f in gate["findings"]] == [("param_without_grad", "spare", 0)]
    assert read(tmp_path, "rank1")["warnings"] == []


def fsdp2_runs_on_cpu() -> bool:
    """FSDP2 runs on CPU from torch 2.6 (where ``fully_shard`` became public); torch 2.4's makes CUDA streams."""
    import torch.distributed.fsdp as fsdp

    return hasattr(fsdp, "fully_shard")


@pytest.mark.skipif(not fsdp2_runs_on_cpu(), reason="FSDP2 needs CUDA before torch 2.6")
def test_fsdp2_every_check_by_the_users_names_and_savings_replayed_together(tmp_path: Path) -> None:
    # Lightning's ModelParallelStrategy with FSDP2's fully_shard (DTensor parameters), two CPU processes
    done = run_ddp(tmp_path, "model_parallel", "fsdp2")
    assert done.returncode == 0, done.stderr[-3000:]
    expected = [
        ("train_mode", "head.0", "validation_step"),
        ("grad_enabled", "", "validation_step"),
        ("inference_tensor", "cache", "on_train_epoch_start"),
        ("stray_graph", "", "on_train_batch_end"),
        ("no_grad_module", "frozen_by_mistake", "training_step"),
        ("eval_mode_leak", "backbone", "on_train_batch_end"),
        ("param_without_grad", "spare", "on_before_optimizer_step"),
    ]
    for process in ("rank0", "rank1"):
        run = read(tmp_path, process)
        assert [(f["kind"], f["subject"], f["hook"]) for f in run["report"]["findings"]] == expected, process
        assert all(f["ranks"] == [0, 1] for f in run["report"]["findings"])
        text = " ".join(f["message"] for f in run["report"]["findings"])
        assert "the whole Sharded" in text and "FSDP" not in text and "_flat_param" not in text
        assert not any("internal error" in w for w in run["warnings"])
    assert len(read(tmp_path, "rank0")["warnings"]) == len(expected) and read(tmp_path, "rank1")["warnings"] == []
    # every rank replayed the same batches the same number of times, as rank 0 decided (rank 1's own
    # budget allowed nothing): graph, memory and time savings for every validation epoch
    repeats = {
        p: [e["details"]["repeats"] for e in read(tmp_path, p)["report"]["epochs"] if e["stage"] == "val"]
        for p in ("rank0", "rank1")
    }
    assert repeats["rank0"] == repeats["rank1"] and all(r >= 3 for r in repeats["rank0"]), repeats
    for key in ("graph_memory_mib", "memory_saved_mib", "time_saved_pct"):
        assert len(csv_values(tmp_path / "csv", f"nograd/val/{key}")) == 2, key
