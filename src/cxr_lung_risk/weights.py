"""Loading published weights safely and strictly.

Accepts a directory of ``.pth`` files or the Zenodo zip itself (``ensamble-model-weights/...``),
bare state dicts or fastai's ``{'model': ..., 'opt': ...}`` container. Never unpickles arbitrary
objects: ``torch.load(weights_only=True)`` with an allow-listed stand-in for the one fastcore
class (``fastcore.foundation.L``) that fastai's optimizer state pickles; the ``opt`` part is
discarded.

Zip members are checked before anything is inflated: a member whose declared uncompressed size
exceeds ``MAX_MEMBER_BYTES`` (1 GiB) or ``EXPECTED_SIZE_FACTOR`` times the size of the model's
state dict (when the caller passes ``expected_bytes``), or whose compression ratio is absurd for
float weights (over ``MAX_COMPRESSION_RATIO``:1 for more than 16 MiB), is refused with
:class:`WeightsError`; reading is bounded by that limit too.
"""
from __future__ import annotations

import io
import os
import threading
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["WeightsError", "WeightSource", "load_state_dict_file", "load_into", "open_source", "state_dict_nbytes"]

#: Largest weights file accepted (the published members are 46-170 MB, CXR-Age's file 258 MB).
MAX_MEMBER_BYTES = 1 << 30
#: A file may hold the model plus fastai's optimizer state (Adam: two more copies of every
#: parameter, as CXR-Age's 258 MB file for a 87 MB model does) and pickle overhead.
EXPECTED_SIZE_FACTOR = 4
_EXPECTED_SLACK = 16 << 20
#: Float weights deflate to ~93% of their size; a member inflating more than this is a bomb.
MAX_COMPRESSION_RATIO = 100
_RATIO_MIN_BYTES = 16 << 20  # small members (a tiny test file of zeros) may compress well


from .errors import WeightsError  # noqa: E402  (the package's error family)


class _FastcoreL(list):
    """Stand-in for ``fastcore.foundation.L`` so fastai's optimizer state unpickles safely."""

    def __setstate__(self, state: Any) -> None:  # BUILD opcode
        items = state.get("items") if isinstance(state, dict) else None
        if items is not None:
            self[:] = list(items)


_FastcoreL.__module__ = "fastcore.foundation"
_FastcoreL.__qualname__ = "L"
_FastcoreL.__name__ = "L"



def _numpy_scalar_globals() -> list[Any]:
    """numpy scalars as fastai v1's optimizer state pickles them (``lr``/``betas`` are
    ``numpy.float64`` after one-cycle scheduling), under numpy 1.x's and 2.x's module names.
    An allow-list of value types only: ``scalar(dtype, bytes)`` builds a number, nothing else."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    out: list[Any] = [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    for name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "BoolDType"):
        t = getattr(getattr(np, "dtypes", None), name, None)
        if t is not None:
            out.append(t)
    return out


_SAFE_GLOBALS = [_FastcoreL, *_numpy_scalar_globals()]


def _torch_load(f: Any, name: str, mmap: bool) -> Any:
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{name}: cannot read the weights file ({msg[:200]})") from None
    except Exception as e:  # pickle.UnpicklingError and friends
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{name}: cannot read the weights file ({type(e).__name__}: {msg[:200]})") from None


def _unwrap(obj: Any, name: str) -> dict[str, torch.Tensor]:
    """fastai ``learn.load`` semantics: a dict whose keys are exactly {'model', 'opt'} is a container."""
    if isinstance(obj, Mapping) and set(obj.keys()) == {"model", "opt"}:
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{name}: not a state dict (expected tensors, or fastai's {{'model', 'opt'}} container)")
    return dict(obj)


def state_dict_nbytes(model: nn.Module | Mapping[str, torch.Tensor]) -> int:
    """Bytes of a model's state dict (also for a model on the meta device): what a weights file
    for it holds, before fastai's optimizer state and pickle overhead."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    return sum(int(t.numel()) * int(t.element_size()) for t in state.values() if isinstance(t, torch.Tensor))


def _size_limit(expected_bytes: int | None) -> int:
    if expected_bytes is None or expected_bytes <= 0:
        return MAX_MEMBER_BYTES
    return min(MAX_MEMBER_BYTES, EXPECTED_SIZE_FACTOR * int(expected_bytes) + _EXPECTED_SLACK)


def _refuse_size(name: str, size: int, limit: int, what: str) -> None:
    if size > limit:
        raise WeightsError(
            f"{name}: {what} {size:,} bytes, more than a weights file of this model can be ({limit:,}); "
            f"refused before reading (corrupt or not a weights file)"
        )


def _check_member(info: zipfile.ZipInfo, name: str, limit: int) -> None:
    """Refuse a zip member by its declared sizes, before inflating anything."""
    _refuse_size(name, info.file_size, limit, "the zip declares it uncompressed as")
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > _RATIO_MIN_BYTES:
        ratio = info.file_size / max(1, info.compress_size)
        if ratio > MAX_COMPRESSION_RATIO:
            raise WeightsError(
                f"{name}: compresses {ratio:,.0f}:1 ({info.compress_size:,} -> {info.file_size:,} bytes), absurd "
                f"for float weights (limit {MAX_COMPRESSION_RATIO}:1); refused before inflating (a zip bomb?)"
            )


def load_state_dict_file(path: str | Path, *, mmap: bool = True, expected_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Read one ``.pth`` file (bare state dict or fastai container) on the CPU.  With
    ``expected_bytes`` (:func:`state_dict_nbytes` of the model), a file far larger than that is
    refused before reading."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    size = path.stat().st_size
    if size == 0:
        raise WeightsError(f"{path}: weights file is empty")
    if expected_bytes is not None:
        _refuse_size(str(path), size, _size_limit(expected_bytes), "the file is")
    try:
        obj = _torch_load(str(path), str(path), mmap=mmap)
    except WeightsError:
        if not mmap:
            raise
        obj = _torch_load(str(path), str(path), mmap=False)  # legacy (non-zip) format
    return _unwrap(obj, str(path))


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], name: str, *, assign: bool = False) -> nn.Module:
    """Strictly load ``state`` into ``model``; any missing/unexpected/mis-shaped key is an error naming it."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise WeightsError(f"{name}: missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise WeightsError(
            f"{name}: unexpected key {unexpected[0]!r}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise WeightsError(f"{name}: key {k!r} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
    state = {k: (t.float() if t.is_floating_point() and t.dtype != expected[k].dtype else t) for k, t in state.items()}
    model.load_state_dict(state, strict=True, assign=assign)
    return model


class WeightSource:
    """Where the member files come from: a directory, or the published zip (read in place)."""

    def __init__(self, location: str | Path) -> None:
        self.location = Path(location)
        self._zip: zipfile.ZipFile | None = None
        self._names: dict[str, str] = {}
        if self.location.is_dir():
            self.kind = "dir"
        elif self.location.is_file() and zipfile.is_zipfile(self.location):
            self.kind = "zip"
            try:
                self._zip = zipfile.ZipFile(self.location)
                for info in self._zip.infolist():
                    if not info.is_dir():
                        self._names.setdefault(Path(info.filename).name, info.filename)
            except (zipfile.BadZipFile, OSError) as e:
                raise WeightsError(f"{self.location}: the weights zip is corrupt ({e}); download it again") from None
        elif self.location.is_file():
            raise WeightsError(f"{self.location}: not a directory or a zip file of weights (is the download truncated?)")
        else:
            raise WeightsError(f"{self.location}: weights location not found")

    def __repr__(self) -> str:
        return f"WeightSource({str(self.location)!r})"

    def filenames(self) -> set[str]:
        """Names of the ``.pth`` files available (folder and its subfolders one level down, or zip)."""
        if self.kind == "dir":
            return {p.name for p in self.location.glob("*.pth")} | {p.name for p in self.location.glob("*/*.pth")}
        return {n for n in self._names if n.endswith(".pth")}

    def has(self, filename: str) -> bool:
        if self.kind == "dir":
            return (self.location / filename).is_file() or any(self.location.glob(f"*/{filename}"))
        return filename in self._names

    def path_of(self, filename: str) -> Path:
        if self.kind != "dir":
            raise WeightsError("path_of() is only for directories")
        direct = self.location / filename
        if direct.is_file():
            return direct
        found = sorted(self.location.glob(f"*/{filename}"))
        if not found:
            raise WeightsError(f"{direct}: weights file not found")
        return found[0]

    def byte_ranges(self, filenames: list[str]) -> list[tuple[Path, int, int]]:
        """(file, offset, length) of where each named member's bytes lie on disk."""
        out: list[tuple[Path, int, int]] = []
        for name in filenames:
            try:
                if self.kind == "dir":
                    p = self.path_of(name)
                    out.append((p, 0, p.stat().st_size))
                elif name in self._names:
                    assert self._zip is not None
                    info = self._zip.getinfo(self._names[name])
                    # local header (30 bytes + name + an extra field whose local length zipfile
                    # does not expose: 1 KiB allowed for it), then the compressed data
                    out.append((self.location, info.header_offset, 30 + len(info.filename.encode()) + 1024 + info.compress_size))
            except (WeightsError, OSError, KeyError):
                continue  # prefetching is advisory; load() reports the problem
        return out

    def prefetch(self, filenames: list[str]) -> threading.Thread | None:
        """Have the kernel read the named members into the page cache, in the background.

        A daemon thread walks the members' byte ranges in order, calling
        ``posix_fadvise(WILLNEED)`` on 512 KiB pieces (the kernel caps one call's readahead at
        the device's readahead/IO size, so one call per file would read only its first few MB).
        The reads are queued asynchronously, so the disk streams the later members while the
        first ones are being built; on a cold cache this replaces one-page-fault-at-a-time reads
        through the memory map (``benchmarks/bench_pipeline.py`` measures both). Advisory only:
        returns None and does nothing where the call does not exist (macOS, Windows).
        """
        advise = getattr(os, "posix_fadvise", None)
        ranges = self.byte_ranges(filenames)
        if advise is None or not ranges:
            return None

        def run() -> None:
            chunk = 512 << 10
            for path, offset, length in ranges:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError:
                    continue
                try:
                    for off in range(offset, offset + length, chunk):
                        advise(fd, off, chunk, os.POSIX_FADV_WILLNEED)
                except OSError:
                    pass
                finally:
                    os.close(fd)

        t = threading.Thread(target=run, name="cxr-weights-prefetch", daemon=True)
        t.start()
        return t

    def load(self, filename: str, *, mmap: bool = True, expected_bytes: int | None = None) -> dict[str, torch.Tensor]:
        """One member's state dict.  ``expected_bytes`` (:func:`state_dict_nbytes` of the model
        it is for) tightens the size limit from 1 GiB to ``EXPECTED_SIZE_FACTOR`` times that."""
        if self.kind == "dir":
            return load_state_dict_file(self.path_of(filename), mmap=mmap, expected_bytes=expected_bytes)
        assert self._zip is not None
        if filename not in self._names:
            raise WeightsError(f"{self.location}: {filename} is missing from the zip")
        member = self._names[filename]
        name = f"{self.location}!{member}"
        limit = _size_limit(expected_bytes)
        try:
            info = self._zip.getinfo(member)
            _check_member(info, name, limit)
            with self._zip.open(info) as f:
                data = f.read(limit + 1)  # never more than the limit, whatever the stream holds
            if len(data) > limit:
                raise WeightsError(f"{name}: inflates to more than {limit:,} bytes; refused (a zip bomb?)")
        except (zipfile.BadZipFile, OSError, EOFError, zipfile.LargeZipFile, KeyError) as e:
            raise WeightsError(f"{name}: cannot read it from the zip ({e}); the zip is corrupt, download it again") from None
        return _unwrap(_torch_load(io.BytesIO(data), name, mmap=False), name)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def open_source(location: str | Path) -> WeightSource:
    return WeightSource(location)
