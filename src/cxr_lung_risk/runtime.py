"""Device and arithmetic policy: the one place that decides where and how models compute.

* :func:`resolve_device`: ``auto`` -> CUDA when available, else the CPU.
* :func:`resolve_precision`: which arithmetic a model's convolutional body runs in, refusing
  combinations that are unsupported or meaningless (tf32/fp16 on the CPU, ...).
* :func:`fp32_math`: IEEE float32 for cuDNN convolutions and cuBLAS matmuls for the duration of
  a forward pass (PyTorch would otherwise run float32 convolutions in TF32 on recent GPUs).
* :class:`Placement`: what a loaded model actually uses (device and arithmetic), recorded in
  every output. A model that has no reduced-precision path (CXR-Age) reports ``fp32`` whatever
  was requested for the ensemble.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import DeviceError

__all__ = ["PRECISIONS", "DEVICES", "Placement", "resolve_device", "resolve_precision", "fp32_math", "placement"]

DEVICES = ("auto", "cpu", "cuda")

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")

def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda was requested but no CUDA device is available; use --device cpu")
    return torch.device(device)


@contextmanager
def fp32_math(allow_tf32: bool = False):
    """Float32 convolutions and matmuls in IEEE float32 (default) or, if allowed, TF32 on CUDA.

    PyTorch lets cuDNN run float32 convolutions in TF32 unless told otherwise, which changes a
    member's output in the 4th significant digit: not the published model's arithmetic. This sets
    the fp32 precision of cuDNN convolutions and cuBLAS matmuls for the duration of the block and
    restores the previous settings after it. No effect on the CPU's arithmetic.
    """
    want = "tf32" if allow_tf32 else "ieee"
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        saved = (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
        conv.fp32_precision = want
        torch.backends.cuda.matmul.fp32_precision = want
        try:
            yield
        finally:
            conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved
    else:  # older torch: the legacy flags
        saved_l = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = bool(allow_tf32)
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved_l


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """``'fp32'`` / ``'tf32'`` -> None (no autocast); ``'bf16'`` / ``'fp16'`` -> the autocast dtype.

    Refuses combinations that would be silently slow, meaningless or unsupported: tf32 or fp16 on
    the CPU, bf16 on a GPU without bfloat16 support.
    """
    p = str(precision).lower()
    if p not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if p == "fp32":
        return None
    if p == "tf32":
        if device.type != "cuda":
            raise DeviceError("--precision tf32 needs a CUDA GPU (TF32 tensor cores); on the CPU use fp32 or bf16")
        return None
    if p == "fp16":
        if device.type != "cuda":
            raise DeviceError("--precision fp16 needs a CUDA device; on the CPU use bf16 or fp32")
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError("--precision bf16: this GPU does not support bfloat16; use fp16 or fp32")
    return torch.bfloat16


@dataclass(frozen=True)
class Placement:
    """Where one loaded model computes and in which arithmetic (what the outputs record)."""

    device: torch.device
    precision: str = "fp32"  # fp32 | tf32 | bf16 | fp16: the arithmetic actually used

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return resolve_precision(self.precision, self.device)

    @property
    def allow_tf32(self) -> bool:
        return self.precision == "tf32"

    @property
    def device_name(self) -> str:
        """``cpu`` or ``cuda:0 (NVIDIA H200)``: the device actually used, as recorded."""
        d = self.device
        if d.type == "cuda":
            idx = d.index if d.index is not None else torch.cuda.current_device()
            try:
                return f"cuda:{idx} ({torch.cuda.get_device_name(idx)})"
            except Exception:  # pragma: no cover - driver trouble
                return f"cuda:{idx}"
        return d.type

    def parameters(self) -> dict[str, str]:
        """The run parameters this placement adds to an output's algorithm description."""
        return {"device": self.device_name, "precision": self.precision}


def placement(device: str | torch.device = "auto", precision: str = "fp32", *, reduced_precision: bool = True) -> Placement:
    """Resolve a request into a :class:`Placement`.

    ``reduced_precision=False`` is for models without a reduced-precision path: they run (and
    report) IEEE float32 whatever was requested, after the request itself was validated.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(str(device))
    resolve_precision(precision, dev)  # refuse unsupported requests for every model alike
    p = str(precision).lower()
    if not reduced_precision and p != "fp32":
        p = "fp32"
    return Placement(dev, p)
