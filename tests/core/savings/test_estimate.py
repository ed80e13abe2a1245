"""The savings estimate: what the timed replays' blocks mean, as a percentage with its interval."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_nograd.core.savings.estimate import ReplayResult, TimedBlock, time_savings


def blocks(*ratios: float, runs: int = 3, work: float = 0.01) -> list[TimedBlock]:
    """Timed blocks whose runs with gradients on take ``ratio`` times the runs without."""
    return [TimedBlock([work * r] * runs, [work] * runs, [work] * runs) for r in ratios]


def test_the_95_percent_interval_is_made_of_the_spread_between_blocks() -> None:
    clear = ReplayResult(blocks(1.21, 1.19, 1.2, 1.22))
    assert not clear.within_noise() and clear.ratio == pytest.approx(1.205, abs=0.002)
    # every run of a block agreeing tells nothing about the next block: the blocks disagree, so it is noise
    assert ReplayResult(blocks(1.6, 0.8, 1.3, 0.9, runs=10)).within_noise()
    assert ReplayResult().within_noise()
    assert ReplayResult(blocks(2.0, runs=20)).within_noise(), "one block: no interval yet"
    # the interval narrows as blocks accumulate: the same spread over four times the blocks
    few = ReplayResult(blocks(1.2, 1.0, 1.3, 1.1))
    many = ReplayResult(few.blocks * 4)
    assert few.ratio_interval is not None and many.ratio_interval is not None
    assert many.ratio_interval[1] - many.ratio_interval[0] < (few.ratio_interval[1] - few.ratio_interval[0]) / 2


@settings(max_examples=300, deadline=None)
@given(
    on=st.lists(st.floats(1e-6, 10.0), min_size=2, max_size=8),
    off=st.lists(st.floats(1e-6, 10.0), min_size=2, max_size=8),
    wall=st.floats(1e-6, 10.0),
    batches=st.integers(1, 1000),
    epoch_seconds=st.floats(1e-6, 1e4),
)
def test_the_percentage_stays_inside_100_and_a_batch_never_takes_negative_time(
    on: list[float], off: list[float], wall: float, batches: int, epoch_seconds: float
) -> None:
    first, second = len(on) // 2, len(off) // 2
    result = ReplayResult([TimedBlock(on[:first], off[:second], [wall]), TimedBlock(on[first:], off[second:], [wall])])
    metrics, details = time_savings(result, batches, epoch_seconds)
    assert -100 < metrics["time_saved_pct"] < 100
    # with gradients on, the epoch and each batch would still take a positive time
    assert epoch_seconds + metrics["time_saved_s"] > 0
    assert details["time_saved_per_batch_s"] > -epoch_seconds / batches
    err = metrics["time_saved_pct_err"]
    assert err >= 0
    if details["within_noise"]:  # the interval it stands for holds 0
        assert metrics["time_saved_pct"] - err <= 1e-9 <= metrics["time_saved_pct"] + err + 2e-9


def test_time_savings_are_logged_within_noise_too() -> None:
    metrics, details = time_savings(ReplayResult(blocks(1.1, 0.9, 1.05, 0.97)), batches=5, epoch_seconds=0.05)
    assert set(metrics) == {"time_saved_s", "time_saved_pct", "time_saved_pct_err"}
    # the interval straddles 0: its half-width is larger than the estimate
    assert metrics["time_saved_pct_err"] > abs(metrics["time_saved_pct"])
    assert details["within_noise"] and details["savings"].startswith("time difference within noise")
    assert "over 4 blocks" in details["savings"]


def test_a_saving_is_what_the_ratio_makes_of_the_work_never_more_than_the_epochs_own_time() -> None:
    # the replayed work took 10 ms a run; gradients make it 1.5 times as long: 5 ms a batch
    metrics, details = time_savings(ReplayResult(blocks(1.5, 1.5)), batches=10, epoch_seconds=0.2)
    assert details["time_saved_per_batch_s"] == pytest.approx(0.005)
    assert metrics["time_saved_pct"] == pytest.approx(100 * 0.05 / 0.25)
    # replays slowed by a busy machine (a run took 50 ms, the epoch's batches 20 ms): the batch's own time counts
    metrics, details = time_savings(ReplayResult(blocks(1.5, 1.5, work=0.05)), batches=10, epoch_seconds=0.2)
    assert details["replayed_work_s"] == pytest.approx(0.02)
    assert details["time_saved_per_batch_s"] == pytest.approx(0.01)
