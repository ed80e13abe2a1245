"""Everything that depends on how Lightning is laid out, in one place.

Checked against lightning / pytorch_lightning 2.2 to 2.6.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning.pytorch import Callback as CallbackBase
    from lightning.pytorch import LightningModule, Trainer
else:

    def _callback_base() -> type:
        """One base class that both ``lightning.pytorch`` and ``pytorch_lightning`` accept."""
        bases = []
        for package in ("lightning.pytorch", "pytorch_lightning"):
            try:
                found = importlib.util.find_spec(package.split(".")[0]) is not None
            except ValueError:
                found = False
            if found:
                bases.append(importlib.import_module(package).Callback)
        if not bases:
            raise ImportError("lightning-nograd needs `lightning` (or `pytorch_lightning`) installed.")
        if len(bases) == 1:
            return bases[0]
        return type("Callback", tuple(bases), {"__module__": __name__})

    CallbackBase = _callback_base()
    LightningModule = Any
    Trainer = Any

__all__ = ["CallbackBase", "LightningModule", "Trainer", "is_sanity_checking", "steps_are_compiled", "world_size"]


def is_sanity_checking(trainer: Trainer) -> bool:
    """Whether the trainer is in its pre-fit sanity-check validation."""
    return bool(getattr(trainer, "sanity_checking", False))


def world_size(trainer: Trainer) -> int:
    """Number of processes taking part in the run."""
    return int(getattr(trainer, "world_size", 1) or 1)


def forget_lightning_module(callback: object) -> None:
    """Drop the ``log``/``log_dict`` bound methods Lightning attaches to every callback at setup.

    ``CallbackConnector._attach_model_logging_functions`` (2.2 to 2.6) sets them; left in place
    they keep the LightningModule alive for as long as the callback lives.
    """
    for name in ("log", "log_dict"):
        vars(callback).pop(name, None)


def steps_are_compiled(pl_module: object) -> bool:
    """Whether the LightningModule was passed through ``torch.compile`` whole.

    ``lightning.pytorch.utilities.compile.from_compiled`` (2.2 to 2.6) then compiles its steps too and
    records that in the private ``_compiler_ctx``.
    """
    return getattr(pl_module, "_compiler_ctx", None) is not None
