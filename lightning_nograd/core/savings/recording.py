"""Records what one evaluation step runs, for the savings replay: a tape of its module calls and of the
functional code between them.

``StepRecorder`` keeps, while active, each outermost call of a module that does the model's work
(modules with parameters, the model itself included; not metrics) and each torch function that runs
outside such calls: the glue a ``forward`` or a step writes with ``torch.cat``, ``F.max_pool2d``,
``F.interpolate``, a loss. It keeps only what autograd would have recorded: an entry that computes on a
trainable parameter or on a tensor an earlier entry produced. A tensor one entry produced and another
used is linked (``Slot``), so the replay runs the step's own dataflow: a tensor shared by two calls is
one tensor with gradients on, as in the real step, not two copies.

Module calls are kept whole (their ``forward`` decides its own path with gradients on, as fused
attention does); inside them nothing else is recorded, and the recorder's torch-function mode steps
off the stack, so compiled submodules see the stack they were compiled with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakTensorKeyDictionary

from lightning_nograd.core.plumbing import torch_internals
from lightning_nograd.core.plumbing.faults import Probe, isolated
from lightning_nograd.core.plumbing.torch_internals import (
    FunctionWatch,
    eager_module,
    register_forward_hook_with_kwargs,
    tree_leaves,
    tree_map,
)


@dataclass(frozen=True)
class Slot:
    """A tensor that an earlier entry of the tape produced: the replay passes the one its own run produced."""

    index: int


@dataclass
class TapeEntry:
    """One recorded module call or torch function, its arguments (``Slot``s where an earlier entry made them)
    and what of its output later entries use.

    Attributes:
        fn: the eager module, or the torch function.
        outputs: (position among the output's leaves, slot) of each tensor a later entry uses.
        frees: the slots no entry after this one uses (the replay drops them, as the step did).
        compiled: the call went through a ``torch.compile`` wrapper; ``fn`` is the eager module behind it.
    """

    fn: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    inference_mode: bool
    autocast: tuple[str, torch.dtype] | None
    outputs: tuple[tuple[int, int], ...] = ()
    frees: tuple[int, ...] = ()
    compiled: bool = False
    linked: bool = False

    @property
    def module(self) -> nn.Module | None:
        return self.fn if isinstance(self.fn, nn.Module) else None

    def bind(self, env: list[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments with each ``Slot`` replaced by what the replay's own run put there."""
        if not self.linked:
            return self.args, self.kwargs

        def fill(value: Any) -> Any:
            return env[value.index] if isinstance(value, Slot) else value

        return tree_map(fill, self.args), tree_map(fill, self.kwargs)


@dataclass
class Tape:
    """What one evaluation step ran that autograd would have recorded, in order.

    Attributes:
        entries: the recorded module calls and torch functions.
        slots: how many linked tensors the entries pass on.
        signature: what a measurement of this tape depends on (``tape_signature``).
    """

    entries: list[TapeEntry]
    slots: int
    signature: tuple[Any, ...] = ()
    segments: list[tuple[tuple[str, torch.dtype] | None, bool, list[TapeEntry]]] = field(default_factory=list)

    @classmethod
    def of_call(cls, module: nn.Module, *args: Any, **kwargs: Any) -> Tape:
        """A tape of one call of ``module`` (no_grad, no autocast), as a benchmark replays it.

        Examples:
            >>> tape = Tape.of_call(nn.Linear(2, 1), torch.ones(3, 2))
            >>> [type(e.fn).__name__ for e in tape.entries]
            ['Linear']
        """
        return _finish([TapeEntry(module, args, kwargs, False, None)], 0)

    @property
    def modules(self) -> list[nn.Module]:
        """The modules whose calls the tape replays, each once."""
        return list({id(e.fn): e.fn for e in self.entries if isinstance(e.fn, nn.Module)}.values())

    @property
    def compiled(self) -> bool:
        return any(e.compiled for e in self.entries)


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


def metric_types() -> tuple[type, ...]:
    """Module types whose calls are state, not model work: torchmetrics' ``Metric`` (its updates accumulate)."""
    try:
        from torchmetrics import Metric
    except ImportError:  # a dependency of the package, but the core must not need it
        return ()
    return (Metric,)


def recorded_modules(model: nn.Module, root_whole: bool = True) -> tuple[set[int], set[int]]:
    """The modules of ``model`` (by ``id``) a ``StepRecorder`` records whole and those it neither records nor
    looks into (metrics).

    Recorded whole: the modules that do its work, ``model`` itself unless not ``root_whole``, except those
    holding a ``torch.compile``d submodule: replaying such a module whole would run the compiled code again
    with gradients on (a recompile, which can change the run), so its own code is recorded function by
    function and the compiled submodule as a whole call, which the replay runs eagerly.
    """
    excluded = metric_types()
    named = dict(model.named_modules(remove_duplicate=False))
    holds_compiled: set[int] = set()
    for path, module in named.items():
        if path and torch_internals.is_compile_wrapper(module):
            parts = path.split(".")
            holds_compiled.update(id(named[".".join(parts[:i])]) for i in range(len(parts)))
    whole = {
        id(m)
        for m in named.values()
        if is_work_module(m, excluded) and (root_whole or m is not model) and id(m) not in holds_compiled
    }
    return whole, {id(m) for m in named.values() if excluded and isinstance(m, excluded)}


def call_hooks(
    probe: Probe,
    pre: Callable[[nn.Module, Any], None],
    post: Callable[[nn.Module, Any, dict[str, Any] | None, Any], None],
) -> list[RemovableHandle]:
    """Global hooks around every module call, isolated as ``probe``'s: ``pre(module, args)`` and
    ``post(module, args, kwargs, output)``, the latter also when the forward raises (``output`` None).
    ``kwargs`` is ``None`` where they are not known: the forward raised, or they cannot be read
    (see ``lightning_nograd.core.plumbing.torch_internals.register_forward_hook_with_kwargs``).

    Global hooks, unlike per-module ones, leave fused kernels (``nn.TransformerEncoderLayer``) on.
    """

    def after(module: nn.Module, args: Any, kwargs: Any = None, output: Any = None) -> None:
        # when a forward raises, PyTorch calls always-called global hooks as (module, args, None)
        post(module, args, kwargs if isinstance(kwargs, dict) else None, output)

    return [
        nn.modules.module.register_module_forward_pre_hook(isolated(pre, probe)),
        register_forward_hook_with_kwargs(after, lambda hook: isolated(hook, probe)),
    ]


def function_name(fn: Any) -> str:
    """A torch function's name as a reader knows it: ``"cat"``, ``"max_pool2d"``, ``"T"`` for ``Tensor.T``.

    Examples:
        >>> function_name(torch.cat), function_name(torch.Tensor.add_), function_name(torch.Tensor.T.__get__)
        ('cat', 'add_', 'T')
    """
    name = str(getattr(fn, "__name__", "") or "")
    if name == "__get__":  # a property of Tensor (`x.T`, `x.data`): the descriptor's name
        return str(getattr(getattr(fn, "__self__", None), "__name__", name))
    return name or type(fn).__name__


# outputs that carry no graph whatever the grad mode: what they produce is data, not a derived tensor
_GRAPH_CUTS = frozenset({"detach", "detach_", "data", "requires_grad_", "grad", "_set_grad_enabled"})
_DUNDER_IN_PLACE = frozenset(
    f"__i{op}__" for op in "add sub mul truediv floordiv mod pow and or xor lshift rshift matmul".split()
) | {"__setitem__"}
# functional normalisation that, asked to train, updates the running statistics it is given
_UPDATES_STATISTICS = frozenset({"batch_norm", "instance_norm"})


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), str(value.dtype), str(value.device), value.requires_grad)
    if isinstance(value, Slot):
        return ("slot", value.index)
    if isinstance(value, (list, tuple)):
        return tuple(_describe(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _describe(v)) for k, v in value.items()))
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return type(value).__name__


def tape_signature(entries: list[TapeEntry]) -> tuple[Any, ...]:
    """What a measurement depends on: which modules and functions ran on what shapes and dtypes, in which
    grad mode and autocast, and which of the modules' parameters are trainable (fine-tuning that unfreezes
    a layer changes the graph). A module is keyed by ``id``, a function by its name."""

    def parameters(module: nn.Module) -> tuple[Any, ...]:
        return tuple((p.requires_grad, str(p.dtype)) for p in module.parameters())

    return tuple(
        (
            id(e.fn) if isinstance(e.fn, nn.Module) else function_name(e.fn),
            _describe(e.args),
            _describe(e.kwargs),
            e.inference_mode,
            e.autocast,
            parameters(e.fn) if isinstance(e.fn, nn.Module) else (),
        )
        for e in entries
    )


def _forward_patched(module: nn.Module) -> bool:
    """Whether ``module.forward`` is, for now, something other than its class's ``forward``: Lightning's forward
    redirection patches it on the instance to run a ``*_step`` (and puts back the bound method after)."""
    patched = vars(module).get("forward")
    return patched is not None and getattr(patched, "__func__", None) is not type(module).forward


class StepRecorder(Probe):
    """Records a ``Tape`` of what runs between ``start()`` and ``stop()``.

    Args:
        whole: the modules (by ``id``) whose outermost calls are recorded as one entry each.
        opaque: modules (by ``id``) never looked into and never replayed (metrics: their updates are state).
        root: the model; a call of it whose ``forward`` was patched on the instance (Lightning's forward
            redirection, which runs a ``*_step`` through a strategy wrapper's ``forward``) is looked into
            instead of recorded whole.
        functions: record the torch functions between module calls too (off under sharded strategies,
            whose parameters outside module calls are shards).

    Examples:
        >>> import torch.nn.functional as F
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
        >>> head = nn.Linear(3, 1)
        >>> recorder = StepRecorder({id(net), id(net[0]), id(head)})
        >>> recorder.start()
        >>> with torch.no_grad():
        ...     loss = F.mse_loss(head(torch.cat([net(torch.ones(4, 2))], 1)), torch.zeros(4, 1))
        >>> tape = recorder.stop()
        >>> [function_name(e.fn) if e.module is None else type(e.fn).__name__ for e in tape.entries]
        ['Sequential', 'cat', 'Linear', 'mse_loss']
    """

    def __init__(
        self,
        whole: set[int],
        opaque: set[int] = frozenset(),  # type: ignore[assignment]
        root: nn.Module | None = None,
        functions: bool = True,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.on_error = on_error
        self.whole = whole
        self.opaque = opaque
        self.root = root
        self.functions = functions
        self.recording = False
        self._active: int | None = None  # the module whose outermost call is running
        self._active_depth = 0
        self._aside: FunctionWatch | None = None  # the mode, off the stack while a whole call runs
        self._handles: list[RemovableHandle] = []
        self._mode: FunctionWatch | None = None
        self._entries: list[TapeEntry] = []
        self._slots = 0
        self._produced: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        self._trainable: dict[int, bool] = {}
        self._record_function = isolated(self._record_function_unsafe, self)

    def start(self, record: bool = True) -> None:
        """Install the hooks, and begin recording (unless ``record`` is false: ``begin`` does it later)."""
        if not self._handles:
            self._handles = call_hooks(self, self._pre, self._post)
        if record:
            self.begin()

    def begin(self) -> None:
        """Begin a new tape (what a previous one recorded and nobody took is dropped)."""
        if self.recording or self.failed:
            return
        self._entries, self._slots = [], 0
        self._produced = WeakTensorKeyDictionary()
        self._trainable = {}
        if self.functions and torch_internals.function_modes_available():
            self._mode = FunctionWatch(self._see_function)
            torch_internals.push_function_mode(self._mode)
        self.recording = True

    def end(self) -> Tape | None:
        """End the tape: what ran since ``begin`` (``None`` if nothing autograd would record ran, or it failed)."""
        self.recording = False
        mode, self._mode = self._mode, None
        if mode is not None:
            torch_internals.remove_function_mode(mode)
        entries, self._entries = self._entries, []
        self._produced = WeakTensorKeyDictionary()
        if self.failed or not entries:
            return None
        return _finish(entries, self._slots)

    def stop(self) -> Tape | None:
        """End the tape and remove the hooks."""
        tape = self.end()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._active, self._active_depth = None, 0
        return tape

    def _opens_whole_call(self, module: nn.Module) -> bool:
        key = id(module)
        if key in self.opaque:
            return True
        if key not in self.whole:
            return False
        return not (module is self.root and _forward_patched(module))

    def _pre(self, module: nn.Module, args: Any) -> None:
        if self._active is not None:
            if self._active == id(module):
                self._active_depth += 1
            return
        if not self.recording or not self._opens_whole_call(module):
            return
        self._active, self._active_depth = id(module), 1
        mode = self._mode
        if mode is not None and torch_internals.function_mode_on_top(mode):
            # off the stack inside the call: no cost per op, and compiled code sees its usual stack
            torch_internals.remove_function_mode(mode)
            self._mode, self._aside = None, mode

    def _post(self, module: nn.Module, args: Any, kwargs: dict[str, Any] | None, output: Any) -> None:
        if self._active != id(module):
            return
        self._active_depth -= 1
        if self._active_depth > 0:
            return
        self._active = None
        aside, self._aside = self._aside, None
        if aside is not None and self.recording:
            self._mode = aside
            torch_internals.push_function_mode(aside)
        # a call whose keyword arguments are not known cannot be replayed; a raised forward has no output
        if kwargs is None or output is None or id(module) in self.opaque:
            return
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if not (self._trains(module) or any(self._derived(t) for t in inputs)):
            return  # a frozen module on data: no graph with gradients on either
        eager = eager_module(module)
        self._append(eager, args, kwargs, output, inputs, compiled=eager is not module)

    def _trains(self, module: nn.Module) -> bool:
        known = self._trainable.get(id(module))
        if known is None:
            known = self._trainable[id(module)] = any(p.requires_grad for p in module.parameters())
        return known

    def _derived(self, tensor: torch.Tensor) -> bool:
        return tensor.requires_grad or tensor in self._produced

    def _see_function(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """A torch function the step ran outside whole module calls (inside one, the mode is off the stack)."""
        if self.recording and self._active is None:
            self._record_function(func, args, kwargs, out)

    def _record_function_unsafe(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        name = function_name(func)
        if name in _GRAPH_CUTS:
            return
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if not any(self._derived(t) for t in inputs):
            return  # data only (a mask, a noise sample): the replay takes what it made as it is
        if name in _UPDATES_STATISTICS:
            training = kwargs.get("training", kwargs.get("use_input_stats", args[5] if len(args) > 5 else False))
            if training:
                return  # replaying it would update the running statistics it was given a second time
        target = kwargs.get("out")
        if target is None:
            outputs = {id(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
            target = next((t for t in inputs if id(t) in outputs), None)
            if target is None and name in _DUNDER_IN_PLACE and args and isinstance(args[0], torch.Tensor):
                target = args[0]
        if isinstance(target, torch.Tensor) and target not in self._produced:
            return  # it writes into a tensor of the user's (a buffer, the batch): never replayed
        self._append(func, args, kwargs, out, inputs, in_place=target is not None)

    def _append(
        self,
        fn: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        out: Any,
        inputs: list[torch.Tensor],
        compiled: bool = False,
        in_place: bool = False,
    ) -> None:
        produced = self._produced
        linked = any(t in produced for t in inputs)

        def link(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value in produced:
                return Slot(produced[value])
            return value

        known = {id(t) for t in inputs}
        outputs = []
        for position, leaf in enumerate(tree_leaves(out)):
            if (
                isinstance(leaf, torch.Tensor)
                and (leaf.is_floating_point() or leaf.is_complex())
                and id(leaf) not in known
                and leaf not in produced
            ):
                produced[leaf] = self._slots
                outputs.append((position, self._slots))
                self._slots += 1
        if not outputs and not in_place and not isinstance(fn, nn.Module):
            return  # nothing a later entry could use, nothing saved: `x.float()` of a float tensor
        self._entries.append(
            TapeEntry(
                fn,
                tree_map(link, tuple(args)) if linked else tuple(args),
                tree_map(link, dict(kwargs)) if linked else dict(kwargs),
                torch.is_inference_mode_enabled(),
                current_autocast(),
                tuple(outputs),
                compiled=compiled,
                linked=linked,
            )
        )


def _finish(entries: list[TapeEntry], slots: int) -> Tape:
    """The tape with each slot kept only as long as an entry uses it, and grouped for the replay."""
    last_use: dict[int, int] = {}
    for index, entry in enumerate(entries):
        if entry.linked:
            for leaf in tree_leaves((entry.args, entry.kwargs)):
                if isinstance(leaf, Slot):
                    last_use[leaf.index] = index
    frees: dict[int, list[int]] = {}
    for slot, index in last_use.items():
        frees.setdefault(index, []).append(slot)
    for index, entry in enumerate(entries):
        entry.outputs = tuple((position, slot) for position, slot in entry.outputs if slot in last_use)
        entry.frees = tuple(frees.get(index, ()))
    return Tape(entries, slots, tape_signature(entries), _segments(entries))


def _segments(entries: list[TapeEntry]) -> list[tuple[tuple[str, torch.dtype] | None, bool, list[TapeEntry]]]:
    """Runs of consecutive entries with the same autocast and inference mode: the replay enters each once."""
    segments: list[tuple[tuple[str, torch.dtype] | None, bool, list[TapeEntry]]] = []
    for entry in entries:
        if segments and (segments[-1][0], segments[-1][1]) == (entry.autocast, entry.inference_mode):
            segments[-1][2].append(entry)
        else:
            segments.append((entry.autocast, entry.inference_mode, [entry]))
    return segments


def _replayable_value(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_inference():  # an inference tensor cannot enter a graph
        with torch.inference_mode(False):
            value = value.clone()
    if value.requires_grad and not value.is_leaf:  # attached to the step's own graph: the replay makes its own
        value = value.detach().requires_grad_()
    return value


def replayable(tape: Tape) -> Tape:
    """The tape with its inference-mode inputs cloned, so a grad-enabled replay can use them."""
    entries = [
        TapeEntry(
            e.fn,
            tree_map(_replayable_value, e.args),
            tree_map(_replayable_value, e.kwargs),
            e.inference_mode,
            e.autocast,
            e.outputs,
            e.frees,
            e.compiled,
            e.linked,
        )
        for e in tape.entries
    ]
    return Tape(entries, tape.slots, tape.signature, _segments(entries))


@contextlib.contextmanager
def _grad_mode(grad: bool, inference: bool) -> Iterator[None]:
    if grad:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    elif inference:
        with torch.inference_mode():
            yield
    else:
        with torch.no_grad():
            yield


def run_tape(tape: Tape, grad: bool) -> None:
    """Run the tape once, gradients on (``grad``) or as recorded (no_grad, or inference mode), each
    tensor dropped after its last use and everything dropped before returning, graph included."""
    env: list[Any] = [None] * tape.slots
    for autocast, inference, entries in tape.segments:
        precision: contextlib.AbstractContextManager[Any] = (
            torch.autocast(autocast[0], dtype=autocast[1]) if autocast else contextlib.nullcontext()
        )
        with precision, _grad_mode(grad, inference):
            for entry in entries:
                args, kwargs = entry.bind(env)
                out = entry.fn(*args, **kwargs)
                if entry.outputs:
                    leaves = tree_leaves(out)
                    for position, slot in entry.outputs:
                        env[slot] = leaves[position]
                del out, args, kwargs
                for slot in entry.frees:
                    env[slot] = None
