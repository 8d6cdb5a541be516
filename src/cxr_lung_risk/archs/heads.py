"""fastai-compatible pooling/head layers as plain ``nn.Module``s (stable state-dict names)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["AdaptiveConcatPool2d", "Flatten", "fastai_head"]


class AdaptiveConcatPool2d(nn.Module):
    """``cat([max_pool(x), avg_pool(x)], 1)``: max first, as fastai's layer does."""

    def __init__(self, size: int = 1) -> None:
        super().__init__()
        self.ap = nn.AdaptiveAvgPool2d(size)
        self.mp = nn.AdaptiveMaxPool2d(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.mp(x), self.ap(x)], 1)


class Flatten(nn.Module):
    """Flatten all but the batch dimension (fastai's ``Flatten(full=False)``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


def fastai_head(nf: int, n_out: int = 1) -> nn.Sequential:
    """fastai 2.x ``create_head(nf, n_out)`` with concat pooling.

    Keys: ``2`` BatchNorm1d(2*nf), ``4`` Linear(2*nf, 512, bias=False), ``6`` BatchNorm1d(512),
    ``8`` Linear(512, n_out, bias=False).
    """
    return nn.Sequential(
        AdaptiveConcatPool2d(),
        Flatten(),
        nn.BatchNorm1d(2 * nf),
        nn.Dropout(0.25),
        nn.Linear(2 * nf, 512, bias=False),
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(512),
        nn.Dropout(0.5),
        nn.Linear(512, n_out, bias=False),
    )
