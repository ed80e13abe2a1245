"""The quickstart logged to Weights & Biases, offline: no account or network needed.

The same model, data, epochs and ``NoGradAuditor()`` defaults as ``examples/quickstart.py``, with
Lightning's ``WandbLogger`` instead of TensorBoard.

    WANDB_MODE=offline python examples/wandb_offline.py [--root-dir DIR] [--max-epochs N]

Every ``nograd/...`` metric goes to the run's history and the end-of-fit summary to its run
summary. ``wandb leet DIR/wandb`` opens it in W&B's terminal viewer (no account needed);
``wandb sync DIR/wandb/offline-run-*`` uploads the run later if you want it online.
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger
from quickstart import Classifier, SyntheticData

from lightning_nograd import NoGradAuditor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root-dir", default=".")
    parser.add_argument("--max-epochs", type=int, default=20, help="the quickstart's 20 by default")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")

    pl.seed_everything(0)
    logger = WandbLogger(project="lightning-nograd-example", save_dir=args.root_dir, offline=True)
    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        callbacks=[NoGradAuditor()],
        logger=logger,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    trainer.fit(Classifier(planted_bug=True), datamodule=SyntheticData())
    logger.experiment.finish()
    print(f"W&B offline run written under {os.path.abspath(args.root_dir)}/wandb")


if __name__ == "__main__":
    main()
