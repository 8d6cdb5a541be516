"""Input -> prepared 224x224 crop, in order, optionally in worker processes.

One job: turn each discovered input (DICOM or PNG/JPEG) into the exact uint8 image the
networks see, or a recorded reason why not. Data flows one way: ``dicom_io`` ->
``preprocess`` -> ``transforms``.
"""
from __future__ import annotations

import os
import warnings
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from . import dicom_io, preprocess, transforms
from .dicom_io import InputFile, SelectionOptions
from .records import Status

__all__ = ["PrepareOptions", "Prepared", "prepare", "iter_prepared", "RASTER_SUFFIXES"]

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class PrepareOptions:
    selection: SelectionOptions = field(default_factory=SelectionOptions)
    im_version: str = preprocess.IM_AUTHORS
    size: int = 224
    keep_512: bool = False  # keep the preprocessed gray image (``preprocess`` command, saliency)
    accept_raster: bool = True  # PNG/JPEG inputs (already preprocessed by the user)


@dataclass
class Prepared:
    file: InputFile
    status: Status
    reason: str = ""
    warnings: list[str] = field(default_factory=list)
    kind: str = ""  # dicom | raster
    image: np.ndarray | None = None  # uint8 CHW 3 x size x size
    gray: np.ndarray | None = None  # uint8 preprocessed gray image (DICOM only, keep_512)
    dataset: Any = None  # pydicom header without pixel data (DICOM only)
    uids: dict[str, str] = field(default_factory=dict)


def prepare(item: InputFile, opts: PrepareOptions) -> Prepared:
    """Never raises for bad input: the reason lands in the returned record. Warnings raised by
    the libraries (pydicom, numpy, Pillow) while this input is read become its warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = _prepare(item, opts)
    seen = set(p.warnings)
    for w in caught:
        msg = " ".join(str(w.message).split())[:200]
        if msg and msg not in seen:
            seen.add(msg)
            p.warnings.append(msg)
    return p


def _prepare(item: InputFile, opts: PrepareOptions) -> Prepared:
    path = item.path
    try:
        if opts.accept_raster and dicom_io.is_raster_image(path):
            img = transforms.open_raster(path)
            crop = transforms.center_crop_resize(img, opts.size)
            return Prepared(item, Status.OK, kind="raster", image=transforms.to_uint8_chw(crop))
        loaded = dicom_io.load_image(path, opts.selection)
        uids = {
            "StudyInstanceUID": loaded.study_uid or "",
            "SeriesInstanceUID": loaded.series_uid or "",
            "SOPInstanceUID": loaded.sop_uid or "",
        }
        status = Status(str(loaded.status))
        if status is not Status.OK:
            if loaded.reason.startswith("skipped: not a DICOM file") and opts.accept_raster:
                reason = "skipped: not a DICOM file or a PNG/JPEG image"
            else:
                reason = loaded.reason
            return Prepared(item, status, reason, list(loaded.warnings), "dicom", uids=uids)
        gray = preprocess.preprocess_pixels(loaded.pixels, loaded.meta, version=opts.im_version)
        crop = transforms.center_crop_resize(transforms.gray_to_pil(gray), opts.size)
        return Prepared(
            item,
            Status.OK,
            warnings=list(loaded.warnings),
            kind="dicom",
            image=transforms.to_uint8_chw(crop),
            gray=gray if opts.keep_512 else None,
            dataset=loaded.dataset,
            uids=uids,
        )
    except transforms.RasterError as e:
        return Prepared(item, Status.FAILED, f"failed: {e}")
    except MemoryError:
        return Prepared(item, Status.FAILED, "failed: not enough memory to decode this image")
    except Exception as e:  # a bug or an unforeseen file: record it, keep the batch going
        return Prepared(item, Status.FAILED, f"failed: {type(e).__name__}: {str(e)[:200]}")


def default_workers() -> int:
    n = os.cpu_count() or 1
    return max(0, min(8, n - 1)) if n > 2 else 0


def iter_prepared(files: Iterable[InputFile], opts: PrepareOptions, workers: int = 0, prefetch: int = 16) -> Iterator[Prepared]:
    """Prepared records in input order; with ``workers > 0`` decoding runs in processes, a bounded
    number of items ahead of the consumer (constant memory in the number of inputs)."""
    if workers <= 0:
        for f in files:
            yield prepare(f, opts)
        return
    ex: Executor = ProcessPoolExecutor(max_workers=workers)
    try:
        window: deque = deque()
        it = iter(files)
        for f in it:
            window.append(ex.submit(prepare, f, opts))
            if len(window) >= max(prefetch, workers * 2):
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
