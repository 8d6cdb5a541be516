"""Build the oracle fixture's SYNTHETIC-weight recipe (system Python, no fastai).

Usage: python tools/oracle/make_fixture.py [--measure] [--weights-out DIR]

1. Lists the fixture images (tests/data/oracle/images + the authors' A..E samples in
   tests/data/reference/sample_png) in recipe.json.
2. For each of the 20 members: draws the synthetic weights (cxr_lung_risk.synthetic), calibrates
   the BatchNorm statistics on all fixture images (our transforms: open_raster ->
   center_crop_resize -> to_uint8_chw) and stores them as tests/data/oracle/bn_stats/member_XX.npz
   (float32, compressed); records the SHA-256 of the final state dict in recipe.json.
3. ``--weights-out DIR`` also writes the 20 synthetic member files there (input of run_oracle.py).
4. ``--measure`` records, per member, in float64: the largest output change caused by a +-1e-6
   perturbation of the normalised input, the output mean/std/min/max over the fixture images,
   and the float32-vs-float64 difference (tests/data/oracle/conditioning.json).
The oracle's expected outputs are produced separately by run_oracle.py in the fastai venv.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cxr_lung_risk import archs
from cxr_lung_risk.spec import lung_risk_spec
from cxr_lung_risk.synthetic import (
    SyntheticRecipe,
    calibrate_bn_stats,
    member_seed,
    state_dict_sha256,
    synthetic_state_dict,
    write_synthetic_weights,
)
from cxr_lung_risk.transforms import center_crop_resize, normalize, open_raster, to_uint8_chw

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "tests" / "data" / "oracle"
REFERENCE = REPO / "tests" / "data" / "reference"  # the authors' files, copied verbatim (PROVENANCE.md)


def image_manifest() -> list[dict[str, str]]:
    """[{name, engine, oracle}]: paths relative to the fixture dir, or 'reference:<rel>' for files
    under tests/data/reference."""
    rows = [{"name": f"{k}.png", "engine": f"reference:sample_png/{k}.png", "oracle": f"reference:sample_png/{k}.png"} for k in "ABCDE"]
    for p in sorted((FIX / "images").iterdir()):
        if p.name.endswith(".as8bit.png"):
            continue
        oracle = p.name
        if "16bit" in p.name:  # fastai/Pillow clips 16-bit PNGs to white: the oracle gets the 8-bit equivalent
            oracle = p.name[: -len(".png")] + ".as8bit.png"
        rows.append({"name": p.name, "engine": f"images/{p.name}", "oracle": f"images/{oracle}"})
    return rows


def resolve(rel: str) -> Path:
    return REFERENCE / rel[len("reference:") :] if rel.startswith("reference:") else FIX / rel


def load_batch(rows: list[dict[str, str]]) -> torch.Tensor:
    return torch.from_numpy(np.stack([to_uint8_chw(center_crop_resize(open_raster(resolve(r["engine"])))) for r in rows]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--measure", action="store_true")
    ap.add_argument("--weights-out", type=Path)
    ap.add_argument("--skip-calibration", action="store_true", help="reuse existing bn_stats")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    spec = lung_risk_spec()
    recipe = SyntheticRecipe()
    rows = image_manifest()
    batch = load_batch(rows)
    (FIX / "bn_stats").mkdir(parents=True, exist_ok=True)
    stats_all: dict[int, dict[str, np.ndarray]] = {}
    hashes: dict[str, str] = {}
    cond: dict[str, dict[str, float]] = {}
    for m in spec.members:
        t0 = time.time()
        npz = FIX / "bn_stats" / f"member_{m.index:02d}.npz"
        seed = member_seed(recipe, m.index)
        if args.skip_calibration:
            with np.load(npz) as z:
                stats = {k: z[k] for k in z.files}
        else:
            sd = synthetic_state_dict(m.architecture, seed, gamma_range=recipe.gamma_range, beta_range=recipe.beta_range)
            model = archs.build(m.architecture)
            model.load_state_dict(sd)
            stats = calibrate_bn_stats(model, batch, recipe.var_scale, var_scale_1d=recipe.var_scale_1d, rel_var_floor=recipe.rel_var_floor)
            np.savez_compressed(npz, **stats)
        stats_all[m.index] = stats
        sd = synthetic_state_dict(m.architecture, seed, stats, gamma_range=recipe.gamma_range, beta_range=recipe.beta_range)
        hashes[m.file] = state_dict_sha256(sd)
        if args.measure:
            model = archs.build(m.architecture)
            model.load_state_dict(sd)
            model.eval()
            x32 = normalize(batch, spec.mean, spec.std)
            x = x32.double()
            g = torch.Generator().manual_seed(1234)
            pert = (torch.randint(0, 2, x.shape, generator=g).double() * 2 - 1) * 1e-6
            with torch.no_grad():
                y32 = model(x32)[:, 0].double()
                md = model.double()
                y = md(x)[:, 0]
                y2 = md(x + pert)[:, 0]
            cond[m.name] = {
                "sensitivity_1e-6_max_abs": float((y2 - y).abs().max()),
                "float32_vs_float64_max_abs": float((y32 - y).abs().max()),
                "mean": float(y.mean()), "std": float(y.std()), "min": float(y.min()), "max": float(y.max()),
            }
            print(m.name, cond[m.name], flush=True)
        print(f"{m.name} ({m.architecture}) {time.time() - t0:.1f}s", flush=True)
    out = {
        "description": "SYNTHETIC weights for the oracle parity test -- never the published model",
        "recipe": recipe.to_json(),
        "member_seeds": {m.name: member_seed(recipe, m.index) for m in spec.members},
        "state_dict_sha256": hashes,
        "images": rows,
        "calibration_images": "all rows of 'images' (engine path), one batch, in this order",
        "generated_with": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__},
    }
    (FIX / "recipe.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    if args.measure:
        (FIX / "conditioning.json").write_text(json.dumps(cond, indent=1) + "\n", encoding="utf-8")
    if args.weights_out:
        write_synthetic_weights(args.weights_out, recipe, stats_all)
        print("wrote", args.weights_out)


if __name__ == "__main__":
    sys.exit(main())
