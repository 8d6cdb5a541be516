"""The published zip is read in place: same weights, same results as the extracted folder."""
from __future__ import annotations

import zipfile

import numpy as np

from cxr_lung_risk.engine import LungRiskEnsemble
from cxr_lung_risk.spec import lung_risk_spec
from cxr_lung_risk.transforms import raster_batch


def test_ensemble_loads_from_the_zip_like_from_the_folder(synthetic_weights, synthetic_weights_zip, sample_pngs):
    spec = lung_risk_spec()
    z = synthetic_weights_zip  # the layout of Zenodo's zip, STORED; built once per session (conftest)
    with zipfile.ZipFile(z) as zf:
        assert zf.namelist() == [f"{spec.weights['archive_folder']}/{m.file}" for m in spec.members]
    x = raster_batch(sample_pngs)
    from_dir = LungRiskEnsemble.load(synthetic_weights, device="cpu").predict_uint8(x)
    from_zip = LungRiskEnsemble.load(z, device="cpu").predict_uint8(x)
    assert np.array_equal(from_zip.per_member, from_dir.per_member)
    assert np.array_equal(from_zip.scores, from_dir.scores)
