"""fastai 2.7's validation transform, reproduced without fastai.

``PILImage.create`` (``convert('RGB')``) -> ``Resize(224)`` with ``ResizeMethod.Crop`` (centre crop
of side ``int(m * 224)`` where ``m = min(w, h) / 224``, then PIL BILINEAR resize to 224x224) ->
uint8 CHW -> ``float() / 255`` -> ImageNet normalisation in float32.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["RasterError", "open_raster", "gray_to_pil", "fastai_crop_box", "center_crop_resize", "to_uint8_chw", "normalize"]


from .errors import CxrLungRiskError


class RasterError(CxrLungRiskError):
    """A PNG/JPEG input cannot be used (one sentence)."""


def open_raster(path: str | Path) -> Image.Image:
    """Open a PNG/JPEG as fastai's ``PILImage.create`` does, returning an RGB image.

    16-bit grayscale PNGs are scaled to 8 bits (``round(v / 257)``) first: Pillow's own
    ``convert('RGB')`` clips them at 255 (an all-white image), which the original pipeline
    silently scored.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im, dtype=np.int64)
                if a.max(initial=0) > 65535 or a.min(initial=0) < 0:
                    raise RasterError(f"{path}: 32-bit integer images are not supported")
                a = np.floor(a / 257.0 + 0.5).astype(np.uint8)
                return Image.fromarray(a, mode="L").convert("RGB")
            if im.mode == "F":
                raise RasterError(f"{path}: floating-point images are not supported")
            return im.convert("RGB")
    except RasterError:
        raise
    except Exception as e:  # PIL raises many kinds for broken files
        raise RasterError(f"{path}: cannot read the image ({type(e).__name__}: {str(e)[:120]})") from None


def gray_to_pil(img8: np.ndarray) -> Image.Image:
    """The in-memory equivalent of writing the 8-bit gray PNG and reading it back with fastai."""
    return Image.fromarray(np.ascontiguousarray(img8, dtype=np.uint8), mode="L").convert("RGB")


def fastai_crop_box(w: int, h: int, size: int = 224) -> tuple[int, int, int, int]:
    """fastai ``Resize(size, method='crop')`` on the validation set: the PIL crop box."""
    m = w / size if (w / size) < (h / size) else h / size
    cw, ch = int(m * size), int(m * size)
    left, top = int(0.5 * (w - cw)), int(0.5 * (h - ch))
    return left, top, left + cw, top + ch


def center_crop_resize(img: Image.Image, size: int = 224) -> Image.Image:
    """Centre crop + PIL BILINEAR resize exactly as fastai's validation ``Resize(size)``."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    box = fastai_crop_box(img.width, img.height, size)
    return img.crop(box).resize((size, size), Image.BILINEAR)


def to_uint8_chw(img: Image.Image) -> np.ndarray:
    """HWC RGB PIL image -> uint8 CHW array (fastai's ``image2tensor``)."""
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def normalize(batch_u8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 NCHW -> float32 ``(x / 255 - mean) / std`` (fastai's IntToFloatTensor + Normalize)."""
    x = batch_u8.float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
