from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_nograd import BrokenBackpropWarning, NoGradError, NoGradWarning, audit, check_training_step


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"`model`.*torch.nn.Module.*str"), audit("net"):  # type: ignore[arg-type]
        pass
    with pytest.raises(ValueError, match=r"`on_violation`.*'loud'"), audit(make_net(), on_violation="loud"):  # type: ignore[arg-type]
        pass
    with pytest.raises(ValueError, match=r"`repeats`.*>= 1.*0"), audit(make_net(), repeats=0):
        pass
    with pytest.raises(TypeError, match=r"`loss_fn`.*callable"):
        check_training_step(make_net(), None, "mse")  # type: ignore[arg-type]


def test_correct_evaluation_loop_is_clean_and_savings_are_measured() -> None:
    net = make_net().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoGradWarning)
        with audit(net, repeats=6) as report, torch.no_grad():
            for _ in range(4):
                net(torch.randn(16, 8))
    assert report.findings == []
    (epoch,) = report.epochs
    assert epoch.metrics["nograd/val/violations"] == 0
    assert epoch.metrics["nograd/val/graph_memory_mib"] > 0
    assert epoch.details["repeats"] == 6
    assert not torch.nn.modules.module._global_forward_pre_hooks


def test_buggy_evaluation_loop_gets_the_same_findings_as_the_callbacks() -> None:
    net = make_net()  # left in train mode, no no_grad
    with pytest.warns(NoGradWarning) as seen, audit(net, monitor_savings=False) as report:
        for _ in range(3):
            net(torch.randn(16, 8))
    kinds = sorted(f.kind for f in report.findings)
    assert kinds == ["grad_enabled", "graph_in_outputs", "train_mode"]
    train = next(f for f in report.findings if f.kind == "train_mode")
    assert "the whole Sequential ran its forward in train mode" in train.message  # named once, by its class
    assert "1 (BatchNorm1d)" in train.message and "3 (Dropout)" in train.message
    assert len(seen) == 3, "each finding once, not once per batch"
    assert {w.filename for w in seen} == {__file__}, "warnings point at the user's loop, not at our code"


def test_fix_and_error_modes() -> None:
    net = make_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with audit(net, on_violation="fix", monitor_savings=False), torch.no_grad():
            net(torch.randn(4, 8))
            assert not net.training
    net = make_net()
    with pytest.raises(NoGradError, match="ran its forward in train mode"), audit(net, on_violation="error"):
        with torch.no_grad():
            net(torch.randn(4, 8))
    assert not torch.nn.modules.module._global_forward_pre_hooks, "hooks removed after the error"


def test_check_training_step_names_what_will_not_learn_and_restores_the_model() -> None:
    net = make_net().train()
    net.extra = nn.Linear(3, 3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        with torch.no_grad():
            h = model[0](x)
        return nn.functional.mse_loss(model[4](model[3](model[2](model[1](h)))), y)

    batch = (torch.randn(8, 8), torch.randn(8, 1))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.warns(BrokenBackpropWarning):
        report = check_training_step(net, batch, loss_fn, optimizer)
    found = {(f.kind, f.subject) for f in report.findings}
    assert ("no_grad_module", "0") in found
    assert ("param_without_grad", "extra") in found
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "batch-norm stats restored"
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in net.parameters())


def test_check_training_step_is_silent_for_a_correct_step_and_frozen_parts() -> None:
    net = make_net().train()
    net[0].requires_grad_(False)

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    with warnings.catch_warnings():
        warnings.simplefilter("error", NoGradWarning)
        report = check_training_step(net, (torch.randn(8, 8), torch.randn(8, 1)), loss_fn)
    assert report.findings == []


THIRD_PARTY_EVALUATE = """
def evaluate(model, batches):
    # an installed library's evaluation loop (a reference script, a benchmark harness)
    return [model(x) for x in batches]
"""


def test_warnings_skip_installed_third_party_frames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "site-packages" / "fakeharness"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(THIRD_PARTY_EVALUATE)
    monkeypatch.syspath_prepend(str(tmp_path / "site-packages"))
    from fakeharness import evaluate  # type: ignore[import-not-found]

    net = make_net()  # left in train mode: a finding on every batch
    with pytest.warns(NoGradWarning) as seen, audit(net, monitor_savings=False), torch.no_grad():
        evaluate(net, [torch.randn(16, 8) for _ in range(2)])
    assert seen and {w.filename for w in seen} == {__file__}, [(w.filename, str(w.message)) for w in seen]


class SwitchesDropoutOn(nn.Module):
    """Evaluated correctly from outside, but its forward switches its dropout to train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.drop = nn.Linear(8, 8), nn.Dropout(0.5)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.drop.train()
        return self.head(self.drop(self.body(x)))


def test_audit_and_the_callback_give_a_train_mode_switch_the_same_subject_and_fix(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    from lightning_nograd import EvalModeAuditor
    from tests.helpers import loader, nograd_warnings, trainer

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = SwitchesDropoutOn()

        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
            self.net(batch[0])

    auditor = EvalModeAuditor()
    with nograd_warnings():
        trainer(tmp_path, [auditor]).validate(Lit(), loader())
    net = SwitchesDropoutOn().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with audit(net, monitor_savings=False) as report, torch.no_grad():
            net(torch.randn(4, 8))
    # the callback's model holds the net as `self.net`: its paths (and the patterns that silence them) start with it
    from_callback = [
        (f.kind, f.subject.removeprefix("net."), f.fix.replace("net\\.", "")) for f in auditor.report.findings
    ]
    from_audit = [(f.kind, f.subject, f.fix) for f in report.findings]
    assert from_callback == from_audit == [("train_mode", "drop", from_audit[0][2])]
    assert from_audit[0][2].startswith("remove the `.train()` call")  # not "call model.eval()": it was in eval


class EnablesGradInside(nn.Module):
    """Evaluated correctly from outside (eval mode, no_grad), but its forward turns both back on."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.drop, self.head = nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.drop.train()
        with torch.enable_grad():
            return self.head(self.drop(self.body(x)))


def test_the_same_evaluation_bugs_get_the_same_findings_from_audit_and_the_callback(tmp_path: Path) -> None:
    """Every evaluation kind that both can see, through both: equal kind, subject and fix."""
    import lightning.pytorch as pl

    from lightning_nograd import EvalModeAuditor
    from tests.helpers import loader, nograd_warnings, trainer

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = EnablesGradInside()

        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.net(batch[0])  # attached: the graph comes back with the output

    auditor = EvalModeAuditor()
    with nograd_warnings():
        trainer(tmp_path, [auditor], inference_mode=False).validate(Lit(), loader())
    net = EnablesGradInside().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with audit(net, monitor_savings=False) as report, torch.no_grad():
            net(torch.randn(4, 8))

    def seen(findings: list, root: str, outputs: str) -> set[tuple[str, str, str]]:
        # the same module under its own path: `net.body` in the LightningModule is `body` for audit(net), and the
        # patterns the fixes name follow it
        subjects = {outputs: "outputs", root: ""}

        def fix(text: str) -> str:
            return (
                text.replace(f"{root}\\.", "").replace(outputs, "outputs") if root else text.replace(outputs, "outputs")
            )

        return {(f.kind, subjects.get(f.subject, f.subject.removeprefix(f"{root}.")), fix(f.fix)) for f in findings}

    from_callback = seen(auditor.report.findings, "net", "validation_step outputs")
    from_audit = seen(report.findings, "", "model outputs")
    assert from_callback == from_audit
    assert {kind for kind, _, _ in from_audit} == {"train_mode", "grad_enabled", "graph_in_outputs"}
    fixes = {kind: fix for kind, _, fix in from_audit}
    assert fixes["grad_enabled"].startswith("remove the `torch.enable_grad()`")  # not "wrap the loop in no_grad"
    assert fixes["graph_in_outputs"].startswith("return `.detach()`ed tensors")


def test_a_loop_without_no_grad_is_told_to_add_it() -> None:
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with audit(net, monitor_savings=False) as report:
            net(torch.randn(4, 8))
    fixes = {f.kind: f.fix for f in report.findings}
    assert set(fixes) == {"grad_enabled", "graph_in_outputs"}
    assert all(fix.startswith("run the evaluation loop under `torch.no_grad()`") for fix in fixes.values())


class Student(nn.Module):
    """One module of each training bug: a `no_grad` branch, an unused head, an eval-mode dropout in a
    trainable block, an inference tensor at the top level and one in a submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1)).eval()
        self.head, self.unused = nn.Linear(8, 1), nn.Linear(8, 1)
        with torch.inference_mode():
            self.cache = torch.ones(2)
            self.block.table = torch.ones(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = self.encoder(x)
        return self.head(self.block(h))


def test_the_same_training_bugs_get_the_same_findings_from_check_training_step_and_the_guard(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    from lightning_nograd import BackpropGuard
    from tests.helpers import loader, nograd_warnings, trainer

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Student()

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    for allow in ([], [r"net\.block"]):
        guard = BackpropGuard(allow=allow)
        with nograd_warnings():
            trainer(tmp_path, [guard], max_epochs=1, limit_train_batches=3).fit(Lit(), loader())
        lit = Lit()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = check_training_step(
                lit,
                (torch.randn(8, 8), torch.randn(8, 1)),
                lambda model, batch: nn.functional.mse_loss(model.net(batch[0]), batch[1]),
                lit.configure_optimizers(),
                allow=allow,
            )
        from_guard = {(f.kind, f.subject, f.fix) for f in guard.report.findings}
        from_check = {(f.kind, f.subject, f.fix) for f in report.findings}
        assert from_guard == from_check
        subjects = {(kind, subject) for kind, subject, _ in from_check}
        expected = {("no_grad_module", "net.encoder"), ("param_without_grad", "net.unused")}
        expected |= {("inference_tensor", "net.cache")}
        if not allow:  # the allow-list leaves out the block and the tensor it holds
            expected |= {("eval_mode_at_start", "net.block"), ("inference_tensor", "net.block.table")}
        assert subjects == expected


@pytest.mark.parametrize("settled", [False, True])
def test_audit_notes_the_cpu_timing_caveat_as_the_callback_does(monkeypatch: pytest.MonkeyPatch, settled: bool) -> None:
    from lightning_nograd.core.savings.epoch_measures import SETTLED_MALLOC_ENV, cpu_timing_caveat

    if cpu_timing_caveat({}) is None:
        pytest.skip("the caveat is about glibc's malloc")
    for name, value in SETTLED_MALLOC_ENV.items():
        monkeypatch.setenv(name, value) if settled else monkeypatch.delenv(name, raising=False)
    for name in ("GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    net = make_net().eval()
    with audit(net, repeats=6) as report, torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 8))
    (epoch,) = report.epochs
    assert "nograd/val/time_saved_s" in epoch.metrics
    assert ("timing_caveat" in epoch.details) is not settled


def test_check_training_step_names_gradients_no_optimizer_steps() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    target = nn.Linear(8, 1)  # used under no_grad and in no optimizer: no gradient, no finding
    optimizer = torch.optim.SGD([*net[0].parameters(), *net[2].parameters()], lr=0.1)

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        h = model[1](model[0](x))
        with torch.no_grad():
            bootstrap = target(h)
        return ((model[2](h) - y - bootstrap) ** 2).mean()

    batch = (torch.randn(6, 4), torch.randn(6, 1))
    with pytest.warns(BrokenBackpropWarning, match="get a gradient in every backward"):
        report = check_training_step(net, batch, loss_fn, optimizer)
    assert [(f.kind, f.subject, f.details["parameters"]) for f in report.findings] == [
        ("grad_without_step", "1", ["1.weight", "1.bias"])
    ]
    assert all(p.grad is None for p in net.parameters()), "gradients restored"
    with warnings.catch_warnings():
        warnings.simplefilter("error", BrokenBackpropWarning)
        assert check_training_step(net, batch, loss_fn, optimizer, allow=[r"1"]).findings == []


class EvaluationBugs(nn.Module):
    """The evaluation findings `audit()` gives: `.train()` on the whole model, a graph recorded inside the forward
    and returned with its output, a part that does not fit with gradients on."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.drop, self.head = nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 1)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.train()
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled() and x.shape[0] == 5:
            raise torch.OutOfMemoryError("CUDA out of memory (the replay, with gradients on)")
        with torch.enable_grad():
            return self.head(self.drop(self.body(x)))


def _allowed_by_its_fix(fix: str) -> tuple[str, str]:
    found = re.search(r'pass `(allow\w*)=\[r"(.*?)"\]`', fix)
    assert found is not None and found.group(2) != "", fix
    return found.group(1), found.group(2)


def test_every_finding_of_the_plain_pytorch_api_is_silenced_by_the_pattern_its_fix_names() -> None:
    def evaluate(**allowed: list[str]) -> list[tuple[str, str, str]]:
        net = EvaluationBugs()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with audit(net, repeats=1, **allowed) as report, torch.no_grad():
                net(torch.randn(4, 8))
                net(torch.randn(5, 8))  # the batch the replay measures: too big with gradients on
        return [(f.kind, f.subject, f.fix) for f in report.findings]

    def train(**allowed: list[str]) -> list[tuple[str, str, str]]:
        net = Student()
        net.norm = nn.LayerNorm(1)  # trainable, used, and left out of the optimizer
        optimizer = torch.optim.SGD([p for n, p in net.named_parameters() if not n.startswith("norm")], lr=0.1)

        def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return nn.functional.mse_loss(model.norm(model(batch[0])), batch[1])

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = check_training_step(net, (torch.randn(4, 8), torch.randn(4, 1)), loss_fn, optimizer, **allowed)
        return [(f.kind, f.subject, f.fix) for f in report.findings]

    found = {"audit": evaluate(), "check_training_step": train()}
    kinds = {api: {kind for kind, _, _ in findings} for api, findings in found.items()}
    assert kinds == {
        "audit": {"train_mode", "grad_enabled", "graph_in_outputs", "grad_replay_oom"},
        "check_training_step": {
            "no_grad_module", "param_without_grad", "eval_mode_at_start", "inference_tensor", "grad_without_step",
        },
    }  # fmt: skip
    for api, findings in found.items():
        for kind, subject, fix in findings:
            option, pattern = _allowed_by_its_fix(fix)
            if api == "check_training_step":
                assert option == "allow", fix  # its one allow-list
                left = train(allow=[pattern])
            else:
                left = evaluate(**{option: [pattern]})
            assert (kind, subject) not in {(k, s) for k, s, _ in left}, (fix, left)
