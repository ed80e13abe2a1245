"""Run a slice of Lightning's own tests twice, without and with ``NoGradAuditor()`` in every Trainer.

    python -m tests.lightning_suite [--tests TARBALL_OR_DIR] [--work DIR] [--timeout S]

Both runs use the same pytest plugin (``lightning_suite.plugin``); they run side by side, one thread
each. The step fails when a test's outcome differs between the two runs and the test is not in
``allowlist.toml`` (each entry gives its reason), or when a Trainer of the baseline got no auditor.
Allow-listed tests whose outcomes no longer differ are reported, so the list can shrink.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

HERE = Path(__file__).resolve().parent
DEFAULT_TESTS = HERE / "lightning-2.6.5-tests.tar.gz"

#: The slice: Lightning's tests of the loops, the trainer's flags, optimisation and logging, the
#: LightningModule and its optimizers, the hook order, and the callbacks that change the model or
#: its training (pruning, fine-tuning, weight averaging, SWA, early stopping, LR monitor). Left out:
#: distributed/accelerator tests (no GPU, no multi-process here), the legacy-checkpoint tests
#: (they download checkpoints and fail without the callback too), and the slow remainder.
SLICE = (
    "tests_pytorch/loops",
    "tests_pytorch/trainer/flags",
    "tests_pytorch/trainer/optimization",
    "tests_pytorch/trainer/logging_",
    "tests_pytorch/models/test_hooks.py",
    "tests_pytorch/core/test_lightning_module.py",
    "tests_pytorch/core/test_lightning_optimizer.py",
    "tests_pytorch/callbacks/test_pruning.py",
    "tests_pytorch/callbacks/test_finetuning_callback.py",
    "tests_pytorch/callbacks/test_weight_averaging.py",
    "tests_pytorch/callbacks/test_stochastic_weight_avg.py",
    "tests_pytorch/callbacks/test_early_stopping.py",
    "tests_pytorch/callbacks/test_lr_monitor.py",
    "tests_pytorch/callbacks/test_callbacks.py",
    "tests_pytorch/callbacks/test_lambda_function.py",
)


@dataclass(frozen=True)
class Comparison:
    """What differs between the baseline run and the injected run."""

    unexplained: dict[str, tuple[str, str]]  # test -> (baseline outcome, injected outcome)
    allowed: dict[str, tuple[str, str]]
    stale: list[str]  # allow-listed, but the outcomes are equal now (or the test is gone)
    missing_auditor: dict[str, tuple[int, int]]  # test -> (Trainers in the baseline, in the injected run)
    tests: int
    trainers: int

    @property
    def ok(self) -> bool:
        return not self.unexplained and not self.missing_auditor


def load_allowlist(path: Path) -> dict[str, str]:
    """``{test id: reason}`` from ``allowlist.toml``; every entry needs a non-empty reason."""
    with path.open("rb") as f:
        entries = tomllib.load(f).get("allowed", [])
    allowed: dict[str, str] = {}
    for entry in entries:
        test, reason = entry.get("test"), entry.get("reason", "").strip()
        if not test or not reason:
            raise ValueError(f"{path}: every [[allowed]] entry needs `test` and a `reason`, got {entry!r}")
        allowed[test] = reason
    return allowed


def compare(baseline: dict, injected: dict, allowlist: dict[str, str]) -> Comparison:
    """Compare two outcome files written by the plugin."""
    base_out, inj_out = baseline["outcomes"], injected["outcomes"]
    differing = {
        test: (base_out.get(test, "not run"), inj_out.get(test, "not run"))
        for test in sorted(base_out.keys() | inj_out.keys())
        if base_out.get(test) != inj_out.get(test)
    }
    unexplained = {t: d for t, d in differing.items() if t not in allowlist}
    allowed = {t: d for t, d in differing.items() if t in allowlist}
    stale = sorted(t for t in allowlist if t not in differing)
    base_tr, inj_tr = baseline["trainers"], injected["trainers"]
    missing = {
        t: (n, inj_tr.get(t, 0))
        for t, n in sorted(base_tr.items())
        if inj_tr.get(t, 0) < n and t not in differing  # a differing test may stop early
    }
    return Comparison(unexplained, allowed, stale, missing, len(base_out), sum(inj_tr.values()))


def _tests_dir(source: Path, work: Path) -> Path:
    if source.is_dir():
        return source
    with tarfile.open(source) as tar:
        tar.extractall(work, filter="data")
    return work / "tests"


def run_both(tests_dir: Path, work: Path, timeout: int, selection: tuple[str, ...] = SLICE) -> tuple[dict, dict]:
    """Run ``selection`` twice side by side (baseline, injected); return the two outcome files."""
    procs = []
    for name, inject in (("baseline", "0"), ("injected", "1")):
        env = dict(
            os.environ,
            NOGRAD_SUITE_INJECT=inject,
            NOGRAD_SUITE_OUTCOMES=str(work / f"{name}.json"),
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
        )
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "lightning_suite.plugin",
               f"--basetemp={work / ('tmp-' + name)}", "-W", "ignore::DeprecationWarning"]  # fmt: skip
        if importlib.util.find_spec("pytest_timeout") is not None:  # CI installs it: a hung test fails alone
            cmd.append(f"--timeout={timeout}")
        cmd += selection
        log = (work / f"{name}.log").open("w")
        procs.append((name, subprocess.Popen(cmd, cwd=tests_dir, env=env, stdout=log, stderr=subprocess.STDOUT)))
    for name, proc in procs:
        proc.wait()
        print(f"{name}: pytest exited {proc.returncode} (log: {work / (name + '.log')})")
    return tuple(json.loads((work / f"{name}.json").read_text()) for name in ("baseline", "injected"))  # type: ignore[return-value]


def report(c: Comparison, allowlist: dict[str, str]) -> str:
    lines = [f"{c.tests} tests, {c.trainers} Trainers built with NoGradAuditor() injected"]
    for title, rows in (("UNEXPLAINED differences", c.unexplained), ("allowed differences", c.allowed)):
        if rows:
            lines.append(f"{title} (baseline -> injected):")
            lines += [
                f"  {t}: {a} -> {b}" + (f"  [{allowlist[t]}]" if t in allowlist else "") for t, (a, b) in rows.items()
            ]
    if c.missing_auditor:
        lines.append("Trainers without an injected auditor (baseline count, injected count):")
        lines += [f"  {t}: {a}, {b}" for t, (a, b) in c.missing_auditor.items()]
    if c.stale:
        lines.append("allow-listed but no longer different (remove from allowlist.toml):")
        lines += [f"  {t}" for t in c.stale]
    lines.append("OK" if c.ok else "FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lightning_suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", type=Path, default=DEFAULT_TESTS, help="tarball or folder holding `tests/`")
    parser.add_argument("--work", type=Path, default=None, help="where to extract and write logs (temp dir)")
    parser.add_argument("--timeout", type=int, default=300, help="per-test timeout in seconds")
    parser.add_argument("selection", nargs="*", help="test paths (default: the slice)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="lightning-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    allowlist = load_allowlist(HERE / "allowlist.toml")
    start = time.monotonic()
    baseline, injected = run_both(_tests_dir(args.tests, work), work, args.timeout, tuple(args.selection) or SLICE)
    comparison = compare(baseline, injected, allowlist)
    print(report(comparison, allowlist))
    print(f"{time.monotonic() - start:.0f} s")
    return 0 if comparison.ok else 1


if __name__ == "__main__":
    sys.exit(main())
