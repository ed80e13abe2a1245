"""What a finding is, and the policy that turns a new finding into a warning or an error.

Framework-free: the Lightning callbacks feed findings in and decide only whether this process
may print (rank zero).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, get_args

from lightning_nograd.core.plumbing import stack
from lightning_nograd.core.plumbing.arguments import check_choice
from lightning_nograd.errors import NoGradError, NoGradWarning

OnViolation = Literal["warn", "fix", "error"]
ON_VIOLATION_CHOICES: tuple[str, ...] = get_args(OnViolation)


@dataclass(frozen=True)
class Policy:
    """``on_violation`` decoded once, into what the checks do with a violation.

    Attributes:
        name: ``"warn"``, ``"fix"`` or ``"error"``, as given.
        fixes: put what is wrong right where a check can (eval mode for a module evaluating in train mode,
            train mode back for one whose eval mode leaked into training), and warn.
        raises: stop the run with ``lightning_nograd.NoGradError`` at the first violation.

    Examples:
        >>> Policy.of("fix")
        Policy(name='fix', fixes=True, raises=False)
        >>> Policy.of("stop")
        Traceback (most recent call last):
        ...
        ValueError: Expected argument `on_violation` to be one of 'warn', 'fix', 'error', but got 'stop'.
    """

    name: str
    fixes: bool
    raises: bool

    @classmethod
    def of(cls, on_violation: object) -> Policy:
        """The policy of ``on_violation``; a ``ValueError`` naming the argument for any other value."""
        name = check_choice("on_violation", on_violation, ON_VIOLATION_CHOICES)
        return cls(name, fixes=name == "fix", raises=name == "error")


@dataclass(frozen=True)
class Finding:
    """One distinct problem, named precisely enough to fix.

    Args:
        kind: what went wrong (``"train_mode"``, ``"no_grad_module"``, ...; the docs' Findings page lists them all).
        subject: the ``named_modules()`` / ``named_parameters()`` path or attribute name.
        stage: ``"val"``, ``"test"``, ``"predict"`` or ``"train"``.
        hook: the hook or step in which it happened, e.g. ``"validation_step"``.
        batch_idx: first batch index at which it was seen (``None`` outside batches).
        epoch: trainer epoch at which it was first seen.
        problem: one sentence on what was observed.
        fix: one sentence on how to fix it.
        details: plain, JSON-serialisable extras (sizes, counts, parameter names).
        run: the Trainer call it happened in (``"fit"``, ``"validate"``, ``"test"``, ``"predict"``);
            ``None`` outside Lightning (``audit()``, ``check_training_step``).
        ranks: the ranks of a distributed run that saw it (``()`` in a run of one process).
        call: which Trainer call of the report it was first seen in (``Report.add_finding`` says; 0 outside one).
    """

    kind: str
    subject: str
    stage: str
    hook: str
    batch_idx: int | None
    epoch: int
    problem: str
    fix: str
    details: dict[str, Any] = field(default_factory=dict)
    run: str | None = None
    ranks: tuple[int, ...] = ()
    call: int = 0

    @property
    def key(self) -> tuple[str, str, str, str]:
        """Identity of a finding: the same kind, subject, stage and hook is the same finding."""
        return (self.kind, self.subject, self.stage, self.hook)

    @property
    def message(self) -> str:
        """The full text of the warning or error."""
        where = f"{STAGE_WORDS.get(self.stage, self.stage)}, `{self.hook}`"
        if self.batch_idx is not None:
            where += f", first at batch {self.batch_idx}"
        if self.ranks:
            where += f", on rank{'s' if len(self.ranks) > 1 else ''} {', '.join(map(str, self.ranks))}"
        return f"[lightning-nograd] {self.problem} ({where}). Fix: {self.fix}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, message included."""
        data = asdict(self)
        data["ranks"] = list(self.ranks)
        data["message"] = self.message
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        """The finding ``to_dict`` described (its ``message`` is derived, not read)."""
        fields = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        fields["ranks"] = tuple(int(rank) for rank in data.get("ranks", ()))
        return cls(**fields)


STAGE_WORDS = {
    "val": "validation",
    "test": "test",
    "predict": "predict",
    "train": "training",
}


def display_name(path: str, root_type: str = "LightningModule") -> str:
    """The user-facing name of a module path; the root module has the empty path."""
    return f"`{path}`" if path else f"the whole {root_type}"


def common_ancestor(paths: list[str]) -> str:
    """Deepest module path that contains every path in ``paths`` (``""`` is the root).

    Examples:
        >>> common_ancestor(["net.0", "net.1", "net.3"])
        'net'
    """
    if not paths:
        return ""
    split = [p.split(".") if p else [] for p in paths]
    prefix: list[str] = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        prefix.append(parts[0])
    if len(paths) == 1:
        return paths[0]
    return ".".join(prefix)


def _package_dirs() -> tuple[str, ...]:
    """Directories of the packages between a user's script and our warnings: ours, Lightning, torch."""
    import importlib.util
    import os

    dirs: list[str] = []
    for name in (
        "lightning_nograd",
        "lightning",
        "pytorch_lightning",
        "lightning_fabric",
        "lightning_utilities",
        "torch",
    ):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.submodule_search_locations:
            dirs.extend(os.path.abspath(d) for d in spec.submodule_search_locations)
    return tuple(os.path.join(d, "") for d in dirs)


_PACKAGE_DIRS: tuple[str, ...] | None = None


def _installed(filename: str) -> bool:
    """Whether ``filename`` belongs to an installed package (torchvision, transformers...), not the user's code."""
    return any(part in filename for part in ("/site-packages/", "/dist-packages/", "\\site-packages\\"))


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by our caller point at the user's code.

    That is the first frame outside lightning-nograd, Lightning, torch and every other installed
    package (torchvision, transformers, ...): usually the line of the user's script that called
    ``trainer.fit`` / ``validate`` / ``test``, or their own code that called into us. Falls back to
    our caller's caller when the whole stack is library code.
    """
    global _PACKAGE_DIRS
    if _PACKAGE_DIRS is None:
        _PACKAGE_DIRS = _package_dirs()
    # from the function that will call warnings.warn: stacklevel 1
    for level, frame in enumerate(stack.outward(stack.caller()), start=1):
        filename = frame.f_code.co_filename
        if not filename.startswith(_PACKAGE_DIRS) and not filename.startswith("<") and not _installed(filename):
            return level
    return 2


class FindingLog:
    """Collects findings, de-duplicates them per run and applies ``on_violation``.

    Args:
        policy: what a new finding does: warn once per distinct finding, or raise (``Policy.raises``).
        category: the warning class used for new findings.

    Examples:
        >>> log = FindingLog(Policy.of("warn"))
        >>> f = Finding("train_mode", "head", "val", "validation_step", 0, 0, "p", "f")
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     log.add(f); log.add(f)
        True
        False
        >>> len(seen), len(log.findings)
        (1, 1)
    """

    def __init__(
        self,
        policy: Policy,
        category: type[NoGradWarning] = NoGradWarning,
        on_new: Callable[[Finding], None] | None = None,
        on_ranks_added: Callable[[Finding, Finding], None] | None = None,
    ) -> None:
        self.policy = policy
        self.category = category
        self.may_warn = True
        self.findings: list[Finding] = []
        self._seen: set[tuple[str, str, str, str]] = set()
        self._held: dict[tuple[str, str, str, str], int] = {}  # key -> index in `findings`
        self._epoch_keys: dict[str, set[tuple[str, str, str, str]]] = {}
        self.listeners: list[Callable[[Finding], None]] = [on_new] if on_new is not None else []
        # called with (old, new) when other ranks saw a finding this one holds already
        self.rank_listeners: list[Callable[[Finding, Finding], None]] = (
            [on_ranks_added] if on_ranks_added is not None else []
        )
        self.rank: int | None = None  # this process's rank in a distributed run
        self._unshared: list[Finding] = []  # new here since the last ``export``

    def join_run(self, rank: int | None, warns: bool) -> None:
        """Take part in a run as ``rank`` (``None``: the only process); only a log that ``warns`` (rank
        zero's) prints warnings, while every rank records its findings and names its rank in them."""
        self.rank = rank
        self.may_warn = warns

    def add(self, finding: Finding) -> bool:
        """Record ``finding``; warn or raise when it is new. Returns whether it was new."""
        if self.rank is not None and not finding.ranks:
            finding = replace(finding, ranks=(self.rank,))
        return self._add(finding, local=True)

    def _add(self, finding: Finding, local: bool) -> bool:
        self._epoch_keys.setdefault(finding.stage, set()).add(finding.key)
        if finding.key in self._seen:
            if finding.ranks:
                self._add_ranks(finding)
            return False
        self._seen.add(finding.key)
        self._held[finding.key] = len(self.findings)
        self.findings.append(finding)
        if local:
            self._unshared.append(finding)
        for listener in self.listeners:
            listener(finding)
        if self.policy.raises and local:  # a rank that saw it stops the run; the others only report it
            raise NoGradError(finding.message)
        if self.may_warn:
            warnings.warn(finding.message, self.category, stacklevel=user_stacklevel())
        return True

    def _add_ranks(self, seen: Finding) -> None:
        """``seen`` repeats a finding held here (warned before, or restored from a checkpoint: not held)."""
        i = self._held.get(seen.key)
        if i is None:
            return
        held = self.findings[i]
        if set(seen.ranks) <= set(held.ranks):
            return
        self.findings[i] = updated = replace(held, ranks=tuple(sorted({*held.ranks, *seen.ranks})))
        for listener in self.rank_listeners:
            listener(held, updated)

    def export(self) -> dict[str, Any]:
        """What the other ranks need from this one (plain data): the findings new here since the last
        export, and the keys of every finding seen in the current epoch of each stage."""
        unshared, self._unshared = self._unshared, []
        return {
            "findings": [finding.to_dict() for finding in unshared],
            "epoch": {stage: [list(key) for key in sorted(keys)] for stage, keys in self._epoch_keys.items()},
        }

    def merge(self, exported: list[dict[str, Any]]) -> None:
        """Take in every rank's ``export`` (this rank's own included, and skipped): a finding new
        here is warned once (where warnings are printed), one held already gains the ranks that saw
        it too, and each epoch's distinct findings become those of all ranks."""
        for rank, payload in enumerate(exported):
            if rank == self.rank:
                continue
            for data in payload.get("findings", []):
                self._add(Finding.from_dict(data), local=False)
            for stage, keys in payload.get("epoch", {}).items():
                self._epoch_keys.setdefault(stage, set()).update((k[0], k[1], k[2], k[3]) for k in keys if len(k) == 4)

    def start_epoch(self, stage: str) -> None:
        """Start counting the distinct findings of a new epoch of ``stage``."""
        self._epoch_keys[stage] = set()

    def epoch_count(self, stage: str, kinds: frozenset[str] | None = None) -> int:
        """Distinct findings of ``stage`` seen since ``start_epoch`` (optionally of some kinds)."""
        keys = self._epoch_keys.get(stage, set())
        return sum(1 for key in keys if kinds is None or key[0] in kinds)

    def adopt(self, findings: list[Finding], warned: list[list[str]]) -> None:
        """Hold ``findings`` and the keys ``warned``, as another process's log of the same run held them."""
        self.findings = list(findings)
        self._held = {finding.key: i for i, finding in enumerate(self.findings)}
        self.load_state(warned)

    def state(self) -> list[list[str]]:
        """Keys already warned, as plain lists (for checkpoints)."""
        return [list(key) for key in sorted(self._seen)]

    def load_state(self, keys: list[list[str]]) -> None:
        """Restore warned keys so a resumed run does not warn again."""
        for key in keys:
            if len(key) == 4:
                self._seen.add((key[0], key[1], key[2], key[3]))
