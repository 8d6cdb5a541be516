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

__all__ = ["RasterError", "open_raster", "raster_crop", "gray_to_pil", "fastai_crop_box", "center_crop_resize", "to_uint8_chw", "raster_batch", "normalize"]


from .errors import CxrLungRiskError


class RasterError(CxrLungRiskError):
    """A PNG/JPEG input cannot be used (one sentence)."""


def open_raster(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Open a PNG/JPEG as fastai's ``PILImage.create`` does, returning an RGB image.

    16-bit grayscale PNGs are scaled to 8 bits (``round(v / 257)``) first: Pillow's own
    ``convert('RGB')`` clips them at 255 (an all-white image), which the original pipeline
    silently scored.
    """
    try:
        with Image.open(path) as im:
            _check_pixels(path, im, max_pixels)
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                return _16bit_to_l(im, path).convert("RGB")
            if im.mode == "F":
                raise RasterError(f"{path}: floating-point images are not supported")
            return im.convert("RGB")
    except RasterError:
        raise
    except Exception as e:  # PIL raises many kinds for broken files
        raise RasterError(f"{path}: cannot read the image ({type(e).__name__}: {str(e)[:120]})") from None


def _check_pixels(path, im: Image.Image, max_pixels: int | None) -> None:
    w, h = im.size
    if max_pixels is not None and w * h > max_pixels:
        raise RasterError(f"{path}: image is too large ({w} x {h} = {w * h:,} pixels, limit {max_pixels:,}); not decoded")


def _16bit_to_l(im: Image.Image, path) -> Image.Image:
    """A 16-bit (or 32-bit integer) gray image as 8-bit ``L``: ``round(v / 257)``, block by block
    (no 64-bit copy of the whole image)."""
    a = np.asarray(im)
    out = np.empty(a.shape, dtype=np.uint8)
    step = max(1, (1 << 22) // max(1, a.shape[1] if a.ndim == 2 else 1))
    for r0 in range(0, a.shape[0], step):
        blk = a[r0:r0 + step].astype(np.int64)
        if blk.max(initial=0) > 65535 or blk.min(initial=0) < 0:
            raise RasterError(f"{path}: 32-bit integer images are not supported")
        out[r0:r0 + step] = np.floor(blk / 257.0 + 0.5)
    return Image.fromarray(out, mode="L")


def raster_crop(path: str | Path, size: int = 224, max_pixels: int | None = None) -> Image.Image:
    """``center_crop_resize(open_raster(path), size)`` with less memory: the pixel count is checked
    against ``max_pixels`` from the header before decoding (the DICOM limit, for every input kind),
    the crop is taken before the RGB conversion (a per-pixel map), and an 8-bit gray crop is
    resized before it is converted (PIL resamples each band alike: the same pixels)."""
    try:
        with Image.open(path) as im:
            _check_pixels(path, im, max_pixels)
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                im = _16bit_to_l(im, path)
            elif im.mode == "F":
                raise RasterError(f"{path}: floating-point images are not supported")
            crop = im.crop(fastai_crop_box(im.width, im.height, size))
            del im
    except RasterError:
        raise
    except Exception as e:  # PIL raises many kinds for broken files
        raise RasterError(f"{path}: cannot read the image ({type(e).__name__}: {str(e)[:120]})") from None
    if crop.mode == "L":
        return crop.resize((size, size), Image.BILINEAR).convert("RGB")
    return crop.convert("RGB").resize((size, size), Image.BILINEAR)


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


def raster_batch(paths: Sequence[str | Path], size: int = 224) -> torch.Tensor:
    """Raster files (PNG, JPEG, ...) -> the engine's uint8 NCHW batch, each prepared as the
    published PNG pipeline does (:func:`open_raster`, :func:`center_crop_resize`,
    :func:`to_uint8_chw`); ready for ``predict_uint8``."""
    return torch.from_numpy(np.stack([to_uint8_chw(center_crop_resize(open_raster(p), size)) for p in paths]))


def normalize(batch_u8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 NCHW -> float32 ``(x / 255 - mean) / std`` (fastai's IntToFloatTensor + Normalize)."""
    x = batch_u8.float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
