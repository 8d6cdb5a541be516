"""How far apart float32 evaluations of the same members are: the inference layouts against the
plain (published-layout) engine, each against float64, and the plain engine against itself on
another instruction set (issue 26 item 1's accuracy bound, measured rather than assumed).

    python benchmarks/bench_layout_accuracy.py --weights SYNTH_DIR [--isa native,avx2] [--out FILE]

For every member (``--members``: all 20 by default) on the held images the tests use (the
authors' five sample PNGs and their mirror images, ``tests/data/reference/sample_png``), as the
engine gets them (normalised, batch of 10, the process's thread count), it computes the raw output
in four float32 builds:

* ``plain``: the published layout (the reference);
* ``fold``: BatchNorm folded into the convolutions (float64 fold, one rounding), NCHW;
* ``cl``: channels_last, BatchNorm kept;
* ``fast``: both (the engine's ``fast`` layout),

plus the published layout in float64 (the definition, without float32 rounding). ``--isa avx2``
runs the float32 builds again in a child restricted to AVX2 (``bench_layers.AVX2_ENV``: the
kernels an AVX2-only CPU runs). Reported per ISA and build: the largest per-member difference to
``plain`` on that ISA and to float64, and across ISAs ``plain`` against ``plain``; and the
ensemble score (years) of ``plain`` and ``fast`` through ``LungRiskEnsemble``.

The weights are SYNTHETIC (the fixture recipe: ``benchmarks/device/write_fixture_weights.py``);
the spreads describe float32 arithmetic on these networks, not the published model's values.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUILDS = {"plain": (False, False), "fold": (True, False), "cl": (False, True), "fast": (True, True)}


def _held():
    import numpy as np
    import torch

    from cxr_lung_risk.transforms import center_crop_resize, open_raster, to_uint8_chw

    pngs = sorted((REPO / "tests" / "data" / "reference" / "sample_png").glob("*.png"))
    x = torch.from_numpy(np.stack([to_uint8_chw(center_crop_resize(open_raster(p))) for p in pngs]))
    return torch.cat([x, x.flip(-1)])


def _outputs(weights: Path, members: int, fp64: bool) -> dict[str, Any]:
    """Per-member raw outputs {build: (N, M)} (and ``fp64``), plus the ensemble scores."""
    import numpy as np
    import torch

    from cxr_lung_risk.engine import LungRiskEnsemble, build_member, fp32_math
    from cxr_lung_risk.spec import lung_risk_spec
    from cxr_lung_risk.transforms import normalize
    from cxr_lung_risk.weights import WeightSource

    spec = lung_risk_spec()
    src = WeightSource(weights)
    x = _held()
    xn = normalize(x, spec.mean, spec.std).float()
    out: dict[str, list] = {k: [] for k in (*BUILDS, *(["fp64"] if fp64 else []))}
    with torch.inference_mode(), fp32_math():
        for m in spec.members[:members]:
            for k, (fold, cl) in BUILDS.items():
                net = build_member(m, src, fold_bn=fold, channels_last=cl)
                xi = xn.contiguous(memory_format=torch.channels_last) if cl else xn
                out[k].append(net(xi)[:, 0].double().numpy())
            if fp64:
                out["fp64"].append(build_member(m, src).double()(xn.double())[:, 0].numpy())
    res = {k: np.stack(v, 1).tolist() for k, v in out.items()}
    res["members"] = [m.file for m in spec.members[:members]]
    res["architectures"] = [m.architecture for m in spec.members[:members]]
    res["scores"] = {lay: LungRiskEnsemble.load(weights, layout=lay).predict_uint8(x).scores.tolist() for lay in ("plain", "fast")}
    res["threads"] = torch.get_num_threads()
    return res


def _child(args: argparse.Namespace, isa: str) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    from bench_layers import AVX2_ENV

    env = dict(os.environ, **(AVX2_ENV if isa == "avx2" else {}))
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "out.json"
        subprocess.run([sys.executable, __file__, "--weights", str(args.weights), "--members", str(args.members),
                        "--_child", str(dst), *(["--_fp64"] if isa == "native" else [])], env=env, check=True)
        return json.loads(dst.read_text())


def _max_abs(a, b) -> float:
    import numpy as np

    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def summarise(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    import numpy as np

    truth = runs["native"]["fp64"]
    archs = runs["native"]["architectures"]
    summary: dict[str, Any] = {}
    for isa, r in runs.items():
        per = {}
        for k in BUILDS:
            per[k] = {"max_vs_plain": _max_abs(r[k], r["plain"]), "max_vs_fp64": _max_abs(r[k], truth),
                      "max_vs_plain_by_arch": {a: _max_abs(np.asarray(r[k])[:, [i for i, x in enumerate(archs) if x == a]],
                                                           np.asarray(r["plain"])[:, [i for i, x in enumerate(archs) if x == a]])
                                               for a in sorted(set(archs))}}
        per["score_fast_vs_plain_years"] = _max_abs(r["scores"]["fast"], r["scores"]["plain"])
        per["threads"] = r["threads"]
        summary[isa] = per
    if "avx2" in runs and "native" in runs:
        summary["plain_avx2_vs_plain_native"] = _max_abs(runs["avx2"]["plain"], runs["native"]["plain"])
        summary["score_plain_avx2_vs_plain_native_years"] = _max_abs(runs["avx2"]["scores"]["plain"], runs["native"]["scores"]["plain"])
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, required=True, help="a folder of the 20 member files (synthetic: benchmarks/device/write_fixture_weights.py)")
    ap.add_argument("--isa", default="native,avx2", help="comma-separated: native, avx2 (default both)")
    ap.add_argument("--members", type=int, default=20, help="the first N members (default 20)")
    ap.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    ap.add_argument("--_child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_fp64", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        args._child.write_text(json.dumps(_outputs(args.weights, args.members, args._fp64)))
        return 0
    isas = [s.strip() for s in args.isa.split(",") if s.strip()]
    if "native" not in isas:
        isas.insert(0, "native")  # the float64 reference is computed there
    sys.path.insert(0, str(HERE))
    from bench_layers import _cpu

    runs = {isa: _child(args, isa) for isa in isas}
    import torch

    result = {"machine": _cpu(), "torch": torch.__version__, "weights": "SYNTHETIC (fixture recipe)",
              "images": "tests/data/reference/sample_png A-E and their mirror images (10)",
              "members": runs["native"]["members"], "summary": summarise(runs)}
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
