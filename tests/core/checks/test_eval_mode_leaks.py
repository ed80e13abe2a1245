from __future__ import annotations

from torch import nn

from lightning_nograd.core.checks.eval_mode_leaks import EvalModeLeaks
from lightning_nograd.core.plumbing.counters import ModeSwitches, mode_switches


def test_eval_mode_leaks_read_only_after_a_switch_and_name_the_topmost_module() -> None:
    net = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Dropout()), nn.Linear(2, 1)).train()
    leaks = EvalModeLeaks(allowed=lambda path: False)
    leaks.start(net)
    leaks.note_train_mode(dict(net.named_modules()), None, "on_train_start")
    try:
        assert leaks.read_at is None
        leaked, found = leaks.read("on_train_batch_start", 0)
        assert leaked == [] and found == [] and leaks.read_at == mode_switches.count
        net[0].eval()  # a callback evaluates the block and forgets to switch back
        assert leaks.read_at != mode_switches.count, "the switch is seen without reading any module"
        leaked, found = leaks.read("training_step", 0)
        assert [(leak.path, leak.where, leak.new) for leak in found] == [("0", "training_step", True)]
        assert len(leaked) == 3  # the block and its two layers: all put back under on_violation="fix"
        _, found = leaks.read("on_train_batch_start", 1)
        assert [leak.new for leak in found] == [False], "reported once per fit"
    finally:
        leaks.close()
    assert id(leaks) not in ModeSwitches._owners, "it stopped listening (others, e.g. doctests, may still)"


def test_a_leak_is_placed_after_the_last_clean_check_not_at_an_epoch_start_that_found_it_already() -> None:
    # a loop whose evaluation leaves the model in eval mode until its training step calls `.train()` (the
    # Hugging Face `Trainer`'s): a step of the user's that leaves that call out trains in eval mode
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    leaks = EvalModeLeaks(allowed=lambda path: False)
    leaks.start(net)
    leaks.note_train_mode(dict(net.named_modules()), None, "on_train_start")
    try:
        assert leaks.read("on_train_batch_start", 0)[1] == [] and leaks.read("training_step", 0)[1] == []
        net.eval()  # the evaluation, after the last step's end
        leaks.note_train_mode(dict(net.named_modules()), None, "on_train_epoch_start")
        _, found = leaks.read("on_train_batch_start", 0)
        assert [(leak.path, leak.where) for leak in found] == [("", "on_train_batch_end")]
        net.train()  # the next epoch starts clean: a leak after it is placed there
        leaks.note_train_mode(dict(net.named_modules()), None, "on_train_epoch_start")
        net.eval()  # an `.eval()` in the epoch's start hooks, after the check there
        _, found = leaks.read("on_train_batch_start", 0)
        assert [(leak.path, leak.where) for leak in found] == [("", "on_train_epoch_start")]
    finally:
        leaks.close()
