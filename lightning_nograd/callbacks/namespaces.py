"""One callback class for both Lightning namespaces, ``lightning.pytorch`` and ``pytorch_lightning``.

Lightning ships its ``Trainer`` twice: as ``lightning.pytorch`` (the ``lightning`` package) and as
``pytorch_lightning``. Each ``Trainer`` takes only instances of its own ``Callback``, and importing the
namespace a user does not use would re-point Lightning's loggers and warning classes for the whole
process. So lightning-nograd imports neither, and follows three rules:

1. **At import**, ``CallbackBase`` derives from the ``Callback`` of each namespace already imported
   (none, one or both). A user who imports Lightning first gets classes that are Lightning callbacks,
   as ``LightningCLI``'s ``--trainer.callbacks`` needs.
2. **When a callback is built**, it must be a ``Callback`` of every namespace imported by then (or, if
   none is, of the one installed, imported then). If its class already is, the instance is of that
   class. If not (``import pytorch_lightning`` came after ``import lightning_nograd``, the order isort
   gives), the instance is of a subclass made for the namespaces missing: the same name and module,
   whose only addition is their ``Callback`` among its bases. It is made once and reused.
3. **When such an instance is pickled** (``ddp_spawn``, ``copy.deepcopy``), the copy is rebuilt from
   the class and the namespaces it was made for: the same made subclass.

No class is ever changed; ``isinstance(callback, NoGradAuditor)`` holds whichever class it is, and the
checkpoint's state key is the class's name either way. Checked against lightning and
pytorch_lightning 2.2 to 2.6.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import TYPE_CHECKING, Any

__all__ = ["CallbackBase", "for_namespaces", "imported_namespaces", "namespaces_to_suit"]

NAMESPACES = ("lightning.pytorch", "pytorch_lightning")


def _callback(namespace: str) -> type:
    return importlib.import_module(namespace).Callback  # type: ignore[no-any-return]


def imported_namespaces() -> tuple[str, ...]:
    """The Lightning namespaces this process has already imported."""
    return tuple(name for name in NAMESPACES if isinstance(getattr(sys.modules.get(name), "Callback", None), type))


def namespaces_to_suit() -> tuple[str, ...]:
    """The namespaces a callback built now must suit (rule 2): those imported; if none is, the installed one
    (``lightning.pytorch``, else ``pytorch_lightning``), imported here."""
    imported = imported_namespaces()
    if imported:
        return imported
    for name in NAMESPACES:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        return (name,)
    raise ImportError("lightning-nograd needs `lightning` (or `pytorch_lightning`) installed.")


_MADE: dict[tuple[type, tuple[str, ...]], type] = {}


def for_namespaces(cls: type, namespaces: tuple[str, ...]) -> type:
    """``cls`` if it is a ``Callback`` of each of ``namespaces``; otherwise the subclass made (once) for those
    it is not, with the same name and signature (rule 2)."""
    missing = tuple(name for name in namespaces if not issubclass(cls, _callback(name)))
    if not missing:
        return cls
    made = _MADE.get((cls, missing))
    if made is None:
        made = type(cls)(
            cls.__name__,
            (cls, *map(_callback, missing)),
            {
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__signature__": inspect.signature(cls),  # (Python 3.10 would show `CallbackBase.__new__`'s)
                "_made_from": (cls, missing),  # what a pickled copy is rebuilt from (rule 3)
            },
        )
        _MADE[(cls, missing)] = made
    return made


def _rebuilt(cls: type, namespaces: tuple[str, ...]) -> Any:
    """An unpickled callback: an instance of the class it was, made again if need be (its state follows)."""
    return object.__new__(for_namespaces(cls, namespaces))


if TYPE_CHECKING:
    from lightning.pytorch import Callback as CallbackBase
else:

    class CallbackBase(*map(_callback, imported_namespaces())):
        """Base of the lightning-nograd callbacks: a ``Callback`` of the Lightning namespaces in use (see the
        module's doc for the three rules)."""

        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            return super().__new__(for_namespaces(cls, namespaces_to_suit()))

        def __reduce_ex__(self, protocol: Any) -> Any:
            cls, namespaces = type(self).__dict__.get("_made_from", (type(self), ()))
            return _rebuilt, (cls, namespaces), self.__getstate__()
