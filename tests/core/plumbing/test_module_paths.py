from __future__ import annotations

import pytest

from lightning_nograd.core.plumbing.module_paths import NamePatterns


def test_a_match_covers_submodules_and_the_empty_pattern_the_root() -> None:
    allowed = NamePatterns("allow", [r"encoder\.mc_.*"])
    assert allowed.matches("encoder.mc_dropout")
    assert allowed.matches("encoder.mc_dropout.inner")
    assert not allowed.matches("encoder")
    assert not allowed.matches("decoder.mc_dropout")
    assert NamePatterns("allow", [""]).matches("anything.at.all")
    assert not NamePatterns("allow", ()).matches("")


@pytest.mark.parametrize(("value", "error"), [(5, TypeError), ([None], TypeError), (["(x"], ValueError)])
def test_bad_patterns_name_the_argument(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="`allow_grad`"):
        NamePatterns("allow_grad", value)  # type: ignore[arg-type]
