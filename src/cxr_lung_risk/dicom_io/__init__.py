"""DICOM in: find input files, decide which ones are frontal chest radiographs, decode them.

Every input ends up as a :class:`LoadedImage` whose ``status`` is ``'ok'``, ``'skipped'``
(a policy refusal: not a DICOM file, not a radiograph, a lateral view, ...) or ``'failed'``
(a broken file: truncated, malformed, undecodable, absurd dimensions).  ``reason`` is one human
sentence that starts with the status (``"skipped: modality CT is not a radiograph (CR/DX)"``);
:func:`load_image` never raises for bad input.

Selection policy (each rule can be widened through :class:`SelectionOptions`):

* DICOMDIR files and non-image objects (SR, PR, KO, RT plans/structures, waveforms, ... i.e.
  files without Rows/Columns) are skipped.
* Modality must be CR or DX.  A file without Modality takes it from its SOP class (Computed
  Radiography / Digital X-Ray storage).  Secondary Capture objects (Modality SC or OT, or a
  Secondary Capture SOP class without Modality) are accepted only when they look like a
  radiograph: ConversionType DF (digitized film) or DI (digital interface), or a chest-like
  BodyPartExamined.  Everything else (CT, MR, US, NM, SEG, MG, ...) is skipped.
* DX ``FOR PROCESSING`` images (PresentationIntentType or the For-Processing SOP class) are
  skipped: they hold raw detector data the models never saw.
* Only single-frame (NumberOfFrames <= 1), single-sample MONOCHROME1/MONOCHROME2 images.
* Lateral views (ViewPosition LL/RL/LATERAL/LAT/LLD/RLD..., 'LATERAL' in ImageType, or a view
  code whose meaning says lateral) are skipped; PA, AP and an unknown view are accepted.
* BodyPartExamined must be missing/empty or chest-like: CHEST, THORAX, LUNG(S), TORSO,
  CHEST_TO_PELVIS, or a value with such a word in it, compared case-, space- and accent-
  insensitively ('Chest', 'CHEST PA', 'THORAX AP') including common non-English terms (PECHO,
  TORAX, BRUST, BRUSTKORB, TORACE, PETTO, POITRINE).  Anything else (EXTREMITY, HAND, SKULL, ...)
  is skipped unless ``allow_non_chest`` (CLI ``--allow-non-chest``), which scores it with a
  warning.
* Rows x Columns x frames is checked against ``max_pixels`` and the aspect ratio against
  ``max_aspect_ratio`` (4:1) BEFORE anything is decoded.

Hostile input (each case is a ``failed``/``skipped`` result, never a hang, a traceback or an
unbounded allocation):

* the file is opened once, only after ``stat`` says it is a regular file (a FIFO, socket or
  device is ``skipped: not a regular file (FIFO)``; it is never opened for reading), with
  ``O_NONBLOCK``; every read is clamped to the file size known at open time;
* the header is parsed up to PixelData only (nothing after the pixel data is parsed, so a valid
  file followed by hundreds of MB of zeros costs milliseconds); an element whose declared length
  runs past the end of the file stops the parse before anything is allocated for it;
* the pixel data element is read by hand: its declared length is checked against the bytes that
  remain, native data is read only up to the size Rows x Columns x BitsAllocated needs, and
  encapsulated fragments are walked item by item;
* the codestream header of frame 1 (JPEG SOFn, JPEG-LS SOF55, JPEG 2000 SIZ, also inside JP2
  boxes) must agree with Rows/Columns/SamplesPerPixel and ``max_pixels`` before the decoder runs;
* a Deflated Explicit VR Little Endian data set is inflated incrementally: at most 32 MiB before
  the pixel data, then only the pixel bytes the header needs;
* warnings of pydicom/numpy/Pillow and the 'pydicom' logger are recorded on the result instead
  of reaching stderr; UIDs are returned as one clean string (a backslash or an invalid UID is a
  warning).

Decoding goes through pydicom 3 (``pydicom.pixels.pixel_array(..., raw=True)``) with the
pylibjpeg plug-ins, so every common transfer syntax works; the array holds the raw stored values
(no Modality LUT/rescale, no VOI, no colour conversion): rendering is :mod:`cxr_lung_risk.preprocess`'s job.

Modules, one job each: :mod:`.discovery` (finding inputs), :mod:`.selection` (the policy),
:mod:`.reading` (bounded reading and codestream checks), :mod:`.decoding` (pixels); this module
loads one image through them (:func:`load_image`, :func:`screen_image`) and names them all.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from pydicom.dataset import Dataset


from ._common import (  # noqa: F401  (the package's names, as before the split)
    CHEST_BODY_PARTS,
    CHEST_WORDS,
    CODESTREAM_PEEK,
    CR_STORAGE,
    DEFLATE_HEADER_ALLOWANCE,
    DX_PRESENTATION,
    DX_PROCESSING,
    DicomInputError,
    ITEM,
    JPEG_MAGIC,
    LATERAL_VIEWS,
    MEDIA_STORAGE_DIRECTORY,
    MODALITY_FROM_SOP,
    PASS_THROUGH,
    PIXEL_DATA,
    PIXEL_TAGS,
    PNG_MAGIC,
    Refusal,
    SC_RADIOGRAPH_CONVERSION_TYPES,
    SECONDARY_CAPTURE_PREFIX,
    SEQ_DELIM,
    SUPPORTED_BITS_ALLOCATED,
    UNDEFINED,
    VRS,
    fail,
    float_attr,
    int_attr,
    library_messages,
    merge_library_messages,
    printable,
    short_error,
    skip,
    sop_class_name,
    text_attr,
    ts_name,
)
from .decoding import (  # noqa: F401  (the package's names, as before the split)
    decode_frames,
    decode_pixels,
)
from .discovery import (  # noqa: F401  (the package's names, as before the split)
    InputFile,
    discover,
)
from .reading import (  # noqa: F401  (the package's names, as before the split)
    DicomReader,
    FileSource,
    MAX_HEADER_ELEMENTS,
    MAX_HEADER_SCAN_S,
    MAX_SEQUENCE_DEPTH,
    NotRegular,
    check_codestream,
    is_dicom_file,
    is_raster_image,
    looks_like_dicom,
    open_regular,
    raster_kind,
    read_header,
)
from .selection import (  # noqa: F401  (the package's names, as before the split)
    LoadedImage,
    OWN_MANUFACTURER,
    SelectionOptions,
    check_policy,
    collect_uids,
    own_result,
    pixel_meta,
)

__all__ = [
    "InputFile",
    "LoadedImage",
    "SelectionOptions",
    "discover",
    "is_dicom_file",
    "is_raster_image",
    "raster_kind",
    "load_image",
    "screen_image",
    "own_result",
    "read_header",
    "decode_pixels",
    "DicomInputError",
]


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def load_image(path: str | Path, options: SelectionOptions | None = None) -> LoadedImage:
    """Read, select and decode one file.  Never raises for bad input: every problem becomes a
    ``'skipped'`` or ``'failed'`` :class:`LoadedImage` with a one-sentence reason.  Warnings of
    the libraries (pydicom, numpy, Pillow, decoders) and pydicom's log messages become entries
    of ``warnings`` ('pydicom: ...', 'decoder: ...') instead of reaching stderr."""
    return _load_reporting(path, options, decode=True)


def screen_image(path: str | Path, options: SelectionOptions | None = None) -> LoadedImage:
    """:func:`load_image` without decoding: the selection rules and every check that needs no
    decoding (header, dimensions, photometric, transfer syntax, the pixel data's declared size
    against the bytes present, the codestream's header against the DICOM header). ``ok`` means
    the file is eligible and not certainly broken (``pixels`` is None); a ``failed`` or
    ``skipped`` result is what :func:`load_image` would say. Used by the PACS node to answer a
    C-STORE before acknowledging it."""
    return _load_reporting(path, options, decode=False)


def _load_reporting(path: str | Path, options: SelectionOptions | None, decode: bool) -> LoadedImage:
    """:func:`_load_image` with the libraries' warnings and log messages made the input's."""
    with library_messages() as messages:
        res = _load_image(Path(os.fsdecode(path)), options if options is not None else SelectionOptions(), decode=decode)
    res.warnings = [printable(w) for w in merge_library_messages(res.warnings, messages)]
    return res


def _open_failure(path: Path, exc: OSError) -> Refusal:
    """The reason for a path that cannot be opened (dangling or looping symbolic links named)."""
    try:
        is_link = stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        is_link = False
    if exc.errno == errno.ELOOP:
        return fail("symbolic link loop")
    if is_link and exc.errno == errno.ENOENT:
        return fail("broken symbolic link")
    return fail(f"cannot read the file ({short_error(exc, 100)})")


def _load_image(path: Path, opts: SelectionOptions, decode: bool = True) -> LoadedImage:
    notes: list[str] = []
    header: Dataset | None = None
    uids: dict[str, str] = {}
    try:
        try:
            f = open_regular(path)
        except NotRegular as exc:
            if exc.kind == "directory":
                raise fail("not a regular file") from None
            raise skip(f"not a regular file ({exc.kind})") from None
        except OSError as exc:
            raise _open_failure(path, exc) from None
        with f:
            if f.size == 0:
                raise fail("the file is empty (0 bytes)")
            if not looks_like_dicom(f.read(132), f.size):
                raise skip("not a DICOM file")
            reader = DicomReader(f, path)
            try:
                header = reader.read_header()
            except (Refusal, MemoryError):
                raise
            except PASS_THROUGH:
                raise
            except BaseException as exc:  # noqa: BLE001
                raise fail(f"malformed DICOM header: {short_error(exc)}") from None
            if len(header) == 0 and not getattr(header, "file_meta", None):
                raise fail("malformed DICOM: no data elements could be read")
            uids = collect_uids(header, notes)
            rows, cols, frames = check_policy(path, header, opts, notes)
            meta = pixel_meta(header, notes)
            reader.check_header()
            pixels = decode_frames(header, reader, rows, cols, frames, meta, opts, notes, decode)
        return LoadedImage("ok", "", notes, pixels, meta, header, uids)
    except Refusal as refusal:
        return LoadedImage(refusal.status, refusal.reason, notes, None, None, header, uids)
    except MemoryError:
        return LoadedImage("failed", "failed: not enough memory to read the file", notes, None, None, header, uids)
    except PASS_THROUGH:
        raise
    except BaseException as exc:  # noqa: BLE001 - last resort: never let a bad file escape
        return LoadedImage("failed", f"failed: unexpected error reading the file ({type(exc).__name__}: "
                           f"{short_error(exc, 120)})", notes, None, None, header, uids)
