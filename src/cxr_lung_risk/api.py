"""The stable Python API: prepare inputs, load the models once, score batches, write outputs.

Everything ``cxr-lung-risk predict`` does, in four steps a program can call (the CLI, the PACS
node and the cluster runner are built on them)::

    from cxr_lung_risk import api

    scorer = api.load_scorer(["lung-risk"], device="cpu")           # once per process
    p = api.prepare_input("chest.dcm")                               # a path ...
    q = api.prepare_input(blob, name="s3://bucket/x.dcm")            # ... bytes or a binary file object
    ok = [x for x in (p, q) if x.status is api.Status.OK]
    rows = scorer.score(ok)                                          # one row per image
    with api.OutputWriter("out", scorer.models, scorer.columns()) as w:
        records = w.write_scored(ok, rows)                           # SR, CSV/JSON rows, records
        for x in (p, q):
            if x.status is not api.Status.OK:
                w.account(x)                                         # every input gets one record

:func:`prepare_input` applies the same selection rules and the same preprocessing as ``predict``
and never raises for a bad input: the returned :class:`Prepared` carries ``status`` (ok /
skipped / failed), ``reason``, ``warnings``, the source ``uids`` and, when ok, the 3x224x224 uint8
``image`` the networks see. Bytes and file objects (from an object store, a network socket) are
spooled to a private temporary file first, so the same bounded, hostile-input-safe reader handles
them; their ``name`` is what the tables and records show.

Stable names (semantic versioning applies to them): :func:`prepare_input`, :func:`load_scorer`,
:class:`Scorer`, :class:`OutputWriter`, :class:`Prepared`, :class:`PrepareOptions`,
:class:`SelectionOptions`, :class:`InputRecord`, :class:`Status`, :func:`read_records`,
:func:`input_identity` (what a rerun compares to skip a finished input), :func:`shard_of` (which
``--shard`` an input belongs to).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Sequence, Union

from .dicom_io import InputFile, SelectionOptions
from .outputs.writer import OutputWriter
from .pipeline import PrepareOptions, Prepared, prepare
from .records import InputRecord, Status, read_records
from .resume import input_identity, shard_of

__all__ = [
    "prepare_input",
    "load_scorer",
    "Scorer",
    "OutputWriter",
    "Prepared",
    "PrepareOptions",
    "SelectionOptions",
    "InputRecord",
    "Status",
    "read_records",
    "input_identity",
    "shard_of",
    "MAX_STREAM_BYTES",
]

Source = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

MAX_STREAM_BYTES = 2 << 30  # a bytes/stream input larger than this is refused (a chest radiograph is < 200 MB)
_CHUNK = 1 << 20


def __getattr__(name: str) -> Any:  # Scorer pulls in torch: only when asked for
    if name == "Scorer":
        from .scoring import Scorer

        return Scorer
    raise AttributeError(name)


def _default_name(source: Any) -> str:
    n = getattr(source, "name", None)
    if isinstance(n, str) and n:
        return PurePosixPath(n.replace(os.sep, "/")).name or "input"
    return "input"


def _spool(source: Any, dest: Path, max_bytes: int) -> int | None:
    """Copy bytes or a binary stream into ``dest``; None when it is larger than ``max_bytes``."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = memoryview(source)
        if data.nbytes > max_bytes:
            return None
        with open(dest, "wb") as f:
            f.write(data)
        return data.nbytes
    total = 0
    with open(dest, "wb") as f:
        while True:
            chunk = source.read(_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                return None
            f.write(chunk)
    return total


def prepare_input(
    source: Source,
    *,
    name: str | None = None,
    options: PrepareOptions | None = None,
    max_bytes: int = MAX_STREAM_BYTES,
    rel: str | None = None,
) -> Prepared:
    """One input -> :class:`Prepared` (selection + the published preprocessing), never raising for
    bad input.

    ``source``: a path, ``bytes``, or a binary file object (read to its end; not closed).
    ``name``: what the outputs call it (``File`` column, record ``input``/``file``); default: the
    path, or the file object's base name. ``rel``: the ``File`` column alone, when it should differ
    from ``name`` (the cluster runner: ``name`` the full URL, ``rel`` the path under the archive
    root). The result's ``identity["sha256"]`` is the SHA-256 of the bytes read. ``options``: selection rules and ImageMagick version
    (default: ``predict``'s). Runs in this process: for many untrusted local files prefer
    :func:`cxr_lung_risk.pipeline.iter_prepared`, which fences each decode in a worker process.
    """
    opts = options or PrepareOptions()
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        return prepare(InputFile(path, rel or name or path.name, source=path), opts)
    if not isinstance(source, (bytes, bytearray, memoryview)) and not hasattr(source, "read"):
        raise TypeError(f"prepare_input takes a path, bytes or a binary file object, not {type(source).__name__}")
    label = name or _default_name(source)
    shown = InputFile(Path(label), rel or label)
    tmpdir = tempfile.mkdtemp(prefix="cxr-lung-risk-in-")
    try:
        tmp = Path(tmpdir) / ("input" + (PurePosixPath(label).suffix[:16] or ""))
        try:
            size = _spool(source, tmp, max_bytes)
        except (OSError, ValueError) as e:
            return Prepared(shown, Status.FAILED, f"failed: could not read the input stream: {type(e).__name__}: {str(e)[:160]}", input_name=label)
        if size is None:
            return Prepared(shown, Status.FAILED, f"failed: the input is larger than {max_bytes} bytes", input_name=label)
        p = prepare(InputFile(tmp, label), opts)
        p.file, p.input_name = shown, label
        return p
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def load_scorer(
    models: str | Sequence[str] = ("lung-risk",),
    *,
    weights: dict[str, Any] | None = None,
    device: str = "auto",
    precision: str = "fp32",
    all_members: bool = False,
    per_model: bool = False,
    tta: bool = True,
    linkage: bool = False,
):
    """Load ``models`` (``"lung-risk"``, ``"age"`` or ``"all"``) once -> :class:`Scorer`.

    ``weights``: a path per model key (a folder, zip or file as ``--weights`` takes); default:
    the ``fetch-weights`` cache. Raises :class:`~cxr_lung_risk.errors.WeightsNotFoundError` when
    they are missing. ``linkage``: rows carry PatientID, StudyDate, AccessionNumber and
    ViewPosition (identifying data).
    """
    from .registry import ModelOptions
    from .scoring import Scorer

    opts = ModelOptions(device=device, precision=precision, all_members=all_members, per_model=per_model, tta=tta)
    return Scorer.load(models, weights=weights, options=opts, linkage=linkage)
