"""The authors' "Tiny" SimpleConv network (keys ``mdl.*``) for 3x224x224 input."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .heads import Flatten

__all__ = ["Tiny"]


class Tiny(nn.Module):
    """SimpleConv(min_layer_size=64, filter_size=5, max_layer_size=512) from ``SimpleArchs.py``."""

    def __init__(self, n_out: int = 1) -> None:
        super().__init__()
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        chans = [3, 64, 128, 256, 512]
        for i in range(4):
            layers[f"Conv{i}"] = nn.Conv2d(chans[i], chans[i + 1], kernel_size=5)
            layers[f"BN{i}"] = nn.BatchNorm2d(chans[i + 1])
            layers[f"ReLU{i}"] = nn.ReLU()
            layers[f"Max{i}"] = nn.MaxPool2d(3, 2)
        layers["AvgPool"] = nn.AvgPool2d(9)
        layers["Flatten"] = Flatten()
        layers["Linear1"] = nn.Linear(512, 32)
        layers["ReLU_Linear1"] = nn.ReLU()
        layers["BN_Linear1"] = nn.BatchNorm1d(32)
        layers["Dropout"] = nn.Dropout(0.25)
        layers["Last_Linear"] = nn.Linear(32, n_out)
        self.mdl = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mdl(x)
