"""The CLI, run as a subprocess against the example models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, entry: str = "module") -> subprocess.CompletedProcess[str]:
    command = (
        [sys.executable, "-m", "lightning_nograd"]
        if entry == "module"
        else [str(Path(sys.executable).with_name("lightning-nograd"))]
    )
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        check=False,
    )


def test_clean_model_exits_zero() -> None:
    done = cli("audit", "examples.quickstart:Classifier", "--data", "examples.quickstart:SyntheticData")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "No findings" in done.stdout


def test_findings_exit_one_and_json_report(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    done = cli(
        "audit",
        "examples.quickstart:Classifier",
        "--data",
        "examples.quickstart:SyntheticData",
        "--init-args",
        '{"planted_bug": true}',
        "--json",
        str(report),
        entry="script",
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "`net.3` (Dropout)" in done.stdout
    data = json.loads(report.read_text())
    assert [f["kind"] for f in data["findings"]] == ["train_mode"]


def test_every_bug_example_is_audited() -> None:
    done = cli("audit", "examples.every_bug:BuggyModel", "--data", "examples.every_bug:BuggyData", "--batches", "3")
    assert done.returncode == 1, done.stderr[-2000:]
    for text in ("`block2` has trainable parameters", "`aux_head`", "ran with gradients enabled", "eval mode"):
        assert text in done.stdout, text


def test_bad_arguments_give_one_line_and_exit_two() -> None:
    for args, text in [
        (("audit", "no_such_module:Model"), "cannot import 'no_such_module'"),
        (("audit", "examples.quickstart"), "must look like 'package.module:ClassName'"),
        (("audit", "examples.quickstart:Nope"), "has no attribute 'Nope'"),
        (("audit", "examples.quickstart:Classifier", "--init-args", "{bad"), "--init-args is not valid JSON"),
        (("audit", "examples.quickstart:Classifier", "--init-args", '{"width": 3}'), "cannot build Classifier"),
        (("audit", "examples.quickstart:synthetic_data"), "MODEL must name a class"),
    ]:
        done = cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert text in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_help_shows_an_example() -> None:
    done = cli("audit", "--help")
    assert done.returncode == 0
    assert "example:" in done.stdout and "lightning-nograd audit examples.quickstart:Classifier" in done.stdout
