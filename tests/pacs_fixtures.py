"""Fixtures of the PACS tests (marker ``pacs``): a real Orthanc per test module.

* ``orthanc_factory``: ``make(aet="ORTHANC", modalities={name: (aet, host, port)}, auth=False,
  overwrite=False, extra={...}) -> Orthanc`` (started; stopped at the module's end);
* ``orthanc``: one started Orthanc for the module (AE title ``ORTHANC``, no modalities; add one with
  ``orthanc.set_modality(name, aet, "127.0.0.1", port)``).

They skip (with the reason) only when Debian's ``orthanc`` / ``orthanc-dicomweb`` are not installed;
``scripts/test.sh`` installs them as root when missing. See ``tests/orthanc.py`` for the helpers.
"""
from __future__ import annotations

import pytest

from orthanc import Orthanc, dicomweb_plugin, orthanc_binary

MISSING = "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; scripts/test.sh does this as root)"


def require_orthanc() -> None:
    """Skip the test when the Orthanc binary or its DICOMweb plugin is absent."""
    if orthanc_binary() is None or dicomweb_plugin() is None:
        pytest.skip(MISSING)


@pytest.fixture(scope="module")
def orthanc_factory(tmp_path_factory):
    """Start real Orthanc servers on free 127.0.0.1 ports; all are stopped at the module's end."""
    require_orthanc()
    started: list[Orthanc] = []

    def make(**kw) -> Orthanc:
        o = Orthanc(tmp_path_factory.mktemp("orthanc"), **kw)
        started.append(o)
        return o.start()

    yield make
    for o in started:
        o.stop()


@pytest.fixture(scope="module")
def orthanc(orthanc_factory) -> Orthanc:
    """One started Orthanc for the test module (DICOMweb at ``orthanc.dicomweb_url``)."""
    return orthanc_factory()
