"""``cxr-lung-risk demo``: see the whole tool work without the published weights.

1. Makes SYNTHETIC weights once in the cache (``<cache>/synthetic/``): the 13 CXR-Lung-Risk
   members that the published LASSO weights use, drawn by :mod:`cxr_lung_risk.synthetic` with
   BatchNorm statistics calibrated on the authors' sample images (so their outputs are finite
   and well-behaved), and a CXR-Age network. Each folder carries ``SYNTHETIC_WEIGHTS_README.txt``,
   which every output then reports (``Weights`` column, ``run.json``, the SR's algorithm
   parameters and series description, the console).
2. Runs ``predict`` with every output (both models, CSV + JSON + SR, per-member values,
   saliency maps as PNG and DICOM SC, deterministic UIDs) on the package's own samples: a real
   chest CR (pydicom-data's RG1_J2KI.dcm) and the authors' five sample PNGs.

The scores mean nothing; they only show what the tool does.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from .options import PredictOptions
from .progress import say

if TYPE_CHECKING:
    import torch

__all__ = ["sample_inputs", "ensure_demo_weights", "demo_weights", "run_demo", "DEMO_DONE"]

DEMO_DONE = "DEMO_WEIGHTS_COMPLETE.json"
_AGE_FILE = "PLCO_Fine_Tuned_120419.pth"


def sample_inputs() -> list[Path]:
    """The sample inputs shipped in the package: a real chest CR (DICOM) and the authors' PNGs."""
    d = Path(str(resources.files("cxr_lung_risk.samples")))
    files = sorted(d.glob("*.dcm")) + sorted(d.glob("*.png"))
    if not files:  # pragma: no cover - a broken install
        raise FileNotFoundError(f"no sample inputs in {d}; reinstall cxr-lung-risk")
    return files


def _sample_batch() -> torch.Tensor:
    from .transforms import raster_batch  # lazily (torch): `predict` imports this module for weights_map before any input is checked

    return raster_batch([p for p in sample_inputs() if p.suffix == ".png"])


def ensure_demo_weights(root: Path, *, progress: bool = True) -> tuple[Path, Path]:
    """Make (once) the SYNTHETIC demo weights under ``root``; returns (ensemble folder, age file)."""
    from . import archs
    from .spec import lung_risk_spec
    from .synthetic import (
        SyntheticRecipe,
        calibrate_bn_stats,
        member_seed,
        synthetic_state_dict,
        write_synthetic_age_weights,
        write_synthetic_weights,
    )
    from .weights import load_into

    lung_dir, age_file = root / "cxr_lung_risk", root / "cxr_age" / _AGE_FILE
    done = root / DEMO_DONE
    if done.is_file() and age_file.is_file() and (lung_dir / "SYNTHETIC_WEIGHTS_README.txt").is_file():
        return lung_dir, age_file
    spec = lung_risk_spec()
    recipe = SyntheticRecipe()
    members = spec.active_members()
    if progress:
        say(f"making SYNTHETIC demo weights in {root} (once; {len(members)} networks, about 1.3 GB) ...")
    images = _sample_batch()
    stats = {}
    for k, m in enumerate(members, 1):
        sd = synthetic_state_dict(m.architecture, member_seed(recipe, m.index), gamma_range=recipe.gamma_range, beta_range=recipe.beta_range)
        net = archs.build(m.architecture, m.num_outputs)
        load_into(net, sd, m.file)
        stats[m.index] = calibrate_bn_stats(net, images, recipe.var_scale, var_scale_1d=recipe.var_scale_1d, rel_var_floor=recipe.rel_var_floor)
        if progress:
            say(f"  calibrated synthetic member {k}/{len(members)} ({m.architecture})")
    write_synthetic_weights(lung_dir, recipe, stats, members=[m.index for m in members])
    write_synthetic_age_weights(age_file)
    done.write_text(json.dumps({"synthetic": True, "members": [m.file for m in members], "age": _AGE_FILE}) + "\n")
    return lung_dir, age_file


def demo_weights(cache: str | Path | None = None) -> tuple[Path, Path]:
    """(ensemble folder, CXR-Age file) of the SYNTHETIC weights ``demo`` made in the cache (``--demo-weights``
    of ``predict`` and ``serve``); a :class:`~cxr_lung_risk.errors.UsageError` saying to run ``demo``
    first when it has not made them."""
    from .errors import UsageError
    from .fetch import cache_dir

    root = Path(cache) if cache else cache_dir() / "synthetic"
    lung_dir, age_file = root / "cxr_lung_risk", root / "cxr_age" / _AGE_FILE
    if not ((root / DEMO_DONE).is_file() and age_file.is_file() and (lung_dir / "SYNTHETIC_WEIGHTS_README.txt").is_file()):
        raise UsageError(
            f"--demo-weights: no synthetic demo weights in {root}; run `cxr-lung-risk demo --out DIR` once "
            "(it makes them, a few minutes), then repeat this command"
        )
    return lung_dir, age_file


def run_demo(out: str | Path, *, cache: str | Path | None = None, progress: bool = True):
    """Make the synthetic weights if needed and run ``predict`` with every output into ``out``."""
    from .fetch import cache_dir
    from .predict import run_predict

    root = Path(cache) if cache else cache_dir() / "synthetic"
    lung_dir, age_file = ensure_demo_weights(root, progress=progress)
    opts = PredictOptions(
        inputs=tuple(sample_inputs()),
        out=Path(out),
        models=("lung-risk", "age"),
        weights={"lung-risk": lung_dir, "age": age_file},
        per_model=True,
        formats=frozenset({"csv", "sr", "json"}),
        deterministic=True,
        saliency=True,
        progress=progress,
    )
    return run_predict(opts)


def weights_map(weights: str | None, age_weights: str | None, demo: bool) -> dict[str, Path]:
    """``--weights``/``--age-weights``/``--demo-weights`` as ``load_scorer``'s ``weights`` map
    (``predict`` and ``web``); the demo weights exclude the other two."""
    from .errors import UsageError

    out: dict[str, Path] = {}
    if demo:
        if weights or age_weights:
            raise UsageError("--demo-weights and --weights/--age-weights exclude each other")
        out["lung-risk"], out["age"] = demo_weights()
    if weights:
        out["lung-risk"] = Path(weights)
    if age_weights:
        out["age"] = Path(age_weights)
    return out
