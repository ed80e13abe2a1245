"""The check for inference tensors kept on a model: buffers and tensor attributes created under
``torch.inference_mode`` (during validation, say), which crash the next backward that uses them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lightning_nograd.core.plumbing.module_paths import named_modules


def inference_tensors(root: nn.Module, allowed: Callable[[str], bool] | None = None) -> list[tuple[str, str]]:
    """Buffers and tensor attributes created under ``torch.inference_mode``: (path, kind).

    A list, tuple or dict attribute is reported once, with how many inference tensors it holds.
    Those held by an ``allowed`` module path, or whose own path is allowed, are left out.

    Examples:
        >>> net = nn.Linear(2, 2)
        >>> with torch.inference_mode():
        ...     net.cache = torch.ones(2)
        ...     net.history = [torch.ones(1), torch.ones(1)]
        >>> inference_tensors(net)
        [('cache', 'tensor attribute'), ('history', 'collection attribute (2 tensors)')]
    """
    found: list[tuple[str, str]] = []
    for path, module in named_modules(root):
        if allowed is not None and allowed(path):
            continue
        prefix = f"{path}." if path else ""
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_inference():
                found.append((prefix + name, "buffer"))
        for name, value in vars(module).items():
            if name in ("_parameters", "_buffers", "_modules"):
                continue
            if isinstance(value, torch.Tensor):
                if not isinstance(value, nn.Parameter) and value.is_inference():
                    found.append((prefix + name, "tensor attribute"))
            elif isinstance(value, (list, tuple, dict)):
                items = value.values() if isinstance(value, dict) else value
                count = sum(1 for item in items if isinstance(item, torch.Tensor) and item.is_inference())
                if count:
                    found.append((prefix + name, f"collection attribute ({count} tensors)"))
    # the path a finding names (and its fix's pattern) allows it too
    return [(path, kind) for path, kind in found if allowed is None or not allowed(path)]
