"""Allow-lists of module names: regular expressions matched against ``named_modules()`` paths."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

from torch import nn

from lightning_nograd.core.plumbing.torch_internals import WRAPPER_SEGMENTS, is_compile_wrapper


def user_path(path: str) -> str:
    """The path the user wrote: the segments of wrappers removed (``torch.compile``'s ``_orig_mod``,
    FSDP1's ``_fsdp_wrapped_module``, activation checkpointing's ``_checkpoint_wrapped_module``).

    Examples:
        >>> user_path("encoder._orig_mod.layers.0"), user_path("_fsdp_wrapped_module.head")
        ('encoder.layers.0', 'head')
    """
    if "._" not in path and not path.startswith("_"):
        return path
    return ".".join(part for part in path.split(".") if part not in WRAPPER_SEGMENTS)


def named_modules(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``root.named_modules()`` with the paths the user wrote (see ``user_path``)."""
    for path, module in root.named_modules():
        yield user_path(path), module


def mode_modules(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` whose train / eval mode matters: a ``torch.compile`` wrapper runs its eager
    module, whose modes do, and torch 2.4 leaves the wrapper's own flag as it was when compiled.

    Examples:
        >>> import torch
        >>> net = nn.Sequential(torch.compile(nn.Linear(1, 1)))
        >>> [path for path, _ in mode_modules(net)]
        ['', '0']
    """
    for path, module in named_modules(root):
        if not is_compile_wrapper(module):
            yield path, module


def parent_path(path: str) -> str:
    """The path of the module holding ``path``: ``"a.b"`` -> ``"a"``, ``"a"`` -> ``""`` (the root)."""
    return path.rsplit(".", 1)[0] if "." in path else ""


def ancestors(path: str) -> list[str]:
    """``path`` and its ancestors, outermost first: ``"a.b"`` -> ``["", "a", "a.b"]``."""
    parts = path.split(".") if path else []
    return ["", *(".".join(parts[: i + 1]) for i in range(len(parts)))]


class NamePatterns:
    """A set of regular expressions; a path matches when it or one of its ancestors full-matches.

    Allow-listing a module therefore allow-lists everything inside it; the root module has the
    empty path, so ``""`` allow-lists the whole model.

    Args:
        argument: the constructor argument the patterns came from, for error messages.
        patterns: regular expressions (``re.fullmatch``) over dotted module paths.

    Raises:
        TypeError: ``patterns`` is not an iterable of strings.
        ValueError: a pattern is not a valid regular expression.

    Examples:
        >>> allowed = NamePatterns("allow_train_mode", [r"encoder\\.mc_dropout"])
        >>> allowed.matches("encoder.mc_dropout.p"), allowed.matches("decoder")
        (True, False)
    """

    def __init__(self, argument: str, patterns: Iterable[str] | str | None) -> None:
        if patterns is None:
            patterns = ()
        if isinstance(patterns, str):
            patterns = (patterns,)
        if isinstance(patterns, (bytes, bytearray, Mapping)):  # iterable, but not of patterns
            raise TypeError(
                f"Expected argument `{argument}` to be a list of regular-expression strings, "
                f"but got {patterns!r} of type {type(patterns).__name__}."
            )
        try:
            items = list(patterns)
        except TypeError:
            raise TypeError(
                f"Expected argument `{argument}` to be a list of regular-expression strings, "
                f"but got {patterns!r} of type {type(patterns).__name__}."
            ) from None
        compiled = []
        for item in items:
            if not isinstance(item, str):
                raise TypeError(
                    f"Expected every entry of `{argument}` to be a regular-expression string, "
                    f"but got {item!r} of type {type(item).__name__}."
                )
            try:
                compiled.append(re.compile(item))
            except re.error as err:
                raise ValueError(
                    f"Expected every entry of `{argument}` to be a valid regular expression, but got {item!r} ({err})."
                ) from None
        self.patterns: tuple[str, ...] = tuple(items)
        self._compiled = tuple(compiled)

    def matches(self, path: str) -> bool:
        """Whether ``path`` or any of its ancestors full-matches one of the patterns."""
        if not self._compiled:
            return False
        return any(p.fullmatch(c) for p in self._compiled for c in ancestors(path))

    def names(self, subject: str) -> bool:
        """Whether a pattern full-matches ``subject`` itself: for what is no module (a step's outputs, an attribute
        ``self.preds``, the savings replay), which no module's pattern, the model's ``""`` included, allows.

        Examples:
            >>> everything, preds = NamePatterns("allow_grad", [""]), NamePatterns("allow", ["self[.]preds"])
            >>> everything.names("self.preds"), preds.names("self.preds")
            (False, True)
        """
        return any(p.fullmatch(subject) for p in self._compiled)


def class_name(module: object) -> str:
    """The name of ``module``'s class as the user wrote it: FSDP2's ``fully_shard`` swaps a module's class
    for a ``FSDP<Name>`` subclass made in ``torch.distributed``, which the user never wrote.

    Examples:
        >>> from torch import nn
        >>> class_name(nn.Linear(1, 1))
        'Linear'
    """
    for cls in type(module).__mro__:
        if not str(cls.__module__).startswith("torch.distributed."):
            return cls.__name__
    return type(module).__name__
