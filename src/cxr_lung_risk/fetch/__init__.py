"""Download, verify, extract and find the model weights (the ``fetch-weights`` subcommand).

Cache layout (``cache_dir()`` is ``$CXR_LUNG_RISK_HOME`` or the platform's user cache dir)::

    <cache>/cxr_lung_risk/ensamble-model-weights/Lung_Age_081221_{0..19}.pth
    <cache>/cxr_lung_risk/SOURCE.json       url, size, sha256 of the zip, date, per-file sizes/sha256
    <cache>/cxr_age/PLCO_Fine_Tuned_120419.pth
    <cache>/cxr_age/SOURCE.json

URLs, sizes, checksums and names come from the model specs (``models/*.json``, ``weights``
section). Downloads go to ``<file>.part`` and are resumed with an HTTP ``Range`` request when
interrupted; the finished file is fsync'd and renamed into place atomically, then its size and
SHA-256 are checked. The CXR-Lung-Risk zip is extracted into a staging folder that is renamed
into place only once every expected member has been read and CRC-checked, and the zip is then
deleted (its SHA-256 is kept in ``SOURCE.json``).

Only the standard library's ``urllib`` is used for HTTP; ``tqdm`` draws a progress bar when
stderr is a terminal. Every failure a user can cause or meet is raised as :class:`FetchError`
with one clear sentence.

Modules, one job each:

* :mod:`.layout`: the cache layout (:func:`cache_dir`, ``$CXR_LUNG_RISK_HOME``, the folders and
  files of each model), where a model's weights come from (the spec, or a mirror's
  ``CXR_*_WEIGHTS_{URL,SIZE,SHA256}``), the ``SOURCE.json`` records, the free-space check, and
  finding installed weights (:func:`find_lung_risk_weights`, :func:`find_age_weights`);
* :mod:`.downloading`: one URL to one file (:func:`download`): the lock, ``.part`` and HTTP
  ``Range`` resume, ``Content-Range`` checks, retries, the progress bar, size and SHA-256 checks;
* :mod:`.extraction`: the zip's expected members into place, safely (:func:`extract_zip_safely`);
* :mod:`.identity`: which weights a location holds (:func:`weights_identity`: source, SHA-256,
  published or synthetic), and hashing (``identity.hash_file``; each file hashed once per
  process and remembered in the cache's ``file_hashes.json``);
* :mod:`.installing`: :func:`fetch_weights`, which puts them together per model;
* ``_common`` (private to the package): :class:`FetchError` and small shared helpers.

This module names them all: everything ``cxr_lung_risk.fetch`` exported before the split is
still importable from here.
"""
from __future__ import annotations

from ..spec import age_spec, lung_risk_spec  # noqa: F401  (the package's names, as before the split)
from ._common import FetchError
from .downloading import download
from .extraction import extract_zip_safely
from .identity import SYNTHETIC_MARKER, weights_identity  # noqa: F401
from .installing import fetch_weights
from .layout import (  # noqa: F401  (the constants too, as before the split)
    ENV_HOME,
    ENV_OVERRIDES,
    MODELS,
    RECORD_NAME,
    age_weights_path,
    cache_dir,
    find_age_weights,
    find_lung_risk_weights,
    lung_risk_expected_members,
    lung_risk_weights_dir,
)

__all__ = [
    "FetchError",
    "cache_dir",
    "lung_risk_weights_dir",
    "age_weights_path",
    "lung_risk_expected_members",
    "find_lung_risk_weights",
    "find_age_weights",
    "download",
    "extract_zip_safely",
    "fetch_weights",
    "weights_identity",
]
