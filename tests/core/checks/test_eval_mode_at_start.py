from __future__ import annotations

import torch
from torch import nn

from lightning_nograd.core.checks.eval_mode_at_start import eval_mode_under_trainable
from lightning_nograd.core.checks.eval_mode_leaks import EvalModeLeaks
from lightning_nograd.core.checks.inference_tensors import inference_tensors


def test_frozen_block_in_eval_mode_and_inference_buffers() -> None:
    net = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), nn.Linear(2, 1))
    net[0].eval()
    assert eval_mode_under_trainable(net) == [("0", [("0.1", "BatchNorm1d")])]
    net[0].requires_grad_(False)
    assert eval_mode_under_trainable(net) == []
    with torch.inference_mode():
        net.register_buffer("table", torch.ones(2))
    assert inference_tensors(net) == [("table", "buffer")]


def test_layers_switched_to_eval_one_by_one_are_a_choice_blocks_are_not() -> None:
    net = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout()), nn.BatchNorm1d(2))
    leaks = EvalModeLeaks(allowed=lambda path: False)
    leaks.start(net)
    leaks.note_train_mode(dict(net.named_modules()), None, "on_train_start")
    try:
        for layer in (net[0][1], net[1]):
            layer.eval()  # frozen batch-norm statistics; their weights still learn
        assert leaks.read("training_step", 0) == ([], [])
        assert eval_mode_under_trainable(net) == []
        net[0].eval()  # now the block, with everything in it
        leaked, found = leaks.read("training_step", 1)
        assert [leak.path for leak in found] == ["0"]
        assert len(leaked) == 4  # the block and its three layers, put back under on_violation="fix"
        assert eval_mode_under_trainable(net) == [("0", [("0.1", "BatchNorm1d"), ("0.2", "Dropout")])]
    finally:
        leaks.close()


def test_eval_mode_at_start_judges_each_block_at_its_first_full_check() -> None:
    from lightning_nograd.core.checks.eval_mode_at_start import EvalModeAtStart

    def block() -> nn.Module:
        return nn.Sequential(nn.Linear(2, 2), nn.Dropout()).eval()  # arrives in eval mode, as from_pretrained

    net = nn.Sequential(block(), block(), block(), nn.Linear(2, 1)).train()
    net[0].eval()
    net[1].eval()
    net[2].eval()
    reported: list[tuple[str, list[str]]] = []
    check = EvalModeAtStart(lambda path, layers: reported.append((path, layers)))
    check.start(net, None, lambda path: False)
    # block 0 got no gradient at all (frozen on purpose: the extractor of transfer learning), block 1 did
    params0, params1 = list(net[0].parameters()), list(net[1].parameters())
    frozen = check.frozen_on_purpose(params0 + params1, missing=params0)
    assert frozen == {id(p) for p in params0}
    assert reported == [("1", [("1.1", "Dropout")])]
    # block 2 was never covered by a full check: reported when judging stops
    check.close()
    assert reported == [("1", [("1.1", "Dropout")]), ("2", [("2.1", "Dropout")])]
    assert check.frozen_on_purpose(list(net.parameters()), []) == set(), "judged once"
