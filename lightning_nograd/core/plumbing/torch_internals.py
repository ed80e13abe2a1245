"""Every private PyTorch API lightning-nograd uses, looked up in one place.

PyTorch may move or drop a private API in any release. Each one the package uses is looked up here,
when ``lightning_nograd`` is imported (and again by ``resolve``), and used nowhere else: the rest
of the package calls the names below. ``INTERNALS`` says, for each, what it is for and what
happens on a torch without it. A missing one never breaks the import or any other check: where a
public API does the same, that is used instead; where the loss is real (a figure not measured, a
module not named), the callbacks say so once, when they are built (``warn_missing``), and the
check that needs it is skipped with that reason. One that is there but behaves differently fails
inside the check that uses it, which is switched off with one warning (``lightning_nograd.core.plumbing.faults``).

Checked on torch 2.4.0 (Python 3.10), 2.13.0 (Python 3.11) and 2.14.1 (Python 3.13), the versions
CI runs the suite on. ``tests/core/plumbing/test_torch_internals.py`` removes each one in turn.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import CodeType
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from lightning_nograd.core.plumbing import stack
from lightning_nograd.core.reporting.findings import user_stacklevel
from lightning_nograd.errors import NoGradWarning

log = logging.getLogger(__name__)

CHECKED_ON = "torch 2.4.0, 2.13.0 and 2.14.1"


class MissingTorchInternal(RuntimeError):
    """A check needs a PyTorch internal that this torch lacks (see ``INTERNALS``)."""


@dataclass(frozen=True)
class TorchInternal:
    """One private PyTorch API: where it lives, what it is for, what happens without it.

    Attributes:
        names: the dotted paths looked up (all are needed).
        purpose: what lightning-nograd uses it for.
        without: what lightning-nograd does on a torch that lacks it.
        lost: what a user loses then (warned once when a callback is built), or ``None`` when a public
            API does the same and only speed may differ (logged, not warned).
    """

    names: tuple[str, ...]
    purpose: str
    without: str
    lost: str | None = None


INTERNALS: dict[str, TorchInternal] = {
    "node_counter": TorchInternal(
        ("torch._C._autograd._get_sequence_nr",),
        "autograd's node counter: read as a training step ends and as the next one begins, it tells whether "
        "a forward in between recorded a graph, without any hook (the stray-graph check's per-batch fast path)",
        "the stray-graph check watches every stretch between training steps with its saved-tensor hooks: "
        "the same findings, a few microseconds more per training batch",
    ),
    "saved_tensors_stack": TorchInternal(
        ("torch._C._autograd._push_saved_tensors_default_hooks", "torch._C._autograd._pop_saved_tensors_default_hooks"),
        "push and pop the graph probes' saved-tensor hooks without building a context object each time "
        "(the stray-graph probe starts and stops around training steps)",
        "the public `torch.autograd.graph.saved_tensors_hooks` is entered and exited instead: the same findings",
    ),
    "profiler_enabled": TorchInternal(
        ("torch._C._autograd._profiler_enabled",),
        "whether a profiler of yours is running: the CPU peak of a replay is read from a profiler of our own, "
        "which must not start inside yours",
        "CPU memory savings are measured from the tensors that ops return (`LiveTensorMemory`)",
        "on CPU, `memory_saved_mib` leaves out memory that kernels allocate internally",
    ),
    "allocator_events": TorchInternal(
        ("torch._C._autograd.DeviceType",),
        "tells the CPU allocator's events from other devices' among the legacy profiler's memory events "
        "(`kineto_results.events()`), for the exact CPU peak of a replay",
        "CPU memory savings are measured from the tensors that ops return (`LiveTensorMemory`)",
        "on CPU, `memory_saved_mib` leaves out memory that kernels allocate internally",
    ),
    "dispatch_mode": TorchInternal(
        ("torch.utils._python_dispatch.TorchDispatchMode",),
        "sees every tensor an op returns: the CPU peak of a replay while a profiler of yours is running",
        "while a profiler of yours runs on CPU, the savings replay is skipped with that reason",
        "while a profiler of yours runs on CPU, memory and time savings are not measured",
    ),
    "pytree": TorchInternal(
        ("torch.utils._pytree.tree_map", "torch.utils._pytree.tree_leaves"),
        "walk the tensors inside a recorded call's arguments, including containers libraries register "
        "(Hugging Face's `ModelOutput`)",
        "lists, tuples (named ones too) and dicts are walked; tensors inside other containers are left as they are",
        "an inference-mode tensor inside a library's own container type is not cloned, and that replay is skipped",
    ),
    "hook_dicts": TorchInternal(
        (
            "torch.nn.modules.module._global_forward_pre_hooks",
            "torch.nn.modules.module._global_forward_hooks",
            "torch.nn.modules.module._global_forward_hooks_always_called",
            "torch.nn.modules.module._global_backward_pre_hooks",
            "torch.nn.modules.module._global_backward_hooks",
            "torch.nn.Module()._forward_pre_hooks",
            "torch.nn.Module()._forward_hooks",
            "torch.nn.Module()._backward_pre_hooks",
            "torch.nn.Module()._backward_hooks",
        ),
        "silence your forward and backward hooks (global and per module) while a replay re-runs module calls: "
        "a feature-capture or statistics hook would see replayed batches as real ones",
        "the savings replay is skipped, with that reason in the report",
        "memory and time savings are not measured",
    ),
    "foreach_norm": TorchInternal(
        ("torch._foreach_norm",),
        "the largest absolute entry of many gradients in one kernel (gradients that stay all zero)",
        "`torch.linalg.vector_norm` per gradient: the same result, one kernel per parameter",
    ),
    "call_impl": TorchInternal(
        ("torch.nn.Module._call_impl",),
        "the frame of a module call on the Python stack: names the module that recorded a graph, and on "
        "a torch whose global forward hooks take no `with_kwargs` (2.4) holds the call's keyword arguments",
        "graph findings name the hook but not the module; on such a torch the savings replay is skipped",
        "graph findings (grad-enabled evaluation, stray graphs) name the hook, not the module",
    ),
    "module_dicts": TorchInternal(
        ("torch.nn.Module()._parameters", "torch.nn.Module()._modules"),
        "a module's own parameters and children read without a generator per module (the one-pass "
        "indexes of a model with tens of thousands of modules)",
        "`named_parameters(recurse=False)` and `children()`: the same result, slower on very large models",
    ),
    "function_mode_stack": TorchInternal(
        (
            "torch._C._len_torch_function_stack",
            "torch._C._get_function_stack_at",
            "torch._C._pop_torch_function_stack",
            "torch._C._push_on_torch_function_stack",
        ),
        "the stack of torch-function modes: a mode of ours sees the functional code a step runs (the savings "
        "recorder's between module calls; the gradient probe's, on a training step that lost gradients, where "
        "parameters were used and where the graph was cut), steps aside in compiled code and leaves the stack "
        "as it found it",
        "the savings replay runs module calls only, without the functional code between them; a parameter "
        "without a gradient is explained by its module alone",
        "graph and memory savings leave out what a step computes outside module calls (`torch.cat`, "
        "`F.max_pool2d`, the loss), and parameters that a `no_grad` region cut off upstream are named in a "
        "finding of their own, without their cause",
    ),
    "orig_mod": TorchInternal(
        ("torch._dynamo.eval_frame.OptimizedModule()._orig_mod",),
        "the eager module behind a `torch.compile` wrapper: replays run it, never the compiled code, and "
        "module names leave the wrapper's `_orig_mod` segment out",
        "a compiled module whose eager module cannot be found is not replayed (the replay is skipped)",
        "memory and time savings of compiled modules are not measured",
    ),
}
"""Every private PyTorch API in use; the key is what the rest of the package asks ``available`` about.
(``Class()._name`` is an attribute of each instance, looked up on a fresh ``nn.Module``; ``orig_mod`` is
read where a compiled module is met, since importing ``torch._dynamo`` up front costs seconds.)"""

_LOOKED_UP_AT_USE = frozenset({"orig_mod"})


def _lookup(dotted: str) -> Any:
    """The object at ``dotted`` (``module.attr``, ``Class()._attr`` on a fresh instance); raises
    ``AttributeError`` or ``ImportError`` when it is not there."""
    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for part in parts[split:]:
            if part.endswith("()"):
                obj = getattr(obj, part[:-2])
                if obj is not nn.Module:
                    raise TypeError(f"{dotted}: only nn.Module instances are looked up")
                obj = vars(nn.Module())
                continue
            obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
        return obj
    raise ImportError(dotted)


_missing: dict[str, TorchInternal] = {}


def _no_node_counter() -> int:
    raise MissingTorchInternal(describe("node_counter"))


node_counter: Callable[[], int] = _no_node_counter
"""Autograd's node counter: every graph node this thread creates takes its next number (where
``available("node_counter")``; it raises otherwise)."""
CALL_IMPL_CODE: CodeType | None = None
"""The code of ``nn.Module._call_impl``, the frame of every module call (``None`` without it)."""
FORWARD_HOOKS_TAKE_KWARGS = False
"""Whether global forward hooks can receive a call's keyword arguments (``with_kwargs``, after torch 2.4)."""
LiveTensorMemoryBase: type = object
"""``TorchDispatchMode``, the base ``lightning_nograd.core.savings.epoch_measures.LiveTensorMemory`` needs."""

_push_saved: Callable[..., None] | None = None
_pop_saved: Callable[[], None] | None = None
_profiler_enabled: Callable[[], bool] | None = None
_cpu_device_type: Any = None
_tree_map: Callable[..., Any] | None = None
_tree_leaves: Callable[[Any], list[Any]] | None = None
_foreach_norm: Callable[..., list[torch.Tensor]] | None = None
_module_dicts = False
_hook_dicts = False
_mode_stack: list[Callable[..., Any]] | None = None


def resolve() -> None:
    """Look every internal up again (at import, and in tests that take one away)."""
    global node_counter, CALL_IMPL_CODE, FORWARD_HOOKS_TAKE_KWARGS, LiveTensorMemoryBase
    global _push_saved, _pop_saved, _profiler_enabled, _cpu_device_type, _tree_map, _tree_leaves
    global _foreach_norm, _module_dicts, _hook_dicts, _mode_stack
    found: dict[str, list[Any]] = {}
    _missing.clear()
    for key, internal in INTERNALS.items():
        if key in _LOOKED_UP_AT_USE:
            continue
        try:
            found[key] = [_lookup(name) for name in internal.names]
        except (AttributeError, ImportError, KeyError, TypeError):
            _missing[key] = internal

    def first(key: str) -> Any:
        return found[key][0] if key in found else None

    node_counter = first("node_counter") or _no_node_counter
    _push_saved, _pop_saved = found.get("saved_tensors_stack", (None, None))
    _profiler_enabled = first("profiler_enabled")
    _cpu_device_type = getattr(first("allocator_events"), "CPU", None)
    dispatch = first("dispatch_mode")
    LiveTensorMemoryBase = dispatch if isinstance(dispatch, type) else object
    _tree_map, _tree_leaves = found.get("pytree", (None, None))
    _foreach_norm = first("foreach_norm")
    call_impl = first("call_impl")
    CALL_IMPL_CODE = getattr(call_impl, "__code__", None)
    _module_dicts = "module_dicts" in found
    _hook_dicts = "hook_dicts" in found
    _mode_stack = found.get("function_mode_stack")
    FORWARD_HOOKS_TAKE_KWARGS = (
        "with_kwargs" in inspect.signature(nn.modules.module.register_module_forward_hook).parameters
    )


def available(key: str) -> bool:
    """Whether the internal ``key`` of ``INTERNALS`` was found."""
    return key not in _missing


def missing() -> dict[str, TorchInternal]:
    """The internals this torch lacks, by key."""
    return dict(_missing)


def describe(key: str) -> str:
    """One sentence on what happens without internal ``key``: its name, what it is for, what we do instead."""
    internal = INTERNALS[key]
    names = ", ".join(f"`{name}`" for name in internal.names)
    return (
        f"torch {torch.__version__} lacks {names} (used for: {internal.purpose}); instead, {internal.without}. "
        "Every other check works."
    )


_warned: set[str] = set()


def warn_missing() -> None:
    """Say once per process, for each internal this torch lacks, what that costs: a ``NoGradWarning``
    (pointing at the user's line) where a finding or figure is lost, a log line where a public API does
    the same. The callbacks call this when they are built, ``audit()`` and ``check_training_step()`` as
    they start."""
    for key, internal in _missing.items():
        if key in _warned:
            continue
        _warned.add(key)
        if internal.lost is None:
            log.info("[lightning-nograd] %s", describe(key))
        else:
            warnings.warn(
                f"[lightning-nograd] {describe(key)} What you lose: {internal.lost}.",
                NoGradWarning,
                stacklevel=user_stacklevel(),
            )


def replay_refusal(device: torch.device | None = None) -> str | None:
    """Why a savings replay cannot run on this torch (``None``: it can)."""
    if not _hook_dicts:
        return "replay skipped: " + describe("hook_dicts")
    if not FORWARD_HOOKS_TAKE_KWARGS and CALL_IMPL_CODE is None:
        return "replay skipped: " + describe("call_impl")
    if device is not None and device.type == "cpu" and LiveTensorMemoryBase is object and profiler_running():
        return "replay skipped: " + describe("dispatch_mode")
    return None


class FunctionWatch(TorchFunctionMode):
    """A torch-function mode that runs each function as called, then hands it with its result to ``see`` (never
    while dynamo traces code under it: compiled code takes the plain path, and nothing is seen there).

    Examples:
        >>> seen = []
        >>> with FunctionWatch(lambda func, args, kwargs, out: seen.append(func.__name__)):
        ...     _ = torch.ones(2) + 1
        >>> seen
        ['ones', 'add']
    """

    def __init__(self, see: Callable[[Any, tuple[Any, ...], dict[str, Any], Any], None]) -> None:
        super().__init__()
        self.see = see

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not torch.compiler.is_compiling():
            self.see(func, args, kwargs, out)
        return out


def function_modes_available() -> bool:
    """Whether a torch-function mode can be taken off and put back on the stack (``function_mode_stack``)."""
    return _mode_stack is not None


def function_mode_on_top(mode: Any) -> bool:
    """Whether ``mode`` is the innermost torch-function mode, so it can step aside and come back."""
    if _mode_stack is None:
        return False
    length, at = _mode_stack[0], _mode_stack[1]
    size = int(length())
    return size > 0 and at(size - 1) is mode


def push_function_mode(mode: Any) -> None:
    """Put ``mode`` on top of the torch-function mode stack."""
    if _mode_stack is None:
        raise MissingTorchInternal(describe("function_mode_stack"))
    _mode_stack[3](mode)


def remove_function_mode(mode: Any) -> bool:
    """Take ``mode`` off the torch-function mode stack wherever it is, the modes above it put back in their
    order (a user's ``with torch.device(...)`` entered after it stays); ``False`` when it is not there."""
    if _mode_stack is None:
        return False
    length, at, pop, push = _mode_stack
    depth = next((i for i in range(int(length()) - 1, -1, -1) if at(i) is mode), None)
    if depth is None:
        return False
    above = [pop() for _ in range(int(length()) - 1 - depth)]
    pop()
    for other in reversed(above):
        push(other)
    return True


class SavedTensorsHooks:
    """Push and pop one pair of saved-tensor hooks, through torch's own stack when it is there."""

    def __init__(self, pack: Callable[[torch.Tensor], Any], unpack: Callable[[Any], torch.Tensor]) -> None:
        self.pack = pack
        self.unpack = unpack
        self._pop: Callable[[], Any] | None = None  # undoes the push the way it was done

    def push(self) -> None:
        if _push_saved is not None and _pop_saved is not None:
            _push_saved(self.pack, self.unpack)
            self._pop = _pop_saved
        else:
            context = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
            context.__enter__()
            self._pop = lambda: context.__exit__(None, None, None)

    def pop(self) -> None:
        pop, self._pop = self._pop, None
        if pop is not None:
            pop()


def profiler_running() -> bool:
    """Whether a profiler is running; ``True`` when this torch cannot tell (assume the worst)."""
    return True if _profiler_enabled is None else bool(_profiler_enabled())


def allocator_events_usable() -> bool:
    """Whether the CPU peak can come from our own profiler's allocator events now."""
    return _cpu_device_type is not None and not profiler_running()


def cpu_memory_events(profiler: Any) -> list[Any]:
    """The CPU allocator's ``[memory]`` events of a finished legacy profiler, each with ``nbytes()`` and
    ``start_ns()``."""
    cpu = _cpu_device_type
    if cpu is None:
        raise MissingTorchInternal(describe("allocator_events"))
    return [e for e in profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == cpu]


def tree_leaves(value: Any) -> list[Any]:
    """The leaves of ``value`` (torch's pytree where present)."""
    if _tree_leaves is not None:
        return _tree_leaves(value)
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in tree_leaves(item)]
    return [value]


def tree_map(fn: Callable[[Any], Any], value: Any) -> Any:
    """``value`` with ``fn`` applied to each leaf (torch's pytree where present)."""
    if _tree_map is not None:
        return _tree_map(fn, value)
    if isinstance(value, dict):
        return type(value)((k, tree_map(fn, v)) for k, v in value.items())
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(tree_map(fn, v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(tree_map(fn, v) for v in value)
    return fn(value)


def max_abs(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The largest absolute entry of each tensor (one kernel for all where torch has ``_foreach_norm``)."""
    if _foreach_norm is not None:
        return _foreach_norm(tensors, float("inf"))
    return [torch.linalg.vector_norm(t, float("inf")) for t in tensors]


def own_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``module``'s own parameters (not its children's), by name."""
    if _module_dicts:
        return ((name, p) for name, p in module._parameters.items() if p is not None)
    return module.named_parameters(recurse=False)


def has_children(module: nn.Module) -> bool:
    """Whether ``module`` holds a submodule."""
    if _module_dicts:
        return bool(module._modules)
    return next(module.children(), None) is not None


def child_modules(module: nn.Module) -> list[nn.Module]:
    """``module``'s direct children."""
    if _module_dicts:
        return [child for child in module._modules.values() if child is not None]
    return list(module.children())


# the kinds of hook dict, global (`_global_<kind>`) and per module (`_<kind>`); a name a torch lacks is skipped
_HOOK_KINDS = (
    "forward_pre_hooks forward_pre_hooks_with_kwargs forward_hooks forward_hooks_with_kwargs "
    "forward_hooks_always_called backward_pre_hooks backward_hooks"
).split()


class UserHooksOff:
    """No forward or backward hook of the user's (global or per module) fires while active, except
    the per-module forward (pre-)hooks that ``keep`` accepts (those PyTorch runs the module with).

    The hook dictionaries are swapped for filtered copies and the very same objects put back on exit,
    so every handle the user holds stays valid.
    """

    def __init__(self, modules: Iterable[nn.Module], keep: Callable[[Any], bool]) -> None:
        if not _hook_dicts:
            raise MissingTorchInternal(describe("hook_dicts"))
        self.modules = list(modules)
        self.keep = keep
        self._globals: dict[str, Any] = {}
        self._own: list[tuple[nn.Module, dict[str, Any]]] = []

    def __enter__(self) -> None:
        module_globals = nn.modules.module
        names = [f"_global_{kind}" for kind in _HOOK_KINDS]
        self._globals = {name: vars(module_globals)[name] for name in names if name in vars(module_globals)}
        for name, hooks in self._globals.items():
            setattr(module_globals, name, type(hooks)())
        for module in self.modules:
            state = vars(module)
            own = {name: state[name] for name in (f"_{kind}" for kind in _HOOK_KINDS) if name in state}
            if not any(own.values()):
                continue
            self._own.append((module, own))
            both = [*own.get("_forward_pre_hooks", {}).items(), *own.get("_forward_hooks", {}).items()]
            kept = {key for key, hook in both if self.keep(hook)}
            for name, hooks in own.items():
                state[name] = type(hooks)((key, value) for key, value in hooks.items() if key in kept)

    def __exit__(self, *exc: object) -> None:
        for name, hooks in self._globals.items():
            setattr(nn.modules.module, name, hooks)
        for module, own in self._own:
            vars(module).update(own)
        self._globals, self._own = {}, []


def register_forward_hook_with_kwargs(
    hook: Callable[[nn.Module, Any, dict[str, Any] | None, Any], None],
    isolate: Callable[[Callable[..., None]], Callable[..., Any]],
) -> RemovableHandle:
    """A global, always-called forward hook that receives ``(module, args, kwargs, output)``.

    ``isolate`` wraps the function torch calls, so that reading the keyword arguments is isolated like
    ``hook`` itself. Where global hooks take no ``with_kwargs`` (torch 2.4) the keyword arguments are
    read from the ``_call_impl`` frame that calls the hook; ``kwargs`` is ``None`` where they cannot be
    read: while dynamo traces the call (frames are not there to read), or on a torch without that
    frame (then ``replay_refusal`` refuses replays).
    """
    if FORWARD_HOOKS_TAKE_KWARGS:
        return nn.modules.module.register_module_forward_hook(isolate(hook), with_kwargs=True, always_call=True)

    def positional(module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            hook(module, args, None, output)
            return
        code = CALL_IMPL_CODE
        frame = stack.frame_running(code, stack.caller()) if code is not None else None
        kwargs = frame.f_locals.get("kwargs") if frame is not None else None
        hook(module, args, kwargs if isinstance(kwargs, dict) else None, output)

    return nn.modules.module.register_module_forward_hook(isolate(positional), always_call=True)


class ModuleTrainPatch:
    """The one patch of a public torch method: ``nn.Module.train`` (which ``eval()`` calls) replaced by a wrapper
    while some check counts mode switches (``lightning_nograd.core.plumbing.counters.ModeSwitches``), and put back
    when the last one stops.

    ``forward_to`` is the method the wrapper calls: torch's own, or the wrapper another library installed
    before ours (it is kept, and is what comes back).

    Examples:
        >>> def wrapper(self, mode=True):
        ...     return ModuleTrainPatch.forward_to(self, mode)
        >>> ModuleTrainPatch.install(wrapper); nn.Module.train is wrapper
        True
        >>> ModuleTrainPatch.remove(wrapper); nn.Module.train is ModuleTrainPatch.forward_to
        True
    """

    forward_to: Any = nn.Module.train

    @staticmethod
    def install(wrapper: Callable[..., nn.Module]) -> None:
        """Put ``wrapper`` in place (once; another library's wrapper installed since is forwarded to)."""
        if nn.Module.train is not wrapper:
            if nn.Module.train is not ModuleTrainPatch.forward_to:
                ModuleTrainPatch.forward_to = nn.Module.train
            nn.Module.train = wrapper  # type: ignore[method-assign,assignment]

    @staticmethod
    def remove(wrapper: Callable[..., nn.Module]) -> None:
        """Put back what ``wrapper`` forwards to, if ``wrapper`` is still the one in place."""
        if nn.Module.train is wrapper:
            nn.Module.train = ModuleTrainPatch.forward_to  # type: ignore[method-assign]

    @staticmethod
    def installed(wrapper: Callable[..., nn.Module]) -> bool:
        return nn.Module.train is wrapper


COMPILE_WRAPPER_SEGMENT = "_orig_mod"
"""The name under which a ``torch.compile`` wrapper holds its eager module (``OptimizedModule._orig_mod``):
a segment of ``named_modules()`` paths that the user never wrote."""
WRAPPER_SEGMENTS = frozenset({COMPILE_WRAPPER_SEGMENT, "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
"""Every such segment: also FSDP1's wrapper (``FullyShardedDataParallel``) and activation checkpointing's."""


def is_compile_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is the wrapper ``torch.compile`` returns for a module (``OptimizedModule``)."""
    return type(module).__name__ == "OptimizedModule"


def eager_module(module: nn.Module) -> nn.Module:
    """The eager module behind a ``torch.compile`` wrapper, or ``module`` itself.

    Replays run the eager module: running the user's compiled code again in another grad mode makes
    dynamo recompile it, and (measured with inductor on CPU) changed the run's final weights.

    Raises:
        MissingTorchInternal: a compile wrapper without its ``_orig_mod``.

    Examples:
        >>> net = nn.Linear(2, 2)
        >>> eager_module(net) is net
        True
    """
    if not is_compile_wrapper(module):
        return module
    try:
        inner = module._orig_mod
    except (AttributeError, KeyError):  # OptimizedModule's __getattr__ reads it from `_modules`
        inner = None
    if not isinstance(inner, nn.Module):
        _missing["orig_mod"] = INTERNALS["orig_mod"]
        raise MissingTorchInternal(describe("orig_mod"))
    return inner


resolve()
