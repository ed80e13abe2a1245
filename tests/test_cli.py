"""The CLI, run as a subprocess against the example models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, entry: str = "module", path: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = (
        [sys.executable, "-m", "lightning_nograd"]
        if entry == "module"
        else [str(Path(sys.executable).with_name("lightning-nograd"))]
    )
    return run(command + list(args), path)


def run(command: list[str], path: Path | None) -> subprocess.CompletedProcess[str]:
    """``command`` from the repository's root, with it and ``path`` importable."""
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in (ROOT, path) if p is not None)),
        check=False,
    )


# Runs `main` once per argument list in one process, each with its own stdout and stderr (a process per
# call spent most of its time importing torch and Lightning); the entry points themselves are run above.
DRIVER = """
import contextlib, io, json, sys
from lightning_nograd.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit:  # argparse's refusals
            code = exit.code
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def cli_calls(calls: list[tuple[str, ...]], path: Path | None = None) -> list[subprocess.CompletedProcess[str]]:
    """``main(args)`` for each of ``calls``, in one fresh process: exit code, stdout and stderr of each."""
    done = run([sys.executable, "-c", DRIVER, json.dumps([list(args) for args in calls])], path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    return [
        subprocess.CompletedProcess(list(a), code, out, err) for a, (code, out, err) in zip(calls, results, strict=True)
    ]


def test_clean_model_exits_zero() -> None:
    done = cli("audit", "examples.quickstart:Classifier", "--data", "examples.quickstart:SyntheticData")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "No findings" in done.stdout


def test_findings_exit_one_and_json_report(tmp_path: Path) -> None:
    report = tmp_path / "reports" / "ci" / "report.json"  # missing folders are created, as `report_path` does
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


def test_its_notes_name_its_own_options_and_promise_no_later_epoch(tmp_path: Path) -> None:
    # no time budget at all, whatever the machine's speed: every stage's time waits, and the notes say why
    quickstart = ("examples.quickstart:Classifier", "--data", "examples.quickstart:SyntheticData", "--batches", "2")
    report = tmp_path / "report.json"
    refused, forced = cli_calls(
        [("audit", *quickstart, "--budget", "0", "--json", str(report)), ("audit", *quickstart, "--repeats", "3")]
    )
    assert refused.returncode == 0, refused.stderr[-2000:]
    notes = [line for line in refused.stdout.splitlines() if "time not measured" in line]
    assert len(notes) == 3 and all("raise `--budget` or set `--repeats`" in note for note in notes), notes
    assert not any("`budget`" in note or "`repeats`" in note for note in notes)
    # only the fit's first validation epoch has one after it; the table's rows end with an epoch that has none
    assert not any("tried again" in note for note in notes), notes
    epochs = [e for e in json.loads(report.read_text())["epochs"] if e["stage"] != "train"]
    assert [("tried again" in e["details"]["savings"]) for e in epochs] == [True, False, False, False]
    assert forced.returncode == 0 and "time not measured" not in forced.stdout, forced.stdout


def test_every_bug_example_is_audited() -> None:
    done = cli("audit", "examples.every_bug:BuggyModel", "--data", "examples.every_bug:BuggyData", "--batches", "3")
    assert done.returncode == 1, done.stderr[-2000:]
    for text in ("`block2` has trainable parameters", "`aux_head`", "ran with gradients enabled", "eval mode"):
        assert text in done.stdout, text


def test_bad_arguments_give_one_line_and_exit_two() -> None:
    cases = [
        (("audit", "no_such_module:Model"), "cannot import 'no_such_module'"),
        (("audit", "examples.quickstart"), "must look like 'package.module:ClassName'"),
        (("audit", "examples.quickstart:Nope"), "has no attribute 'Nope'"),
        (("audit", "examples.quickstart:Classifier", "--init-args", "{bad"), "--init-args is not valid JSON"),
        (("audit", "examples.quickstart:Classifier", "--init-args", '{"width": 3}'), "cannot build Classifier"),
        (("audit", "examples.quickstart:synthetic_data"), "MODEL must name a class"),
        (("audit", "examples.quickstart:Classifier", "--budget", "-1"), "--budget must be between 0 and 1000"),
        (("audit", "examples.quickstart:Classifier", "--repeats", "0"), "--repeats must be at least 1"),
    ]
    for (args, text), done in zip(cases, cli_calls([args for args, _ in cases]), strict=True):
        assert done.returncode == 2, (args, done.stderr)
        assert text in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_help_shows_an_example() -> None:
    done = cli("audit", "--help")
    assert done.returncode == 0
    assert "example:" in done.stdout and "lightning-nograd audit examples.quickstart:Classifier" in done.stdout


PROBLEM_MODELS = """
import lightning.pytorch as pl
import pytorch_lightning
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from examples.quickstart import Classifier, SyntheticData


class NeedsPositiveWidth(Classifier):
    def __init__(self, hidden: int = 8) -> None:
        if hidden < 1:
            raise ValueError(f"hidden must be positive, got {hidden}")
        super().__init__()


class BrokenData(SyntheticData):
    def __init__(self, batch_size: int = 64) -> None:
        raise RuntimeError("no such dataset")


class CrashesInTrainingStep(Classifier):
    def training_step(self, batch, batch_idx):
        raise RuntimeError("shape mismatch in the loss")


class NoDataloaders(Classifier):
    pass


class NotADataModule:
    pass


class ClassicNamespace(pytorch_lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=4)
"""

DATA = ("--data", "examples.quickstart:SyntheticData")


def test_exit_codes_and_one_line_messages(tmp_path: Path) -> None:
    (tmp_path / "problem_models.py").write_text(PROBLEM_MODELS)
    unwritable = Path("/proc/nograd/report.json")  # a pseudo file system: no permission bit says so
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [
        (
            ("problem_models:NeedsPositiveWidth", *DATA, "--init-args", '{"hidden": -4}'),
            2,
            "stderr",
            "cannot build NeedsPositiveWidth from MODEL: ValueError: hidden must be positive, got -4",
        ),
        (
            ("problem_models:NeedsPositiveWidth", "--data", "problem_models:BrokenData"),
            2,
            "stderr",
            "cannot build BrokenData from --data: RuntimeError: no such dataset",
        ),
        (
            ("problem_models:NeedsPositiveWidth", *DATA, "--json", str(unwritable)),
            2,
            "stderr",
            "--json cannot be written to '/proc/nograd/report.json': '/proc' is not writable",
        ),
        (
            ("problem_models:NeedsPositiveWidth", *DATA, "--json", str(blocker / "report.json")),
            2,
            "stderr",
            "is not a directory",
        ),
        (
            ("problem_models:NeedsPositiveWidth", "--data", "problem_models:NotADataModule"),
            2,
            "stderr",
            "--data must be a LightningDataModule subclass, got NotADataModule",
        ),
        (
            ("problem_models:NeedsPositiveWidth", "--data-init-args", '{"batch_size": 8}'),
            2,
            "stderr",
            "--data-init-args needs --data",
        ),
        (
            ("problem_models:CrashesInTrainingStep", *DATA),
            3,
            "stdout",
            "The audit could not finish: `trainer.fit` stopped with RuntimeError: shape mismatch in the loss",
        ),
        (("problem_models:NoDataloaders",), 3, "stdout", "The audit could not finish: `trainer.fit` stopped with"),
    ]
    calls = cli_calls([("audit", *args) for args, *_ in cases], path=tmp_path)
    for (args, code, stream, text), done in zip(cases, calls, strict=True):
        assert done.returncode == code, (args, done.stdout[-1500:], done.stderr[-1500:])
        output = getattr(done, stream)
        assert text in output, (args, output)
        assert "Traceback" not in done.stderr and "No findings" not in done.stdout, (args, done.stderr)
        if code == 2:
            assert len(done.stderr.strip().splitlines()) == 1, done.stderr
            assert done.stdout == "", done.stdout  # refused before anything ran
    assert not unwritable.parent.exists()


def test_pytorch_lightning_namespace_model_is_audited(tmp_path: Path) -> None:
    (tmp_path / "problem_models.py").write_text(PROBLEM_MODELS)
    done = cli("audit", "problem_models:ClassicNamespace", path=tmp_path)
    assert done.returncode == 0, (done.stdout[-1500:], done.stderr[-1500:])
    assert "No findings" in done.stdout


def test_allow_lists_mean_what_the_callback_arguments_mean() -> None:
    planted = ("audit", "examples.quickstart:Classifier", *DATA, "--init-args", '{"planted_bug": true}')
    buggy = ("audit", "examples.every_bug:BuggyModel", "--data", "examples.every_bug:BuggyData", "--batches", "3")
    calls = [
        planted,
        (*planted, "--allow-train-mode", r"net\.3"),
        (*planted, "--allow-grad", r"net\.3"),  # another allow-list: the finding stays
        buggy,
        (*buggy, "--allow", "block2", "--allow", "aux_head", "--allow-grad", "", "--allow-train-mode", r"head\.0"),
        (*planted, "--allow-train-mode", "("),
    ]
    found, allowed, other_list, buggy_found, buggy_allowed, bad = cli_calls(calls)
    assert found.returncode == 1 and "`net.3` (Dropout)" in found.stdout
    assert allowed.returncode == 0 and "No findings" in allowed.stdout, allowed.stdout[-2000:]
    assert other_list.returncode == 1 and "`net.3` (Dropout)" in other_list.stdout
    # what the allow-lists cover is gone; the findings they do not cover stay
    for text in ("`block2` has trainable parameters", "`aux_head`", "ran with gradients enabled", "`head.0`"):
        assert text in buggy_found.stdout and text not in buggy_allowed.stdout, text
    assert buggy_allowed.returncode == 1 and "outside the training step" in buggy_allowed.stdout
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == (
        "lightning-nograd: error: --allow-train-mode must be a regular expression, got '(' "
        "(missing ), unterminated subpattern at position 0)"
    )


GRU_MODEL = """
import lightning.pytorch as pl
import torch
from torch import nn


class GRUClassifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.emb_drop = nn.Dropout(0.2)
        self.encoder = nn.GRU(8, 8, batch_first=True, dropout=0.1, num_layers=2)
        self.head = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.2), nn.Linear(8, 2))

    def forward(self, x):
        return self.head(self.encoder(self.emb_drop(self.emb(x)))[0][:, -1])

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.train()  # the bug: the whole model in train mode
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randint(0, 20, (16, 6)), torch.randint(0, 2, (16,)))
        return torch.utils.data.DataLoader(data, batch_size=4)

    val_dataloader = train_dataloader
"""


def test_a_finding_on_the_whole_model_is_silenced_by_the_flag_it_prints(tmp_path: Path) -> None:
    import re

    (tmp_path / "gru_model.py").write_text(GRU_MODEL)
    args = ("audit", "gru_model:GRUClassifier", "--batches", "2")
    (found,) = cli_calls([args], path=tmp_path)
    assert found.returncode == 1, found.stderr[-2000:]
    assert "the whole GRUClassifier was switched to train mode during the step;" in found.stdout  # named once
    flag = re.search(r"CLI: `--allow-train-mode '(.*?)'`", found.stdout)
    assert flag is not None and flag.group(1) == "emb_drop|encoder|head\\.1", found.stdout
    (silenced,) = cli_calls([(*args, "--allow-train-mode", flag.group(1))], path=tmp_path)
    assert silenced.returncode == 0, silenced.stdout[-3000:]


def test_every_finding_of_the_every_bug_example_is_silenced_by_the_flags_it_prints(tmp_path: Path) -> None:
    import re

    args = ("audit", "examples.every_bug:BuggyModel", "--data", "examples.every_bug:BuggyData", "--batches", "3")
    (found,) = cli_calls([(*args, "--json", str(tmp_path / "found.json"))])
    assert found.returncode == 1, found.stderr[-2000:]
    flags: list[str] = []
    for finding in json.loads((tmp_path / "found.json").read_text())["findings"]:
        flag = re.search(r"CLI: `(--allow[\w-]*) '(.+?)'`", finding["fix"])
        assert flag is not None, finding["fix"]
        flags += [flag.group(1), flag.group(2)]
    (silenced,) = cli_calls([(*args, *flags)])
    assert silenced.returncode == 0, silenced.stdout[-3000:]
