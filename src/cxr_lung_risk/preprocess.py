"""The published DICOM -> PNG recipe (dcmj2pnm + ImageMagick), in numpy.

The authors turned each DICOM into the PNG their networks were trained on with::

    dcmj2pnm -O +ot +G in.dcm out.tif
    mogrify -trim +repage -colorspace RGB -auto-level -depth 8 -resize 512x512^ -format png out.tif

This module reproduces both tools bit for bit:

* :func:`dcmj2pnm_8bit` - dcmj2pnm's rendering without a VOI window (full BitsStored range,
  rescale, MONOCHROME1 / Presentation LUT polarity, bits above BitsStored masked).
* :func:`imagemagick_recipe` - the ``mogrify`` chain (trim, sRGB -> linear light, auto-level,
  depth 8, Lanczos / Mitchell resize) in the arithmetic of ImageMagick 6.8.9-9 (the authors'
  build: single precision ``MagickRealType``) or 6.9.11 (Debian 12: double precision).
* :func:`write_png` / :func:`read_png_gray` - 8-bit grayscale PNG with ``gAMA`` 1.0.

Guards (they refuse inputs, they never change the arithmetic): :func:`imagemagick_recipe` raises
:class:`ImageRefused` before resizing when ``-resize 512x512^`` of the trimmed image would exceed
``MAX_RESIZED_PIXELS`` (ImageMagick would allocate it: an 8 x 8000 strip becomes 512 x 512000);
:func:`preprocess_checked` (the DICOM path) also refuses a trimmed image whose aspect ratio
exceeds ``MAX_ASPECT`` and a rendered image without contrast (:func:`check_rendered`).
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

IM_AUTHORS = "6.8.9-9"
IM_DEBIAN = "6.9.11"

#: Short side of the ImageMagick output (``-resize 512x512^``).
TARGET = 512

_QR = 65535  # QuantumRange of a Q16 build

#: Largest ``-resize 512x512^`` output accepted (ImageMagick would allocate it; ~40 MP is a
#: 512 x 78,000 strip, far beyond any radiograph).
MAX_RESIZED_PIXELS = 40_000_000
#: Largest long side / short side of the trimmed image that :func:`preprocess_checked` accepts.
MAX_ASPECT = 4.0
#: A rendered 8-bit image whose max - min is below this has no contrast (blank).
MIN_CONTRAST = 2


class ImageRefused(ValueError):
    """The image cannot be preprocessed into a meaningful radiograph (extreme shape, no
    contrast); ``str(e)`` is one sentence, without a status prefix."""


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

    @classmethod
    def from_dataset(cls, ds) -> "PixelMeta":
        """Build the metadata from a pydicom dataset (missing rescale -> identity)."""
        shape = ds.get("PresentationLUTShape")
        slope = ds.get("RescaleSlope")
        icpt = ds.get("RescaleIntercept")
        return cls(
            photometric=str(ds.PhotometricInterpretation).strip().upper(),
            bits_stored=int(ds.BitsStored),
            bits_allocated=int(ds.BitsAllocated),
            pixel_representation=int(ds.get("PixelRepresentation", 0) or 0),
            rescale_slope=1.0 if slope in (None, "") else float(slope),
            rescale_intercept=0.0 if icpt in (None, "") else float(icpt),
            presentation_lut_shape=None if not shape else str(shape).strip().upper(),
        )


def _check_version(version: str) -> bool:
    """True for the authors' single-precision build, False for Debian's double build."""
    if version == IM_AUTHORS:
        return True
    if version in (IM_DEBIAN, "6.9.11-60"):
        return False
    raise ValueError(f"unknown ImageMagick version {version!r}: use {IM_AUTHORS!r} or {IM_DEBIAN!r}")


# ----------------------------------------------------------------------------------------
# dcmj2pnm
# ----------------------------------------------------------------------------------------


def _output_polarity(meta: PixelMeta) -> tuple[int, int]:
    """(low, high) output values of dcmj2pnm's linear ramp for this image."""
    shape = (meta.presentation_lut_shape or "").upper()
    if shape == "INVERSE":
        return 255, 0
    if meta.photometric.upper() == "MONOCHROME1" and shape != "IDENTITY":
        return 255, 0
    return 0, 255


def dcmj2pnm_8bit(pixels: np.ndarray, meta: PixelMeta) -> np.ndarray:
    """Render stored pixel values as ``dcmj2pnm -O +ot +G`` does (no VOI window).

    ``out = trunc(low + (v - absmin) * gradient)`` with ``v = trunc(slope * p + intercept)``,
    ``gradient = (high - low + 1) / (absmax - absmin + 1)`` and absmin..absmax the range that
    BitsStored allows, mapped through the rescale. Bits above BitsStored are ignored.
    """
    p = np.asarray(pixels)
    if p.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale pixel array, got shape {p.shape}")
    if not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"expected integer stored pixel values, got {p.dtype}")
    bs = int(meta.bits_stored)
    if not 1 <= bs <= 16:
        raise ValueError(f"BitsStored {bs} is not supported (1..16)")
    signed = int(meta.pixel_representation) == 1
    nvals = 1 << bs
    smin = -(nvals >> 1) if signed else 0
    smax = smin + nvals - 1
    slope = float(meta.rescale_slope)
    icpt = float(meta.rescale_intercept)
    stored = np.arange(smin, smax + 1, dtype=np.float64)  # every value BitsStored allows
    if slope == 1.0 and icpt == 0.0:
        vals = stored
        absmin, absmax = float(smin), float(smax)
    else:
        vals = np.trunc(stored * slope + icpt)
        absmin, absmax = smin * slope + icpt, smax * slope + icpt
        if absmin > absmax:
            absmin, absmax = absmax, absmin
    low, high = _output_polarity(meta)
    rng = absmax - absmin + 1.0
    gradient = (float(high) - float(low) + 1.0) / rng
    if p.size > 3 * rng:
        # dcmtk's lookup-table path: index with an integer (truncated) absmin
        base = float(math.trunc(absmin))
    else:
        base = absmin
    lut = np.trunc(float(low) + (vals - base) * gradient)
    lut = np.clip(lut, 0, 255).astype(np.uint8)
    # mask the bits above BitsStored, sign-extend, index the table: block by block in an
    # unsigned type of the pixels' width (no int64 copies of a 100-megapixel image)
    out = np.empty(p.shape, dtype=np.uint8)
    udt = np.dtype(f"u{max(p.dtype.itemsize, 2)}")
    step = max(1, _BLOCK_ELEMS // max(1, p.shape[1]))
    for r0 in range(0, p.shape[0], step):
        idx = p[r0:r0 + step].astype(udt)  # two's complement bits of a signed value, as & sees them
        idx &= nvals - 1
        if signed:
            idx ^= nvals >> 1  # two's complement -> offset binary == value - smin
        np.take(lut, idx, out=out[r0:r0 + step])
    return out


# ----------------------------------------------------------------------------------------
# ImageMagick
# ----------------------------------------------------------------------------------------


def _srgb_to_linear_q16(single: bool) -> np.ndarray:
    """256-entry table: 8-bit sRGB value -> Q16 linear light (``-colorspace RGB``)."""
    q = np.arange(256, dtype=np.float64) * 257.0
    lin = _QR * ((q / _QR + 0.055) / 1.055) ** 2.4
    if single:
        low = (q.astype(np.float32) / np.float32(12.92)).astype(np.float64)
        lin = np.where(q <= 0.0404482362771076 * _QR, low, lin).astype(np.float32)
        out = np.floor((lin + np.float32(0.5)).astype(np.float32).astype(np.float64))
    else:
        lin = np.where(q <= 0.0404482362771076 * _QR, q / 12.92, lin)
        out = np.floor(lin + 0.5)
    return np.clip(out, 0, _QR).astype(np.int64)


#: Elements per block where a whole-image temporary would be large (a 100-megapixel image).
_BLOCK_ELEMS = 1 << 22


def _trim_box(img: np.ndarray) -> tuple[int, int, int, int] | None:
    """ImageMagick's ``-trim`` bounding box (fuzz 0): (top, bottom, left, right) inclusive."""
    tl, tr, bl = img[0, 0], img[0, -1], img[-1, 0]
    h, w = img.shape
    any_cols_tl = np.zeros(w, dtype=bool)
    any_cols_tr = np.zeros(w, dtype=bool)
    any_rows_tl = np.zeros(h, dtype=bool)
    any_rows_bl = np.zeros(h, dtype=bool)
    step = max(1, _BLOCK_ELEMS // max(1, w))
    for r0 in range(0, h, step):  # block by block: no image-sized boolean temporaries
        blk = img[r0:r0 + step]
        d = blk != tl
        any_cols_tl |= d.any(axis=0)
        any_rows_tl[r0:r0 + step] = d.any(axis=1)
        any_cols_tr |= (blk != tr).any(axis=0)
        any_rows_bl[r0:r0 + step] = (blk != bl).any(axis=1)
    cols_tl = np.flatnonzero(any_cols_tl)
    rows_tl = np.flatnonzero(any_rows_tl)
    cols_tr = np.flatnonzero(any_cols_tr)
    rows_bl = np.flatnonzero(any_rows_bl)
    right = int(cols_tr[-1]) if cols_tr.size else 0
    bottom = int(rows_bl[-1]) if rows_bl.size else 0
    if right == 0 or bottom == 0 or not cols_tl.size or not rows_tl.size:
        return None
    left, top = int(cols_tl[0]), int(rows_tl[0])
    if right < left or bottom < top:
        return None
    return top, bottom, left, right


def _sincfast(x: np.ndarray, single: bool) -> np.ndarray:
    """ImageMagick's polynomial sinc approximation (Q16 coefficients)."""
    c = (0.173611107357320220183368594093166520811e-2, -0.384240921114946632192116762889211361285e-3,
         0.394201182359318128221229891724947048771e-4, -0.250963301609117217660068889165550534856e-5,
         0.111902032818095784414237782071368805120e-6, -0.372895101408779549368465614321137048875e-8,
         0.957694196677572570319816780188718518330e-10, -0.187208577776590710853865174371617338991e-11,
         0.253524321426864752676094495396308636823e-13, -0.177084805010701112639035485248501049364e-15)
    if single:
        xx = (x * x).astype(np.float32).astype(np.float64)
    else:
        xx = x * x
    p = c[9]
    for k in range(8, -1, -1):
        p = c[k] + xx * p
    r = (xx - 1.0) * (xx - 4.0) * (xx - 9.0) * (xx - 16.0) * p
    xd = x.astype(np.float64)
    big = xd > 4.0
    if np.any(big):
        if single:
            alpha = (np.pi * xd).astype(np.float32).astype(np.float64)
        else:
            alpha = np.pi * xd
        r = np.where(big, np.sin(alpha) / np.where(big, alpha, 1.0), r)
    return r.astype(np.float32) if single else r


def _mitchell(x: np.ndarray, single: bool) -> np.ndarray:
    """CubicBC with B = C = 1/3, evaluated as ImageMagick does."""
    ft = np.float32 if single else np.float64
    b = float(ft(1.0 / 3.0))
    cc = b
    two_b = float(ft(b + b))
    co = [ft(1.0 - (1.0 / 3.0) * b), ft(-3.0 + two_b + cc), ft(2.0 - 1.5 * b - cc),
          ft((4.0 / 3.0) * b + 4.0 * cc), ft(-8.0 * cc - two_b), ft(b + 5.0 * cc), ft((-1.0 / 6.0) * b - cc)]
    x = x.astype(ft)
    inner = co[0] + x * (x * (co[1] + x * co[2]))
    outer = co[3] + x * (co[4] + x * (co[5] + x * co[6]))
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, ft(0.0))).astype(ft)


@lru_cache(maxsize=64)
def _contributions(n_in: int, n_out: int, enlarge: bool, single: bool) -> tuple[np.ndarray, np.ndarray]:
    """Tap indices and weights of ImageMagick's 1-D resize filter (rows = output pixels).

    Returns ``(idx, w)`` of shape (n_out, taps); unused taps have weight 0 and a valid index.
    """
    ft = np.float32 if single else np.float64
    eps = 1.0e-15 if single else 1.0e-12
    factor = ft(n_out) / ft(n_in)
    scale = ft(max(1.0 / float(factor) + eps, 1.0))
    filt_support = 2.0 if enlarge else 3.0
    support = ft(scale * ft(filt_support))
    if support < 0.5:  # pragma: no cover - never for these filters
        support, scale = ft(0.5), ft(1.0)
    scale = ft(1.0 / float(scale))
    x = np.arange(n_out, dtype=np.float64)
    bisect = (ft(1.0) * (x + 0.5).astype(ft) / factor).astype(ft)
    bisect = (bisect.astype(np.float64) + eps).astype(ft)
    start = np.maximum((bisect - support).astype(ft).astype(np.float64) + 0.5, 0.0).astype(np.int64)
    stop = np.minimum((bisect + support).astype(ft).astype(np.float64) + 0.5, float(n_in)).astype(np.int64)
    ntap = int((stop - start).max())
    k = np.arange(ntap)
    pix = start[:, None] + k[None, :]
    valid = pix < stop[:, None]
    arg = (pix.astype(ft) - bisect[:, None]).astype(ft).astype(np.float64) + 0.5
    arg = (float(scale) * arg).astype(ft)
    xb = np.abs(arg.astype(np.float64)).astype(ft)  # blur == 1
    if enlarge:
        w = _mitchell(xb, single)
    else:
        wscale = ft(ft(1.0) / ft(3.0))
        win = _sincfast((xb * wscale).astype(ft), single)
        w = (win * _sincfast(xb, single)).astype(ft)
    w = np.where(valid, w, ft(0.0)).astype(ft)
    density = np.zeros(n_out, dtype=ft)
    for j in range(ntap):  # sequential accumulation, as in the C loop
        density = (density + w[:, j]).astype(ft)
    norm = (density != 0.0) & (density != 1.0)
    recip = np.where(norm, 1.0 / np.where(norm, density.astype(np.float64), 1.0), 1.0).astype(ft)
    w = np.where(norm[:, None], (w * recip[:, None]).astype(ft), w).astype(ft)
    idx = np.where(valid, pix, start[:, None])
    idx = np.minimum(idx, n_in - 1)
    return idx, w


def _clamp_q16(acc: np.ndarray, single: bool) -> np.ndarray:
    """ClampToQuantum: <= 0 -> 0, >= 65535 -> 65535, else trunc(value + 0.5)."""
    if single:
        r = (acc + np.float32(0.5)).astype(np.float32)
    else:
        r = acc + 0.5
    np.trunc(r, out=r)
    np.clip(r, 0, _QR, out=r)  # value <= 0 -> 0 and value >= 65535 -> 65535 agree with trunc
    return r


def _filter_axis(img: np.ndarray, n_out: int, axis: int, enlarge: bool, single: bool) -> np.ndarray:
    """One separable resize pass along ``axis`` (0 = vertical, 1 = horizontal)."""
    ft = np.float32 if single else np.float64
    idx, w = _contributions(img.shape[axis], n_out, enlarge, single)
    src = np.ascontiguousarray(img if axis == 0 else img.T, dtype=ft)
    shape = (n_out, src.shape[1])
    acc = np.empty(shape, dtype=ft)
    buf = np.empty(shape, dtype=ft)
    for j in range(idx.shape[1]):
        # acc += w * p, in the precision of the build and in the C loop's order
        target = acc if j == 0 else buf
        np.take(src, idx[:, j], axis=0, out=target)
        np.multiply(target, w[:, j][:, None], out=target)
        if j:
            np.add(acc, buf, out=acc)
    out = _clamp_q16(acc, single)
    return out if axis == 0 else out.T


def _resize_geometry(h: int, w: int, single: bool):
    """``-resize 512x512^``'s target size and factors: (new_w, new_h, float type, x factor,
    y factor, enlarge), computed as ImageMagick does in single or double precision."""
    s = max(TARGET / w, TARGET / h)
    new_w = int(math.floor(s * w + 0.5))
    new_h = int(math.floor(s * h + 0.5))
    ft = np.float32 if single else np.float64
    xf = ft(new_w) / ft(w)
    yf = ft(new_h) / ft(h)
    enlarge = float(xf) * float(yf) > 1.0 if not single else bool(ft(xf * yf) > 1.0)
    return new_w, new_h, ft, xf, yf, enlarge


def _resize(q: np.ndarray, single: bool) -> np.ndarray:
    """``-resize 512x512^`` on a Q16 gray image (values as float)."""
    h, w = q.shape
    new_w, new_h, ft, xf, yf, enlarge = _resize_geometry(h, w, single)
    if new_w == w and new_h == h:
        return q
    src = q.astype(ft, copy=False)
    if xf > yf:
        tmp = _filter_axis(src, new_w, 1, enlarge, single)
        return _filter_axis(tmp, new_h, 0, enlarge, single)
    tmp = _filter_axis(src, new_h, 0, enlarge, single)
    return _filter_axis(tmp, new_w, 1, enlarge, single)


def _resize_mapped(a: np.ndarray, table: np.ndarray, single: bool) -> np.ndarray:
    """``_resize(table[a], single)`` without the image-sized float copy: the first (separable)
    pass runs block by block on ``table[block]`` (rows for a horizontal first pass, columns for a
    vertical one), each output value computed exactly as the whole-image pass computes it."""
    h, w = a.shape
    new_w, new_h, ft, xf, yf, enlarge = _resize_geometry(h, w, single)
    if (new_w == w and new_h == h) or a.size <= _BLOCK_ELEMS:
        return _resize(table[a], single)
    if xf > yf:  # horizontal first: blocks of rows
        tmp = np.empty((h, new_w), dtype=ft)
        step = max(1, _BLOCK_ELEMS // w)
        for r0 in range(0, h, step):
            tmp[r0:r0 + step] = _filter_axis(table[a[r0:r0 + step]], new_w, 1, enlarge, single)
        return _filter_axis(tmp, new_h, 0, enlarge, single)
    tmp = np.empty((new_h, w), dtype=ft)  # vertical first: blocks of columns
    step = max(1, _BLOCK_ELEMS // h)
    for c0 in range(0, w, step):
        tmp[:, c0:c0 + step] = _filter_axis(table[a[:, c0:c0 + step]], new_h, 0, enlarge, single)
    return _filter_axis(tmp, new_w, 1, enlarge, single)


def _quantum_to_char(q: np.ndarray) -> np.ndarray:
    """ScaleQuantumToChar of a Q16 build: 6.8.9's PNG coder at depth 8 (rounds)."""
    qi = q.astype(np.int64)
    return (((qi + 128) - ((qi + 128) >> 8)) >> 8).astype(np.uint8)


def resize_shape(height: int, width: int) -> tuple[int, int]:
    """(height, width) that ``-resize 512x512^`` makes of an image (as :func:`_resize`)."""
    s = max(TARGET / width, TARGET / height)
    return int(math.floor(s * height + 0.5)), int(math.floor(s * width + 0.5))


def _ratio_text(height: int, width: int) -> str:
    r = max(height, width) / max(1, min(height, width))
    t = f"{r:.0f}" if r >= 10 else f"{r:.1f}"
    return f"1:{t}" if width > height else f"{t}:1"


def _guard_shape(shape: tuple[int, int], max_aspect: float | None) -> None:
    """Refuse the trimmed image before resizing (see :class:`ImageRefused`)."""
    h, w = int(shape[0]), int(shape[1])
    if max_aspect is not None and max(h, w) > max_aspect * min(h, w):
        raise ImageRefused(
            f"image aspect ratio {_ratio_text(h, w)} cannot be a chest radiograph (after trimming its uniform "
            f"border the image is {h} x {w} pixels, limit {max_aspect:g}:1)"
        )
    nh, nw = resize_shape(h, w)
    if nh * nw > MAX_RESIZED_PIXELS:
        raise ImageRefused(
            f"image aspect ratio {_ratio_text(h, w)} cannot be a chest radiograph (after trimming, {h} x {w} "
            f"pixels would be resized to {nh} x {nw} = {nh * nw:,} pixels, limit {MAX_RESIZED_PIXELS:,})"
        )


def imagemagick_recipe(img8: np.ndarray, version: str = IM_AUTHORS, *, max_aspect: float | None = None) -> np.ndarray:
    """``mogrify -trim +repage -colorspace RGB -auto-level -depth 8 -resize 512x512^``.

    ``img8`` is the 8-bit gray image dcmj2pnm wrote; the result is the 8-bit gray image
    ImageMagick writes to PNG (short side 512).  Raises :class:`ImageRefused` (before resizing)
    when the resized image would exceed ``MAX_RESIZED_PIXELS``, or when ``max_aspect`` is given
    and the trimmed image is more elongated than that.
    """
    single = _check_version(version)
    a = np.asarray(img8)
    if a.ndim != 2 or a.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 gray image, got {a.dtype} {a.shape}")
    box = _trim_box(a)
    if box is None:
        return np.zeros((TARGET, TARGET), dtype=np.uint8)
    t, b, l, r = box
    a = a[t:b + 1, l:r + 1]
    _guard_shape(a.shape, max_aspect)
    # -colorspace RGB: sRGB EOTF to Q16 linear light (a 256-entry table, applied lazily)
    eotf = _srgb_to_linear_q16(single)
    counts = np.zeros(256, dtype=np.int64)
    step = max(1, _BLOCK_ELEMS // max(1, a.shape[1]))
    for r0 in range(0, a.shape[0], step):  # (ravel of the trimmed view would copy the image)
        counts += np.bincount(a[r0:r0 + step].ravel(), minlength=256)
    present = np.flatnonzero(counts)
    # -auto-level: range of the linear values over the trimmed image
    lo, hi = float(eotf[present].min()), float(eotf[present].max())
    if abs(hi - lo) >= (1e-15 if single else 1e-12):
        # per gray value, then mapped (the table has at most 256 distinct entries)
        vals = eotf.astype(np.float64)
        scale = 1.0 / (hi - lo)
        lv = _QR * (scale * (vals - lo))
        if single:
            lv32 = lv.astype(np.float32)
            lvq = np.where(lv32 <= 0, 0, np.where(lv32 >= _QR, _QR,
                           np.trunc((lv32 + np.float32(0.5)).astype(np.float32))))
        else:
            lvq = np.where(lv <= 0, 0, np.where(lv >= _QR, _QR, np.floor(lv + 0.5)))
        lvq = lvq.astype(np.int64)
        # -depth 8
        if single:
            d = np.trunc((lvq * 255).astype(np.float32) / np.float32(_QR) + 0.5)
        else:
            d = lvq // 257
        table = (d.astype(np.int64) * 257)
    else:
        table = eotf
        if single:
            table = np.trunc(table * 255 / _QR + 0.5).astype(np.int64) * 257
        else:
            table = (table // 257) * 257
    out = _resize_mapped(a, table.astype(np.float32 if single else np.float64), single)
    if single:
        return _quantum_to_char(out)
    # 6.9.11's PNG coder scales 16 -> 8 bits with ScaleQuantumToAny, which floors
    return (out.astype(np.int64) // 257).astype(np.uint8)


def preprocess_pixels(pixels: np.ndarray, meta: PixelMeta, version: str = IM_AUTHORS) -> np.ndarray:
    """dcmj2pnm rendering followed by the ImageMagick recipe: the authors' 512 PNG pixels."""
    return imagemagick_recipe(dcmj2pnm_8bit(pixels, meta), version)


def check_rendered(gray: np.ndarray) -> str | None:
    """None for a rendered 8-bit image with contrast; else the reason it is useless (one
    sentence, no status prefix): e.g. a RescaleSlope that maps every pixel to one gray level."""
    g = np.asarray(gray)
    if g.size == 0:
        return "the preprocessed image is empty"
    lo, hi = int(g.min()), int(g.max())
    if hi - lo < MIN_CONTRAST:
        return (f"the preprocessed image has no contrast (every pixel is gray level {lo}" + (f" or {hi}" if hi != lo else "")
                + "): the pixel data or its rescale/LUT make a blank image")
    return None


def preprocess_checked(pixels: np.ndarray, meta: PixelMeta, version: str = IM_AUTHORS, *,
                       max_aspect: float | None = MAX_ASPECT) -> np.ndarray:
    """:func:`preprocess_pixels` for scoring: the same pixels, or :class:`ImageRefused` when the
    trimmed image is more elongated than ``max_aspect`` (or its resize too large) or the result
    has no contrast (:func:`check_rendered`). ``pixels`` may be a one-element list: the array
    is then taken out of it and freed as soon as it is rendered to 8 bits (large images)."""
    if isinstance(pixels, list):  # [array]: handed over, freed once rendered to 8 bits
        img8 = dcmj2pnm_8bit(pixels.pop(), meta)
    else:
        img8 = dcmj2pnm_8bit(pixels, meta)
    gray = imagemagick_recipe(img8, version, max_aspect=max_aspect)
    del img8
    why = check_rendered(gray)
    if why:
        raise ImageRefused(why)
    return gray


# ----------------------------------------------------------------------------------------
# PNG
# ----------------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path: str | Path, img8: np.ndarray) -> None:
    """Write an 8-bit grayscale PNG with ``gAMA`` 1.0 (as ImageMagick does after -colorspace RGB)."""
    a = np.ascontiguousarray(np.asarray(img8))
    if a.ndim != 2 or a.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 gray image, got {a.dtype} {a.shape}")
    h, w = a.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), a], axis=1).tobytes()  # filter 0 per row
    data = b"\x89PNG\r\n\x1a\n"
    data += _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    data += _chunk(b"gAMA", struct.pack(">I", 100000))
    data += _chunk(b"IDAT", zlib.compress(raw, 6))
    data += _chunk(b"IEND", b"")
    Path(path).write_bytes(data)


def read_png_gray(path: str | Path) -> np.ndarray:
    """Read a PNG as a 2-D gray array (uint8, or uint16 for 16-bit PNGs); colour is refused."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("L", "I;16", "I;16B", "I;16L"):
            a = np.array(im)
        elif im.mode == "I":
            a = np.array(im).astype(np.uint16)
        elif im.mode in ("LA", "P", "1"):
            a = np.array(im.convert("L"))
        else:
            raise ValueError(f"{path} is not a grayscale PNG (mode {im.mode})")
    return a
