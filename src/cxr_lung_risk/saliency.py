"""Saliency maps (``predict --saliency``): the gradient of each model's final score, or Grad-CAM,
as PNG overlays and DICOM Secondary Captures.

The code lives in :mod:`cxr_lung_risk.outputs.saliency` (an output the writer makes, built on what
a model exposes through :mod:`cxr_lung_risk.differentiable`); this module keeps its names
importable from here.
"""
from __future__ import annotations

from .outputs.saliency import *  # noqa: F401,F403
from .outputs.saliency import MAX_ITEMS_PER_PASS, __all__  # noqa: F401
