"""With default settings the callbacks must not change what they watch: bit-identical runs."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_nograd import BackpropGuard, EvalModeAuditor
from tests.helpers import Regressor, loader, nograd_warnings, read_csv_metrics, trainer


def run(tmp_path: Path, callbacks: list[pl.Callback], **kwargs: object) -> tuple[dict[str, torch.Tensor], list]:
    pl.seed_everything(7)
    model = Regressor()
    t = trainer(
        tmp_path,
        callbacks,
        logger=CSVLogger(tmp_path, name="csv"),
        max_epochs=2,
        limit_train_batches=4,
        val_check_interval=0.5,
        log_every_n_steps=1,
        **kwargs,
    )
    with nograd_warnings() as seen:
        t.fit(model, loader(n=64), loader(n=32))
    assert seen == []
    losses = [
        (row["step"], row.get("train_loss"), row.get("val_loss"))
        for row in read_csv_metrics(tmp_path / "csv")
        if row.get("train_loss") or row.get("val_loss")
    ]
    return model.state_dict(), losses


@pytest.mark.parametrize("extra", [{}, {"accumulate_grad_batches": 2}])
def test_weights_buffers_and_losses_are_bit_identical(tmp_path: Path, extra: dict) -> None:
    base_state, base_losses = run(tmp_path / "plain", [], **extra)
    state, losses = run(tmp_path / "audited", [EvalModeAuditor(), BackpropGuard()], **extra)
    assert base_losses and losses == base_losses
    assert state.keys() == base_state.keys()
    for key in state:
        assert torch.equal(state[key], base_state[key]), key  # weights and batch-norm running stats
