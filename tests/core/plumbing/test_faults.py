from __future__ import annotations

import pytest

from lightning_nograd import NoGradError, NoGradWarning
from lightning_nograd.core.plumbing import faults
from lightning_nograd.core.plumbing.faults import isolated


class Probe(faults.Probe):
    def __init__(self) -> None:
        self.calls = 0

    def hook(self, fail: str | None = None) -> int:
        self.calls += 1
        if fail == "bug":
            raise KeyError("bug")
        if fail == "stop":
            raise NoGradError("the user asked to stop")
        return self.calls


def test_a_failing_hook_warns_once_and_then_does_nothing() -> None:
    probe = Probe()
    hook = isolated(probe.hook, probe)
    assert hook() == 1
    with pytest.warns(NoGradWarning, match="internal error in Probe: KeyError"):
        assert hook("bug") is None
    assert hook() is None and probe.calls == 2, "switched off after its failure"


def test_a_handler_gets_the_error_and_no_grad_error_passes() -> None:
    probe = Probe()
    seen: list[BaseException] = []
    probe.on_error = seen.append  # type: ignore[assignment]
    with pytest.raises(NoGradError):
        isolated(probe.hook, probe)("stop")
    isolated(probe.hook, probe)("bug")
    assert [type(e) for e in seen] == [KeyError]


def test_a_failing_probe_method_goes_to_on_error_and_the_probe_then_does_nothing() -> None:
    from lightning_nograd.core.plumbing.faults import isolated_method

    class Counter(Probe):
        calls = 0

        @isolated_method
        def step(self, fail: bool) -> int:
            self.calls += 1
            if fail:
                raise KeyError("bug")
            return self.calls

    seen: list[BaseException] = []
    probe = Counter()
    probe.on_error = seen.append
    assert probe.step(False) == 1
    assert probe.step(True) is None and [type(e) for e in seen] == [KeyError] and probe.failed
    assert probe.step(False) is None and probe.calls == 2, "a failed probe's methods do nothing"

    class Stops(Probe):
        @isolated_method
        def step(self) -> None:
            raise NoGradError("the user asked to stop")

    with pytest.raises(NoGradError):
        Stops().step()
