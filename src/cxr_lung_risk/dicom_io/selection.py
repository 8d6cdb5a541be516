"""The selection policy: :class:`SelectionOptions`, :class:`LoadedImage`, which objects are
frontal chest radiographs (modality, SOP class, view, body part, For Processing, own results),
the pixel description and its limits, the source UIDs as clean strings."""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pydicom.errors
import pydicom.filereader
import pydicom.multival
import pydicom.uid
from pydicom.dataset import Dataset
from pydicom.uid import UID

from ..preprocess import PixelMeta

from ._common import (  # noqa: F401
    CHEST_BODY_PARTS,
    CHEST_WORDS,
    DX_PROCESSING,
    LATERAL_VIEWS,
    MEDIA_STORAGE_DIRECTORY,
    MODALITY_FROM_SOP,
    SC_RADIOGRAPH_CONVERSION_TYPES,
    SECONDARY_CAPTURE_PREFIX,
    SUPPORTED_BITS_ALLOCATED,
    fail,
    float_attr,
    int_attr,
    printable,
    short_error,
    skip,
    sop_class_name,
    text_attr,
)


# --------------------------------------------------------------------------------------------
# selection options and result
# --------------------------------------------------------------------------------------------
@dataclass
class SelectionOptions:
    """Selection rules; each option widens one rule.

    allow_lateral: accept lateral views (with a warning).
    allow_for_processing: accept DX FOR PROCESSING images (with a warning).
    allow_non_chest: accept a BodyPartExamined that is not chest-like (EXTREMITY, HAND, SKULL...)
        with a warning (True, CLI ``--allow-non-chest``) or skip it (False, the default).
    allowed_modalities: modalities accepted unconditionally.
    accept_radiograph_like_sc: accept Secondary Capture that looks like a radiograph (see module doc).
    allow_multiframe: accept multi-frame images, using frame 1 only (with a warning).
    max_pixels: refuse images whose Rows x Columns x frames exceeds this (memory-bomb guard),
        checked before decoding (and against the codestream header of compressed data).
    max_aspect_ratio: refuse images whose long side is more than this many times the short
        side (a chest radiograph is never 1:1000; the 512-pixel short-side resize of such an
        image would be hundreds of millions of pixels), checked before decoding.
    """

    allow_lateral: bool = False
    allow_for_processing: bool = False
    allow_non_chest: bool = False
    allowed_modalities: tuple[str, ...] = ("CR", "DX")
    accept_radiograph_like_sc: bool = True
    allow_multiframe: bool = False
    max_pixels: int = 100_000_000
    max_aspect_ratio: float = 4.0


@dataclass
class LoadedImage:
    """What :func:`load_image` made of one file."""

    status: str  # 'ok' | 'skipped' | 'failed'
    reason: str = ""  # '' when ok; otherwise one sentence starting with "skipped: "/"failed: "
    warnings: list[str] = field(default_factory=list)
    pixels: np.ndarray | None = None  # 2-D raw stored values
    meta: PixelMeta | None = None
    dataset: Dataset | None = None  # header without PixelData (file meta included)
    #: Clean UID strings by keyword, computed once by :func:`load_image` (see :func:`_clean_uid`).
    uids: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def sentence(self) -> str:
        """The reason without its leading status word ("failed: ", "skipped: ")."""
        prefix = f"{self.status}: "
        return self.reason[len(prefix):] if self.reason.startswith(prefix) else self.reason

    def _uid(self, keyword: str) -> str:
        if keyword in self.uids:
            return self.uids[keyword]
        if self.dataset is None:
            return ""
        return _clean_uid(self.dataset, keyword)[0]

    @property
    def study_uid(self) -> str:
        return self._uid("StudyInstanceUID")

    @property
    def series_uid(self) -> str:
        return self._uid("SeriesInstanceUID")

    @property
    def sop_uid(self) -> str:
        return self._uid("SOPInstanceUID")

    @property
    def sop_class_uid(self) -> str:
        return self._uid("SOPClassUID")

    @property
    def ok(self) -> bool:
        return self.status == "ok"



# --------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------
_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
_MAX_UID_TEXT = 256


def _uid_problem(uid: str) -> str:
    if len(uid) > 64:
        return f"{len(uid)} characters, more than 64"
    if any(ch not in "0123456789." for ch in uid):
        return "characters other than digits and dots"
    return "an empty component or a leading zero"


def _clean_uid(ds: Dataset, keyword: str) -> tuple[str, str | None]:
    """One clean string for a UID attribute, from its raw value, and a warning or None.

    A value with a backslash (which pydicom reads as several values) becomes one string with the
    backslash replaced by '.'; unprintable characters become '?'; more than 256 characters are
    cut; a value that is still not a valid UID is kept as text with a warning.
    """
    try:
        if keyword not in ds:
            return "", None
        elem = ds.get_item(keyword)
        value = elem.value if elem is not None else None
    except Exception as exc:  # noqa: BLE001 - a malformed value must not make a property raise
        return "", f"{keyword} is unreadable ({short_error(exc, 80)})"
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).decode("latin-1")
    elif isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        text = "\\".join(str(v) for v in value)
    elif value is None:
        text = ""
    else:
        text = str(value)
    text = text.strip(" \x00")
    if not text:
        return "", None
    clean = "".join(ch if ch.isprintable() else "?" for ch in text)
    problems: list[str] = []
    if "\\" in clean:
        parts = [p.strip(" \x00") for p in clean.split("\\")]
        parts = [p for p in parts if p]
        clean = ".".join(parts)
        problems.append(f"holds {len(parts)} values (a backslash in a UID)")
    if len(clean) > _MAX_UID_TEXT:
        clean = clean[:_MAX_UID_TEXT]
        problems.append(f"is longer than {_MAX_UID_TEXT} characters (cut)")
    if not UID(clean).is_valid:
        problems.append(f"is not a valid UID ({_uid_problem(clean)})")
    if not problems:
        return clean, None
    shown = printable(text, 80)
    using = f"; using '{printable(clean, 80)}'" if clean != text else "; kept as text"
    return clean, f"{keyword} '{shown}' {' and '.join(problems)}{using}"


def collect_uids(ds: Dataset, notes: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for keyword in _UID_KEYWORDS:
        out[keyword], warning = _clean_uid(ds, keyword)
        if warning:
            notes.append(warning)
    return out


def _is_chest_body_part(body: str) -> bool:
    """Whether an (upper-cased) BodyPartExamined is empty or chest-like (see CHEST_WORDS)."""
    if body in CHEST_BODY_PARTS:
        return True
    folded = unicodedata.normalize("NFKD", body).encode("ascii", "ignore").decode("ascii").upper()
    words = re.split(r"[\s_\-/,.+;:()&]+", folded)
    return any(w in CHEST_WORDS for w in words)



# --------------------------------------------------------------------------------------------
# policy
# --------------------------------------------------------------------------------------------
def _is_dicomdir(path: Path, ds: Dataset) -> bool:
    media = ""
    try:
        media = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    except Exception:
        pass
    if media == MEDIA_STORAGE_DIRECTORY or str(ds.get("SOPClassUID", "") or "") == MEDIA_STORAGE_DIRECTORY:
        return True
    return "DirectoryRecordSequence" in ds


#: The Manufacturer of every DICOM object this package writes (SR, result image, saliency SC).
OWN_MANUFACTURER = "cxr-lung-risk open implementation"


def own_result(ds: Dataset) -> str:
    """What kind of this tool's own output ``ds`` is (e.g. "a result image (SC) made by
    cxr-lung-risk 0.1.0"), or '' when it is not one: a study sent back to the node, or a folder
    holding an earlier run's outputs, must not have its results scored as radiographs."""
    if text_attr(ds, "Manufacturer") != OWN_MANUFACTURER.upper():
        return ""

    def raw(kw: str) -> str:
        try:
            return str(ds.get(kw, "") or "").strip()[:64]
        except Exception:  # noqa: BLE001 - a malformed value is left out of the message
            return ""

    sop_class = raw("SOPClassUID")
    kind = ("a structured report" if sop_class.startswith("1.2.840.10008.5.1.4.1.1.88")
            else "a derived image (SC)" if sop_class.startswith(SECONDARY_CAPTURE_PREFIX) else "an object")
    series, version = raw("SeriesDescription"), raw("SoftwareVersions")
    return (f"{kind} made by cxr-lung-risk{' ' + version if version else ''}"
            + (f" ({series})" if series else "") + ", not a source image")


def _modality(ds: Dataset, sop_class: str) -> str:
    modality = text_attr(ds, "Modality")
    if not modality:
        modality = MODALITY_FROM_SOP.get(sop_class, "")
    return modality


def _is_lateral(ds: Dataset) -> str:
    """A short description of why the view is lateral, or '' when it is not (or unknown)."""
    view = text_attr(ds, "ViewPosition")
    if view in LATERAL_VIEWS:
        return f"ViewPosition {view}"
    image_type = [v.strip() for v in text_attr(ds, "ImageType").split("\\")]
    if "LATERAL" in image_type:
        return "ImageType contains LATERAL"
    try:
        for item in ds.get("ViewCodeSequence", None) or []:
            meaning = str(item.get("CodeMeaning", "") or "")
            if "lateral" in meaning.lower() and "medio" not in meaning.lower():
                return f"view code '{meaning}'"
    except Exception:
        pass
    return ""


def check_policy(path: Path, ds: Dataset, opts: SelectionOptions, notes: list[str]) -> tuple[int, int, int]:
    """Apply the selection rules to a header; returns (rows, columns, frames) or raises Refusal."""
    if _is_dicomdir(path, ds):
        raise skip("DICOMDIR (a media directory index, not an image)")
    own = own_result(ds)
    if own:
        raise skip(f"own result: {own}")
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if not sop_class:
        try:
            sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
        except Exception:
            sop_class = ""
    if sop_class and not UID(sop_class).is_valid:
        raise fail(f"SOPClassUID '{sop_class[:64]}' is not a valid UID (corrupt header)")
    modality = _modality(ds, sop_class)
    if "Rows" not in ds and "Columns" not in ds:
        what = sop_class_name(sop_class)
        if not sop_class:
            raise fail("the header has neither a SOP Class UID nor Rows/Columns (file truncated or corrupt)")
        if "Image Storage" in what:
            raise fail(f"{what} header has no Rows/Columns (file truncated or malformed)")
        mod = f", modality {modality}" if modality else ""
        raise skip(f"{what}{mod} is not an image (no pixel data)")

    allowed = tuple(m.upper() for m in opts.allowed_modalities)
    if modality not in allowed:
        is_sc = modality in ("SC", "OT", "") and (
            sop_class.startswith(SECONDARY_CAPTURE_PREFIX) or modality == "SC"
        )
        if is_sc and opts.accept_radiograph_like_sc:
            conversion = text_attr(ds, "ConversionType")
            body = text_attr(ds, "BodyPartExamined")
            if conversion in SC_RADIOGRAPH_CONVERSION_TYPES or (body and _is_chest_body_part(body)):
                notes.append(
                    f"secondary capture (modality {modality or 'missing'}, ConversionType "
                    f"{conversion or 'missing'}, BodyPartExamined {body or 'missing'}) accepted as a radiograph"
                )
            else:
                raise skip(
                    f"secondary capture (modality {modality or 'missing'}, ConversionType "
                    f"{conversion or 'missing'}, BodyPartExamined {body or 'missing'}) does not look like "
                    f"a radiograph (needs ConversionType DF/DI or a chest BodyPartExamined)"
                )
        elif not modality:
            raise skip(f"modality is missing and {sop_class_name(sop_class)} is not a radiograph (CR/DX)")
        else:
            raise skip(f"modality {modality} is not a radiograph ({'/'.join(allowed)})")

    intent = text_attr(ds, "PresentationIntentType")
    if intent == "FOR PROCESSING" or sop_class == DX_PROCESSING:
        if not opts.allow_for_processing:
            raise skip("DX image is FOR PROCESSING (raw detector data), not FOR PRESENTATION")
        notes.append("FOR PROCESSING image accepted (raw detector data)")

    frames = int_attr(ds, "NumberOfFrames", 1)
    if frames is None or frames < 1:
        frames = 1
    if frames > 1:
        if not opts.allow_multiframe:
            raise skip(f"multi-frame image ({frames} frames); only single-frame radiographs are supported")
        notes.append(f"multi-frame image: only frame 1 of {frames} is used")

    photometric = text_attr(ds, "PhotometricInterpretation")
    samples = int_attr(ds, "SamplesPerPixel", 1)
    if not photometric:
        raise fail("PhotometricInterpretation is missing")
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or samples != 1:
        raise skip(
            f"photometric interpretation {photometric} ({samples} samples per pixel) is not "
            f"monochrome (MONOCHROME1/MONOCHROME2)"
        )

    lateral = _is_lateral(ds)
    if lateral:
        if not opts.allow_lateral:
            raise skip(f"lateral view ({lateral}); only frontal (PA/AP) chest radiographs are supported")
        notes.append(f"lateral view accepted ({lateral})")

    body = text_attr(ds, "BodyPartExamined")
    if not _is_chest_body_part(body):
        body = printable(body, 64)
        if not opts.allow_non_chest:
            raise skip(f"BodyPartExamined is '{body}', not a chest radiograph (use --allow-non-chest to score it)")
        notes.append(f"BodyPartExamined is '{body}', not chest-like")

    rows = int_attr(ds, "Rows", 0) or 0
    cols = int_attr(ds, "Columns", 0) or 0
    if rows <= 0 or cols <= 0:
        raise fail(f"image dimensions are missing or zero (Rows {rows}, Columns {cols})")
    total = rows * cols * (frames if opts.allow_multiframe else 1)
    if total > opts.max_pixels:
        raise fail(
            f"image is too large ({rows} x {cols} = {rows * cols:,} pixels, limit {opts.max_pixels:,}); "
            f"not decoded"
        )
    long_side, short_side = max(rows, cols), min(rows, cols)
    if long_side > opts.max_aspect_ratio * short_side:
        ratio = long_side / short_side
        r = f"{ratio:.0f}" if ratio >= 10 else f"{ratio:.1f}"
        raise fail(
            f"image aspect ratio {f'1:{r}' if cols > rows else f'{r}:1'} cannot be a chest radiograph "
            f"(Rows {rows} x Columns {cols}, limit {opts.max_aspect_ratio:g}:1); not decoded"
        )
    return rows, cols, frames


def pixel_meta(ds: Dataset, notes: list[str]) -> PixelMeta:
    bits_allocated = int_attr(ds, "BitsAllocated", None)
    if bits_allocated not in SUPPORTED_BITS_ALLOCATED:
        raise fail(f"BitsAllocated {bits_allocated} is not supported (8, 16 or 32)")
    bits_stored = int_attr(ds, "BitsStored", bits_allocated)
    if bits_stored is None or not 1 <= bits_stored <= bits_allocated:
        raise fail(f"BitsStored {bits_stored} is not between 1 and BitsAllocated {bits_allocated}")
    high_bit = int_attr(ds, "HighBit", bits_stored - 1)
    if high_bit != bits_stored - 1:
        notes.append(f"HighBit {high_bit} is not BitsStored - 1 ({bits_stored - 1}); assuming {bits_stored - 1}")
    rep = int_attr(ds, "PixelRepresentation", 0)
    if rep not in (0, 1):
        raise fail(f"PixelRepresentation {rep} is invalid (0 or 1)")
    slope = float_attr(ds, "RescaleSlope", 1.0, notes)
    intercept = float_attr(ds, "RescaleIntercept", 0.0, notes)
    if slope == 0.0:
        notes.append("RescaleSlope is 0; using 1")
        slope = 1.0
    if "ModalityLUTSequence" in ds:
        notes.append("Modality LUT Sequence is ignored (as dcmj2pnm without options does)")
    shape = text_attr(ds, "PresentationLUTShape") or None
    if shape not in (None, "IDENTITY", "INVERSE"):
        notes.append(f"PresentationLUTShape {shape} is not IDENTITY/INVERSE; ignored")
        shape = None
    return PixelMeta(
        photometric=text_attr(ds, "PhotometricInterpretation"),
        bits_stored=bits_stored,
        bits_allocated=bits_allocated,
        pixel_representation=rep,
        rescale_slope=slope,
        rescale_intercept=intercept,
        presentation_lut_shape=shape,
    )
