"""The published zip is read in place: same weights, same results as the extracted folder."""
from __future__ import annotations

import zipfile

import numpy as np
import torch

from cxr_lung_risk.engine import LungRiskEnsemble
from cxr_lung_risk.spec import lung_risk_spec
from cxr_lung_risk.transforms import center_crop_resize, open_raster, to_uint8_chw


def test_ensemble_loads_from_the_zip_like_from_the_folder(tmp_path, synthetic_weights, sample_pngs):
    spec = lung_risk_spec()
    z = tmp_path / spec.weights["archive"]
    folder = spec.weights["archive_folder"]
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_STORED) as zf:  # the layout of Zenodo's zip
        for m in spec.members:
            zf.write(synthetic_weights / m.file, f"{folder}/{m.file}")
    x = torch.from_numpy(np.stack([to_uint8_chw(center_crop_resize(open_raster(p))) for p in sample_pngs]))
    from_dir = LungRiskEnsemble.load(synthetic_weights, device="cpu").predict_uint8(x)
    from_zip = LungRiskEnsemble.load(z, device="cpu").predict_uint8(x)
    assert np.array_equal(from_zip.per_member, from_dir.per_member)
    assert np.array_equal(from_zip.scores, from_dir.scores)
