"""Everything that depends on how Lightning is laid out, in one place.

Checked against lightning / pytorch_lightning 2.2 to 2.6.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

_NAMESPACES = ("lightning.pytorch", "pytorch_lightning")


def imported_namespaces() -> tuple[str, ...]:
    """The Lightning namespaces this process has already imported."""
    return tuple(name for name in _NAMESPACES if isinstance(getattr(sys.modules.get(name), "Callback", None), type))


def imported_callback_bases() -> tuple[type, ...]:
    """The ``Callback`` classes of the Lightning namespaces this process has already imported."""
    return tuple(sys.modules[name].Callback for name in imported_namespaces())


# the class made from a lightning-nograd class for the Lightning namespaces it lacked -> (that class, the namespaces)
_MADE_FOR: dict[type, tuple[type, tuple[str, ...]]] = {}
_MADE: dict[tuple[type, tuple[str, ...]], type] = {}


def for_namespaces(cls: type, namespaces: tuple[str, ...]) -> type:
    """``cls`` with the ``Callback`` of each of ``namespaces`` among its bases: ``cls`` itself when it has them
    already, otherwise a subclass made once (same name and module) whose only addition is those bases."""
    missing = tuple(n for n in namespaces if not issubclass(cls, importlib.import_module(n).Callback))
    if not missing:
        return cls
    made = _MADE.get((cls, missing))
    if made is None:
        bases = (cls, *(importlib.import_module(n).Callback for n in missing))
        names = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        # its signature is the class's (Python 3.10 would otherwise show `CallbackBase.__new__`'s)
        made = type(cls)(cls.__name__, bases, {**names, "__signature__": inspect.signature(cls)})
        _MADE[(cls, missing)] = made
        _MADE_FOR[made] = (cls, missing)
    return made


# set while NoGradAuditor builds its parts: they are driven by the auditor, never handed to a Trainer
_BUILDING_PARTS: ContextVar[bool] = ContextVar("lightning_nograd_building_parts", default=False)


@contextmanager
def building_parts() -> Iterator[None]:
    """Callbacks built inside are parts of another one: their class is kept as it is (``type(part) is
    EvalModeAuditor``), since no Trainer sees them."""
    token = _BUILDING_PARTS.set(True)
    try:
        yield
    finally:
        _BUILDING_PARTS.reset(token)


def _remade(cls: type, namespaces: tuple[str, ...]) -> Any:
    """Unpickling a callback built for ``namespaces``: an instance of the same class (its state follows)."""
    return object.__new__(for_namespaces(cls, namespaces))


def _namespaces_for_a_trainer() -> tuple[str, ...]:
    """The namespaces a callback built now must suit: those imported; or, when none is yet, the installed one
    (``lightning.pytorch``, else ``pytorch_lightning``), imported here, at construction."""
    imported = imported_namespaces()
    if imported:
        return imported
    for name in _NAMESPACES:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        return (name,)
    raise ImportError("lightning-nograd needs `lightning` (or `pytorch_lightning`) installed.")


if TYPE_CHECKING:
    from lightning.pytorch import Callback as CallbackBase
    from lightning.pytorch import LightningModule, Trainer
else:

    class CallbackBase(*imported_callback_bases()):
        """Base of the lightning-nograd callbacks: a ``Callback`` of the Lightning namespaces in use.

        Its bases are the ``Callback`` classes of the namespaces imported when lightning-nograd is
        imported (none is imported for it). A callback built later, once the Trainer's namespace is
        imported (``pytorch_lightning`` after ``lightning_nograd``, the order isort gives), is an
        instance of ``for_namespaces(cls, ...)``: a subclass made once per class and namespace, with the
        same name, whose only addition is that ``Callback`` among its bases. No class is ever changed.
        ``isinstance(callback, NoGradAuditor)``, the checkpoint's ``state_key`` and pickling hold.
        """

        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            if _BUILDING_PARTS.get():
                return super().__new__(cls)
            return super().__new__(for_namespaces(cls, _namespaces_for_a_trainer()))

        def __reduce_ex__(self, protocol: Any) -> Any:
            # rebuilt as this very class: the one made from, with the namespaces it was made for
            cls, namespaces = _MADE_FOR.get(type(self), (type(self), ()))
            return _remade, (cls, namespaces), self.__getstate__()

    LightningModule = Any
    Trainer = Any


__all__ = [
    "CallbackBase",
    "LightningModule",
    "Trainer",
    "building_parts",
    "for_namespaces",
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
