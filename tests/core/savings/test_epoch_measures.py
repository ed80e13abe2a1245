from __future__ import annotations

import platform
import sys

import pytest
import torch

from lightning_nograd.core.savings.epoch_measures import (
    SETTLED_MALLOC_ENV,
    EpochClock,
    EpochPeakMemory,
    LiveTensorMemory,
    cpu_timing_caveat,
    peak_bytes_of,
)


def test_live_tensor_memory_counts_storages_once_and_subtracts_frees() -> None:
    with LiveTensorMemory() as memory:
        a = torch.ones(1024)  # 4 KiB
        view = a[:10]
        b = a + 1  # 4 KiB more
        del a, view, b
        c = torch.ones(256)
    assert memory.peak_bytes == 8192
    assert memory.current_bytes == 1024
    del c


def test_peak_of_a_graph_is_larger_with_gradients_on() -> None:
    # four Linear + ReLU: without gradients only two activations are ever alive at once
    net = torch.nn.Sequential(*[layer for _ in range(4) for layer in (torch.nn.Linear(64, 64), torch.nn.ReLU())])
    x = torch.randn(32, 64)

    def run(grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            return net(x)

    on = peak_bytes_of(lambda: run(True), torch.device("cpu"))
    off = peak_bytes_of(lambda: run(False), torch.device("cpu"))
    activation = 32 * 64 * 4
    assert off == 2 * activation
    assert on >= 4 * activation
    assert on == peak_bytes_of(lambda: run(True), torch.device("cpu")), "exact and repeatable"


def test_clock_excludes_pauses_and_memory_peak_is_positive() -> None:
    clock = EpochClock(torch.device("cpu"))
    memory = EpochPeakMemory(torch.device("cpu"))
    memory.start()
    clock.start()
    clock.pause()
    torch.ones(10_000_000).sum()
    clock.resume()
    memory.sample()
    assert clock.stop() < 1.0
    assert memory.peak_mib() > 0


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)
@pytest.mark.parametrize(
    ("environ", "caveat"),
    [
        ({}, True),
        ({"MALLOC_TRIM_THRESHOLD_": "1073741824"}, True),  # one threshold alone is worse, not settled
        (dict(SETTLED_MALLOC_ENV), False),
        ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"}, False),
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, False),
    ],
)
def test_cpu_timing_caveat_names_the_unsettled_glibc_allocator(environ: dict[str, str], caveat: bool) -> None:
    text = cpu_timing_caveat(environ)
    assert (text is not None) is caveat
    if text is not None:
        assert "MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824" in text
