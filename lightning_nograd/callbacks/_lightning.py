"""What the callbacks read of Lightning's objects, in one place: each helper says which Lightning attribute
it relies on. How one callback class serves both namespaces is ``namespaces.py``.

Checked against lightning / pytorch_lightning 2.2 to 2.6.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule as LightningModule
    from lightning.pytorch import Trainer as Trainer
else:  # either namespace's (see `namespaces.py`): the helpers below only read attributes
    LightningModule = Any
    Trainer = Any


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
