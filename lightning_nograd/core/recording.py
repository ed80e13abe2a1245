"""Records the module calls of one evaluation batch, with their inputs, for the savings replay.

``CallRecorder`` keeps the outermost calls of the modules that do the model's work (modules with
parameters; not metrics, not parameter-free layers), through global forward hooks installed only
while it records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_nograd.core.faults import Probe, isolated
from lightning_nograd.core.torch_internals import (
    eager_module,
    register_forward_hook_with_kwargs,
    tree_map,
)


@dataclass
class RecordedCall:
    """One module call: the module, its inputs, the grad mode and autocast it ran under."""

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    inference_mode: bool
    autocast: tuple[str, torch.dtype] | None = None
    compiled: bool = False
    """The call went through a ``torch.compile`` wrapper; ``module`` is the eager module behind it."""

    @classmethod
    def of(cls, module: nn.Module, args: Any, kwargs: Any) -> RecordedCall:
        """The call of ``module`` that is running now: its eager module, inputs, grad mode and autocast."""
        eager = eager_module(module)
        return cls(
            eager,
            tuple(args),
            dict(kwargs),
            torch.is_inference_mode_enabled(),
            current_autocast(),
            compiled=eager is not module,
        )


def current_autocast() -> tuple[str, torch.dtype] | None:
    """The active autocast (device type, dtype), if any: mixed precision must be replayed as run."""
    for device_type in ("cuda", "cpu"):
        if torch.is_autocast_enabled(device_type):
            return device_type, torch.get_autocast_dtype(device_type)
    return None


def is_work_module(module: nn.Module, excluded: tuple[type, ...] = ()) -> bool:
    """Whether ``module`` does model work worth replaying: it has parameters and is not excluded."""
    if excluded and isinstance(module, excluded):
        return False
    return any(True for _ in module.parameters())


def call_hooks(
    probe: Probe,
    pre: Callable[[nn.Module, Any], None],
    post: Callable[[nn.Module, Any, dict[str, Any] | None, Any], None],
) -> list[RemovableHandle]:
    """Global hooks around every module call, isolated as ``probe``'s: ``pre(module, args)`` and
    ``post(module, args, kwargs, output)``, the latter also when the forward raises (``output`` None).
    ``kwargs`` is ``None`` where they are not known: the forward raised, or they cannot be read
    (see ``lightning_nograd.core.torch_internals.register_forward_hook_with_kwargs``).

    Global hooks, unlike per-module ones, leave fused kernels (``nn.TransformerEncoderLayer``) on.
    """

    def after(module: nn.Module, args: Any, kwargs: Any = None, output: Any = None) -> None:
        # when a forward raises, PyTorch calls always-called global hooks as (module, args, None)
        post(module, args, kwargs if isinstance(kwargs, dict) else None, output)

    return [
        nn.modules.module.register_module_forward_pre_hook(isolated(pre, probe)),
        register_forward_hook_with_kwargs(after, lambda hook: isolated(hook, probe)),
    ]


class CallRecorder(Probe):
    """Records the outermost calls of ``candidates`` while active (global hooks, so fused paths stay on).

    Args:
        candidates: the modules whose calls may be recorded (by ``id``).

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> recorder = CallRecorder({id(m) for m in (net, net[0], net[2])})
        >>> recorder.start()
        >>> with torch.no_grad():
        ...     _ = net(torch.ones(4, 2))
        >>> recorder.stop()
        >>> [type(c.module).__name__ for c in recorder.calls]
        ['Sequential']
    """

    def __init__(self, candidates: set[int], on_error: Callable[[BaseException], None] | None = None) -> None:
        self.on_error = on_error
        self.candidates = candidates
        self.calls: list[RecordedCall] = []
        self._active: int | None = None
        self._handles: list[RemovableHandle] = []

    def start(self) -> None:
        if not self._handles:
            self._handles = call_hooks(self, self._pre, self._post)

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._active = None

    def _pre(self, module: nn.Module, args: Any) -> None:
        if self._active is None and id(module) in self.candidates:
            self._active = id(module)

    def _post(self, module: nn.Module, args: Any, kwargs: dict[str, Any] | None, output: Any) -> None:
        if self._active == id(module):
            self._active = None
            if kwargs is not None:  # a call whose keyword arguments are not known cannot be replayed
                self.calls.append(RecordedCall.of(module, args, kwargs))


def _clone_inference(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_inference():
        with torch.inference_mode(False):
            return value.clone()
    return value


def replayable(calls: Iterable[RecordedCall]) -> list[RecordedCall]:
    """Calls whose inference-mode inputs are cloned, so a grad-enabled replay can use them."""
    return [
        RecordedCall(
            c.module,
            tree_map(_clone_inference, c.args),
            tree_map(_clone_inference, c.kwargs),
            c.inference_mode,
            c.autocast,
            c.compiled,
        )
        for c in calls
    ]
