"""Tensors kept in step outputs and module attributes: how many, how many hold a graph, their memory."""

from __future__ import annotations

import torch
from torch import nn

from lightning_nograd.core.checks.tensors import tally_tensors, tensor_attributes


def test_graphs_kept_in_attributes_are_found_and_views_of_one_storage_count_once() -> None:
    module = nn.Linear(2, 2)
    attached = module(torch.ones(1, 2))
    module.kept = [attached, attached.detach()]
    module.name = "not a tensor"
    names = [name for name, _ in tensor_attributes(module)]
    assert names == ["kept"]
    tally = tally_tensors(module.kept)
    assert (tally.tensors, tally.attached) == (2, 1)
    assert tally.nbytes == 8, "two views of one storage count once"
