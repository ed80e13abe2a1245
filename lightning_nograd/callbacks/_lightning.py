"""Everything that depends on how Lightning is laid out, in one place.

Checked against lightning / pytorch_lightning 2.2 to 2.6.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

_NAMESPACES = ("lightning.pytorch", "pytorch_lightning")


def imported_callback_bases() -> tuple[type, ...]:
    """The ``Callback`` classes of the Lightning namespaces this process has already imported."""
    bases = []
    for name in _NAMESPACES:
        callback = getattr(sys.modules.get(name), "Callback", None)
        if isinstance(callback, type):
            bases.append(callback)
    return tuple(bases)


def callback_bases_for_a_trainer() -> tuple[type, ...]:
    """The ``Callback`` classes a callback built now must derive from, for either namespace's ``Trainer``.

    Those of the namespaces the user imported; when none is imported yet, ``lightning.pytorch``
    (or ``pytorch_lightning`` where only that is installed) is imported here, at construction,
    never when ``lightning_nograd`` itself is imported.
    """
    bases = imported_callback_bases()
    if bases:
        return bases
    for name in _NAMESPACES:
        try:
            return (importlib.import_module(name).Callback,)
        except ImportError:
            continue
    raise ImportError("lightning-nograd needs `lightning` (or `pytorch_lightning`) installed.")


if TYPE_CHECKING:
    from lightning.pytorch import Callback as CallbackBase
    from lightning.pytorch import LightningModule, Trainer
else:

    class _NoLightningYet:
        """Where ``CallbackBase`` starts when no Lightning namespace is imported yet.

        A class of our own rather than ``object``: Python lets a class derived from it be re-based.
        """

    class CallbackBase(_NoLightningYet):
        """The ``Callback`` classes of the Lightning namespaces in use (see ``attach_lightning_bases``)."""

    LightningModule = Any
    Trainer = Any


def attach_lightning_bases() -> None:
    """Make every lightning-nograd callback a ``Callback`` of each Lightning namespace imported so far.

    Only namespaces the user imported: importing ``pytorch_lightning`` behind a user of
    ``lightning.pytorch`` re-points Lightning's loggers and warning classes for the whole process.
    Runs when lightning-nograd is imported and again whenever a callback is built, so a namespace
    imported in between (``pytorch_lightning`` after ``lightning_nograd``, as isort orders them)
    joins; the classes stay the same classes, so ``type(cb) is NoGradAuditor`` and pickling hold.
    """
    current = tuple(b for b in CallbackBase.__bases__ if b.__name__ != "_NoLightningYet")
    bases = imported_callback_bases() if current else callback_bases_for_a_trainer()
    wanted = tuple(dict.fromkeys((*current, *bases)))
    if wanted and wanted != current:
        CallbackBase.__bases__ = wanted


def _attach_imported_bases() -> None:
    if imported_callback_bases():
        attach_lightning_bases()


_attach_imported_bases()

__all__ = [
    "CallbackBase",
    "LightningModule",
    "Trainer",
    "attach_lightning_bases",
    "is_sanity_checking",
    "steps_are_compiled",
    "world_size",
]


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


def log_step(trainer: Trainer, stage: str) -> int:
    """The step at which Lightning logs the epoch-level metrics of ``stage``, for ours to sit beside them.

    Lightning logs evaluation epochs at the fit loop's count of batches that stepped, and training
    epochs one below it (the epoch's last step); ``global_step`` counts optimizer steps instead, and
    differs under gradient accumulation and several optimizers.
    """
    stepped = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "_batches_that_stepped", None)
    if not isinstance(stepped, int):
        return int(trainer.global_step)
    return max(0, stepped - 1) if stage == "train" else stepped


def is_global_zero(trainer: Trainer) -> bool:
    """Whether this process is rank zero (a trainer without the attribute counts as rank zero)."""
    return bool(getattr(trainer, "is_global_zero", True))


def is_logger(logger: object, name: str) -> bool:
    """Whether ``logger`` is a Lightning logger class called ``name`` or a subclass of one (either
    namespace, without importing one)."""
    return any(cls.__name__ == name for cls in type(logger).__mro__)


def ddp_stops_on_unused_parameters(trainer: Trainer) -> bool:
    """Whether the model runs under ``DistributedDataParallel`` that raises at the next forward when a
    parameter got no gradient: neither ``find_unused_parameters`` nor ``static_graph`` is set."""
    model = getattr(getattr(trainer, "strategy", None), "model", None)
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:
        return False
    if not isinstance(model, DistributedDataParallel):
        return False
    return not getattr(model, "find_unused_parameters", True) and not getattr(model, "static_graph", True)
