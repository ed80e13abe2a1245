"""A zoo of real architectures under ``NoGradAuditor()``: correct runs report nothing, seeded bugs are found.

Hugging Face models come from tiny configs through ``save_pretrained`` / ``from_pretrained`` (as users
load them), LoRA adapters from ``peft``; the CNNs, the ViT and the recurrent nets are small
hand-built models of the common shapes. Each seeded bug is checked for its kind, module path, stage
and hook. Libraries that are not installed skip their entries.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.models import Block
from lightning_nograd import NoGradAuditor
from tests.helpers import nograd_warnings, trainer
from tests.test_backprop_guard import GAN

CLASSES = 3


def _hf(kind: str, tmp_path: Path) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    tiny = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    if kind == "bert":
        config = transformers.BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32, **tiny,
        )  # fmt: skip
        built = transformers.BertModel(config)
        cls = transformers.BertModel
    elif kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)
        built, cls = transformers.GPT2Model(config), transformers.GPT2Model
    else:
        config = transformers.ViTConfig(
            image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=32, **tiny,
        )  # fmt: skip
        built, cls = transformers.ViTModel(config), transformers.ViTModel
    built.save_pretrained(tmp_path / kind)
    return cls.from_pretrained(tmp_path / kind).train()  # from_pretrained arrives in eval mode


class HFFeatures(nn.Module):
    """A Hugging Face model as a feature extractor: pooled output, or the last token's hidden state."""

    def __init__(self, model: nn.Module, pooled: bool) -> None:
        super().__init__()
        self.model = model
        self.pooled = pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = "input_ids" if x.dtype == torch.long else "pixel_values"
        out = self.model(**{key: x})
        return out.pooler_output if self.pooled else out.last_hidden_state[:, -1]


def _lora_bert(tmp_path: Path) -> nn.Module:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.1)
    return HFFeatures(peft.get_peft_model(_hf("bert", tmp_path), config), pooled=True)


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.LSTM] | type[nn.GRU]) -> None:
        super().__init__()
        self.rnn = cell(8, 16, num_layers=2, batch_first=True, dropout=0.1)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.dropout(out[:, -1])


class TinyViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, 16, 4, 4)
        self.cls = nn.Parameter(torch.zeros(1, 1, 16))
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1)
        return self.encoder(tokens)[:, 0]


def _mobilenet() -> nn.Module:
    def inverted(c_in: int, c_out: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(c_in, c_in * 4, 1, bias=False), nn.BatchNorm2d(c_in * 4), nn.Hardswish(),
            nn.Conv2d(c_in * 4, c_in * 4, 3, stride, 1, groups=c_in * 4, bias=False), nn.BatchNorm2d(c_in * 4),
            nn.Hardswish(), nn.Conv2d(c_in * 4, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )  # fmt: skip

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish(), inverted(8, 16, 2),
        inverted(16, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
    )  # fmt: skip


def _resnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), Block(8, 1), Block(8, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
    )  # fmt: skip


def _checkpointed_gpt2(tmp_path: Path) -> nn.Module:
    gpt2 = _hf("gpt2", tmp_path)
    gpt2.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    return HFFeatures(gpt2, pooled=False)  # its blocks run their forward again inside the backward


def _compiled_resnet() -> nn.Module:
    return torch.compile(_resnet(), backend="aot_eager")  # type: ignore[return-value]


IMAGES, TOKENS, SEQUENCES = "images", "tokens", "sequences"
ZOO: dict[str, tuple[Callable[[Path], nn.Module], str, int]] = {
    "bert": (lambda p: HFFeatures(_hf("bert", p), pooled=True), TOKENS, 16),
    "gpt2": (lambda p: HFFeatures(_hf("gpt2", p), pooled=False), TOKENS, 16),
    "gpt2-checkpointed": (_checkpointed_gpt2, TOKENS, 16),
    "hf-vit": (lambda p: HFFeatures(_hf("vit", p), pooled=True), IMAGES, 16),
    "bert-lora": (_lora_bert, TOKENS, 16),
    "resnet": (lambda p: _resnet(), IMAGES, 16),
    "mobilenet": (lambda p: _mobilenet(), IMAGES, 16),
    "vit": (lambda p: TinyViT(), IMAGES, 16),
    "lstm": (lambda p: Recurrent(nn.LSTM), SEQUENCES, 16),
    "gru": (lambda p: Recurrent(nn.GRU), SEQUENCES, 16),
    "compiled-resnet": (lambda p: _compiled_resnet(), IMAGES, 16),
}


def data(inputs: str, n: int = 16, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    if inputs == TOKENS:
        x = torch.randint(0, 64, (n, 12), generator=g)
    elif inputs == IMAGES:
        x = torch.randn(n, 3, 16, 16, generator=g)
    else:
        x = torch.randn(n, 10, 8, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, CLASSES, (n,), generator=g)), batch_size=batch_size)


class Classifier(pl.LightningModule):
    """``backbone`` -> ``head``; ``bug`` plants one of the mistakes the auditor must name."""

    def __init__(self, backbone: nn.Module, features: int, bug: str | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(features, CLASSES)
        self.bug = bug
        self.kept: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_logits(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        if self.bug == "detach_before_head":
            features = features.detach()
        if self.bug == "head_under_no_grad":
            with torch.no_grad():
                logits = self.head(features)
            return logits + 0 * features.sum()  # the backbone still learns; the head does not
        return self.head(features)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.training_logits(x), y)
        if self.bug == "graph_kept":
            self.kept.append(loss)  # no .detach(): every step's graph stays alive
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.bug == "eval_left_on":
            self.backbone.eval()  # e.g. to compute a metric, and never switched back

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        if self.bug == "dropout_on_in_validation":
            self.head_dropout().train()
        if self.bug == "validation_with_grad":
            with torch.enable_grad():
                logits = self(x)
            self.log("val_loss", nn.functional.cross_entropy(logits, y).detach())
            return
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def head_dropout(self) -> nn.Module:
        """The last dropout of the backbone: the one a validation step might switch on by mistake."""
        return [m for m in self.backbone.modules() if isinstance(m, nn.Dropout) and m.p > 0][-1]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.01)


def _path(model: pl.LightningModule, module: nn.Module) -> str:
    from lightning_nograd.core.plumbing.module_paths import user_path

    return next(user_path(p) for p, m in model.named_modules() if m is module)


def fit(tmp_path: Path, model: pl.LightningModule, inputs: str, callbacks: list[Any] = ()) -> NoGradAuditor:
    auditor = NoGradAuditor(verbose=False)
    with nograd_warnings():
        trainer(tmp_path, [*callbacks, auditor], limit_train_batches=3, inference_mode=False).fit(
            model, data(inputs), data(inputs)
        )
    return auditor


@pytest.mark.parametrize("name", list(ZOO))
def test_correct_architectures_are_silent(tmp_path: Path, name: str) -> None:
    build, inputs, features = ZOO[name]
    torch.manual_seed(0)
    auditor = fit(tmp_path, Classifier(build(tmp_path), features), inputs)
    assert auditor.report.findings == [], [f.message for f in auditor.report.findings]


# each seeded bug in two architectures of different families, and what the finding must say
SEEDED = [
    ("validation_with_grad", "bert", "grad_enabled", lambda m: "", "val", "validation_step"),
    ("validation_with_grad", "lstm", "grad_enabled", lambda m: "", "val", "validation_step"),
    ("dropout_on_in_validation", "gpt2", "train_mode", lambda m: _path(m, m.head_dropout()), "val", "validation_step"),
    ("dropout_on_in_validation", "mobilenet", "train_mode", lambda m: _path(m, m.head_dropout()), "val",
     "validation_step"),
    ("graph_kept", "hf-vit", "graph_in_attribute", lambda m: "self.kept", "train", "training_step"),
    ("graph_kept", "gru", "graph_in_attribute", lambda m: "self.kept", "train", "training_step"),
    ("head_under_no_grad", "bert-lora", "no_grad_module", lambda m: "head", "train", "training_step"),
    ("head_under_no_grad", "resnet", "no_grad_module", lambda m: "head", "train", "training_step"),
    ("detach_before_head", "vit", "param_without_grad", lambda m: "backbone", "train", "on_before_optimizer_step"),
    ("detach_before_head", "bert-lora", "param_without_grad", lambda m: "backbone", "train",
     "on_before_optimizer_step"),
    ("eval_left_on", "resnet", "eval_mode_leak", lambda m: "backbone", "train", "on_train_batch_end"),
    ("eval_left_on", "compiled-resnet", "eval_mode_leak", lambda m: "backbone", "train", "on_train_batch_end"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("bug", "name", "kind", "subject", "stage", "hook"), SEEDED, ids=[f"{s[0]}-{s[1]}" for s in SEEDED]
)
def test_seeded_bugs_are_named(
    tmp_path: Path, bug: str, name: str, kind: str, subject: Callable[[Any], str], stage: str, hook: str
) -> None:
    build, inputs, features = ZOO[name]
    torch.manual_seed(0)
    model = Classifier(build(tmp_path), features, bug)
    auditor = fit(tmp_path, model, inputs)
    found = {(f.kind, f.subject, f.stage, f.hook) for f in auditor.report.findings}
    assert (kind, subject(model), stage, hook) in found, found


@pytest.mark.parametrize("name", ["mobilenet", "bert"])
def test_inference_buffer_made_before_fit_is_named(tmp_path: Path, name: str) -> None:
    build, inputs, features = ZOO[name]
    model = Classifier(build(tmp_path), features)
    with torch.inference_mode():  # e.g. a cache filled by a `trainer.validate` run before `fit`
        model.head.register_buffer("scale", torch.ones(CLASSES))
    auditor = fit(tmp_path, model, inputs)
    found = {(f.kind, f.subject, f.stage, f.hook) for f in auditor.report.findings}
    assert ("inference_tensor", "head.scale", "train", "on_fit_start") in found, found


def test_lightning_patterns_and_callbacks_are_silent(tmp_path: Path) -> None:
    from lightning.pytorch import callbacks

    runs: list[tuple[pl.LightningModule, str, list[Any]]] = [
        (GAN(), "gan", []),
        (Classifier(_resnet(), 16), IMAGES, [callbacks.ModelPruning("l1_unstructured", amount=0.3, verbose=0)]),
        (Classifier(_mobilenet(), 16), IMAGES, [callbacks.BackboneFinetuning(unfreeze_backbone_at_epoch=1)]),
    ]
    if hasattr(callbacks, "WeightAveraging"):  # Lightning >= 2.6
        runs.append((Classifier(TinyViT(), 16), IMAGES, [callbacks.WeightAveraging()]))
    for i, (model, inputs, extra) in enumerate(runs):
        auditor = NoGradAuditor(verbose=False)
        loaders = (None, None) if inputs == "gan" else (data(inputs), data(inputs))
        with nograd_warnings():
            t = trainer(tmp_path / str(i), [*extra, auditor], limit_train_batches=3)
            if inputs == "gan":
                from tests.helpers import loader

                t.fit(model, loader(), loader())
            else:
                t.fit(model, *loaders)
        assert auditor.report.findings == [], (
            type(model).__name__,
            extra,
            [f.message for f in auditor.report.findings],
        )


class Tuned(Classifier):
    """The zoo's classifier with what Lightning's tuners and optimizers ask of a model: an ``lr``, an
    optimizer by name (LBFGS re-runs the training step inside ``optimizer.step``), and torchmetrics
    metrics logged as objects in training and validation."""

    def __init__(self, backbone: nn.Module, features: int, bug: str | None = None, optimizer: str = "sgd") -> None:
        super().__init__(backbone, features, bug)
        self.lr = 0.01
        self.optimizer = optimizer
        torchmetrics = pytest.importorskip("torchmetrics")
        self.train_accuracy = torchmetrics.Accuracy("multiclass", num_classes=CLASSES)
        self.val_accuracy = torchmetrics.Accuracy("multiclass", num_classes=CLASSES)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.training_logits(x)
        self.train_accuracy(logits.detach(), y)
        self.log("train_accuracy", self.train_accuracy, on_step=True, on_epoch=True)
        return nn.functional.cross_entropy(logits, y)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.bug == "stray_forward":
            self(batch[0])  # e.g. a metric on the batch, with gradients on: a graph no backward uses
        super().on_train_batch_end(outputs, batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.val_accuracy(self(batch[0]), batch[1])
        self.log("val_accuracy", self.val_accuracy)
        super().validation_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), lr=self.lr, max_iter=3)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


MORE_PATTERNS: dict[str, tuple[str, str, Callable[[], list[Any]], dict[str, Any]]] = {
    # name: (zoo entry, optimizer, the callbacks it adds, what else the trainer gets)
    "lbfgs": ("resnet", "lbfgs", list, {}),
    "stochastic-weight-averaging": (
        "mobilenet", "sgd", lambda: [pl.callbacks.StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)], {},
    ),
    "learning-rate-finder": (
        "vit", "sgd", lambda: [pl.callbacks.LearningRateFinder(num_training_steps=5, early_stop_threshold=None)], {},
    ),
    "clipping-and-accumulation-schedule": (
        "lstm", "sgd", lambda: [pl.callbacks.GradientAccumulationScheduler({0: 1, 1: 2})], {"gradient_clip_val": 0.5},
    ),
}  # fmt: skip


@pytest.mark.parametrize("pattern", list(MORE_PATTERNS))
def test_more_lightning_callbacks_optimizers_and_stacks_are_silent(tmp_path: Path, pattern: str) -> None:
    name, optimizer, callbacks, options = MORE_PATTERNS[pattern]
    build, inputs, features = ZOO[name]
    torch.manual_seed(0)
    auditor = NoGradAuditor(verbose=False)
    with nograd_warnings() as seen:
        run = trainer(tmp_path, [*callbacks(), auditor], max_epochs=3, limit_train_batches=4, **options)
        run.fit(Tuned(build(tmp_path), features, optimizer=optimizer), data(inputs), data(inputs))
    assert auditor.report.findings == [], [str(w.message) for w in seen]


@pytest.mark.parametrize("bug", ["stray_forward", "head_under_no_grad", "eval_left_on"])
def test_seeded_bugs_are_named_under_lbfgs(tmp_path: Path, bug: str) -> None:
    # LBFGS runs the training step again inside `optimizer.step`: the stretches between steps and the
    # gradient checks must still see each bug, in its hook
    build, inputs, features = ZOO["resnet"]
    torch.manual_seed(0)
    auditor = fit(tmp_path, Tuned(build(tmp_path), features, bug, optimizer="lbfgs"), inputs)
    expected = {
        "stray_forward": ("stray_graph", "", "on_train_batch_end"),
        "head_under_no_grad": ("no_grad_module", "head", "training_step"),
        "eval_left_on": ("eval_mode_leak", "backbone", "on_train_batch_end"),
    }[bug]
    assert expected in {(f.kind, f.subject, f.hook) for f in auditor.report.findings}


# -- conditional computation: correct models whose parameters learn only on some steps ---------------


class Conditional(pl.LightningModule):
    """A token model (8 tokens a step) with one kind of conditional computation, or a branch that never runs.

    ``kind``: ``"moe"`` noisy top-1 routing over 8 experts (most steps leave some expert without a token);
    ``"layerdrop"`` stochastic depth, each of 6 blocks skipped 30% of the steps (wav2vec2's ``layerdrop``);
    ``"every_4th"`` an auxiliary head in the loss every 4th step; ``"curriculum"`` a branch that joins
    the loss after 5 steps; ``"dead"`` a head that is never used (a real bug).
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.embed = nn.Linear(16, 16)
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(8))
        self.router = nn.Linear(16, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(6))
        self.aux_head = nn.Linear(16, 1)
        self.head = nn.Linear(16, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        if self.kind == "moe":
            logits = self.router(h)
            if self.training:  # noisy top-1 gating (Shazeer et al., 2017): every expert gets tokens now and then
                logits = logits + torch.randn_like(logits)
            gates = logits.softmax(-1)
            top = gates.argmax(-1)
            routed = torch.zeros_like(h)
            for i, expert in enumerate(self.experts):
                chosen = top == i
                if chosen.any():
                    routed[chosen] = expert(h[chosen]) * gates[chosen, i : i + 1]
            return h + routed
        for block in self.blocks:
            if self.kind == "layerdrop" and self.training and torch.rand(()) < 0.3:
                continue
            h = h + block(h)
        return h

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = self.features(x)
        loss = nn.functional.mse_loss(self.head(h), y)
        if (self.kind == "every_4th" and self.global_step % 4 == 3) or (
            self.kind == "curriculum" and self.global_step >= 5
        ):
            loss = loss + 0.1 * self.aux_head(h).pow(2).mean()
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", nn.functional.mse_loss(self.head(self.features(batch[0])), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # the parts this kind uses; the others are left out of the optimizer, as a user would
        unused = ("blocks",) if self.kind == "moe" else ("experts", "router")
        if self.kind not in ("every_4th", "curriculum", "dead"):
            unused += ("aux_head",)
        return torch.optim.SGD([p for name, p in self.named_parameters() if not name.startswith(unused)], lr=0.01)


def fit_conditional(tmp_path: Path, kind: str, steps: int, epochs: int = 2) -> NoGradAuditor:
    from tests.helpers import loader

    torch.manual_seed(0)
    auditor = NoGradAuditor(verbose=False, monitor_savings=False)
    with nograd_warnings():
        run = trainer(tmp_path, [auditor], max_epochs=epochs, limit_train_batches=steps, limit_val_batches=1)
        run.fit(Conditional(kind), loader(n=8 * steps, features=16), loader(n=8, features=16))
    return auditor


@pytest.mark.parametrize("kind", ["moe", "layerdrop", "every_4th", "curriculum"])
def test_conditional_computation_is_silent(tmp_path: Path, kind: str) -> None:
    # 12 steps an epoch: each of these leaves some parameter without a gradient at the first step
    auditor = fit_conditional(tmp_path, kind, steps=12)
    assert auditor.report.findings == [], [f.message for f in auditor.report.findings]


@pytest.mark.parametrize(
    ("steps", "evidence"), [(40, "at each of its last 32 steps"), (6, "at every step of a whole epoch")]
)
def test_a_branch_that_never_runs_is_found_within_the_first_epoch(tmp_path: Path, steps: int, evidence: str) -> None:
    # after 32 steps without a gradient in a long epoch; at the end of a short first epoch
    auditor = fit_conditional(tmp_path, "dead", steps=steps, epochs=1)
    found = [f for f in auditor.report.findings]
    assert [(f.kind, f.subject, f.epoch, f.batch_idx) for f in found] == [("param_without_grad", "aux_head", 0, 0)]
    assert evidence in found[0].problem and 'pass `allow=[r"aux_head"]`' in found[0].fix
    assert found[0].details["parameters"] == ["aux_head.weight", "aux_head.bias"]
