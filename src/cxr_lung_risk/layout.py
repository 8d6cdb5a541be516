"""Which inference layout each network architecture runs in on this CPU (issue 26).

Two layouts compute the same function (outputs agree to float32 reordering, ~1e-6 relative):

* ``plain``: the published layout -- BatchNorm kept, NCHW (contiguous) tensors. The reference.
* ``fast``: BatchNorm folded into the convolutions, weights and activations channels_last (NHWC).

Which one is faster depends on the CPU, not on the weights: on AVX-512 CPUs (Zen 4/5) ``fast``
measured 1.2-1.6x faster; on a 2-core AVX2-only Zen 3 the ``plain`` path measured faster for the
ensemble as a whole (1.17 vs 1.28 s/image). So ``auto`` (the default for float32 on the CPU)
decides per architecture *at load time*: it builds the first member of each architecture both ways,
times both on a small random batch (alternating, after a warm-up, best of two) and keeps the
faster one (``plain`` only when it is at least :data:`MARGIN` faster: ``fast`` is the tested
default). The answer is cached per CPU, instruction set, torch version and thread count in
``<cache>/engine_layouts.json`` (see :mod:`cxr_lung_risk.fetch`'s cache folder), so only the first
load on a machine pays for it (a few seconds). The choice and how it was made are recorded with
the model: ``run.json``'s ``models`` (layout, how it was decided, the times) and the SR's
algorithm parameters (``layout``).

``CXR_LUNG_RISK_LAYOUT=fast|plain|auto`` (or ``layout=`` of the engine's ``load``) overrides it.
CUDA and reduced precision always run ``fast`` (channels_last is what tensor cores want).
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .errors import UsageError

__all__ = [
    "LAYOUTS", "ENV_LAYOUT", "MARGIN", "CACHE_NAME", "LayoutChoice", "requested_layout", "cpu_name", "cpu_flags", "cpu_key",
    "time_alternating", "LayoutCache", "describe",
]

LAYOUTS = ("auto", "fast", "plain")
ENV_LAYOUT = "CXR_LUNG_RISK_LAYOUT"
MARGIN = 0.03  # plain is chosen only when at least 3 % faster than fast
CACHE_NAME = "engine_layouts.json"


@dataclass(frozen=True)
class LayoutChoice:
    """The layout one architecture runs in, and how that was decided."""

    architecture: str
    layout: str  # fast | plain
    how: str  # measured | cached | requested | device
    ms_per_image: Mapping[str, float] = field(default_factory=dict)  # per layout, when measured

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"layout": self.layout, "how": self.how}
        if self.ms_per_image:
            d["ms_per_image"] = {k: round(v, 2) for k, v in self.ms_per_image.items()}
        return d


def requested_layout(layout: str | None = None) -> str:
    """``layout`` if given, else ``$CXR_LUNG_RISK_LAYOUT``, else ``auto``; refuses unknown names."""
    src = "layout" if layout else ENV_LAYOUT
    value = (layout or os.environ.get(ENV_LAYOUT) or "auto").strip().lower()
    if value not in LAYOUTS:
        raise UsageError(f"{src}={value!r}: choose one of {', '.join(LAYOUTS)}")
    return value


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == name:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere what :mod:`platform` knows)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``avx2``, ``avx512f``, ``amx_tile``, ...); empty where unknown."""
    return frozenset((_cpuinfo_field("flags") or "").split())


def cpu_key() -> str:
    """What a measured choice holds for: CPU model, the instruction set torch uses, torch
    version, threads."""
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        isa = "?"
    return f"{cpu_name()} | {isa} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def time_alternating(variants: Mapping[str, Callable[[], Any]], *, rounds: int = 3, warmup: int = 1) -> dict[str, float]:
    """Seconds per call of each variant: ``warmup`` untimed calls each, then ``rounds`` rounds
    calling every variant in turn; the best of each (alternating keeps a shared machine's load
    from favouring one of them)."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    best = {k: float("inf") for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


class LayoutCache:
    """Measured choices, kept in one JSON file ({cpu_key: {architecture: choice}}); a cache that
    cannot be read or written is simply empty (the choice is then measured on every load)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def _read(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, key: str, architecture: str) -> LayoutChoice | None:
        per_cpu = self._read().get(key)
        entry = per_cpu.get(architecture) if isinstance(per_cpu, dict) else None
        if not isinstance(entry, dict) or entry.get("layout") not in ("fast", "plain"):
            return None
        ms = entry.get("ms_per_image") or {}
        return LayoutChoice(architecture, entry["layout"], "cached", {k: float(v) for k, v in ms.items()})

    def put(self, key: str, choice: LayoutChoice) -> None:
        if self.path is None:
            return
        data = self._read()
        if not isinstance(data.get(key), dict):
            data[key] = {}
        data[key][choice.architecture] = {
            "layout": choice.layout,
            "ms_per_image": {k: round(v, 3) for k, v in choice.ms_per_image.items()},
            "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only cache: measured again next time


def describe(choices: Mapping[str, LayoutChoice]) -> str:
    """The SR parameter: ``fast`` or ``plain`` when every architecture runs the same way, else
    ``inceptionv4=fast, resnet34=plain, ...``. Only the layout: how it was decided (measured,
    cached, requested) is in ``run.json``, so that the same computation writes the same SR
    whether the layout was timed here or pinned (MHub compares SRs with a reference)."""
    if not choices:
        return "fast"
    layouts = {c.layout for c in choices.values()}
    return layouts.pop() if len(layouts) == 1 else ", ".join(f"{a}={c.layout}" for a, c in sorted(choices.items()))
