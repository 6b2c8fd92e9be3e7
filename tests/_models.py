"""Helpers the tests share for tiny models (importable: pytest puts ``tests`` on sys.path)."""

from __future__ import annotations


def settle_batchnorm(model, size: int, batch: int = 4):
    """Give a random-init model real BatchNorm statistics from one random batch, in eval mode.

    Random-init running statistics (mean 0, var 1) make every class map flat; a cumulative
    average over one ``(batch, 3, size, size)`` forward in train mode replaces them.
    """
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(batch, 3, size, size))
    return model.eval()
