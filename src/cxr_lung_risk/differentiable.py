"""What a model exposes to saliency: its differentiable final score (models layer).

A loaded model (:class:`cxr_lung_risk.registry.Model`) answers ``saliency_target()`` with a
:class:`SaliencyTarget`; :mod:`cxr_lung_risk.saliency` (a feature built on models) only consumes
it. This module sits beside the models (``engine``, ``age``) and imports neither them nor
saliency, so saliency depends on models and never the reverse.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["SaliencyTarget", "PlainScore", "input_format", "ensemble_target"]


@dataclass
class SaliencyTarget:
    """What to differentiate for one model: its final score and the networks inside it."""

    name: str  # file-name tag, e.g. 'cxr-age'
    title: str  # words, e.g. 'CXR-Age'
    score: Callable[[torch.Tensor], torch.Tensor]  # normalised (N,3,H,W) -> final score (N,)
    plain_parts: Sequence[tuple[nn.Module, float]]  # (network, weight): plain score = g(sum w_i net_i(x))
    outer: Callable[[torch.Tensor], torch.Tensor]  # g above (monotone map, e.g. age calibration)
    mean: Sequence[float]
    std: Sequence[float]
    device: torch.device


def input_format(net: nn.Module) -> torch.memory_format:
    """channels_last when the network's first 4-D weight is (the engine's inference copies),
    else contiguous: the input then has the layout the convolutions run in, as in inference."""
    for prm in net.parameters():
        if prm.ndim == 4:
            cl = prm.is_contiguous(memory_format=torch.channels_last) and not prm.is_contiguous()
            return torch.channels_last if cl else torch.contiguous_format
    return torch.contiguous_format


class PlainScore:
    """``outer(sum_i w_i * net_i(x)[:, 0])`` over ``parts = [(net_i, w_i)]``.

    A final score of this form (one weighted sum of networks, no test-time views) has the input
    gradient ``outer'(raw) * sum_i w_i * d net_i / d x``, which
    :func:`cxr_lung_risk.saliency.input_gradient` takes one network at a time: only one network's
    activations are kept for its backward pass.
    """

    def __init__(self, parts: Sequence[tuple[nn.Module, float]], outer: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.parts = list(parts)
        self.outer = outer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raw = None
        for net, w in self.parts:
            part = w * net(x.contiguous(memory_format=input_format(net)))[:, 0].to(x.dtype)
            raw = part if raw is None else raw + part
        return self.outer(raw)


def ensemble_target(ens: Any) -> SaliencyTarget:
    """The saliency target of a weighted ensemble (``models``, ``members`` with ``weight``, ``spec``
    with ``intercept``/``name``/``title``/``mean``/``std``, ``device``): its LASSO-combined score
    ``sum_i w_i f_i(x) + b``, written over ``plain_parts`` and differentiated one member at a time."""
    intercept = float(ens.spec.intercept)
    parts = [(net, float(mem.weight)) for net, mem in zip(ens.models, ens.members)]

    def outer(y: torch.Tensor) -> torch.Tensor:
        return y + intercept

    return SaliencyTarget(
        name=ens.spec.name,
        title=ens.spec.title,
        score=PlainScore(parts, outer),
        plain_parts=parts,
        outer=outer,
        mean=ens.spec.mean,
        std=ens.spec.std,
        device=ens.device,
    )
