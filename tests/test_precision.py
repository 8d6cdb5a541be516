"""Arithmetic policy: IEEE float32 by default (also for cuDNN/cuBLAS), reduced precision only on request."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cxr_lung_risk.age import CXRAge
from cxr_lung_risk.engine import LungRiskEnsemble, fp32_math, resolve_precision
from cxr_lung_risk.errors import DeviceError


def _flags() -> tuple[str, str]:
    return torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision


def test_fp32_math_sets_ieee_or_tf32_and_restores():
    before = _flags()
    with fp32_math():
        assert _flags() == ("ieee", "ieee")
        with fp32_math(allow_tf32=True):
            assert _flags() == ("tf32", "tf32")
        assert _flags() == ("ieee", "ieee")
    assert _flags() == before
    with pytest.raises(RuntimeError):
        with fp32_math():
            raise RuntimeError("boom")
    assert _flags() == before


def test_resolve_precision_refuses_gpu_only_modes_on_the_cpu():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("BF16", cpu) is torch.bfloat16
    for p in ("tf32", "fp16"):
        with pytest.raises(DeviceError, match="CUDA"):
            resolve_precision(p, cpu)
    with pytest.raises(DeviceError, match="unknown precision"):
        resolve_precision("int4", cpu)


class _Recorder(nn.Module):
    """Records the fp32 precision flags in force when it runs; outputs zeros (N, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(_flags())
        return torch.zeros(x.shape[0], 1)


def test_every_member_and_the_age_model_run_in_ieee_float32(synthetic_weights):
    ens = LungRiskEnsemble.load(synthetic_weights, device="cpu")
    rec = _Recorder()
    for m in ens.models:
        m.register_forward_pre_hook(lambda mod, args: rec.seen.append(_flags()))
    before = _flags()
    ens.predict_uint8(torch.zeros(2, 3, 224, 224, dtype=torch.uint8))
    assert len(rec.seen) == len(ens.models)
    assert set(rec.seen) == {("ieee", "ieee")}
    assert _flags() == before

    age_rec = _Recorder()
    CXRAge(age_rec, tta=False).predict_uint8(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    assert age_rec.seen == [("ieee", "ieee")]


def test_bf16_is_close_to_fp32_but_not_equal_and_heads_stay_float32(synthetic_weights, sample_pngs):
    from cxr_lung_risk.transforms import normalize, raster_batch

    x = raster_batch(sample_pngs[:2])
    fp32 = LungRiskEnsemble.load(synthetic_weights, device="cpu").predict_uint8(x)
    bf16_ens = LungRiskEnsemble.load(synthetic_weights, device="cpu", precision="bf16")
    raw = bf16_ens.member_outputs(normalize(x, bf16_ens.spec.mean, bf16_ens.spec.std))
    assert raw.dtype == torch.float32
    d = np.abs(raw.double().numpy() - fp32.per_member)
    assert d.max() > 1e-4  # it really ran in reduced precision
    assert d.max() < 1.0  # the synthetic members' outputs span about [-1.4, 0.8]
