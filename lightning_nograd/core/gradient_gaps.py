"""Why a parameter got no gradient: the causes a gradient check names in its finding.

``GradModeProbe`` records, for one training step, whether given modules ran their forward with
gradients on; it uses a *global* forward pre-hook (installed only for that step), which does not
switch off fused kernels the way per-module hooks do. ``explain_gradient_gaps`` turns what it saw
into ``GradientGap`` findings: a module run under ``no_grad``, a branch cut from the loss, one not run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_nograd.core.faults import Probe, isolated
from lightning_nograd.core.findings import display_name
from lightning_nograd.core.messages import Explanation
from lightning_nograd.core.model_index import ParamIndex, topmost_in
from lightning_nograd.core.modes import is_grad_recording


class GradModeProbe(Probe):
    """Records whether watched modules ran their forward with gradients on, for one step.

    Examples:
        >>> import torch
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
        >>> import torch
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
