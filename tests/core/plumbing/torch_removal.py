"""Takes PyTorch APIs away, as a torch without them would be. Imports nothing of lightning-nograd, so a
fresh process can take them away before lightning-nograd is imported."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from torch import nn


def owner_and_attribute(dotted: str) -> tuple[Any, str]:
    """The object holding ``dotted`` and the attribute's name; for ``Class()._name`` (an attribute of
    every instance) the owner is the string ``"Class()"``."""
    path, _, attribute = dotted.rpartition(".")
    if path.endswith("()"):
        return path, attribute
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            owner: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for part in parts[split:]:
            owner = getattr(owner, part)
        return owner, attribute
    raise ImportError(dotted)


@contextmanager
def without(names: Iterable[str]) -> Iterator[None]:
    """Inside the block, each of ``names`` is deleted (an ``nn.Module()`` attribute from every module
    built meanwhile); everything is put back on exit."""
    with pytest.MonkeyPatch.context() as patch:
        instance_attributes = []
        for name in names:
            owner, attribute = owner_and_attribute(name)
            if isinstance(owner, str):
                instance_attributes.append(attribute)
            else:
                patch.delattr(owner, attribute)
        if instance_attributes:
            original_init = nn.Module.__init__

            def init(self: nn.Module, *args: Any, **kwargs: Any) -> None:
                original_init(self, *args, **kwargs)
                for attribute in instance_attributes:
                    vars(self).pop(attribute, None)

            patch.setattr(nn.Module, "__init__", init)
        yield
