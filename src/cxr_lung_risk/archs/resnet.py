"""ResNet34 with torchvision's module names, as the body fastai cuts from it."""
from __future__ import annotations

import torch
from torch import nn

from .heads import fastai_head

__all__ = ["BasicBlock", "resnet34_body", "resnet34_fastai"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _layer(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(cin, cout, stride), *[BasicBlock(cout, cout) for _ in range(blocks - 1)])


def resnet34_body() -> nn.Sequential:
    """``Sequential(conv1, bn1, relu, maxpool, layer1..layer4)``: 512 output channels."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
        _layer(64, 64, 3, 1),
        _layer(64, 128, 4, 2),
        _layer(128, 256, 6, 2),
        _layer(256, 512, 3, 2),
    )


def resnet34_fastai(n_out: int = 1) -> nn.Sequential:
    """``Sequential(body, head)`` as fastai's ``cnn_learner(dls, resnet34, n_out=1)`` builds it."""
    return nn.Sequential(resnet34_body(), fastai_head(512, n_out))
