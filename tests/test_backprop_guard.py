from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_nograd import BackpropGuard, BrokenBackpropWarning, NoGradAuditor, NoGradError
from tests.helpers import csv_values, loader, nograd_warnings, trainer


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"on_violation": "loud"}, ValueError, r"`on_violation`.*'loud'"),
        ({"allow": "[bad"}, ValueError, r"`allow`.*\[bad"),
        ({"allow": [1]}, TypeError, r"`allow`.*got 1"),
        ({"zero_grad_steps": 0}, ValueError, r"`zero_grad_steps`.*>= 1.*got 0"),
        ({"zero_grad_steps": 2.5}, TypeError, r"`zero_grad_steps`.*got 2.5"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        BackpropGuard(**kwargs)


class Net(pl.LightningModule):
    """Encoder + head; ``bug`` plants one way of silently not learning."""

    def __init__(self, bug: str | None = None) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 16))
        self.head = nn.Linear(16, 1)
        self.bug = bug
        self.probe_input = torch.randn(4, 8)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.bug == "no_grad":
            with torch.no_grad():
                return self.encoder(x)
        if self.bug == "detach":
            return self.encoder(x).detach()
        return self.encoder(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.head(self.features(x)), y)
        self.log("train_loss", loss)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.bug == "eval_leak":
            self.encoder.eval()
        if self.bug == "stray_forward":
            self.head(self.encoder(self.probe_input))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.head(self.encoder(x)), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def fit(tmp_path: Path, model: pl.LightningModule, guard: BackpropGuard, **kwargs: Any) -> None:
    t = trainer(tmp_path, [guard], **kwargs)
    t.fit(model, loader(), loader())


def test_correct_model_is_silent(tmp_path: Path) -> None:
    guard = BackpropGuard()
    with nograd_warnings() as seen:
        fit(tmp_path, Net(), guard)
    assert seen == []


def test_trainable_branch_under_no_grad_is_named(tmp_path: Path) -> None:
    guard = BackpropGuard()
    with nograd_warnings() as seen:
        fit(tmp_path, Net("no_grad"), guard)
    assert len(seen) == 1 and seen[0].category is BrokenBackpropWarning
    message = str(seen[0].message)
    assert "`encoder` has trainable parameters but its forward ran only with gradients disabled" in message
    assert "encoder.0.weight" in message and "encoder.3.bias" in message
    assert "(training, `training_step`" in message


def test_detached_branch_is_named(tmp_path: Path) -> None:
    guard = BackpropGuard()
    with nograd_warnings() as seen:
        fit(tmp_path, Net("detach"), guard)
    assert len(seen) == 1
    message = str(seen[0].message)
    assert "4 trainable parameter(s) of `encoder` reached the optimizer step with no gradient" in message
    assert "a `.detach()` in the training step's own code cut them off the loss" in message  # the cause, seen
    assert "remove a `.detach()` in the training step's own code on the way to the loss" in message


class Attends(pl.LightningModule):
    """``emb`` -> ``attn`` -> ``head``, with ``attn`` under ``no_grad`` by mistake (``bug``), in one of the shapes
    users write it: ``nn.MultiheadAttention`` (which uses ``out_proj.weight`` functionally), a ViT whose first
    block runs under ``no_grad`` (class token and position embedding joined functionally before it), a
    ``.detach()`` upstream of the ``no_grad`` region, or a decoder whose weight is tied to the embedding."""

    def __init__(self, shape: str) -> None:
        super().__init__()
        self.shape = shape
        if shape == "vit":
            self.patch_embed = nn.Conv2d(3, 16, 4, stride=4)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 16))
            self.pos_embed = nn.Parameter(torch.zeros(1, 5, 16))
            self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True) for _ in range(2))
        else:
            self.emb = nn.Embedding(10, 16) if shape == "tied" else nn.Linear(8, 16)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 10, bias=False) if shape == "tied" else nn.Linear(16, 1)
        if shape == "tied":
            self.head.weight = self.emb.weight  # the decoder's weight is the embedding's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shape == "vit":
            x = self.patch_embed(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
            with torch.no_grad():
                x = self.blocks[0](x)
            return self.head(self.blocks[1](x)[:, 0])
        h = self.emb(x)
        if self.shape == "detach":
            h = h.detach()
        with torch.no_grad():
            h = self.attn(h, h, h)[0]
            if self.shape == "tied":
                return self.head(h).mean(1) + 0 * h.sum()
        return self.head(h).mean(1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        if self.shape == "tied":  # the decoder ran under no_grad too: only a bias-free extra term learns
            out = out + self.bias_term
        return nn.functional.mse_loss(out, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def attends_data(shape: str) -> Any:
    g = torch.Generator().manual_seed(0)
    x = {
        "vit": torch.randn(16, 3, 8, 8, generator=g),
        "tied": torch.randint(0, 10, (16, 5), generator=g),
    }.get(shape, torch.randn(16, 5, 8, generator=g))
    y = torch.randn(16, 10 if shape == "tied" else 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


ROOT_CAUSES = {
    # shape: (the one no_grad finding's subject, the parameters it names, those upstream it cut off the loss)
    "mha": ("attn", ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"],
            ["emb.weight", "emb.bias"]),
    "vit": ("blocks.0", ["blocks.0.self_attn.in_proj_weight", "blocks.0.self_attn.out_proj.weight",
                         "blocks.0.linear1.weight", "blocks.0.norm2.bias"],
            ["cls_token", "pos_embed", "patch_embed.weight", "patch_embed.bias"]),
    "detach": ("attn", ["attn.in_proj_weight", "attn.out_proj.weight"], []),
    "tied": ("attn", ["attn.in_proj_weight", "attn.out_proj.weight"], ["emb.weight"]),
}  # fmt: skip


@pytest.mark.parametrize("shape", list(ROOT_CAUSES))
def test_one_root_cause_is_one_finding_with_every_parameter_it_starved(tmp_path: Path, shape: str) -> None:
    from lightning_nograd import check_training_step
    from lightning_nograd.core.reporting.summary import rows

    model = Attends(shape)
    if shape == "tied":
        model.bias_term = nn.Parameter(torch.zeros(1))
    guard = BackpropGuard()
    with nograd_warnings():
        trainer(tmp_path, [guard], max_epochs=1, limit_val_batches=0).fit(model, attends_data(shape))
    subject, own, upstream = ROOT_CAUSES[shape]
    no_grad = [f for f in guard.report.findings if f.kind == "no_grad_module"]
    assert [f.subject for f in no_grad] == [subject], [f.message for f in guard.report.findings]
    (finding,) = no_grad
    assert set(own) <= set(finding.details["parameters"]), finding.details
    assert finding.details.get("upstream", []) == upstream or set(finding.details["upstream"]) == set(upstream)
    assert finding.details["count"] == len(finding.details["parameters"]) + len(upstream)
    others = [f for f in guard.report.findings if f is not finding]
    if shape == "detach":  # two causes, two findings: the detach starved `emb`, the no_grad region `attn`
        (cut,) = others
        assert cut.subject == "emb" and cut.details["cause"] == "detach" and "a `.detach()`" in cut.message
    elif shape == "tied":  # the tied weight's lookup ran with gradients, its decoder under no_grad: one cause,
        # no second finding that blames the embedding (its module did run) with a cause that was not there
        assert others == []
    else:
        assert others == [], [f.message for f in others]
    assert next(row[-1] for row in rows(guard.report)) == f"{1 + len(others)} finding" + ("s" * bool(others))
    # the plain-PyTorch API names the same root causes
    x, y = next(iter(attends_data(shape)))
    report = check_training_step(model, (x, y), lambda m, b: m.training_step(b, 0))
    found = sorted((f.kind, f.subject) for f in guard.report.findings)
    assert sorted((f.kind, f.subject) for f in report.findings) == found


def test_unused_parameter_is_named(tmp_path: Path) -> None:
    model = Net()
    model.spare = nn.Linear(3, 3)
    guard = BackpropGuard()
    with nograd_warnings() as seen:
        fit(tmp_path, model, guard)
    assert len(seen) == 1
    assert "of `spare` reached the optimizer step with no gradient" in str(seen[0].message)
    assert "did not run" in str(seen[0].message)


def test_frozen_backbone_and_params_in_no_optimizer_are_silent(tmp_path: Path) -> None:
    class Frozen(Net):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.head.parameters(), lr=0.05)

    model = Frozen("no_grad")
    model.encoder.requires_grad_(False)
    with nograd_warnings() as seen:
        fit(tmp_path, model, BackpropGuard())
    assert seen == []
    model = Frozen("no_grad")  # encoder trainable but in no optimizer: intentional
    with nograd_warnings() as seen:
        fit(tmp_path, model, BackpropGuard())
    assert seen == []


def test_allow_listed_module_is_silent(tmp_path: Path) -> None:
    with nograd_warnings() as seen:
        fit(tmp_path, Net("no_grad"), BackpropGuard(allow=[r"encoder"]))
    assert seen == []


@pytest.mark.parametrize(
    ("scale", "set_to_none", "reported", "accumulate"),
    [
        (0.0, False, True, 1),
        # zero_grad every other batch: zeroing is read after it, from a parameter the first step saw with a gradient
        (0.0, False, True, 2),
        # gradients of ~1e-23 are tiny, not missing: their L2 norm underflows to 0 in float32, their maximum does not
        (1e-22, False, False, 1),
        # with Lightning's default zeroing an all-zero gradient is a real gradient (pruned weights, dead units)
        (0.0, True, False, 1),
        (0.0, True, False, 2),
    ],
)
def test_all_zero_gradients_for_consecutive_steps(
    tmp_path: Path, scale: float, set_to_none: bool, reported: bool, accumulate: int
) -> None:
    class ScaledLoss(Net):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.head(self.encoder(x)), y) * scale

        def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
            optimizer.zero_grad(set_to_none=set_to_none)

    guard = BackpropGuard(zero_grad_steps=3)
    with nograd_warnings() as seen:
        # four optimizer steps either way
        batches = 4 * accumulate
        t = trainer(tmp_path, [guard], limit_train_batches=batches, max_epochs=1, accumulate_grad_batches=accumulate)
        t.fit(ScaledLoss(), loader(n=32 * accumulate), loader())
    found = {(f.kind, f.subject) for f in guard.report.findings}
    assert found == ({("param_without_grad", "")} if reported else set()), [str(w.message) for w in seen]
    assert guard._gradients.keeps_zeros is not set_to_none, "zeroing was read right"
    if reported:
        assert "encoder.0.weight" in guard.report.findings[0].details["parameters"]


def test_eval_mode_leak_is_named_and_fixed(tmp_path: Path) -> None:
    with nograd_warnings() as seen:
        fit(tmp_path, Net("eval_leak"), BackpropGuard())
    assert len(seen) == 1
    message = str(seen[0].message)
    assert "`encoder` (Sequential) is in eval mode during training" in message
    assert "(training, `on_train_batch_end`, first at batch 0)" in message

    modes: list[bool] = []

    class RecordsModes(Net):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            modes.append(self.encoder.training)
            return super().training_step(batch, batch_idx)

    model = RecordsModes("eval_leak")
    with pytest.warns(BrokenBackpropWarning, match="put back in train mode"):
        fit(tmp_path, model, BackpropGuard(on_violation="fix"), limit_train_batches=3, max_epochs=1)
    assert modes == [True, True, True]


def test_pretrained_model_arriving_in_eval_mode_is_named(tmp_path: Path) -> None:
    model = Net()
    model.encoder.eval()  # as `from_pretrained` leaves it
    with nograd_warnings() as seen:
        fit(tmp_path, model, BackpropGuard(), max_epochs=1)
    messages = [str(w.message) for w in seen]
    assert any("`encoder` is in eval mode as training starts" in m and "encoder.2 (Dropout)" in m for m in messages)


def test_a_block_in_eval_is_named_at_the_first_epoch_end_when_no_step_came(tmp_path: Path) -> None:
    class SkipsEveryStep(Net):
        def training_step(self, batch: Any, batch_idx: int) -> None:
            return None  # Lightning's way to skip a step: no gradient check ever judges the block

    model = SkipsEveryStep()
    model.encoder.eval()  # as `from_pretrained` leaves it
    guard = BackpropGuard()
    with nograd_warnings():
        fit(tmp_path, model, guard, max_epochs=2)
    found = [(f.kind, f.subject, f.hook, f.epoch) for f in guard.report.findings]
    assert found == [("eval_mode_at_start", "encoder", "on_train_start", 0)]


def test_frozen_backbone_in_eval_mode_is_silent(tmp_path: Path) -> None:
    class Frozen(Net):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.head.parameters(), lr=0.05)

    model = Frozen()
    model.encoder.requires_grad_(False)
    model.encoder.eval()
    with nograd_warnings() as seen:
        fit(tmp_path, model, BackpropGuard())
    assert seen == []


def test_stray_forward_outside_training_step_is_named(tmp_path: Path) -> None:
    guard = BackpropGuard()
    with nograd_warnings() as seen:
        fit(tmp_path, Net("stray_forward"), guard)
    assert len(seen) == 1
    message = str(seen[0].message)
    assert "the whole Net ran a forward in `on_train_batch_end`, outside the training step" in message
    assert "KiB saved for backward" in message
    assert "first at batch 0" in message


class StrayOnSomeBatches(Net):
    """A forward outside the step on some batches only (sample logging every few batches)."""

    def __init__(self, batches: set[int]) -> None:
        super().__init__()
        self.stray_batches = batches

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx in self.stray_batches:
            self.head(self.encoder(self.probe_input))


@pytest.mark.parametrize(
    ("stray_batches", "named_at"),
    [({0}, 0), ({3, 6}, 6), (set(), None)],
    ids=["first-batch", "recurring-mid-epoch", "clean"],
)
def test_a_stray_forward_is_named_at_the_batch_it_first_built_a_graph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stray_batches: set[int], named_at: int | None
) -> None:
    # the saved-tensor probe watches the first stretch of an epoch and the one after a validation; the
    # other stretches only read autograd's node counter, which arms the probe once it moved
    from lightning_nograd.core.checks.graph import SAVED_TENSOR_HOOKS

    registered: list[int] = []
    register = SAVED_TENSOR_HOOKS.register
    monkeypatch.setattr(SAVED_TENSOR_HOOKS, "register", lambda probe: (registered.append(1), register(probe))[1])
    guard = BackpropGuard()
    with nograd_warnings():
        trainer(tmp_path, [guard], max_epochs=1, limit_train_batches=8, limit_val_batches=0).fit(
            StrayOnSomeBatches(stray_batches), loader(64)
        )
    stray = [(f.subject, f.hook, f.batch_idx) for f in guard.report.findings if f.kind == "stray_graph"]
    assert stray == ([] if named_at is None else [("", "on_train_batch_end", named_at)])
    # clean: the first stretch only; a stray forward at batch 3: the probe from batch 4 until it names it at 6
    assert len(registered) == {None: 1, 0: 1, 6: 1 + 3}[named_at]


def test_inference_tensor_from_validate_is_named_before_the_crash(tmp_path: Path) -> None:
    class Rotary(Net):
        def __init__(self) -> None:
            super().__init__()
            self.cache: torch.Tensor | None = None

        def scale(self, x: torch.Tensor) -> torch.Tensor:
            if self.cache is None:
                self.cache = torch.ones(16) * 2
            return x * self.cache

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.head(self.scale(self.encoder(x))), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, _ = batch
            self.head(self.scale(self.encoder(x)))

    model = Rotary()
    guard = BackpropGuard()
    events: list[str] = []
    t = trainer(tmp_path, [guard])
    t.validate(model, loader())  # inference_mode: the cache becomes an inference tensor
    with pytest.warns(
        BrokenBackpropWarning, match=r"tensor attribute `cache` was created under `torch.inference_mode`"
    ):
        try:
            trainer(tmp_path, [guard]).fit(model, loader(), loader())
        except RuntimeError as err:
            events.append(str(err))
    assert events and "Inference tensors cannot be saved for backward" in events[0]


def test_error_mode_stops_at_first_violation_naming_its_cause(tmp_path: Path) -> None:
    # the step after the gap was seen is watched, so the error names the `no_grad` branch, as warn mode does
    guard = BackpropGuard(on_violation="error")
    with pytest.raises(NoGradError, match=r"forward ran only with gradients disabled") as raised:
        fit(tmp_path, Net("no_grad"), guard)
    assert "`encoder` has trainable parameters" in str(raised.value)
    assert [f.kind for f in guard.report.findings] == ["no_grad_module"]
    assert not torch.nn.modules.module._global_forward_pre_hooks


class GAN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.discriminator = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real, _ = batch
        opt_g, opt_d = self.optimizers()  # type: ignore[misc]
        z = torch.randn(real.shape[0], 4)
        with torch.no_grad():
            fake = self.generator(z)
        d_loss = (
            nn.functional.softplus(self.discriminator(fake)).mean()
            + nn.functional.softplus(-self.discriminator(real)).mean()
        )
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = nn.functional.softplus(-self.discriminator(self.generator(z))).mean()
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.SGD(self.generator.parameters(), lr=0.01),
            torch.optim.SGD(self.discriminator.parameters(), lr=0.01),
        ]


def test_gan_with_manual_optimization_is_silent(tmp_path: Path) -> None:
    with nograd_warnings() as seen:
        trainer(tmp_path, [BackpropGuard()], limit_val_batches=0).fit(GAN(), loader())
    assert seen == []


def test_ema_teacher_is_silent(tmp_path: Path) -> None:
    class MeanTeacher(Net):
        def __init__(self) -> None:
            super().__init__()
            self.teacher = copy.deepcopy(self.encoder).requires_grad_(False)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            with torch.no_grad():
                target = self.teacher(x)
            features = self.encoder(x)
            return nn.functional.mse_loss(self.head(features), y) + nn.functional.mse_loss(features, target)

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            with torch.no_grad():
                for t, s in zip(self.teacher.parameters(), self.encoder.parameters(), strict=True):
                    t.mul_(0.9).add_(s, alpha=0.1)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD([*self.encoder.parameters(), *self.head.parameters()], lr=0.05)

    with nograd_warnings() as seen:
        fit(tmp_path, MeanTeacher(), BackpropGuard())
    assert seen == []


def test_gradient_accumulation_is_silent_and_bug_still_found(tmp_path: Path) -> None:
    with nograd_warnings() as seen:
        fit(tmp_path, Net(), BackpropGuard(), accumulate_grad_batches=2, limit_train_batches=4)
    assert seen == []
    with nograd_warnings() as seen:
        fit(tmp_path, Net("no_grad"), BackpropGuard(), accumulate_grad_batches=2, limit_train_batches=4)
    assert len(seen) == 1 and "`encoder` has trainable parameters" in str(seen[0].message)
    # the branch ran under no_grad from the first of the accumulated batches, not from the one that stepped
    assert "first at batch 0)" in str(seen[0].message)
    with nograd_warnings() as seen:
        fit(tmp_path, Net("detach"), BackpropGuard(), accumulate_grad_batches=3, limit_train_batches=6, max_epochs=2)
    assert len(seen) == 1 and "first at batch 0)" in str(seen[0].message), seen


@pytest.mark.parametrize("bug", [None, "no_grad"])
def test_training_metrics_reach_csv(tmp_path: Path, bug: str | None) -> None:
    with nograd_warnings():
        fit(tmp_path, Net(bug), BackpropGuard(), logger=CSVLogger(tmp_path, name="csv"), max_epochs=3)
    expected = (1.0, 4.0) if bug else (0.0, 0.0)
    assert csv_values(tmp_path / "csv", "nograd/train/no_grad_modules") == [expected[0]] * 3
    assert csv_values(tmp_path / "csv", "nograd/train/params_without_grad") == [expected[1]] * 3
    assert csv_values(tmp_path / "csv", "nograd/train/eval_mode_modules") == [0.0] * 3


@pytest.mark.parametrize(
    ("bug", "match"),
    [
        ("no_grad", "forward ran only with gradients disabled"),
        ("detach", r"reached the optimizer step with no gradient.*a `\.detach\(\)` in the training step.s own code"),
        ("eval_leak", r"`encoder` \(Sequential\) is in eval mode during training"),
        ("stray_forward", "ran a forward in `on_train_batch_end`, outside the training step"),
    ],
)
def test_error_mode_for_each_finding(tmp_path: Path, bug: str, match: str) -> None:
    with pytest.raises(NoGradError, match=match):
        fit(tmp_path, Net(bug), BackpropGuard(on_violation="error"))
    assert not torch.nn.modules.module._global_forward_pre_hooks


def test_error_mode_for_pretrained_eval_mode_and_inference_tensor(tmp_path: Path) -> None:
    model = Net()
    model.encoder.eval()
    with pytest.raises(NoGradError, match="is in eval mode as training starts"):
        fit(tmp_path, model, BackpropGuard(on_violation="error"))
    model = Net()
    with torch.inference_mode():
        model.cache = torch.ones(3)
    with pytest.raises(NoGradError, match=r"tensor attribute `cache` was created under `torch\.inference_mode`"):
        fit(tmp_path, model, BackpropGuard(on_violation="error"))


class TransferLearning(pl.LightningModule):
    """Lightning's documented transfer-learning pattern, in the three ways users write it.

    ``optimizer_only``: the feature extractor is put in eval in ``__init__``, run under ``no_grad``,
    and only the classifier is in the optimizer. ``requires_grad``: the extractor is frozen with
    ``requires_grad_(False)`` and put back in eval every epoch (frozen batch-norm statistics).
    ``skip_steps``: every other ``training_step`` returns ``None``, Lightning's way to skip a step.
    ``every_parameter``: as the documentation writes it (extractor in eval, forward under ``no_grad``)
    with ``self.parameters()`` in the optimizer, as most users write ``configure_optimizers``;
    ``every_parameter_detached``: the same with ``.detach()`` in place of ``no_grad``.
    """

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.feature_extractor = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.1), nn.ReLU())
        if style == "requires_grad":
            self.feature_extractor.requires_grad_(False)
        else:
            self.feature_extractor.eval()
        self.classifier = nn.Linear(16, 1)

    def on_train_epoch_start(self) -> None:
        if self.style == "requires_grad":
            self.feature_extractor.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "every_parameter_detached":
            return self.classifier(self.feature_extractor(x).detach())
        with torch.no_grad():
            features = self.feature_extractor(x)
        return self.classifier(features)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if self.style == "skip_steps" and batch_idx % 2 == 1:
            return None
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.style.startswith("every_parameter"):
            return torch.optim.Adam(self.parameters(), lr=0.01)
        return torch.optim.SGD(self.classifier.parameters(), lr=0.05)


@pytest.mark.parametrize("style", ["optimizer_only", "requires_grad", "skip_steps", "every_parameter",
                                   "every_parameter_detached"])  # fmt: skip
def test_frozen_feature_extractor_and_skipped_steps_are_silent(tmp_path: Path, style: str) -> None:
    auditor = NoGradAuditor(verbose=False)
    logger = CSVLogger(tmp_path)
    model = TransferLearning(style)
    extractor = copy.deepcopy(model.feature_extractor.state_dict())
    with nograd_warnings() as seen:
        trainer(tmp_path, [auditor], limit_train_batches=4, logger=logger).fit(model, loader(), loader())
    assert auditor.report.findings == [], [str(w.message) for w in seen]
    for key in ("nograd/train/params_without_grad", "nograd/train/no_grad_modules"):
        assert csv_values(Path(logger.log_dir), key) == [0.0, 0.0], key  # nothing on the dashboard either
    assert all(torch.equal(v, extractor[k]) for k, v in model.feature_extractor.state_dict().items())


def test_a_block_in_eval_that_partly_learns_is_named_after_its_first_step(tmp_path: Path) -> None:
    class HalfFrozen(TransferLearning):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            first = self.feature_extractor[0](x)  # learns, in a block left in eval mode
            with torch.no_grad():
                rest = self.feature_extractor[1:](first.detach())
            return self.classifier(rest + first)

    guard = BackpropGuard()
    with nograd_warnings():
        fit(tmp_path, HalfFrozen("every_parameter"), guard, max_epochs=1)
    found = [(f.kind, f.subject, f.hook, f.batch_idx) for f in guard.report.findings]
    assert ("eval_mode_at_start", "feature_extractor", "on_train_start", None) in found, found


def test_eval_in_on_train_epoch_start_is_named_there(tmp_path: Path) -> None:
    class EvalAtEpochStart(Net):
        def on_train_epoch_start(self) -> None:
            self.encoder.eval()  # a trainable encoder: a real leak

    guard = BackpropGuard()
    with nograd_warnings():
        fit(tmp_path, EvalAtEpochStart(), guard)
    assert [(f.kind, f.subject, f.hook) for f in guard.report.findings] == [
        ("eval_mode_leak", "encoder", "on_train_epoch_start")
    ]


class FrozenBatchNormStatistics(Net):
    """The batch-norm layers are put in eval one by one (their running statistics stay as loaded) while
    their weights and the rest of the model train, in the three places users write it."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.encoder.insert(1, nn.BatchNorm1d(16))
        self.where = where
        if where == "__init__":
            self.freeze_statistics()

    def freeze_statistics(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.eval()

    def on_train_epoch_start(self) -> None:
        if self.where == "on_train_epoch_start":
            self.freeze_statistics()


class FreezesStatistics(pl.Callback):
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.freeze_statistics()


@pytest.mark.parametrize("where", ["__init__", "on_train_epoch_start", "a callback"])
@pytest.mark.parametrize("on_violation", ["warn", "fix"])
def test_batch_norm_statistics_frozen_layer_by_layer_are_silent(tmp_path: Path, where: str, on_violation: str) -> None:
    model = FrozenBatchNormStatistics(where)
    norm = model.encoder[1]
    loaded = norm.running_mean.clone()
    guard = BackpropGuard(on_violation=on_violation)  # type: ignore[arg-type]
    callbacks = [FreezesStatistics(), guard] if where == "a callback" else [guard]
    with nograd_warnings() as seen:
        trainer(tmp_path, callbacks).fit(model, loader(), loader())
    assert guard.report.findings == [], [str(w.message) for w in seen]
    # "fix" left them alone: a training step in train mode would have moved the statistics
    assert torch.equal(norm.running_mean, loaded) and not norm.training
    assert not torch.equal(norm.weight, torch.ones(16)), "the layer's own weights trained"


def test_an_encoder_put_in_eval_with_its_layers_is_still_a_leak(tmp_path: Path) -> None:
    class EvalAtEpochStart(FrozenBatchNormStatistics):
        def on_train_epoch_start(self) -> None:
            self.encoder.eval()  # the block, not its layers one by one: the linear layers' dropout is off

    guard = BackpropGuard()
    with nograd_warnings():
        fit(tmp_path, EvalAtEpochStart("nowhere"), guard)
    assert [(f.kind, f.subject) for f in guard.report.findings] == [("eval_mode_leak", "encoder")]


def test_model_pruning_is_silent(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelPruning

    # pruning computes `weight = weight_orig * mask` with gradients on at epoch end (a graph that is no
    # forward), and masked weights get exact-zero gradients under Lightning's default zeroing
    auditor = NoGradAuditor(verbose=False)
    pruning = ModelPruning("l1_unstructured", amount=0.5, verbose=0)
    with nograd_warnings() as seen:
        trainer(tmp_path, [pruning, auditor], max_epochs=3, limit_train_batches=4).fit(Net(), loader(), loader())
    assert auditor.report.findings == [], [str(w.message) for w in seen]


class Milestones(pl.callbacks.BaseFinetuning):
    """Lightning's fine-tuning example's callback: the extractor frozen, unfrozen at a milestone into a group
    of its own; with ``train_bn=False`` its batch-norm layers are made trainable but left out of the group."""

    def __init__(self, train_bn: bool) -> None:
        super().__init__()
        self.train_bn = train_bn

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.freeze(pl_module.backbone, train_bn=self.train_bn)  # type: ignore[arg-type]

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.backbone, optimizer, train_bn=self.train_bn)  # type: ignore[arg-type]


class FineTuned(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU()
        )
        self.head = nn.Linear(16, 1)
        self.target = copy.deepcopy(self.head)  # a target network: used under no_grad, in no optimizer

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = self.backbone(x)
        with torch.no_grad():
            bootstrap = self.target(h)
        return nn.functional.mse_loss(self.head(h), y + 0.1 * bootstrap)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # as the example does: only what is trainable now; the callback adds the rest as a group at its milestone
        return torch.optim.Adam([p for p in [*self.backbone.parameters(), *self.head.parameters()] if p.requires_grad])


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("milestones, train_bn=False", [("grad_without_step", "backbone", 1)]),  # one cause: one finding
        ("milestones, train_bn=True", []),
        ("BackboneFinetuning, train_bn=False", []),  # its batch norm is in the optimizer from the start
    ],
)
def test_gradients_no_optimizer_steps_are_named(tmp_path: Path, schedule: str, expected: list[Any]) -> None:
    from lightning.pytorch.callbacks import BackboneFinetuning

    if schedule.startswith("milestones"):
        finetuning: pl.Callback = Milestones(train_bn=schedule.endswith("True"))
    else:
        finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, train_bn=False)
    guard = BackpropGuard()
    with nograd_warnings():
        trainer(tmp_path, [guard, finetuning], max_epochs=3, limit_val_batches=0).fit(FineTuned(), loader())
    assert [(f.kind, f.subject, f.epoch) for f in guard.report.findings] == expected
    if expected:
        (finding,) = guard.report.findings
        assert finding.details["parameters"] == [
            "backbone.1.weight", "backbone.1.bias", "backbone.4.weight", "backbone.4.bias"
        ]  # fmt: skip
        assert finding.details["modules"] == ["backbone.1", "backbone.4"]
        assert "4 parameter(s) of 2 modules of `backbone` (BatchNorm1d x2)" in finding.problem
        assert finding.details["gradient_mib"] == pytest.approx(4 * 16 * 4 / 2**20)
        assert finding.details["optimizer_groups"] == ["Adam group 0: 2 parameters, lr 0.001",
                                                       "Adam group 1: 4 parameters, lr 0.0001"]  # fmt: skip
        assert "add them to an optimizer" in finding.fix and 'pass `allow=[r"backbone"]`' in finding.fix


class ToggledGAN(GAN):
    """The GAN as Lightning's docs write manual optimization: each optimizer toggled around its step."""

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real, _ = batch
        opt_g, opt_d = self.optimizers()  # type: ignore[misc]
        z = torch.randn(real.shape[0], 4)
        self.toggle_optimizer(opt_g)
        g_loss = nn.functional.softplus(-self.discriminator(self.generator(z))).mean()
        self.manual_backward(g_loss)
        opt_g.step()
        opt_g.zero_grad()
        self.untoggle_optimizer(opt_g)
        self.toggle_optimizer(opt_d)
        d_loss = nn.functional.softplus(self.discriminator(self.generator(z).detach())).mean()
        self.manual_backward(d_loss + nn.functional.softplus(-self.discriminator(real)).mean())
        opt_d.step()
        opt_d.zero_grad()
        self.untoggle_optimizer(opt_d)


def test_gan_with_toggled_optimizers_is_silent(tmp_path: Path) -> None:
    with nograd_warnings() as seen:
        trainer(tmp_path, [BackpropGuard()], max_epochs=2, limit_val_batches=0).fit(ToggledGAN(), loader())
    assert seen == []
