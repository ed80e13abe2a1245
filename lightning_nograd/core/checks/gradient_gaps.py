"""Why a parameter got no gradient: the one root cause a gradient check names in its finding.

``GradModeProbe`` follows one training step (installed only for that step). With global forward hooks
it records which watched modules ran their forward with gradients on and which only with them off
(global hooks, unlike per-module ones, leave fused kernels on). With a torch-function mode it also
sees, function by function, where each trainable parameter was used and in which grad mode (so a
parameter a module uses functionally, ``nn.MultiheadAttention``'s ``out_proj.weight``, a weight-tied
decoder, ``F.linear(x, self.weight)`` in a parent, belongs to the module whose forward ran), and where
a tensor attached to the graph entered code that records nothing (a ``no_grad`` region) or was cut
from it (``.detach()``, ``.data``, ``.item()``).

``explain_gradient_gaps`` turns that into ``GradientGap`` findings, one per root cause: the
parameters a ``no_grad`` region starved, those it used and those upstream of it whose only path to
the loss went through it (found by walking the autograd graph back from the cut), are all reported
under the one finding that names the region.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_nograd.core.checks.modes import is_grad_recording
from lightning_nograd.core.plumbing import torch_internals
from lightning_nograd.core.plumbing.faults import Probe, isolated
from lightning_nograd.core.plumbing.model_index import ParamIndex, topmost_in
from lightning_nograd.core.plumbing.stack import running_function
from lightning_nograd.core.plumbing.torch_internals import tree_leaves
from lightning_nograd.core.reporting.findings import common_ancestor, display_name
from lightning_nograd.core.reporting.messages import Explanation, allow_hint
from lightning_nograd.core.savings.recording import function_name

# functions whose result carries no graph of its input: the gradient path ends there
_CUTS = {
    "detach": "a `.detach()`",
    "detach_": "a `.detach_()`",
    "data": "a `.data`",
    "item": "an `.item()`",
    "tolist": "a `.tolist()`",
    "numpy": "a `.numpy()`",
}


# reads of a tensor's properties: they compute nothing from it
_READS = frozenset({"grad", "_grad", "data", "_base", "grad_fn", "requires_grad_", "retain_grad", "detach", "detach_"})


@dataclass
class Cut:
    """Where a tensor attached to the autograd graph stopped carrying gradients back.

    Attributes:
        kind: ``"no_grad"`` (it entered code that records nothing) or the name of the cutting function.
        where: the innermost watched module whose forward was running (``None``: the step's own code).
        node: the graph node that made the tensor: what lies behind it got no gradient through here.
        function: the torch function it was passed to.
    """

    kind: str
    where: str | None
    node: Any
    function: str


class GradModeProbe(Probe):
    """Records, for one step, which watched modules ran their forward with gradients on or off, and (where
    this torch's mode stack allows, ``torch_internals.function_modes_available``) where parameters were
    used and where the graph was cut.

    Args:
        watch: the modules to watch, by ``id``, with their paths.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> probe = GradModeProbe({id(net[0]): "0"})
        >>> probe.start()
        >>> with torch.no_grad():
        ...     _ = net(torch.ones(1, 2))
        >>> probe.stop()
        >>> probe.ran_without_grad_only(), sorted(probe.used_without_grad.values())
        (['0'], [('0', 'linear'), ('0', 'linear')])
    """

    def __init__(self, watch: dict[int, str], on_error: Callable[[BaseException], None] | None = None) -> None:
        self.on_error = on_error
        self.watch = watch
        self.with_grad: set[str] = set()
        self.without_grad: set[str] = set()
        self.order: dict[str, int] = {}  # watched modules in the order their forward first ran
        self.used_with_grad: set[int] = set()  # parameters (by id) an operation recording a graph used
        # parameters used only where nothing is recorded: where (innermost watched module) and in which function
        self.used_without_grad: dict[int, tuple[str | None, str]] = {}
        self.cuts: list[Cut] = []
        # watched modules that ran with gradients off inside a reentrant activation checkpoint
        self.checkpointed: set[str] = set()
        self._cut_nodes: set[int] = set()
        self._stack: list[str] = []
        self._handles: list[RemovableHandle] = []
        self._trace: torch_internals.FunctionWatch | None = None
        self._aside: list[bool] = []  # per compiled module call: the trace stepped off the stack for it
        self._see_function = isolated(self._see_function_unsafe, self)

    def start(self) -> None:
        if self._handles:
            return
        self._handles = [
            nn.modules.module.register_module_forward_pre_hook(isolated(self._pre_forward, self)),
            nn.modules.module.register_module_forward_hook(isolated(self._post_forward, self), always_call=True),
        ]
        if torch_internals.function_modes_available():
            self._trace = torch_internals.FunctionWatch(self._see_function)
            torch_internals.push_function_mode(self._trace)

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        trace, self._trace = self._trace, None
        if trace is not None:
            torch_internals.remove_function_mode(trace)
        self._stack, self._aside = [], []

    @property
    def traced(self) -> bool:
        """Whether the step was followed function by function (parameter uses and cuts are known)."""
        return bool(self.used_with_grad or self.used_without_grad or self.cuts)

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        if torch_internals.is_compile_wrapper(module):  # compiled code runs with the stack it was compiled with
            trace = self._trace
            aside = trace is not None and torch_internals.function_mode_on_top(trace)
            if aside:
                torch_internals.remove_function_mode(trace)
            self._aside.append(aside)
        path = self.watch.get(id(module))
        if path is None:
            return
        self.order.setdefault(path, len(self.order))
        recording = is_grad_recording()
        (self.with_grad if recording else self.without_grad).add(path)
        if not recording and path not in self.checkpointed and _in_reentrant_checkpoint():
            self.checkpointed.add(path)
        self._stack.append(path)

    def _post_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        path = self.watch.get(id(module))
        if path is not None and self._stack and self._stack[-1] == path:
            self._stack.pop()
        if torch_internals.is_compile_wrapper(module) and self._aside and self._aside.pop() and self._trace:
            torch_internals.push_function_mode(self._trace)

    def _see_function_unsafe(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        recording = is_grad_recording()
        where = self._stack[-1] if self._stack else None
        name = function_name(func)
        inputs = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        made = [leaf for leaf in tree_leaves(out) if isinstance(leaf, torch.Tensor)]
        # a use computes something from the parameter: with gradients on, autograd recorded it (the output has a
        # graph node); with them off, a new tensor came out that is no property read (an optimizer's `p.grad`)
        if recording:
            computes = any(t.grad_fn is not None for t in made)
        else:
            computes = name not in _READS and any(all(t is not i for i in inputs) for t in made)
        for leaf in inputs:
            if not isinstance(leaf, torch.Tensor) or not leaf.requires_grad:
                continue
            if leaf.is_leaf:  # a trainable parameter
                if not computes:
                    continue
                if recording:
                    self.used_with_grad.add(id(leaf))
                    self.used_without_grad.pop(id(leaf), None)
                elif id(leaf) not in self.used_with_grad:
                    self.used_without_grad.setdefault(id(leaf), (where, name))
            elif not recording:
                self._add_cut("no_grad", where, leaf.grad_fn, name)
            elif name in _CUTS:
                self._add_cut(name, where, leaf.grad_fn, name)

    def _add_cut(self, kind: str, where: str | None, node: Any, function: str) -> None:
        if node is not None and id(node) not in self._cut_nodes:
            self._cut_nodes.add(id(node))
            self.cuts.append(Cut(kind, where, node, function))

    def ran_without_grad_only(self) -> list[str]:
        """Watched modules whose every forward in the step ran with gradients off, in the order they ran."""
        return sorted(self.without_grad - self.with_grad, key=self.order.__getitem__)

    def ran(self) -> set[str]:
        """Watched modules whose forward ran at all."""
        return self.with_grad | self.without_grad

    def release(self) -> None:
        """Drop what the step left: the graph nodes the cuts hold."""
        self.cuts, self._cut_nodes = [], set()
        self.used_with_grad, self.used_without_grad = set(), {}


def _in_reentrant_checkpoint() -> bool:
    """Whether the forward under way runs inside ``torch.utils.checkpoint``'s reentrant function, which runs
    it with gradients off and gives its output a gradient only when one of its inputs requires one."""
    return running_function(_CHECKPOINT_FILE, "forward")


_CHECKPOINT_FILE = os.path.join("torch", "utils", "checkpoint.py")


def starved_by(cuts: list[Cut], params: Iterable[nn.Parameter]) -> dict[int, Cut]:
    """For each of ``params`` (by ``id``) that lies behind a cut in the autograd graph, the first such cut.

    One walk over the graph for all cuts together: a node reached from an earlier cut is not walked again.

    Examples:
        >>> emb, head = nn.Linear(2, 2), nn.Linear(2, 1)
        >>> h = emb(torch.ones(1, 2))
        >>> cut = Cut("no_grad", "head", h.grad_fn, "linear")
        >>> [p.shape for p in emb.parameters() if id(p) in starved_by([cut], emb.parameters())]
        [torch.Size([2, 2]), torch.Size([2])]
    """
    wanted = {id(p) for p in params}
    found: dict[int, Cut] = {}
    # the nodes walked, kept referenced: a torch may hand out a new wrapper for a node at each
    # `next_functions`, and a freed one's `id` would come back for another node (seen on torch 2.4)
    seen: dict[int, Any] = {}
    for cut in cuts:
        stack = [cut.node]
        while stack and len(found) < len(wanted):
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen[id(node)] = node
            variable = getattr(node, "variable", None)  # AccumulateGrad: the parameter itself
            if variable is not None and id(variable) in wanted:
                found.setdefault(id(variable), cut)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return found


_CAUSES = {
    "detached": (
        "its module's forward ran with gradients on, yet no gradient reached it; what cut it off was not "
        "observed (a `.detach()`, `.data` or `.item()` on the way to the loss, a non-differentiable op such as "
        "`argmax`, a loss that does not use the output, or a custom `backward`)",
        "follow this module's output to the loss: remove a `.detach()` / `.data` on the way, make the loss use "
        "it, or freeze it (`requires_grad_(False)`) if it is meant to stay fixed.",
    ),
    "used, no gradient": (
        "it was used with gradients on, yet no gradient reached it: what cut it off was not observed (a "
        "non-differentiable op such as `argmax`, a loss that does not use the result, or a custom `backward`)",
        "make the loss depend on what it computes, or freeze it (`requires_grad_(False)`) if it is meant to stay "
        "fixed.",
    ),
    "not used": (
        "its module's forward ran, but never used it",
        "use it in the forward, or freeze it (`requires_grad_(False)`) or leave it out of the optimizer.",
    ),
    "unused": (
        "its module's forward did not run in the training step",
        "use it in the loss, or freeze it (`requires_grad_(False)`) or leave it out of the optimizer.",
    ),
    "reentrant_checkpoint": (
        "they ran inside reentrant activation checkpoints (`torch.utils.checkpoint(..., use_reentrant=True)`, "
        "gradient checkpointing) whose inputs did not require grad (frozen embeddings feed them), so the "
        "checkpoints ran them with gradients off and gave their output no gradient",
        "make the checkpoints' inputs require grad (Hugging Face models: `model.enable_input_require_grads()`), "
        "or use non-reentrant checkpoints (`use_reentrant=False`; Hugging Face: "
        '`gradient_checkpointing_kwargs={"use_reentrant": False}`).',
    ),
    "cause not yet known": (
        "no gradient reached it",
        "check for `torch.no_grad()`, `.detach()` or an unused branch between this module and the loss; "
        "freeze it if it is meant to stay fixed.",
    ),
}


DDP_SOMETIMES = (
    " If it is meant to learn only on some steps, DDP needs `find_unused_parameters=True` "
    '(`strategy="ddp_find_unused_parameters_true"`); if it is meant to go without a gradient, '
)


SOMETIMES = (
    " If it is meant to learn only on some steps and did not in this window (a branch that starts after "
    "the first epoch, a head used less than once an epoch), or to go without a gradient, "
)


def _shown(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def _place(where: str | None, root_type: str) -> str:
    if where is None:
        return "in the training step's own code"
    return f"in the forward of {display_name(where, root_type)}"


@dataclass(frozen=True)
class GradientGap:
    """Trainable parameters that got no gradient for one root cause, named by the module it lies in.

    Attributes:
        kind: ``"no_grad_module"`` (a module ran only with gradients off) or ``"param_without_grad"``.
        subject: the module the finding names (``""``: the model itself).
        parameters: the parameters the cause starved.
        cause: for ``param_without_grad``: a key of the causes (``"detached"``, ``"unused"``, ...), or the
            cut that starved them (``"no_grad"``, ``"detach"``, ``"item"``, ...) with ``cut_at`` and ``cut_by``.
        upstream: for ``no_grad_module``: parameters upstream of it whose only path to the loss ran through it.
        evidence: how long they went without a gradient (``"at each of its last 32 steps"``); empty where one
            step says it all.
        ddp_stops: under ``DistributedDataParallel`` without ``find_unused_parameters``, which stops the run.
    """

    kind: str
    subject: str
    parameters: list[str]
    cause: str | None = None
    evidence: str = ""
    ddp_stops: bool = False
    upstream: list[str] = field(default_factory=list)
    cut_at: str | None = None
    cut_by: str = ""

    @property
    def definite(self) -> bool:
        """Whether one watched step proves the parameters will never learn (a module run only under ``no_grad``,
        a reentrant checkpoint without inputs that require grad), so the finding needs no more evidence."""
        return self.kind == "no_grad_module" or self.cause == "reentrant_checkpoint"

    def problem(self, root_type: str) -> str:
        name = display_name(self.subject, root_type)
        if self.kind == "no_grad_module":
            upstream = ""
            if self.upstream:
                upstream = (
                    f"; it also cut {len(self.upstream)} parameter(s) upstream off the loss, whose only path to it "
                    f"ran through it: {_shown(self.upstream)}"
                )
            return (
                f"{name} has trainable parameters but its forward ran only with gradients disabled "
                f"(`no_grad`, `inference_mode` or `set_grad_enabled(False)`): {_shown(self.parameters)} will not "
                f"learn{upstream}"
            )
        when = f" {self.evidence}" if self.evidence else ""
        ddp = (
            "; DistributedDataParallel (without `find_unused_parameters`) stops the run at the next step"
            * self.ddp_stops
        )
        return (
            f"{len(self.parameters)} trainable parameter(s) of {name} reached the optimizer step with no gradient"
            f"{when} ({_shown(self.parameters)}): {self._reason(root_type)}{ddp}"
        )

    def _reason(self, root_type: str) -> str:
        if self.cause == "no_grad":
            return (
                f"a region with gradients disabled {_place(self.cut_at, root_type)} (at `{self.cut_by}`) cut them off "
                "the loss"
            )
        if self.cause in _CUTS:
            return f"{_CUTS[self.cause]} {_place(self.cut_at, root_type)} cut them off the loss"
        return _CAUSES[self.cause or "cause not yet known"][0]

    def explanation(self, root_type: str) -> Explanation:
        """The finding's text: problem, fix, and the parameters (and cause) as details."""
        details: dict[str, Any] = {"parameters": self.parameters, "count": len(self.parameters) + len(self.upstream)}
        if self.upstream:
            details["upstream"] = self.upstream
        if self.cause:
            details["cause"] = self.cause
        if self.cut_at is not None or self.cut_by:
            details["cut_in"] = self.cut_at if self.cut_at is not None else "training step"
        if self.evidence:
            details["evidence"] = self.evidence
        return Explanation(self.problem(root_type), self.fix(root_type), details)

    def fix(self, root_type: str = "LightningModule") -> str:
        allow = allow_hint("allow", self.subject, root_type)
        if self.kind == "no_grad_module":
            return (
                "remove the `torch.no_grad()` around it, or freeze it (`requires_grad_(False)`) if it is meant "
                f"to stay fixed. If it runs without gradients on purpose, {allow}"
            )
        if self.cause == "no_grad":
            base = (
                f"remove the `torch.no_grad()` (or `inference_mode`) {_place(self.cut_at, root_type)} around "
                f"`{self.cut_by}`, or freeze these parameters if they are meant to stay fixed."
            )
        elif self.cause in _CUTS:
            base = (
                f"remove {_CUTS[self.cause]} {_place(self.cut_at, root_type)} on the way to the loss, or freeze "
                "these parameters if they are meant to stay fixed."
            )
        else:
            base = _CAUSES[self.cause or "cause not yet known"][1]
        sometimes = DDP_SOMETIMES if self.ddp_stops else SOMETIMES
        return f"{base}{sometimes}{allow}"


def explain_gradient_gaps(
    index: ParamIndex, params: list[nn.Parameter], probe: GradModeProbe | None
) -> list[GradientGap]:
    """Why ``params`` got no gradient, one gap per root cause, from what ``probe`` saw of a step (``None``: not
    watched).

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
    traced = probe.traced
    starved = starved_by(probe.cuts, params) if traced else {}
    regions: dict[str, list[str]] = {}  # a module that ran only under no_grad -> the parameters it starved
    upstream: dict[str, list[str]] = {}
    cut_groups: dict[int, tuple[Cut, list[nn.Parameter]]] = {}
    by_cause: dict[str, list[nn.Parameter]] = {}

    containers = set(probe.watch.values()) - ran  # never called (a `ModuleList`): a region reaches over them

    def region_of(path: str | None) -> str | None:
        return topmost_in(path, no_grad, containers) if path is not None and path in no_grad else None

    for param in params:
        key, owner = id(param), index.owner[id(param)]
        used_off = probe.used_without_grad.get(key)
        if used_off is not None and region_of(used_off[0]) is not None:
            regions.setdefault(region_of(used_off[0]) or "", []).append(index.name(param))
        elif used_off is not None:  # used only in a no_grad block of a forward that itself ran with gradients
            cut = Cut("no_grad", used_off[0], None, used_off[1])
            cut_groups.setdefault(hash((used_off[0], used_off[1])), (cut, []))[1].append(param)
        elif key not in probe.used_with_grad and owner in no_grad:
            regions.setdefault(topmost_in(owner, no_grad, containers), []).append(index.name(param))
        elif key in starved:
            cut = starved[key]
            region = region_of(cut.where) if cut.kind == "no_grad" else None
            if region is not None:
                upstream.setdefault(region, []).append(index.name(param))
            else:
                cut_groups.setdefault(id(cut), (cut, []))[1].append(param)
        elif traced and key in probe.used_with_grad:
            by_cause.setdefault("used, no gradient", []).append(param)
        elif traced and owner in ran:
            by_cause.setdefault("not used", []).append(param)
        else:
            by_cause.setdefault("detached" if owner in ran else "unused", []).append(param)
    # modules run with gradients off by reentrant checkpoints: one cause, the checkpoints' inputs
    checkpointed = sorted(r for r in {*regions, *upstream} if r in probe.checkpointed)
    gaps = []
    if checkpointed:
        names = [n for r in checkpointed for n in (*regions.pop(r, []), *upstream.pop(r, []))]
        gaps.append(GradientGap("param_without_grad", common_ancestor(checkpointed), names, "reentrant_checkpoint"))
    gaps[:0] = [
        GradientGap("no_grad_module", region, regions.get(region, []), upstream=upstream.get(region, []))
        for region in sorted({*regions, *upstream}, key=lambda r: probe.order.get(r, len(probe.order)))
    ]
    for cut, members in cut_groups.values():
        for top, names in index.group(members).items():
            gaps.append(GradientGap("param_without_grad", top, names, cut.kind, cut_at=cut.where, cut_by=cut.function))
    for cause, members in by_cause.items():
        gaps.extend(GradientGap("param_without_grad", top, names, cause) for top, names in index.group(members).items())
    return gaps
