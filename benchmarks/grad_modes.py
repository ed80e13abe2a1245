"""What gradients cost in evaluation: eval-mode forwards with gradients on, under ``no_grad`` and
under ``inference_mode``, on the MLP, ResNet-style CNN and Transformer encoder.

Per model and mode: ms per batch (median and interquartile range over interleaved repeats), the
bytes autograd saves for backward (gradients on only), and the exact peak memory of one batch
(tensor-storage count on CPU, allocator peak on CUDA). The Transformer is also run with PyTorch's
fused inference path switched off, to show how much of its saving comes from that kernel.

    python -m benchmarks.grad_modes [--quick]
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from benchmarks.models import MODELS
from benchmarks.timing import in_fresh_process
from lightning_nograd.core.checks.tensors import MIB
from lightning_nograd.core.savings.epoch_measures import peak_bytes_of, synchronize
from lightning_nograd.core.savings.recording import Tape
from lightning_nograd.core.savings.replay import graph_bytes_of

MODES = ("grad", "no_grad", "inference_mode")


def context(mode: str) -> contextlib.AbstractContextManager[Any]:
    if mode == "grad":
        return torch.enable_grad()
    if mode == "no_grad":
        return torch.no_grad()
    return torch.inference_mode()


@contextlib.contextmanager
def fast_path(enabled: bool) -> Iterator[None]:
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def time_once(forward: Callable[[], Any], mode: str, device: torch.device) -> float:
    """One settled timing: an untimed run in the same mode first (see ``core.replay._timed``)."""
    with context(mode):
        del_out = forward()
        del del_out
        synchronize(device)
        start = time.perf_counter()
        out = forward()
        synchronize(device)
        elapsed = time.perf_counter() - start
    del out
    return elapsed


def measure(name: str, repeats: int, fused: bool = True) -> list[dict[str, Any]]:
    factory, batch_size = MODELS[name]
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = factory().to(device).eval()
    x, _ = next(iter(module.data(1, batch_size)))
    x = x.to(device)

    def forward() -> Any:
        return module(x)

    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    with fast_path(fused):
        for mode in MODES:  # warm-up: the first forwards are 1.1-3x slower
            for _ in range(2):
                time_once(forward, mode, device)
        for rep in range(repeats):
            order = MODES if rep % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                times[mode].append(time_once(forward, mode, device))
        graph = graph_bytes_of(Tape.of_call(module, x), set())
        peaks = {}
        for mode in MODES:

            def run(mode: str = mode) -> Any:
                with context(mode):
                    return forward()

            peaks[mode] = peak_bytes_of(run, device)
    label = name if fused else f"{name} (fused path off)"
    rows = []
    for mode in MODES:
        q1, _, q3 = statistics.quantiles(times[mode], n=4)
        rows.append(
            {
                "model": label,
                "mode": mode,
                "batch_size": batch_size,
                "ms_median": 1e3 * statistics.median(times[mode]),
                "ms_q1": 1e3 * q1,
                "ms_q3": 1e3 * q3,
                "saved_vs_grad_pct": 100 * (1 - statistics.median(times[mode]) / statistics.median(times["grad"])),
                "graph_mib": graph / MIB if mode == "grad" else 0.0,
                "peak_mib": peaks[mode] / MIB,
            }
        )
    return rows


def run_all(quick: bool) -> list[dict[str, Any]]:
    """Every model (and the Transformer without its fused path), each in a fresh process."""
    if quick:  # a smoke run: no fresh processes, no numbers worth reading
        rows = [row for name in MODELS for row in measure(name, 3)]
        return rows + measure("transformer", 3, fused=False)
    flags: list[str] = []
    rows = []
    for name in MODELS:
        rows.extend(in_fresh_process("benchmarks.grad_modes", "--model", name, *flags))
    rows.extend(in_fresh_process("benchmarks.grad_modes", "--model", "transformer", "--no-fused", *flags))
    return rows


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | mode | ms/batch, median [IQR] | time saved vs grad | graph saved for backward "
        "| peak memory of a batch |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        saved = "-" if r["mode"] == "grad" else f"{r['saved_vs_grad_pct']:.1f}%"
        graph = f"{r['graph_mib']:.2f} MiB" if r["mode"] == "grad" else "0"
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['ms_median']:.2f} [{r['ms_q1']:.2f}, {r['ms_q3']:.2f}] "
            f"| {saved} | {graph} | {r['peak_mib']:.2f} MiB |"
        )
    return lines


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", choices=list(MODELS), help="measure one model in this process")
    parser.add_argument("--no-fused", action="store_true", help="switch the fused Transformer path off")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    if args.model:
        rows = measure(args.model, 5 if args.quick else 31, fused=not args.no_fused)
    else:
        rows = run_all(args.quick)
    print(json.dumps(rows) if args.json else "\n".join(table(rows)))
