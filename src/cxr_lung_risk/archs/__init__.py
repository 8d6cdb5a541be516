"""Network architectures as plain ``nn.Module``s whose state-dict keys equal the published files'."""
from __future__ import annotations

from typing import Callable

from torch import nn

from .heads import AdaptiveConcatPool2d, Flatten, fastai_head
from .inceptionv4 import inceptionv4_fastai
from .resnet import resnet34_body, resnet34_fastai
from .tiny import Tiny

__all__ = ["ARCHITECTURES", "build", "AdaptiveConcatPool2d", "Flatten", "fastai_head", "resnet34_body"]

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "inceptionv4": inceptionv4_fastai,
    "resnet34": resnet34_fastai,
    "tiny": Tiny,
}


def build(architecture: str, n_out: int = 1) -> nn.Module:
    """Build an architecture named in a model spec (``inceptionv4``, ``resnet34``, ``tiny``)."""
    try:
        factory = ARCHITECTURES[architecture.lower()]
    except KeyError:
        raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(sorted(ARCHITECTURES))}") from None
    return factory(n_out)
