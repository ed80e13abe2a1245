"""A Hugging Face ``Trainer`` run under DDP on 2 CPU processes (gloo), launched by ``torch.distributed.run``.

    python -m torch.distributed.run --nproc_per_node 2 tests/integrations/hf_ddp_run.py OUT

Rank 1's ``prediction_step`` switches a dropout to train mode; each rank writes the warnings it gave, its findings (with
the ranks they name) and the evaluation metrics it logged to ``OUT``.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist
from transformers import Trainer, TrainingArguments

from lightning_nograd import NoGradWarning
from lightning_nograd.integrations.huggingface import NoGradTrainerCallback
from tests.integrations.test_huggingface import Tokens, bert


class DropoutOnRankOne(Trainer):
    def prediction_step(self, model: Any, inputs: Any, prediction_loss_only: bool, ignore_keys: Any = None) -> Any:
        if dist.get_rank() == 1:
            self.model.bert.embeddings.dropout.train()  # type: ignore[union-attr]
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)


def main(out: Path) -> None:
    fields = TrainingArguments.__dataclass_fields__
    strategy = "eval_strategy" if "eval_strategy" in fields else "evaluation_strategy"
    args = TrainingArguments(
        output_dir=str(out / "hf"), num_train_epochs=2, per_device_train_batch_size=8, per_device_eval_batch_size=8,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0, ddp_backend="gloo",
        **{strategy: "epoch"},
    )  # fmt: skip
    callback = NoGradTrainerCallback(verbose=False)
    trainer = DropoutOnRankOne(
        model=bert(),
        args=args,
        train_dataset=Tokens(32),
        eval_dataset=Tokens(32, seed=1),
        callbacks=[callback],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NoGradWarning)
        trainer.train()
    rank = dist.get_rank()
    said = [str(w.message) for w in caught if issubclass(w.category, NoGradWarning)]
    findings = [(f.kind, f.subject, f.ranks) for f in callback.report.findings]
    metrics = [row for row in trainer.state.log_history if any(k.startswith("eval_nograd/") for k in row)]
    (out / f"rank{rank}.json").write_text(json.dumps({"warnings": said, "findings": findings, "metrics": metrics}))


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]))
    finally:
        # the Trainer leaves the process group up; gloo's threads can then abort the interpreter's exit (pytorch#179291)
        if dist.is_initialized():
            dist.destroy_process_group()
