"""Detects modules whose forward runs in train mode while the model should be evaluating.

Cost model: the modes are read by one pass over a cached module list at every stage and epoch
start, and again only after a mode switch (``lightning_nograd.core.plumbing.counters.ModeSwitches``): a
batch in which no module's mode changed visits no module. A clean model (everything in eval mode)
gets no hooks at all, so fused inference paths (``nn.TransformerEncoderLayer``) stay on. Only when
some module is found in train mode does a *global* forward pre-hook go in, for as long as it is
needed; global hooks, unlike per-module hooks, do not switch off the fused paths. A mode assigned
directly (``module.training = True``, not through ``train()``) during a batch is seen at the next
epoch start.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_nograd.core.plumbing.counters import ModeSwitches, mode_switches, visits
from lightning_nograd.core.plumbing.faults import Probe, isolated, isolated_method
from lightning_nograd.core.plumbing.module_paths import NamePatterns, mode_modules, parent_path

MODE_SENSITIVE_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.dropout._DropoutNd,
    nn.modules.batchnorm._NormBase,
    nn.RNNBase,
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


def train_mode_layers(
    module: nn.Module, prefix: str, allowed: Callable[[str], bool] | None = None, order: dict[int, int] | None = None
) -> tuple[list[tuple[str, nn.Module]], bool]:
    """The layers in ``module`` (itself included) that are in train mode and behave differently there, those
    ``allowed`` left out, in the order the forward ran them where ``order`` (module ``id`` -> first call)
    knows it; and whether any were left out.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.BatchNorm1d(2))
        >>> [path for path, _ in train_mode_layers(net, "", order={id(net[2]): 0, id(net[1]): 1})[0]]
        ['2', '1']
    """
    found = [
        (name, child)
        for name, child in module.named_modules(prefix=prefix)
        if child.training and isinstance(child, MODE_SENSITIVE_TYPES)
    ]
    kept = [(name, child) for name, child in found if allowed is None or not allowed(name)]
    if order:
        last = len(order)
        kept.sort(key=lambda item: order.get(id(item[1]), last))
    return kept, len(kept) < len(found)


class ModeProbe(Probe):
    """Watches a module tree for forwards that run in train mode.

    Args:
        root: the module tree to watch (the LightningModule).
        allowed: modules that legitimately stay in train mode (MC dropout); never reported, nor is a module
            whose layers that behave differently in train mode are all allowed.
        on_train_forward: called with (topmost train-mode module path, module, confirmed, its layers that
            behave differently in train mode, in the order the forward ran them) at the end of the batch in
            which a forward in train mode started (``confirmed=True``; as it starts with ``report_at_once``),
            or for a module that user code switched to train mode during the batch (``confirmed=False``: its
            forward may have run before the switch); may raise to stop the run.
        fix: put the offending module (and everything below it) in eval mode before its
            forward runs.
        report_at_once: report as the forward starts (``on_violation="error"`` stops there), the layers then
            in the order they are defined.
        locate: where a forward in train mode was found, asked as it starts (the callbacks name the hook that
            ran it); passed on with the report as its last argument (``None`` without it, or when switched).

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).eval()
        >>> _ = net[1].train()
        >>> seen = []
        >>> probe = ModeProbe(net, NamePatterns("allow", ()), lambda p, m, c, layers, hook: seen.append(p), fix=True)
        >>> probe.refresh(); probe.before_batch()
        >>> _ = net(torch.ones(1, 2)); probe.after_batch()
        >>> seen, net[1].training
        (['1'], False)
    """

    def __init__(
        self,
        root: nn.Module,
        allowed: NamePatterns,
        on_train_forward: Callable[[str, nn.Module, bool, list[tuple[str, nn.Module]], str | None], None],
        fix: bool,
        on_error: Callable[[BaseException], None] | None = None,
        report_at_once: bool = False,
        locate: Callable[[], str | None] | None = None,
    ) -> None:
        self.on_error = on_error
        self.root = root
        self.allowed = allowed
        self.on_train_forward = on_train_forward
        self.fix = fix
        self.report_at_once = report_at_once
        self.locate = locate
        self._calls: dict[int, int] = {}  # module id -> order of its first call in a watched batch
        # found as their forward started (with where), reported at the batch end
        self._pending: list[tuple[str, nn.Module, str | None]] = []
        self._modules: list[tuple[str, nn.Module, nn.Module | None]] = []
        self._watch: dict[int, str] = {}
        self._reported_this_epoch: set[str] = set()
        self._fixed: dict[int, str] = {}
        self._train_at_start: set[int] = set()
        self._handle: RemovableHandle | None = None
        self._tops: dict[int, str] = {}
        self._switches_seen: int | None = None  # None: read the modes at the next batch
        # settled: every module was read in eval mode, none switched since, none to keep fixed, so that
        # before_batch and after_batch have nothing to do. The loops test `settled_at == mode_switches.count`
        # (two attributes: every batch pays for it); None while not settled
        self.settled_at: int | None = None
        ModeSwitches.listen(self)

    @isolated_method
    def refresh(self) -> None:
        """Re-read the module tree (at every stage and epoch start) and forget epoch state."""
        by_name: dict[str, nn.Module] = {}
        modules: list[tuple[str, nn.Module, nn.Module | None]] = []
        for name, module in mode_modules(self.root):
            by_name[name] = module
            if self.allowed.matches(name):
                continue
            parent = by_name.get(parent_path(name)) if name else None
            modules.append((name, module, parent))
        self._modules = modules
        self._reported_this_epoch = set()
        self._switches_seen = None
        self.settled_at = None

    def _train_mode_tops(self) -> dict[int, str]:
        """Every non-allowed module in train mode, mapped to its topmost train-mode ancestor.

        Read again only when some module's mode was switched since the last reading.
        """
        if self._switches_seen == mode_switches.count:
            return self._tops
        self._switches_seen = mode_switches.count
        visits.modules += len(self._modules)
        top_of: dict[int, str] = {}
        for name, module, parent in self._modules:
            if not module.training:
                continue
            if parent is not None and id(parent) in top_of:
                top_of[id(module)] = top_of[id(parent)]
            else:
                top_of[id(module)] = name
        self._tops = top_of
        return top_of

    def _note_settled(self) -> None:
        """Note whether the probe is settled now (after anything that changes its state): ``settled_at``."""
        quiet = not self._tops and not self._fixed and self._handle is None
        self.settled_at = self._switches_seen if quiet else None

    @isolated_method
    def before_batch(self) -> None:
        """Find train-mode modules and, if any need watching, install the global pre-hook."""
        top_of = self._train_mode_tops()
        self._train_at_start = set(top_of)
        watch = {key: top for key, top in top_of.items() if top not in self._reported_this_epoch}
        watch.update({k: v for k, v in self._fixed.items() if k not in watch})
        self._watch = watch
        self._calls = {}
        if watch and self._handle is None:
            self._handle = nn.modules.module.register_module_forward_pre_hook(isolated(self._pre_forward, self))
        elif not watch:
            self._remove_hook()
        self._note_settled()

    @isolated_method
    def after_batch(self) -> None:
        """Remove the global pre-hook; report the modules found in train mode as their forward started (their
        layers in the order the batch ran them), then those switched to train mode during the batch."""
        self._remove_hook()
        pending, self._pending = self._pending, []
        for top, module, where in pending:
            self._report(top, module, True, where)
        switched = {
            top
            for key, top in self._train_mode_tops().items()
            if key not in self._train_at_start and top not in self._reported_this_epoch
        }
        for top in sorted(switched):
            self._reported_this_epoch.add(top)
            module = self.root.get_submodule(top) if top else self.root
            self._report(top, module, False, None)
            if self.fix:
                self._fixed[id(module)] = top
        self._calls = {}
        self._note_settled()

    def _report(self, top: str, module: nn.Module, confirmed: bool, where: str | None) -> None:
        layers, left_out = train_mode_layers(module, top, self.allowed.matches, self._calls)
        if left_out and not layers:
            return  # every layer that behaves differently in train mode is allowed to
        self.on_train_forward(top, module, confirmed, layers, where)

    def close(self) -> None:
        """Remove every hook and drop references to the model."""
        ModeSwitches.stop(self)
        self._remove_hook()
        self._tops = {}
        self._modules = []
        self._watch = {}
        self._fixed = {}
        self._train_at_start = set()
        self._calls, self._pending = {}, []
        self.root = nn.Module()
        self.settled_at = None

    def fixed_modules(self) -> set[str]:
        """Paths of the modules put in eval mode so far, to keep watching in the next stage run."""
        return set(self._fixed.values())

    def keep_fixing(self, paths: set[str]) -> None:
        """Watch modules fixed in an earlier run of the same stage from the first batch on."""
        for path in paths:
            try:
                module = self.root.get_submodule(path) if path else self.root
            except AttributeError:
                continue
            self._fixed[id(module)] = path
        self._note_settled()

    def _remove_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        self._calls.setdefault(id(module), len(self._calls))
        top = self._watch.get(id(module))
        if top is None or not module.training:
            return
        top_module = self.root.get_submodule(top) if top else self.root
        if top not in self._reported_this_epoch:
            self._reported_this_epoch.add(top)
            where = self.locate() if self.locate is not None else None
            if self.report_at_once:
                self._report(top, top_module, True, where)
            else:
                self._pending.append((top, top_module, where))
        if self.fix:
            top_module.train(False)
            self._fixed[id(top_module)] = top


def is_grad_recording() -> bool:
    """Whether an operation run now would record an autograd graph (grad on, not inference mode)."""
    return torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
