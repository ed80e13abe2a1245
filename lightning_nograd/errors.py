"""Warning and error classes of lightning-nograd, so users can filter them."""

from __future__ import annotations

__all__ = ["BrokenBackpropWarning", "NoGradError", "NoGradWarning"]


class NoGradWarning(UserWarning):
    """Every warning lightning-nograd emits is this class or a subclass.

    Examples:
        >>> import warnings
        >>> warnings.simplefilter("ignore", NoGradWarning)  # silence the library
    """


class BrokenBackpropWarning(NoGradWarning):
    """A definite training bug: some trainable part of the model is not learning."""


class NoGradError(RuntimeError):
    """Raised at the first violation when a callback was built with ``on_violation="error"``."""
