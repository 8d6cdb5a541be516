"""The published DICOM -> PNG recipe (dcmj2pnm + ImageMagick), in numpy.

Owner: preprocessing stage. See ../shared/notes/original_pipeline.md section 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IM_AUTHORS = "6.8.9-9"
IM_DEBIAN = "6.9.11"


@dataclass(frozen=True)
class PixelMeta:
    """The attributes of a grayscale image that dcmj2pnm's rendering depends on."""

    photometric: str  # MONOCHROME1 or MONOCHROME2
    bits_stored: int
    bits_allocated: int = 16
    pixel_representation: int = 0  # 0 unsigned, 1 signed
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    presentation_lut_shape: str | None = None  # IDENTITY, INVERSE or None
