"""Every private PyTorch API, taken away in turn: import still works, the check that needs it falls back
or switches off with one clear warning, and every other check keeps finding what it finds."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tokenize
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_nograd import NoGradAuditor, audit
from lightning_nograd.core.plumbing import torch_internals
from lightning_nograd.core.plumbing.torch_internals import INTERNALS, MissingTorchInternal, describe
from lightning_nograd.core.savings.recording import StepRecorder
from tests.core.plumbing.torch_removal import without
from tests.helpers import loader, nograd_warnings, trainer


@pytest.fixture(autouse=True)
def _resolved_again() -> Iterator[None]:
    """Each test leaves the internals looked up on the real torch again."""
    yield
    torch_internals.resolve()
    torch_internals._warned.clear()


def _without(key: str) -> Any:
    return without(INTERNALS[key].names)


# Internals that torch's own code uses during any forward (module calls read the hook dicts and run
# `_call_impl`; modules are built with `_parameters`; the public saved-tensor context calls the pair it
# replaces): a torch without them would have replaced them, so they are taken away while they are
# looked up, and the run then goes on that torch. The others stay away for the whole run.
_NEEDED_BY_TORCH_ITSELF = {"saved_tensors_stack", "hook_dicts", "call_impl", "module_dicts"}
_LOOKED_UP_AT_IMPORT = [key for key in INTERNALS if key not in torch_internals._LOOKED_UP_AT_USE]


class SeededBugs(pl.LightningModule):
    """One finding of each kind the internals feed: train mode and a graph in validation, a no_grad
    block, an unused head and a stray forward in training."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.block = nn.Linear(16, 16)
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(16, 1))
        self.aux = nn.Linear(16, 1)  # never used

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = self.encoder(x)
        with torch.no_grad():
            h = h + self.block(h)
        return nn.functional.mse_loss(self.head(h), y)

    def on_train_epoch_end(self) -> None:
        self.encoder(torch.randn(2, 8))  # a graph nobody uses

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.head[0].train()
        with torch.enable_grad():
            h = self.encoder(x)
        return nn.functional.mse_loss(self.head(h.detach()), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _run(tmp_path: Path) -> tuple[NoGradAuditor, list[str]]:
    """Build the auditor and fit the seeded model; the auditor and every lightning-nograd warning."""
    with nograd_warnings() as seen:
        auditor = NoGradAuditor(verbose=False)
        torch.manual_seed(0)
        trainer(tmp_path, [auditor], max_epochs=2).fit(SeededBugs(), loader(n=16), loader(n=16))
    return auditor, [str(w.message) for w in seen]


def _found(auditor: NoGradAuditor) -> set[tuple[str, str]]:
    return {(f.kind, f.subject) for f in auditor.report.findings}


def _val_epochs(auditor: NoGradAuditor) -> list[Any]:
    return [e for e in auditor.report.epochs if e.stage == "val"]


@pytest.fixture(scope="module")
def with_every_internal(tmp_path_factory: pytest.TempPathFactory) -> set[tuple[str, str]]:
    auditor, messages = _run(tmp_path_factory.mktemp("all"))
    assert not [m for m in messages if "lacks" in m or "internal error" in m], messages
    found = _found(auditor)
    assert {kind for kind, _ in found} >= {
        "train_mode",
        "grad_enabled",
        "no_grad_module",
        "param_without_grad",
        "stray_graph",
    }, found
    assert all("nograd/val/graph_memory_mib" in e.metrics for e in _val_epochs(auditor))
    return found


def test_every_internal_is_found_on_this_torch() -> None:
    assert torch_internals.missing() == {}
    assert torch_internals.FORWARD_HOOKS_TAKE_KWARGS or torch_internals.CALL_IMPL_CODE is not None


@pytest.mark.parametrize("key", _LOOKED_UP_AT_IMPORT)
def test_without_one_internal_the_rest_works(
    key: str, tmp_path: Path, with_every_internal: set[tuple[str, str]]
) -> None:
    internal = INTERNALS[key]
    if key in _NEEDED_BY_TORCH_ITSELF:
        with _without(key):
            torch_internals.resolve()
        auditor, messages = _run(tmp_path)
    else:
        with _without(key):
            torch_internals.resolve()
            auditor, messages = _run(tmp_path)
    assert key in torch_internals.missing()
    assert not [m for m in messages if "internal error" in m], messages
    about_it = [m for m in messages if internal.names[0] in m]
    if internal.lost is None:  # a public API does the same: nothing to warn about, nothing lost
        assert about_it == [], about_it
    else:  # said once, as the auditor was built, with what is lost
        assert len(about_it) == 1, messages
        assert internal.lost in about_it[0] and "Every other check works" in about_it[0]

    found = _found(auditor)
    val = _val_epochs(auditor)
    if key == "call_impl":  # graphs are still found, named by the model instead of the module
        graphs = {"grad_enabled", "stray_graph"}
        assert {k for k, s in found if k in graphs} == graphs
        assert all(s == "" for k, s in found if k in graphs), found
        assert {f for f in found if f[0] not in graphs} == {f for f in with_every_internal if f[0] not in graphs}
    elif key == "function_mode_stack":  # the encoder the no_grad block cut off is named apart, without its cause
        assert found == with_every_internal | {("param_without_grad", "encoder")}
    else:
        assert found == with_every_internal
    replay_lost = key == "hook_dicts" or (key == "call_impl" and not torch_internals.FORWARD_HOOKS_TAKE_KWARGS)
    if replay_lost:  # your hooks cannot be silenced, or (torch 2.4) keyword arguments read: no replay, and why
        assert all("nograd/val/graph_memory_mib" not in e.metrics for e in val)
        assert all(e.details["savings"].startswith("replay skipped: ") for e in val), [e.details for e in val]
    else:
        assert all(
            "nograd/val/graph_memory_mib" in e.metrics and "nograd/val/memory_saved_mib" in e.metrics for e in val
        ), val


@pytest.mark.parametrize(("key", "measured"), [("dispatch_mode", False), ("profiler_enabled", True)])
def test_under_your_profiler_memory_is_measured_from_returned_tensors_or_skipped(key: str, measured: bool) -> None:
    net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 1))
    with _without(key):
        torch_internals.resolve()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autograd.profiler.profile(), audit(net, repeats=2) as report, torch.no_grad():
                for _ in range(3):
                    net(torch.randn(16, 8))
    (epoch,) = report.epochs
    if measured:  # LiveTensorMemory counts what ops return
        assert epoch.metrics["nograd/val/graph_memory_mib"] > 0 and "nograd/val/memory_saved_mib" in epoch.metrics
    else:
        assert epoch.details["savings"] == "replay skipped: " + describe("dispatch_mode")


def test_a_compile_wrapper_without_its_eager_module_is_not_replayed() -> None:
    compiled = torch.compile(nn.Linear(2, 2), backend="eager")
    assert torch_internals.eager_module(compiled) is compiled._orig_mod
    del compiled._modules["_orig_mod"]
    with pytest.raises(MissingTorchInternal, match="_orig_mod"):
        torch_internals.eager_module(compiled)
    assert "orig_mod" in torch_internals.missing()


def test_keyword_arguments_are_recorded_where_global_hooks_take_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.4's global forward hooks have no ``with_kwargs``: the call's frame holds them."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return self.linear(x) * scale

    net = Scaled()
    monkeypatch.setattr(torch_internals, "FORWARD_HOOKS_TAKE_KWARGS", False)
    recorder = StepRecorder({id(net)})
    recorder.start()
    with torch.no_grad():
        net(torch.ones(1, 2), scale=3.0)
    tape = recorder.stop()
    assert tape is not None
    (call,) = tape.entries
    assert call.kwargs == {"scale": 3.0}
    assert torch_internals.replay_refusal() is None
    monkeypatch.setattr(torch_internals, "CALL_IMPL_CODE", None)  # and where the frame cannot be found
    assert torch_internals.replay_refusal() == "replay skipped: " + describe("call_impl")


def test_importing_and_building_work_with_every_internal_taken_away() -> None:
    names = [name for key in _LOOKED_UP_AT_IMPORT for name in INTERNALS[key].names]
    lost = [key for key in _LOOKED_UP_AT_IMPORT if INTERNALS[key].lost]
    script = f"""
        import warnings
        from tests.core.plumbing.torch_removal import without
        with without({names!r}):
            import lightning_nograd
            from lightning_nograd.core.plumbing import torch_internals
        assert sorted(torch_internals.missing()) == {sorted(_LOOKED_UP_AT_IMPORT)!r}, torch_internals.missing()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            lightning_nograd.NoGradAuditor()
            lightning_nograd.EvalModeAuditor()
        messages = [str(w.message) for w in seen if issubclass(w.category, lightning_nograd.NoGradWarning)]
        assert len(messages) == {len(lost)}, messages
        print("ok", len(messages))
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[3],
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok"), done.stdout


_PRIVATE_TORCH = re.compile(
    r"torch\._\w+|torch\.utils\._\w+|\b_global_\w+|\._call_impl\b|\._orig_mod\b|kineto_results"
    r"|(?<!self)\._(parameters|modules|buffers)\b|\._(forward|backward)\w*_hooks\w*"
)


def test_no_private_torch_api_is_used_outside_torch_internals() -> None:
    package = Path(__file__).resolve().parents[3] / "lightning_nograd"
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "torch_internals.py":
            continue
        with path.open() as source:  # code only: docstrings, strings and comments may name them
            tokens = [
                t.string
                for t in tokenize.generate_tokens(source.readline)
                if t.type == tokenize.NAME or t.string == "."
            ]
        code = " ".join(tokens).replace(" . ", ".")
        found += [f"{path.relative_to(package)}: {m.group(0)}" for m in _PRIVATE_TORCH.finditer(code)]
    assert found == []


def test_the_readme_names_every_internal_and_what_happens_without_it() -> None:
    readme = (Path(__file__).resolve().parents[3] / "docs" / "torch-internals.md").read_text()
    section = readme.split("# PyTorch internals\n", 1)[1]
    assert torch_internals.CHECKED_ON in section
    for internal in INTERNALS.values():
        assert all(f"`{name}`" in section for name in internal.names), internal.names
        assert internal.purpose in section and internal.without in section, internal.names
