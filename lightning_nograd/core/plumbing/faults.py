"""The one way an internal failure is handled wherever it happens: one warning, that check off, the run goes on.

Probe hooks run inside the user's forward (global forward hooks, saved-tensor hooks). Registered
through ``isolated``, an exception in them never reaches the user's code: the probe's
``on_error`` gets it (the callbacks switch that check off with one warning), or, with no handler,
it becomes one ``lightning_nograd.NoGradWarning``; the probe then does nothing more.
``lightning_nograd.NoGradError``, raised because the user asked a run to stop, passes.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

from lightning_nograd.core.plumbing.torch_internals import MissingTorchInternal
from lightning_nograd.core.reporting.findings import user_stacklevel
from lightning_nograd.errors import NoGradError, NoGradWarning

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")
T = TypeVar("T", bound="Probe")


class Probe:
    """Something whose hooks run inside the user's code: where its failures go, and whether it failed.

    Attributes:
        on_error: receives an internal failure (the callbacks switch that check off); ``None``: warn once.
        failed: set by the first failure; the probe's hooks do nothing from then on.
    """

    on_error: Callable[[BaseException], None] | None = None
    failed: bool = False


def report_fault(owner: Probe, err: BaseException) -> None:
    """Hand ``err`` to ``owner.on_error``, or warn once; ``owner`` stops working either way.

    Examples:
        >>> seen = []
        >>> probe = Probe(); probe.on_error = seen.append
        >>> report_fault(probe, ValueError("boom")); [type(e).__name__ for e in seen], probe.failed
        (['ValueError'], True)
    """
    first = not owner.failed
    owner.failed = True
    if owner.on_error is not None:
        owner.on_error(err)
    elif first:
        warnings.warn(fault_message(type(owner).__name__, err), NoGradWarning, stacklevel=user_stacklevel())


def fault_message(check: str, err: BaseException) -> str:
    """The one warning for a check switched off by ``err``: a PyTorch internal this torch lacks, or our bug.

    Examples:
        >>> fault_message("SavingsMonitor check `replay`", ValueError("boom")).split(". ")[0]
        '[lightning-nograd] internal error in SavingsMonitor check `replay`: ValueError: boom'
        >>> fault_message("SavingsMonitor check `replay`", MissingTorchInternal("torch 9 lacks `x`."))
        '[lightning-nograd] SavingsMonitor check `replay` is switched off: torch 9 lacks `x`. The run goes on.'
    """
    if isinstance(err, MissingTorchInternal):
        return f"[lightning-nograd] {check} is switched off: {err} The run goes on."
    return (
        f"[lightning-nograd] internal error in {check}: {type(err).__name__}: {err}. "
        "That check is switched off; the run goes on. Please report this with the traceback from the debug log."
    )


def isolated(hook: Callable[P, R], owner: Probe) -> Callable[P, R | None]:
    """``hook`` made safe to run inside the user's code, on behalf of ``owner`` (see the module doc)."""

    @functools.wraps(hook)
    def run(*args: P.args, **kwargs: P.kwargs) -> R | None:
        if owner.failed:
            return None
        try:
            return hook(*args, **kwargs)
        except NoGradError:
            raise
        except Exception as err:
            report_fault(owner, err)
            return None

    return run


def isolating(
    skip: Callable[[S], bool], fault: Callable[[S, Exception], None]
) -> Callable[[Callable[Concatenate[S, P], R]], Callable[Concatenate[S, P], R | None]]:
    """A decorator that makes a method safe to call from the user's run: nothing while ``skip(self)``,
    ``lightning_nograd.NoGradError`` passes (the user asked to stop), any other failure goes to
    ``fault(self, err)`` and the method returns ``None``."""

    def decorate(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R | None]:
        @functools.wraps(method)
        def run(self: S, *args: P.args, **kwargs: P.kwargs) -> R | None:
            if skip(self):
                return None
            try:
                return method(self, *args, **kwargs)
            except NoGradError:
                raise
            except Exception as err:
                fault(self, err)
                return None

        return run  # type: ignore[return-value]

    return decorate


def isolated_method(method: Callable[Concatenate[T, P], R]) -> Callable[Concatenate[T, P], R | None]:
    """A probe's method, called by a callback or ``audit()``, made safe like its hooks: a failure goes to
    the probe's ``on_error`` (the check is switched off) and a failed probe's methods do nothing."""

    def failed(probe: T) -> bool:
        return probe.failed

    def fault(probe: T, err: Exception) -> None:
        report_fault(probe, err)

    return isolating(failed, fault)(method)
