"""The replay that measures what disabling gradients saves, on the user's own model and data.

``Replay`` runs the tape ``lightning_nograd.core.savings.recording.StepRecorder`` recorded during one
evaluation batch (its module calls and the functional code between them) again, with gradients on
and off, in eval mode, with RNG state and the modules' attributes restored, and measures graph bytes,
peak memory and time (settled blocks of timed runs). No user hook or step is re-run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_nograd.core.checks.graph import SAVED_TENSOR_HOOKS
from lightning_nograd.core.checks.tensors import storage_bytes, storage_key
from lightning_nograd.core.plumbing.counters import mode_switches
from lightning_nograd.core.plumbing.torch_internals import (
    UserHooksOff,
)
from lightning_nograd.core.savings.epoch_measures import peak_bytes_of, synchronize
from lightning_nograd.core.savings.estimate import ReplayResult, TimedBlock
from lightning_nograd.core.savings.recording import Tape, run_tape

EAGER_REPLAY_NOTE = (
    "compiled modules were replayed eagerly (their `_orig_mod`): the figures are those of the eager forward, "
    "and the compiled code is never run by the replay"
)


def graph_bytes_of(tape: Tape, exclude: set[tuple[str, int]]) -> int:
    """Bytes autograd saves for backward in one grad-enabled run of ``tape``.

    Each storage is counted once, at its full size; parameters and buffers (``exclude``) are left
    out because they exist anyway.
    """
    seen: dict[tuple[str, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = storage_key(tensor)
        if key not in exclude:
            seen[key] = storage_bytes(tensor)
        # detached: a node holding one of its own outputs would be a cycle through C++ that the garbage
        # collector cannot see, and the whole graph would stay allocated (seen on an H100: gigabytes)
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run_tape(tape, grad=True)
    return sum(seen.values())


def _weight_hook_types() -> tuple[type, ...]:
    """PyTorch's hooks that compute a module's weights (pruning masks, old-style weight / spectral norm)."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return (BasePruningMethod, WeightNorm, SpectralNorm)


def torch_runs_the_module(hook: Any, weight_hooks: tuple[type, ...] = ()) -> bool:
    """Whether a module's ``hook`` is part of how PyTorch runs it, not an observer: a weight hook
    (``weight_hooks``), or a hook of ``torch.distributed`` (FSDP2 gathers a module's parameters
    in its forward pre-hook and frees them in its forward hook, tensor parallelism moves inputs
    and outputs between meshes)."""
    if weight_hooks and isinstance(hook, weight_hooks):
        return True
    return str(getattr(hook, "__module__", "") or "").startswith("torch.distributed.")


def _user_hooks_off(roots: list[nn.Module]) -> UserHooksOff:
    """No forward or backward hook of the user's (module-level or global) fires inside the block.

    A replay re-runs module calls: a feature-capture or statistics hook would see them as real
    batches. Only the hooks PyTorch runs the modules with stay (``torch_runs_the_module``).
    """
    weight_hooks = _weight_hook_types()
    modules = {id(m): m for root in roots for m in root.modules()}.values()
    return UserHooksOff(modules, lambda hook: torch_runs_the_module(hook, weight_hooks))


_MISSING = object()


class _EvalModeAndRng:
    """Puts the replayed modules in eval mode and restores modes, RNG state and the modules' attributes
    afterwards (a ``forward`` that keeps ``self.last_attention = weights`` must not be left holding the
    replay's grad-attached tensor)."""

    def __init__(self, modules: list[nn.Module], device: torch.device) -> None:
        self.modules = modules
        self.device = device
        self._modes: list[tuple[nn.Module, bool]] = []
        self._attributes: list[tuple[nn.Module, dict[str, Any]]] = []
        self._cpu_rng: torch.Tensor | None = None
        self._cuda_rng: list[torch.Tensor] | None = None
        self._switches = 0

    def __enter__(self) -> None:
        self._modes = [(m, m.training) for root in self.modules for m in root.modules()]
        self._attributes = [(m, dict(vars(m))) for m, _ in self._modes]
        self._switches = mode_switches.count
        for root in self.modules:
            root.train(False)
        self._cpu_rng = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            self._cuda_rng = torch.cuda.get_rng_state_all()

    def __exit__(self, *exc: object) -> None:
        for module, mode in self._modes:
            module.training = mode
        for module, before in self._attributes:
            state = vars(module)
            for name in [name for name in state if name not in before]:
                del state[name]
            for name, value in before.items():
                if state.get(name, _MISSING) is not value:
                    state[name] = value
        self._attributes = []
        # the modes are as they were: our own switches are no reason for the checks to read them again
        mode_switches.count = self._switches
        if self._cpu_rng is not None:
            torch.set_rng_state(self._cpu_rng)
        if self._cuda_rng is not None:
            torch.cuda.set_rng_state_all(self._cuda_rng)


#: Untimed runs before the timed run of each grad mode in a block.
SETTLING_RUNS = 2
#: Runs one timed pair costs: each is a block of its own, one settled timed run per grad mode. Many small
#: blocks give a far narrower honest interval than a few long ones for the same runs (the spread between
#: blocks, not between the runs of one, is what varies: the allocator's state moves a whole block).
RUNS_PER_PAIR = 2 * (SETTLING_RUNS + 1)


def _timed_runs(
    tape: Tape, grad: bool, device: torch.device, runs: int, deadline: float | None = None
) -> tuple[list[float], list[float]]:
    """The process CPU seconds and the wall seconds of each of ``runs`` runs of ``tape``, timed one by one after
    two untimed runs in the same grad mode; fewer when ``deadline`` (a ``time.perf_counter()`` value) passes.

    A run straight after one in the other mode is slowed by the allocator reshaping its memory
    (a ResNet under no_grad runs about a quarter slower after a grad-enabled run than after another
    no_grad run), which hides the very difference being measured; one settling run was not always
    enough after a 50 MiB graph was freed, two were. An evaluation epoch runs every batch in one
    mode, so the settled runs are the ones that match it. Timing a block of runs after the settling
    ones pays for settling once per block, not once per run.

    The outputs are dropped inside each timed window: every real batch frees its graph (each
    node and saved tensor, host work that is most of the difference where kernels are fast), so
    freeing it is part of what gradients cost.
    """
    for _ in range(SETTLING_RUNS):
        run_tape(tape, grad)
    cpu, wall = [], []
    for _ in range(runs):
        if deadline is not None and time.perf_counter() > deadline:
            break
        synchronize(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        run_tape(tape, grad)
        synchronize(device)
        cpu.append(time.process_time() - cpu_started)
        wall.append(time.perf_counter() - started)
    return cpu, wall


class Replay:
    """Replays one batch's tape, a little at a time.

    ``measure_memory`` runs once (graph bytes and both peaks; ``memory_run_seconds`` is
    what its two runs took, the profiler's start and stop left out);
    ``time_pairs`` adds settled blocks of timed runs (``lightning_nograd.core.savings.estimate``), each block
    starting with the other grad mode than the one before, so a slow moment of the machine does not
    always fall on the same side. On a CPU the runs are timed by the process's CPU time as well as the
    wall clock (``ReplayResult.clock``).

    Args:
        tape: what one batch ran (``lightning_nograd.core.savings.recording.replayable``: inference-mode inputs cloned).
        device: where the model runs (CUDA is synchronised around every timing).
        exclude_storages: parameter and buffer storages, not counted as graph memory.

    A grad-enabled run that raises ``torch.OutOfMemoryError`` leaves ``result.out_of_memory=True``
    (its memory freed) and the run goes on.
    """

    def __init__(
        self,
        tape: Tape,
        device: torch.device,
        exclude_storages: set[tuple[str, int]],
    ) -> None:
        self.tape = tape
        self.device = device
        self.exclude_storages = exclude_storages
        self.result = ReplayResult(clock="cpu" if device.type == "cpu" else "wall")
        self.run_seconds = 0.0
        self._blocks = 0
        self.memory_run_seconds = 0.0
        self._modules = tape.modules

    def _guarded(self, work: Callable[[], None]) -> None:
        if self.result.out_of_memory:
            return
        with _EvalModeAndRng(self._modules, self.device), SAVED_TENSOR_HOOKS.paused(), _user_hooks_off(self._modules):
            try:
                work()
            except torch.OutOfMemoryError:
                self.result.out_of_memory = True
                self.result.blocks = []

    def measure_memory(self) -> None:
        """Graph bytes and peak memory with gradients on and off (one run each)."""

        def work() -> None:
            tape, device = self.tape, self.device
            graph: list[int] = []
            # one run with gradients on gives both the graph's bytes and the peak (the counting hook
            # adds no storage), one run with them off the other peak
            self.result.peak_on_bytes = peak_bytes_of(
                self._clocked(lambda: graph.append(graph_bytes_of(tape, self.exclude_storages))), device
            )
            self.result.graph_bytes = graph[0]
            self.result.peak_off_bytes = peak_bytes_of(self._clocked(lambda: run_tape(tape, grad=False)), device)

        self._guarded(work)

    def _clocked(self, run: Callable[[], Any]) -> Callable[[], Any]:
        """``run``, adding what it takes to ``memory_run_seconds``."""

        def clocked() -> Any:
            start = time.perf_counter()
            try:
                return run()
            finally:
                synchronize(self.device)
                self.memory_run_seconds += time.perf_counter() - start

        return clocked

    def time_pairs(self, pairs: int, deadline: float | None = None) -> None:
        """Add ``pairs`` timed pairs, each a block of its own: one timed run per grad mode, each after its
        settling runs; which mode goes first alternates from block to block. A ``deadline`` that passes ends
        them early (a block is kept only whole); ``run_seconds`` is then what one run cost."""

        def work() -> None:
            started = time.perf_counter()
            runs = 0
            for _ in range(pairs):
                first = self._blocks % 2 == 0
                self._blocks += 1
                timed: dict[bool, tuple[list[float], list[float]]] = {}
                for grad in (first, not first):
                    timed[grad] = _timed_runs(self.tape, grad, self.device, 1, deadline)
                    runs += SETTLING_RUNS + len(timed[grad][0])
                    if not timed[grad][0]:  # the deadline passed: no half block is kept
                        self.run_seconds = (time.perf_counter() - started) / max(runs, 1)
                        return
                clock = 0 if self.result.clock == "cpu" else 1
                self.result.blocks.append(TimedBlock(timed[True][clock], timed[False][clock], timed[False][1]))
            self.run_seconds = (time.perf_counter() - started) / max(runs, 1)

        self._guarded(work)
