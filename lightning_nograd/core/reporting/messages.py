"""What each finding kind says: one constructor per kind, for the callbacks and the plain-PyTorch API.

Each function returns an ``Explanation`` (problem, fix, details); the caller adds where
and when it happened (stage, hook, batch) to make a ``lightning_nograd.core.reporting.findings.Finding``.
Where the right fix depends on what was observed (a module already in train mode as the batch
started, or switched to it inside; gradients on around the whole loop, or enabled inside it),
the constructor takes that observation, never the caller's framework: the same bug gets the same
text from ``NoGradAuditor`` and from ``audit()`` / ``check_training_step``.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from torch import nn

from lightning_nograd.core.checks.graph import GraphEvent
from lightning_nograd.core.checks.tensors import MIB, TensorTally, format_bytes
from lightning_nograd.core.plumbing.module_paths import class_name
from lightning_nograd.core.reporting.findings import display_name


class Explanation(NamedTuple):
    """The text of a finding: what was observed, how to fix it, and plain extras."""

    problem: str
    fix: str
    details: dict[str, Any]


def shown(items: list[str], limit: int = 5) -> str:
    """The first ``limit`` items, comma-separated, and how many more.

    Examples:
        >>> shown(["a", "b", "c"], limit=2)
        'a, b and 1 more'
    """
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def allow_pattern(paths: list[str]) -> str:
    r"""The one regular expression that allow-lists exactly ``paths`` (``""``: the model itself, and so all of it).

    Examples:
        >>> print(allow_pattern(["emb_drop", "encoder", "head.1", "validation_step outputs"]))
        emb_drop|encoder|head\.1|validation_step outputs
    """
    unique = list(dict.fromkeys(paths))
    return "|".join(_REGEX_SPECIAL.sub(r"\\\1", path) for path in unique) if unique != [""] else ""


_REGEX_SPECIAL = re.compile(r"([.^$*+?{}\[\]\\|()])")


def allow_hint(option: str, paths: str | list[str], root_type: str = "LightningModule") -> str:
    r"""The words that end a fix: the exact pattern of ``option`` (and the CLI's flag of the same name) that
    silences a finding about ``paths``.

    Examples:
        >>> print(allow_hint("allow_train_mode", ["head.1"]))
        pass `allow_train_mode=[r"head\.1"]` (CLI: `--allow-train-mode 'head\.1'`).
    """
    pattern = allow_pattern([paths] if isinstance(paths, str) else paths)
    whole = f" (the whole {root_type}, all of it)" if pattern == "" else ""
    flag = "--" + option.replace("_", "-")
    return f"pass `{option}=[r\"{pattern}\"]`{whole} (CLI: `{flag} '{pattern}'`)."


def train_mode(
    path: str, module: nn.Module, root_type: str, confirmed: bool, during: str, layers: list[tuple[str, nn.Module]]
) -> Explanation:
    """A module ran (``confirmed``) or was switched to (not ``confirmed``) train mode while evaluating.

    ``confirmed``: it was in train mode as the batch started, so the evaluation loop left it
    there (Lightning sets eval mode itself: then a ``.train()`` call in an evaluation hook put it
    back); else code inside the batch switched it, after some of its forward may have run.
    ``during`` names the unit of work (``"the step"``, ``"the batch"``). ``layers``: those in it that behave
    differently in train mode and are not allowed to (``lightning_nograd.core.checks.modes.train_mode_layers``), in
    the order the forward ran them; the pattern that silences the finding names them (or the module, if none).
    """
    listed = [f"{name} ({class_name(layer)})" for name, layer in layers if name != path]
    detail = f"; layers that behave differently in train mode: {shown(listed)}" if listed else ""
    what = "ran its forward in train mode" if confirmed else f"was switched to train mode during {during}"
    kind = "" if not path else f" ({class_name(module)})"
    problem = f"{display_name(path, root_type)}{kind} {what}{detail}"
    keep = allow_hint("allow_train_mode", [name for name, _ in layers] or [path], root_type)
    if confirmed:
        fix = (
            "put the model in eval mode before evaluating: call `model.eval()` and remove any `.train()` call that "
            "runs after it (under Lightning, which calls `.eval()` itself, a `.train()` in an evaluation hook). "
            f"If it must stay in train mode (MC dropout), {keep}"
        )
    else:
        fix = "remove the `.train()` call that runs during evaluation. If it must stay in train mode (MC dropout), "
        fix += keep
    return Explanation(problem, fix, {"mode_sensitive_layers": listed})


def grad_enabled(event: GraphEvent, modules: list[str], root_type: str, grad_off_around: bool) -> Explanation:
    """A forward recorded an autograd graph while evaluating.

    ``grad_off_around``: gradients were off around the batch (Lightning's loops, a loop under
    ``no_grad``), so code inside the forward switched them on; else the whole loop ran with them.
    """
    inner = [m for m in modules if m != event.module]
    where = f" (in {shown(inner)})" if inner else ""
    problem = (
        f"{display_name(event.module, root_type)} ran with gradients enabled and recorded an autograd graph{where}: "
        f"{format_bytes(event.saved_bytes)} saved for backward in one batch"
    )
    allow = (
        f"If it needs gradients (saliency, physics), {allow_hint('allow_grad', modules or [event.module], root_type)}"
    )
    if grad_off_around:
        fix = f"remove the `torch.enable_grad()` (or `set_grad_enabled(True)`) around this code. {allow}"
    else:
        fix = f"run the evaluation loop under `torch.no_grad()` or `torch.inference_mode()`. {allow}"
    return Explanation(problem, fix, {"saved_mib": event.saved_bytes / MIB, "modules": modules})


def graph_in_outputs(
    returned_by: str, subject: str, tally: TensorTally, kept_mib: float, grad_off_around: bool
) -> Explanation:
    """``returned_by`` (the step, the model) returned tensors still attached to an autograd graph; ``subject`` is
    the finding's (``"validation_step outputs"``), which ``allow_grad`` silences."""
    problem = (
        f"{returned_by} returned {tally.attached} tensor(s) still attached to an autograd graph, which keeps the "
        f"whole graph alive ({kept_mib:.3f} MiB: the tensors and what their graph saved for backward)"
    )
    keep = f" If it returns them on purpose, {allow_hint('allow_grad', subject)}"
    if grad_off_around:
        fix = f"return `.detach()`ed tensors, and remove the `torch.enable_grad()` the forward ran under.{keep}"
    else:
        fix = f"run the evaluation loop under `torch.no_grad()` or `torch.inference_mode()`.{keep}"
    return Explanation(problem, fix, {"tensors": tally.attached, "mib": kept_mib, "tensor_mib": tally.attached_mib})


def graph_in_attribute(name: str, root_type: str, tally: TensorTally, kept_mib: float, when: str) -> Explanation:
    """An attribute of the model holds tensors attached to a graph at an evaluation epoch's end."""
    filled = f"was filled {when} and " if when else ""
    return Explanation(
        f"`self.{name}` on the {root_type} {filled}holds {tally.attached} tensor(s) still attached to an autograd "
        f"graph, keeping their graphs alive ({kept_mib:.3f} MiB: the tensors and what their graphs saved for backward)",
        f"store `.detach()`ed tensors in `self.{name}` (and clear it at epoch end). If it keeps them on purpose, "
        + allow_hint("allow_grad", f"self.{name}"),
        {"tensors": tally.attached, "mib": kept_mib, "tensor_mib": tally.attached_mib},
    )


def growing_collection(name: str, tensors: int, mib: float, devices: list[str], epoch_end_hook: str) -> Explanation:
    """An attribute's collection of tensors grows from epoch to epoch and is never cleared."""
    return Explanation(
        f"`self.{name}` keeps growing across epochs: it now holds {tensors} tensors "
        f"({mib:.3f} MiB on {', '.join(devices)}) and is never cleared",
        f"call `self.{name}.clear()` at the end of `{epoch_end_hook}`. If it grows on purpose, "
        + allow_hint("allow", f"self.{name}"),
        {"tensors": tensors, "mib": mib, "devices": devices},
    )


REPLAY_SUBJECT = "savings replay"
"""The subject of a ``grad_replay_oom`` finding: the measurement, not a module."""


def grad_replay_oom() -> Explanation:
    """The replay with gradients on ran out of memory: no_grad is what lets the batch run."""
    return Explanation(
        "with gradients on, this batch does not fit in memory: no_grad is what makes it run",
        "keep evaluation under `torch.no_grad()` / `inference_mode` (Lightning's default); nothing else to do, this "
        f"is what the savings metrics would have shown. To not be told again, {allow_hint('allow', REPLAY_SUBJECT)}",
        {},
    )


def inference_tensor(path: str, kind: str) -> Explanation:
    """A buffer or tensor attribute created under ``torch.inference_mode`` is held as training starts."""
    return Explanation(
        f"the {kind} `{path}` was created under `torch.inference_mode` (e.g. while evaluating); the next backward "
        "that uses it fails with 'Inference tensors cannot be saved for backward'",
        "rebuild it outside inference mode before training (`self.x = self.x.clone()`), or evaluate under "
        "`torch.no_grad()` instead (Lightning: `Trainer(inference_mode=False)`). If training never uses it, "
        + allow_hint("allow", path),
        {},
    )


def eval_mode_at_start(path: str, layers: list[tuple[str, str]], root_type: str) -> Explanation:
    """Dropout / batch-norm layers (path, class) in eval mode inside a trainable block as training starts."""
    listed = [f"{name} ({kind})" for name, kind in layers]
    return Explanation(
        f"{display_name(path, root_type)} is in eval mode as training starts, with trainable parameters around "
        f"layers that behave differently in train mode: {shown(listed)}",
        "call `.train()` on it before training (models loaded with `from_pretrained` arrive in eval mode), or "
        "freeze its parameters if it is meant to stay fixed. If these layers train in eval mode on purpose, "
        + allow_hint("allow", [name for name, _ in layers], root_type),
        {"layers": listed},
    )


def eval_mode_leak(path: str, module: nn.Module, root_type: str, fixed: bool, layers: list[str]) -> Explanation:
    """A module that trained earlier is in eval mode during training: an ``.eval()`` not undone. ``layers``: those in
    it that behave differently in train mode, which the pattern that silences it names (the module, if none)."""
    action = "; it was put back in train mode" if fixed else ""
    kind = "" if not path else f" ({class_name(module)})"
    return Explanation(
        f"{display_name(path, root_type)}{kind} is in eval mode during training although it "
        f"was in train mode earlier in the fit: something called `.eval()` and did not switch back{action}",
        "call `.train()` again after the code that evaluates it. If it trains in eval mode on purpose, "
        + allow_hint("allow", layers or [path], root_type),
        {"layers": layers},
    )


def stray_graph(event: GraphEvent, modules: list[str], hook: str, root_type: str) -> Explanation:
    """A forward outside the training step recorded a graph that no backward will use."""
    return Explanation(
        f"{display_name(event.module, root_type)} ran a forward in `{hook}`, outside the training step, with "
        f"gradients on: it recorded an autograd graph that no backward will use "
        f"({format_bytes(event.saved_bytes)} saved for backward)",
        "wrap that code in `torch.no_grad()` (or `torch.inference_mode()`). If that graph is needed, "
        + allow_hint("allow", modules or [event.module], root_type),
        {"saved_mib": event.saved_bytes / MIB, "modules": modules},
    )


def grad_without_step(
    path: str,
    parameters: list[str],
    modules: list[str],
    kinds: dict[str, int],
    mib: float,
    groups: list[str],
    root_type: str,
) -> Explanation:
    """Trainable parameters of ``modules`` (``kinds``: how many of each class) got a gradient in a training step,
    but no optimizer steps them: one cause, the optimizers were built without them."""
    layers = ", ".join(f"{kind} x{count}" if count > 1 else kind for kind, count in kinds.items())
    where = (
        f"{display_name(path, root_type)}"
        if len(modules) == 1
        else (f"{len(modules)} modules of {display_name(path, root_type)} ({layers})")
    )
    return Explanation(
        f"{len(parameters)} parameter(s) of {where} get a gradient in every backward "
        f"({format_bytes(mib * MIB)} of gradients) but no optimizer steps them ({shown(parameters)}): backward "
        f"spends time and memory on them and they never change; the optimizers hold: {'; '.join(groups)}",
        "add them to an optimizer (a parameter group of their own, with its learning rate), or set "
        f"`requires_grad_(False)` on them if they are meant to stay fixed. If they are kept out on purpose, "
        f"{allow_hint('allow', [path] if path else modules, root_type)}",
        {"parameters": parameters, "modules": modules, "gradient_mib": mib, "optimizer_groups": groups},
    )
