"""Framework-free pieces of the backprop guard: which parameters got no gradient and why.

* ``ParamIndex`` names parameters and groups them under the topmost module that lost them.
* ``GradModeProbe`` records, for one training step, whether given modules ran their forward
  with gradients on; it uses a *global* forward pre-hook (installed only for that step), which
  does not switch off fused kernels the way per-module hooks do.
* ``ZeroGradientStreaks`` counts consecutive steps with an all-zero gradient per parameter,
  without stalling a CUDA device (one asynchronous copy per step, read once it has landed).
* ``inference_tensors`` finds buffers and tensor attributes created under inference mode.
* ``eval_mode_under_trainable`` finds dropout / batch-norm layers left in eval mode inside
  trainable blocks (``from_pretrained`` models arrive that way).
* ``GradientCheck`` finds, step by step, the stepped parameters that got no gradient;
  ``EvalModeLeaks`` the modules an ``.eval()`` left in eval mode during training.
"""

from __future__ import annotations

import itertools
import operator
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_nograd.core.counters import GRADIENT_EVERY, GRADIENT_WINDOW, ModeSwitches, mode_switches, visits
from lightning_nograd.core.faults import Probe, isolated
from lightning_nograd.core.findings import display_name
from lightning_nograd.core.gradient_window import GradientWindow, HeldGap, has_gradient
from lightning_nograd.core.messages import Explanation
from lightning_nograd.core.modes import MODE_SENSITIVE_TYPES, is_grad_recording
from lightning_nograd.core.module_paths import ancestors, mode_modules, named_modules, parent_path
from lightning_nograd.core.torch_internals import child_modules, has_children, max_abs, own_parameters


class ParamIndex:
    """Names of the trainable parameters of a model and the modules that own them.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> index = ParamIndex(net)
        >>> index.group([*net[0].parameters(), *net[2].parameters()])
        {'': ['0.weight', '0.bias', '2.weight', '2.bias']}
        >>> index.group(list(net[2].parameters()))
        {'2': ['2.weight', '2.bias']}
    """

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self._foreign: set[int] = set()  # optimizer parameters no module of the model holds
        self._read(root)

    def _read(self, root: nn.Module) -> None:
        self.params: dict[int, nn.Parameter] = {}
        self.names: dict[int, str] = {}
        self.owner: dict[int, str] = {}
        self.order: dict[int, int] = {}
        self.ancestors: dict[int, list[str]] = {}  # the owner's path and its ancestors, outermost first
        self.modules: dict[str, nn.Module] = {}
        for path, module in named_modules(root):
            self.modules[path] = module  # under torch.compile the wrapper and its _orig_mod share a path
            chain: list[str] | None = None
            for pname, param in own_parameters(module):
                if id(param) in self.names:
                    continue
                if chain is None:
                    chain = ancestors(path)
                key = id(param)
                self.params[key] = param
                self.names[key] = f"{path}.{pname}" if path else pname
                self.owner[key] = path
                self.order[key] = len(self.order)
                self.ancestors[key] = chain

    def stepped(self, optimizer: torch.optim.Optimizer | None, allowed: Callable[[str], bool]) -> list[nn.Parameter]:
        """The parameters whose gradient a step must produce, in the optimizer's order: those of
        ``optimizer`` (``None``: every parameter of the model) owned by a module that is not ``allowed``.
        Whether they require grad is read when they are checked (``without_gradient``)."""
        if optimizer is None:
            candidates: Iterable[nn.Parameter] = self.params.values()
        else:
            candidates = [p for group in optimizer.param_groups for p in group["params"]]
            unknown = {id(p) for p in candidates if id(p) not in self.owner} - self._foreign
            if unknown:
                # the model holds other parameter objects than when it was indexed: FSDP2 swaps the root's
                # sharded parameters for unsharded ones from a forward until the next backward
                self._read(self.root)
                self._foreign |= {key for key in unknown if key not in self.owner}
        owner = self.owner
        return [p for p in candidates if id(p) in owner and not allowed(owner[id(p)])]

    def name(self, param: torch.Tensor) -> str:
        """The ``named_parameters()`` path of ``param`` (or ``"<unnamed>"``)."""
        return self.names.get(id(param), "<unnamed>")

    def group(self, params: Iterable[torch.Tensor]) -> dict[str, list[str]]:
        """Group ``params`` under the topmost module all of whose trainable parameters are among them."""
        chosen = {id(p) for p in params if id(p) in self.owner}
        # per module: how many trainable parameters it holds, and how many of those are chosen;
        # O(parameters x depth), one pass each, where a subset test per parameter and ancestor is quadratic
        trainable: dict[str, int] = {}
        trainable_chosen: dict[str, int] = {}
        for key, param in self.params.items():
            if param.requires_grad:
                for ancestor in self.ancestors[key]:
                    trainable[ancestor] = trainable.get(ancestor, 0) + 1
                    if key in chosen:
                        trainable_chosen[ancestor] = trainable_chosen.get(ancestor, 0) + 1
        groups: dict[str, list[str]] = {}
        for key in sorted(chosen, key=self.order.__getitem__):
            top = self.owner[key]
            for ancestor in self.ancestors[key]:
                if trainable.get(ancestor, 0) and trainable_chosen.get(ancestor, 0) == trainable[ancestor]:
                    top = ancestor
                    break
            groups.setdefault(top, []).append(self.names[key])
        return groups


class GradModeProbe(Probe):
    """Records whether watched modules ran their forward with gradients on, for one step.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> probe = GradModeProbe({id(net[0]): "0"})
        >>> probe.start()
        >>> with torch.no_grad():
        ...     _ = net(torch.ones(1, 2))
        >>> probe.stop()
        >>> probe.ran_without_grad_only()
        ['0']
    """

    def __init__(self, watch: dict[int, str], on_error: Callable[[BaseException], None] | None = None) -> None:
        self.on_error = on_error
        self.watch = watch
        self.with_grad: set[str] = set()
        self.without_grad: set[str] = set()
        self._handle: RemovableHandle | None = None

    def start(self) -> None:
        if self._handle is None:
            self._handle = nn.modules.module.register_module_forward_pre_hook(isolated(self._pre_forward, self))

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        path = self.watch.get(id(module))
        if path is not None:
            (self.with_grad if is_grad_recording() else self.without_grad).add(path)

    def ran_without_grad_only(self) -> list[str]:
        """Watched modules whose every forward in the step ran with gradients off."""
        return sorted(self.without_grad - self.with_grad)

    def ran(self) -> set[str]:
        """Watched modules whose forward ran at all."""
        return self.with_grad | self.without_grad


@dataclass
class _StepCheck:
    """One step's zero flags: per device, the parameters and one flag each, and the copy's event."""

    parts: list[tuple[list[nn.Parameter], torch.Tensor, Any]]

    def ready(self, wait: bool) -> bool:
        for _, _, event in self.parts:
            if event is None:
                continue
            if wait:
                event.synchronize()
            elif not event.query():
                return False
        return True


class ZeroGradientStreaks:
    """Consecutive observed steps in which each parameter's gradient was all zero.

    ``observe`` queues one step's check: per device and dtype, one reduction to the largest
    absolute value of each gradient (exact: a norm underflows to 0 for gradients around 1e-23 in
    float32), and on a CUDA device one asynchronous copy of one flag per parameter to pinned host
    memory. ``collect`` reads the checks whose copy has landed, in step order, so a training
    step never waits for the device; ``wait=True`` (at the end of training) reads them all.

    Args:
        steps: how many consecutive all-zero steps make a gradient count as missing.

    Examples:
        >>> weight, bias = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(1))
        >>> weight.grad, bias.grad = torch.zeros(2), torch.full((1,), 1e-23)
        >>> streaks = ZeroGradientStreaks(steps=2)
        >>> streaks.observe([weight, bias]); streaks.collect()
        []
        >>> streaks.observe([weight, bias]); streaks.collect() == [weight]
        True
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.streak: dict[int, int] = {}
        self.pending: deque[_StepCheck] = deque()  # observed steps not collected yet (true while any)

    def observe(self, params: Sequence[nn.Parameter]) -> None:
        """Queue the check of this step's gradients of ``params`` (those with a dense gradient)."""
        by_device: dict[torch.device, dict[torch.dtype, list[nn.Parameter]]] = {}
        for param in params:
            grad = param.grad
            if grad is not None and grad.layout == torch.strided:
                by_device.setdefault(grad.device, {}).setdefault(grad.dtype, []).append(param)
        parts: list[tuple[list[nn.Parameter], torch.Tensor, Any]] = []
        with torch.no_grad():
            for device, by_dtype in by_device.items():
                ordered = [param for group in by_dtype.values() for param in group]
                flags = torch.cat(
                    [
                        torch.stack(max_abs([p.grad for p in group if p.grad is not None])) == 0
                        for group in by_dtype.values()
                    ]
                )
                parts.append((ordered, *_to_host(flags, device)))
        if parts:
            self.pending.append(_StepCheck(parts))

    def collect(self, wait: bool = False) -> list[nn.Parameter]:
        """Parameters whose streak reached ``steps`` in the checks read now (each once)."""
        reached: dict[int, nn.Parameter] = {}
        while self.pending and self.pending[0].ready(wait):
            for params, flags, _ in self.pending.popleft().parts:
                for param, is_zero in zip(params, flags.tolist(), strict=True):
                    streak = self.streak.get(id(param), 0) + 1 if is_zero else 0
                    self.streak[id(param)] = streak
                    if streak >= self.steps:
                        reached[id(param)] = param
        return list(reached.values())

    def clear(self) -> None:
        """Forget every streak and every pending check."""
        self.streak = {}
        self.pending.clear()


def _to_host(flags: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Any]:
    """``flags`` on the host, and the CUDA event that says when the copy has landed (``None``: now)."""
    if device.type != "cuda":
        return flags.cpu(), None
    host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
    host.copy_(flags, non_blocking=True)
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(torch.cuda.current_stream(device))
    return host, event


_GRAD = operator.attrgetter("grad")


def without_gradient(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters of ``params`` that require grad and reached the step with no gradient.

    A step where every one has a gradient (the usual case) costs one pass in C, no Python loop.

    Examples:
        >>> a, b = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))
        >>> a.grad = torch.ones(1)
        >>> without_gradient([a, b]) == [b]
        True
    """
    if not any(map(operator.is_, map(_GRAD, params), itertools.repeat(None))):
        return []
    return [p for p in params if p.grad is None and p.requires_grad]


def inference_tensors(root: nn.Module, allowed: Callable[[str], bool] | None = None) -> list[tuple[str, str]]:
    """Buffers and tensor attributes created under ``torch.inference_mode``: (path, kind).

    A list, tuple or dict attribute is reported once, with how many inference tensors it holds.
    Those held by an ``allowed`` module path are left out.

    Examples:
        >>> net = nn.Linear(2, 2)
        >>> with torch.inference_mode():
        ...     net.cache = torch.ones(2)
        ...     net.history = [torch.ones(1), torch.ones(1)]
        >>> inference_tensors(net)
        [('cache', 'tensor attribute'), ('history', 'collection attribute (2 tensors)')]
    """
    found: list[tuple[str, str]] = []
    for path, module in named_modules(root):
        if allowed is not None and allowed(path):
            continue
        prefix = f"{path}." if path else ""
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_inference():
                found.append((prefix + name, "buffer"))
        for name, value in vars(module).items():
            if name in ("_parameters", "_buffers", "_modules"):
                continue
            if isinstance(value, torch.Tensor):
                if not isinstance(value, nn.Parameter) and value.is_inference():
                    found.append((prefix + name, "tensor attribute"))
            elif isinstance(value, (list, tuple, dict)):
                items = value.values() if isinstance(value, dict) else value
                count = sum(1 for item in items if isinstance(item, torch.Tensor) and item.is_inference())
                if count:
                    found.append((prefix + name, f"collection attribute ({count} tensors)"))
    return found


def trained_parameter_ids(
    optimizers: Iterable[torch.optim.Optimizer], model: nn.Module | None = None
) -> set[int] | None:
    """``id``s of the parameters some optimizer steps and that require grad; ``None`` without optimizers,
    or where ``model`` holds other parameter objects than its optimizers do (FSDP2 swaps the sharded
    parameters for unsharded ones between a forward and its backward): every parameter that requires
    grad then counts as trained.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> trained = trained_parameter_ids([torch.optim.SGD(net[1].parameters(), lr=0.1)])
        >>> sorted(i for i, p in enumerate(net.parameters()) if id(p) in trained)
        [2, 3]
    """
    optimizers = list(optimizers)
    if not optimizers:
        return None
    stepped = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    if model is not None:
        held = {id(p) for p in model.parameters()}
        if any(id(p) not in held for p in stepped):
            return None
    return {id(p) for p in stepped if p.requires_grad}


def is_trained(param: torch.Tensor, trained: set[int] | None) -> bool:
    """Whether ``param`` learns: it requires grad and (when the optimizers are known) one of them steps it."""
    return param.requires_grad and (trained is None or id(param) in trained)


class Learning:
    """Which modules learn: one pass over a model, then an answer per module in constant time.

    A module *learns* when a parameter anywhere below it learns (``is_trained``); it is *frozen*
    when none does, and a parameter-free one (dropout, an activation) goes with its parent. Each
    module's own parameters are read once, so a model of n modules and p parameters costs
    O(n + p), where asking every module's subtree costs O(n x p) (a deep ``nn.Sequential`` of
    activations, each under the whole stack, is the shape where that shows).

    Args:
        modules: the modules to answer for (their submodules are read too).
        trained: ``id``s of the parameters some optimizer steps (``None``: every one that requires grad).

    Examples:
        >>> block = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> Learning([block], None).frozen(block[1], block)
        False
        >>> Learning([block.requires_grad_(False)], None).frozen(block[1], block)
        True
    """

    def __init__(self, modules: Iterable[nn.Module], trained: set[int] | None) -> None:
        self._trained = trained
        self._learns: dict[int, bool] = {}
        self._has_params: dict[int, bool] = {}
        for module in modules:
            self._visit(module)

    def _visit(self, module: nn.Module) -> None:
        # depth-first with a stack (no recursion limit), each module once however often it is shared; a
        # module that holds one of its ancestors (a cycle) asks torch for its whole subtree instead.
        # `_modules` and `_parameters` are read directly: torch's generators cost more than the work here
        learns, has_params = self._learns, self._has_params
        stack: list[tuple[nn.Module, list[nn.Module] | None]] = [(module, None)]
        entered: set[int] = set()
        while stack:
            current, children = stack.pop()
            key = id(current)
            if key in learns:
                continue
            if children is None:
                entered.add(key)
                children = child_modules(current)
                stack.append((current, children))
                stack.extend((child, None) for child in children if id(child) not in entered)
                continue
            if any(id(c) not in learns for c in children):  # a child is an ancestor: a cycle
                own, children = list(current.parameters()), []
            else:
                own = [p for _, p in own_parameters(current)]
            visits.modules += 1
            visits.params += len(own)
            has_params[key] = bool(own) or any(has_params[id(c)] for c in children)
            learns[key] = any(is_trained(p, self._trained) for p in own) or any(learns[id(c)] for c in children)

    def learns(self, module: nn.Module) -> bool:
        """Whether a parameter below ``module`` learns."""
        if id(module) not in self._learns:
            self._visit(module)
        return self._learns[id(module)]

    def frozen(self, module: nn.Module, parent: nn.Module | None) -> bool:
        """Whether ``module`` is frozen (``parent``: its parent, for a parameter-free module)."""
        learns = self.learns(module)
        if not self._has_params[id(module)] and parent is not None:
            return not self.learns(parent)
        return not learns


def switched_alone(module: nn.Module, parent: nn.Module | None) -> bool:
    """Whether ``module``, in eval mode, was switched there on its own: it holds no submodule and its parent
    is in train mode. An ``.eval()`` on a block (a model from ``from_pretrained``, a forgotten
    ``self.backbone.eval()``) switches the block with everything in it; a layer alone in eval is a choice,
    the usual way to freeze batch-norm statistics while its weights and the rest of the model train.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> switched_alone(net[1].eval(), net)
        True
        >>> switched_alone(net[1], net.eval())  # the whole block is in eval
        False
    """
    return parent is not None and parent.training and not has_children(module)


def eval_blocks(
    root: nn.Module, trained: set[int] | None = None, allowed: Callable[[str], bool] | None = None
) -> dict[str, set[int]]:
    """Blocks in eval mode that hold learning parameters: each topmost module in eval (the root, or one whose
    parent is in train mode; not a layer switched alone, ``switched_alone``), mapped to the ``id``s of
    its parameters that learn (``is_trained``). ``allowed`` paths are left out. The blocks are disjoint,
    so this reads each parameter once.

    Examples:
        >>> net = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Dropout()), nn.Linear(2, 1))
        >>> _ = net[0].eval()
        >>> {path: len(ids) for path, ids in eval_blocks(net).items()}
        {'0': 2}
    """
    modules = dict(named_modules(root))
    found: dict[str, set[int]] = {}
    for path, module in modules.items():
        if module.training:
            continue
        parent = modules.get(parent_path(path)) if path else None
        if (parent is not None and not parent.training) or switched_alone(module, parent):
            continue
        if allowed is not None and allowed(path):
            continue
        ids = {id(p) for p in module.parameters() if is_trained(p, trained)}
        if ids:
            found[path] = ids
    return found


def eval_mode_under_trainable(
    root: nn.Module, trained: set[int] | None = None, allowed: Callable[[str], bool] | None = None
) -> list[tuple[str, list[str]]]:
    """Dropout / batch-norm layers in eval mode whose block has trainable parameters.

    Returns (topmost eval-mode module containing them, the layers), leaving out ``allowed`` paths.
    A frozen backbone in eval mode (parameters that do not require grad, or that no optimizer in
    ``trained`` steps) has no trainable parameters around its layers and is not returned, nor is a
    layer switched to eval on its own (``switched_alone``: frozen batch-norm statistics).

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).eval()
        >>> eval_mode_under_trainable(net)
        [('', ['1 (Dropout)'])]
        >>> _ = net.requires_grad_(False)
        >>> eval_mode_under_trainable(net)
        []
    """
    modules = dict(named_modules(root))
    learning: Learning | None = None  # read only once a layer in eval mode asks
    groups: dict[str, list[str]] = {}
    for path, module in modules.items():
        if module.training or not isinstance(module, MODE_SENSITIVE_TYPES):
            continue
        parent = modules.get(parent_path(path), module) if path else module
        if path and switched_alone(module, parent):
            continue
        if learning is None:
            learning = Learning([root], trained)
        if not learning.learns(parent):
            continue
        top = path
        for ancestor in reversed(ancestors(path)[:-1]):
            if modules[ancestor].training:
                break
            top = ancestor
        groups.setdefault(top, []).append(f"{path} ({type(module).__name__})")
    return [(top, layers) for top, layers in groups.items() if allowed is None or not allowed(top)]


def topmost_in(path: str, paths: set[str]) -> str:
    """The outermost ancestor of ``path`` reached through modules that are all in ``paths``."""
    top = path
    for ancestor in reversed(ancestors(path)[:-1]):
        if ancestor not in paths:
            break
        top = ancestor
    return top


_CAUSES = {
    "detached": (
        "its module's forward ran with gradients on, yet no gradient reached it; what cut it off was not "
        "observed (a `.detach()`, `.data` or `.item()` on the way to the loss, a non-differentiable op such as "
        "`argmax`, a loss that does not use the output, or a custom `backward`)",
        "follow this module's output to the loss: remove a `.detach()` / `.data` on the way, make the loss use "
        "it, or freeze it (`requires_grad_(False)`) if it is meant to stay fixed.",
    ),
    "unused": (
        "its module's forward did not run in the training step",
        "use it in the loss, or freeze it (`requires_grad_(False)`) or leave it out of the optimizer.",
    ),
    "cause not yet known": (
        "no gradient reached it",
        "check for `torch.no_grad()`, `.detach()` or an unused branch between this module and the loss; "
        "freeze it if it is meant to stay fixed.",
    ),
}
DDP_SOMETIMES = (
    " If it is meant to learn only on some steps, DDP needs `find_unused_parameters=True` "
    '(`strategy="ddp_find_unused_parameters_true"`); then list it in `allow=` if it stays unused for long.'
)
SOMETIMES = (
    " If it is meant to learn only on some steps and did not in this window (a branch that starts after "
    "the first epoch, a head used less than once an epoch), list it in `allow=`."
)


def _shown(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


@dataclass
class GradientGap:
    """Trainable parameters that got no gradient, grouped under a module, with the reason."""

    kind: str
    subject: str
    parameters: list[str]
    cause: str | None = None
    evidence: str = ""
    """How long it went without a gradient (``"at each of its last 32 steps"``); empty where one step says it all."""
    ddp_stops: bool = False
    """Under ``DistributedDataParallel`` without ``find_unused_parameters``, which stops the run on it."""

    def problem(self, root_type: str) -> str:
        name = display_name(self.subject, root_type)
        if self.kind == "no_grad_module":
            return (
                f"{name} has trainable parameters but its forward ran only with gradients disabled "
                f"(`no_grad`, `inference_mode` or `set_grad_enabled(False)`): {_shown(self.parameters)} will not learn"
            )
        reason = _CAUSES[self.cause or "cause not yet known"][0]
        when = f" {self.evidence}" if self.evidence else ""
        ddp = (
            "; DistributedDataParallel (without `find_unused_parameters`) stops the run at the next step"
            * self.ddp_stops
        )
        return (
            f"{len(self.parameters)} trainable parameter(s) of {name} reached the optimizer step with no gradient"
            f"{when} ({_shown(self.parameters)}): {reason}{ddp}"
        )

    def explanation(self, root_type: str) -> Explanation:
        """The finding's text: problem, fix, and the parameters (and cause) as details."""
        details: dict[str, Any] = {"parameters": self.parameters}
        if self.cause:
            details["cause"] = self.cause
        if self.evidence:
            details["evidence"] = self.evidence
        return Explanation(self.problem(root_type), self.fix(), details)

    def fix(self) -> str:
        if self.kind == "no_grad_module":
            return (
                "remove the `torch.no_grad()` around it, or freeze it (`requires_grad_(False)`) if it is meant "
                "to stay fixed."
            )
        if self.ddp_stops:
            return _CAUSES[self.cause or "cause not yet known"][1] + DDP_SOMETIMES
        return _CAUSES[self.cause or "cause not yet known"][1] + SOMETIMES


def explain_gradient_gaps(
    index: ParamIndex, params: list[nn.Parameter], probe: GradModeProbe | None
) -> list[GradientGap]:
    """Why ``params`` got no gradient, from what ``probe`` saw of the step (``None``: not watched).

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> probe = GradModeProbe({id(m): p for p, m in net.named_modules()})
        >>> probe.start()
        >>> with torch.no_grad():
        ...     h = net[0](torch.ones(1, 2))
        >>> net[1](h).sum().backward()
        >>> probe.stop()
        >>> [(g.kind, g.subject) for g in explain_gradient_gaps(ParamIndex(net), list(net[0].parameters()), probe)]
        [('no_grad_module', '0')]
    """
    if probe is None:
        return [
            GradientGap("param_without_grad", top, names, "cause not yet known")
            for top, names in index.group(params).items()
        ]
    no_grad = set(probe.ran_without_grad_only())
    ran = probe.ran()
    gaps: list[GradientGap] = []
    modules: dict[str, list[str]] = {}
    by_cause: dict[str, list[nn.Parameter]] = {"detached": [], "unused": []}
    for param in params:
        owner = index.owner[id(param)]
        if owner in no_grad:
            modules.setdefault(topmost_in(owner, no_grad), []).append(index.name(param))
        else:
            by_cause["detached" if owner in ran else "unused"].append(param)
    gaps.extend(GradientGap("no_grad_module", module, names) for module, names in modules.items())
    for cause, members in by_cause.items():
        gaps.extend(GradientGap("param_without_grad", top, names, cause) for top, names in index.group(members).items())
    return gaps


class GradientCheck:
    """Which parameters a stepped optimizer holds reach its step with no gradient, at a cost that does not grow
    with the model: every parameter at an epoch's first step, then ``GRADIENT_WINDOW`` of them every
    ``GRADIENT_EVERY``-th step, round robin (see ``lightning_nograd.core.counters``).

    Where gradients are zeroed with ``set_to_none=False`` a missing gradient is all zeros: that is
    learnt right after ``zero_grad`` at the start of each epoch (``backward``: one parameter that
    had a gradient at the last full check is read, so one step decides it), and then
    ``zero_grad_steps`` consecutive all-zero steps make a gradient missing (``ZeroGradientStreaks``).
    With ``set_to_none=True`` (Lightning's default) a zero gradient is a real one (pruned weights).
    A step with no backward and no gradient at all was skipped (``training_step`` returned ``None``).
    At each full check ``frozen_on_purpose`` may name parameters that are frozen on purpose; they are not
    checked again.

    Parameters found missing become *suspects* until explained (``take_suspects``); a suspect
    is explained once per epoch.

    The loop calls one method per event: ``zero_grad`` before an optimizer's ``zero_grad``,
    ``before_backward`` (and ``backward`` when that returns ``False``), and ``passes_steady_step``
    before each optimizer step, then ``step`` unless that returned ``True``: a step that needs nothing
    (one optimizer, between two checks, zeroing already read) is only counted down. A steady step
    so costs three short calls, whatever the model's size; a checked one makes few calls (while the
    CPU caches hold the model, each costs microseconds).

    Args:
        zero_grad_steps: consecutive all-zero steps that make a kept-zero gradient missing.
        allowed: module paths whose parameters are never checked.
        frozen_on_purpose: asked at each full check with (checked, missing): the ``id``s of parameters
            never to check again (a block frozen on purpose); they are left out for the rest of the fit.
    """

    def __init__(
        self,
        zero_grad_steps: int,
        allowed: Callable[[str], bool],
        frozen_on_purpose: Callable[[list[nn.Parameter], list[nn.Parameter]], set[int]] | None = None,
    ) -> None:
        self.zero_grad_steps = zero_grad_steps
        self.allowed = allowed
        self.index: ParamIndex | None = None
        self.streaks = ZeroGradientStreaks(zero_grad_steps)
        self.suspects: dict[int, str] = {}
        self.explained: set[int] = set()
        self.keeps_zeros = False
        # the optimizer whose zero_grad ran last, kept only in a step that reads how zeroing works: while it is
        # not known for that optimizer (`zeroing_known`), in its first `zero_grad_steps` steps of an epoch
        self._zeroing: torch.optim.Optimizer | None = None
        self.zeroing_known: set[int] = set()  # optimizers (by id) whose zeroing was read in this epoch
        self._witness: dict[int, nn.Parameter] = {}  # per optimizer, a parameter with a gradient at its last full check
        self._backward_seen = False
        self._params: dict[int, list[nn.Parameter]] = {}
        self.steps: dict[int, int] = {}  # per optimizer (by id), its steps in this epoch
        self._skip = 0  # steps that pass without a call of `step` (see the class doc)
        self.optimizers = 0  # how many optimizers the loop has this epoch (0: not known)
        self._zero_checks: dict[int, int] = {}
        self._window_at: dict[int, int] = {}
        self._frozen_on_purpose = frozen_on_purpose
        self.ignored: set[int] = set()
        self.window = GradientWindow()  # parameters found without a gradient, until the evidence is definite
        self._confirmed: list[HeldGap] = []
        self._first_step_missing: set[int] = set()  # without a gradient at the epoch's first full check
        self._stepped_ids: dict[int, set[int]] = {}

    def index_model(self, root: nn.Module) -> None:
        """Index ``root``'s parameters (when training starts)."""
        self.index = ParamIndex(root)
        self._params = {}
        self._witness = {}
        self.ignored = set()

    def new_epoch(self, optimizers: int = 0) -> None:
        """Start an epoch of a loop with ``optimizers`` optimizers (0: not known): its first step checks
        every parameter, and each suspect is explained again."""
        self.optimizers = optimizers
        self._skip = 0
        self._params = {}
        self._stepped_ids = {}
        self._first_step_missing = set()
        self.window.new_epoch()
        self.steps = {}
        self._zero_checks = {}
        self.zeroing_known = set()
        self.explained = set()

    @property
    def skip(self) -> int:
        """Steps that will pass without a check (counted down by ``passes_steady_step``)."""
        return self._skip

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.zero_grad`` is about to run: the backward after it reads how zeroing works, while
        that is not known (in a steady step, nothing to do)."""
        if self._skip or self.keeps_zeros:
            return
        if self.reads_zeroing(optimizer):
            self._zeroing = optimizer

    def before_backward(self) -> bool:
        """Note that a backward is about to run; ``False`` when ``backward`` has more to do (reading how
        zeroing works, after ``zero_grad`` said so), ``True`` in the usual step."""
        if self._zeroing is None:
            self._backward_seen = True
            return True
        return False

    def passes_steady_step(self) -> bool:
        """An optimizer step is about to run: ``True`` when it needs nothing (counted down here), ``False``
        when ``step`` must see it."""
        if self._skip:
            self._skip -= 1
            self._backward_seen = False
            return True
        return False

    def backward(self) -> None:
        """A backward is about to run: noted, and after a ``zero_grad`` that asked for it, how zeroing works
        is read from one parameter that had a gradient."""
        self._backward_seen = True
        optimizer, self._zeroing = self._zeroing, None
        if optimizer is None or self.keeps_zeros:  # (`zero_grad` kept it only where `reads_zeroing` said so)
            return
        key = id(optimizer)
        witness = self._witness.get(key)
        if witness is not None:
            # right after zero_grad, a parameter that had a gradient: none now is `set_to_none=True`, one kept zeros
            self.keeps_zeros = witness.grad is not None
            self.zeroing_known.add(key)
            return
        # no full check yet: a gradient still there means zeros are kept; none tells nothing (there may have
        # been no backward before this one)
        params = (p for group in optimizer.param_groups for p in group["params"] if p.requires_grad)
        if any(p.grad is not None for _, p in zip(range(8), params, strict=False)):
            self.keeps_zeros = True
            self.zeroing_known.add(key)

    def reads_zeroing(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether the backward after ``optimizer``'s ``zero_grad`` should read how zeroing works: not yet
        known in this epoch, in its first ``zero_grad_steps`` steps."""
        key = id(optimizer)
        return key not in self.zeroing_known and self.steps.get(key, 0) < self.zero_grad_steps

    def step(self, optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
        """Count a step of ``optimizer`` and check it when due: the parameters found without a gradient
        (missing, or all zero for ``zero_grad_steps`` steps), each counted in every step it is missing.

        Due: the epoch's first step (every parameter), every ``GRADIENT_EVERY``-th (the next window),
        and every step while kept zeros are checked or a zero check is pending. Then, with one
        optimizer, once zeroing is known and no zero check is due, ``skip`` says how many steps need
        nothing until the next check (``passes_steady_step`` counts them down)."""
        key = id(optimizer)
        steps = self.steps.get(key, 0) + 1
        self.steps[key] = steps
        if self.window.held:
            self._confirmed += self.window.step(self._stepped(key), self.keeps_zeros)
        zero_check = self.keeps_zeros and self._zero_checks.get(key, 0) < self.zero_grad_steps
        found: list[nn.Parameter] = []
        if steps == 1 or not steps % GRADIENT_EVERY or zero_check or self.streaks.pending:
            checked = self._check(key, optimizer, steps, zero_check)
            if checked is None:
                return found  # nothing to check, or a skipped step: no plan either
            found = checked
        else:
            self._backward_seen = False
        if self.optimizers != 1 or len(self.steps) != 1 or self.streaks.pending or self.window.held:
            return found
        if self.reads_zeroing(optimizer) or (self.keeps_zeros and self._zero_checks.get(key, 0) < self.zero_grad_steps):
            return found
        self._skip = GRADIENT_EVERY - 1 - steps % GRADIENT_EVERY
        self.steps[key] = steps + self._skip  # counted now: the skipped steps do not call this
        return found

    def _check(
        self, key: int, optimizer: torch.optim.Optimizer, steps: int, zero_check: bool
    ) -> list[nn.Parameter] | None:
        backward_seen, self._backward_seen = self._backward_seen, False
        index = self.index
        if index is None:
            return None
        params = self._params.get(key)
        if params is None or steps == 1:
            params = self._params[key] = self._unignored(index.stepped(optimizer, self.allowed))
        checked = params
        if steps != 1 and not zero_check and len(params) > GRADIENT_WINDOW:  # the next window, round robin
            start = self._window_at.get(key, 0) % len(params)
            self._window_at[key] = start + GRADIENT_WINDOW
            checked = params[start : start + GRADIENT_WINDOW]
            checked += params[: GRADIENT_WINDOW - len(checked)]
        visits.params += len(checked)
        missing = without_gradient(checked)
        if steps == 1:
            self._first_step_missing.update(id(p) for p in missing)
        if missing and not backward_seen and len(missing) == sum(p.requires_grad for p in checked):
            return None  # no backward and no gradient at all: a skipped step (`training_step` returned None)
        if checked is params and self._frozen_on_purpose is not None:
            ignored = self._frozen_on_purpose(params, missing)
            if ignored:
                self.ignored |= ignored
                checked = params = self._params[key] = self._unignored(params)
                missing = self._unignored(missing)
        if checked is params:  # a full check: the parameter that tells how the next zero_grad zeroes
            witness = next((p for p in params if p.grad is not None), None)  # the first, as a rule
            if witness is not None:
                self._witness[key] = witness
        if zero_check:
            self._zero_checks[key] = self._zero_checks.get(key, 0) + 1
            self.streaks.observe([p for p in params if p.requires_grad])
        # each call costs microseconds while the CPU caches hold the model: none where nothing was found
        return self._suspect(missing, self.streaks.collect()) if missing or self.streaks.pending else missing

    def _stepped(self, key: int) -> set[int] | None:
        """The ``id`` of each parameter the optimizer ``key`` steps (``None`` before its first check)."""
        ids = self._stepped_ids.get(key)
        if ids is None and key in self._params:
            ids = self._stepped_ids[key] = {id(p) for p in self._params[key]}
        return ids

    def missing_all_epoch(self, param: nn.Parameter) -> bool:
        """Whether ``param`` has had no gradient at any step of this epoch so far."""
        if id(param) in self._first_step_missing:
            return True
        # kept zeros: all-zero at every zero check of this epoch (they start at its first step)
        checks = max(self._zero_checks.values(), default=0)
        return self.keeps_zeros and checks > 0 and self.streaks.streak.get(id(param), 0) >= checks

    def hold(self, gap: GradientGap, params: list[nn.Parameter], batch_idx: int | None, epoch: int) -> None:
        """Hold ``gap``'s parameters in the window (see ``lightning_nograd.core.gradient_window``);
        read now, at the step after the one that found them: those with a gradient already are let go."""
        index = self.index
        if index is None:
            return
        later = [p for p in params if not has_gradient(p, self.keeps_zeros)]
        if not later:
            return
        names = {id(p): index.name(p) for p in later}
        whole = all(self.missing_all_epoch(p) for p in later)
        self.window.hold(gap, later, names, batch_idx, epoch, whole, missed=2)
        if self._skip:  # held parameters are read at every step
            for key in self.steps:
                self.steps[key] -= self._skip
            self._skip = 0

    def take_confirmed(self, epoch_end: bool = False) -> list[HeldGap]:
        """The held groups whose evidence became definite (``epoch_end``: also those without a gradient
        for the whole epoch)."""
        confirmed, self._confirmed = self._confirmed, []
        return confirmed + (self.window.epoch_end() if epoch_end else [])

    def _unignored(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        ignored = self.ignored
        return [p for p in params if id(p) not in ignored] if ignored else params

    def collect(self, wait: bool) -> list[nn.Parameter]:
        """Parameters whose all-zero streak completed in checks read now (``wait``: all of them, at the end)."""
        return self._suspect([], self.streaks.collect(wait))

    def _suspect(self, missing: list[nn.Parameter], zero: list[nn.Parameter]) -> list[nn.Parameter]:
        if self.index is None:
            return []
        seen = {id(p) for p in missing}
        missing = missing + [p for p in zero if id(p) not in seen and p.requires_grad]
        self.suspects.update({id(p): self.index.name(p) for p in missing if id(p) not in self.explained})
        return missing

    def take_suspects(self) -> list[nn.Parameter]:
        """The suspects to explain now; they count as explained for the rest of the epoch."""
        if self.index is None:
            return []
        params = [self.index.params[key] for key in self.suspects if key in self.index.params]
        self.explained |= set(self.suspects)
        self.suspects = {}
        return params

    def clear(self) -> None:
        """Forget the model (at the end of training)."""
        self.index = None
        self._params = {}
        self._witness = {}
        self.suspects = {}
        self.ignored = set()
        self.streaks.clear()
        self.window.clear()
        self._confirmed = []


@dataclass
class Leak:
    """A module that trained earlier in the fit and is in eval mode now (the topmost such)."""

    path: str
    module: nn.Module
    where: str  # the hook or step during which it was switched
    batch_idx: int | None
    new: bool  # not reported before in this fit


class EvalModeLeaks:
    """Modules in eval mode during training although they were in train mode earlier: an ``.eval()``
    (a callback's, a hook's) that was not undone.

    Modes are read only after some module's mode switched (``lightning_nograd.core.counters.ModeSwitches``);
    at each check ``unchanged`` compares the count at the last read with ``mode_switches.count``, and
    only when they differ does ``read`` look at the modules. Frozen modules (no parameter of theirs
    learns) are left out: keeping them in eval is a choice. So is a layer switched to eval on its own
    (``switched_alone``: the usual way to freeze batch-norm statistics); it is not put back in train
    mode under ``on_violation="fix"`` either.

    Args:
        allowed: module paths never reported.
    """

    def __init__(self, allowed: Callable[[str], bool]) -> None:
        self.allowed = allowed
        self._read_at: int | None = None  # mode_switches.count when the modes were last read
        self.clean_at = "on_train_start"  # the last hook at which no trained module was in eval mode
        self._modules: list[tuple[str, nn.Module]] = []
        self._seen_training: set[str] = set()
        self._watched: list[tuple[str, nn.Module, nn.Module | None]] = []  # path, module, parent
        self._reported: set[str] = set()

    @property
    def read_at(self) -> int | None:
        """``mode_switches.count`` when the modes were last read (``None``: to be read at the next check)."""
        return self._read_at

    def unchanged(self, hook: str) -> bool:
        """Whether no module's mode switched since the modes were last read (then ``hook`` is noted as a clean
        check: the usual batch); otherwise ``read`` must look."""
        if self._read_at == mode_switches.count:
            self.clean_at = hook
            return True
        return False

    def forget_modes(self) -> None:
        """The modes may have changed without a counted switch (Lightning restores them by assignment after
        validation): the next check reads them."""
        self._read_at = None

    def index(self, root: nn.Module) -> None:
        """The modules to watch, once per fit."""
        self._modules = [(path, m) for path, m in mode_modules(root) if not self.allowed(path)]

    def note_train_mode(self, modules: dict[str, nn.Module], trained: set[int] | None, hook: str) -> None:
        """Remember modules in train mode now (at training and each epoch's start): from here on, eval mode in
        a training step is a leak. ``modules`` are all paths (for a module's parent), ``trained`` the
        parameters some optimizer steps."""
        self._seen_training |= {path for path, m in self._modules if m.training}
        modules = modules or dict(self._modules)
        learning = Learning(modules.values(), trained)
        parents = ((path, m, modules.get(parent_path(path)) if path else None) for path, m in self._modules)
        self._watched = [
            (path, m, parent)
            for path, m, parent in parents
            if path in self._seen_training and not learning.frozen(m, parent)
        ]
        self.clean_at = hook
        self._read_at = None
        ModeSwitches.listen(self)

    def read(self, hook: str, batch_idx: int | None) -> tuple[list[nn.Module], list[Leak]]:
        """Read the watched modules' modes at ``hook``: every leaked module, and the topmost ones as leaks."""
        self._read_at = mode_switches.count
        visits.modules += len(self._watched)
        leaked = [
            (path, module)
            for path, module, parent in self._watched
            if not module.training and not switched_alone(module, parent)
        ]
        leaks: list[Leak] = []
        if leaked:
            paths = {path for path, _ in leaked}
            # the check at the batch's end covers the training step; the one at its start covers what ran
            # since the last clean check (the previous batch's end hooks, validation, an epoch start)
            where = {"on_train_batch_start": "training_step", "training_step": "on_train_batch_end"}.get(
                self.clean_at, self.clean_at
            )
            if hook == "training_step":
                where = "training_step"
            seen_at = batch_idx - 1 if where == "on_train_batch_end" and batch_idx else batch_idx
            for path, module in leaked:
                if not any(a in paths for a in ancestors(path)[:-1]):
                    leaks.append(Leak(path, module, where, seen_at, path not in self._reported))
                    self._reported.add(path)
        self.clean_at = hook
        return [module for _, module in leaked], leaks

    def stop(self) -> None:
        """Stop counting mode switches and forget the model (at the end of training)."""
        ModeSwitches.stop(self)
        self._read_at = None
        self._modules = []
        self._watched = []
