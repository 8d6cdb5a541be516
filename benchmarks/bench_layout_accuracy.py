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
``plain`` on that ISA and to float64, and across ISAs ``plain`` against ``plain``; the
ensemble score (years) of ``plain`` and ``fast`` through ``LungRiskEnsemble``; and per ISA and
architecture the local rounding error of every convolution shape in the NCHW kernels (``plain``)
and the channels_last ones (``cl``, ``fast``) against float64 (``kernel_local_error``: why the
builds part); and ``blocked_layout_candidate``: oneDNN's blocked layout kept between layers
(``torch.jit.optimize_for_inference``), timed and compared with ``plain`` and ``fast`` on one
member per architecture (measured, not adopted).

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
    import torch

    from cxr_lung_risk.transforms import raster_batch

    x = raster_batch(sorted((REPO / "tests" / "data" / "reference" / "sample_png").glob("*.png")))
    return torch.cat([x, x.flip(-1)])


def _one_per_architecture(spec) -> dict[str, Any]:
    """{architecture: its first member}, in the ensemble's order."""
    first: dict[str, Any] = {}
    for m in spec.members:
        first.setdefault(m.architecture, m)
    return first


def _kernel_errors(spec, src, xn) -> dict[str, list[dict[str, Any]]]:
    """Local rounding error of each convolution kernel, per architecture (its first member, plain
    build, the first 4 held images): every Conv2d is fed its float32 input from the plain forward
    and evaluated in float32 NCHW (what ``plain`` runs), float32 channels_last (``cl``/``fast``)
    and float64; the error is mean |float32 - float64| / mean |float64| over the output, averaged
    over the calls of each shape. This is where two float32 builds part: the kernels oneDNN picks
    for the two layouts accumulate each output in different orders."""
    import collections

    import torch
    import torch.nn.functional as F

    from cxr_lung_risk.engine import build_member

    out: dict[str, list[dict[str, Any]]] = {}
    for arch, member in _one_per_architecture(spec).items():
        net = build_member(member, src)
        rows: dict[tuple, list[tuple[float, float]]] = collections.defaultdict(list)

        def hook(mod, inp, y):
            i = inp[0]
            conv = dict(stride=mod.stride, padding=mod.padding, dilation=mod.dilation, groups=mod.groups)
            ref = F.conv2d(i.double(), mod.weight.double(), None if mod.bias is None else mod.bias.double(), **conv)
            y_cl = F.conv2d(i.contiguous(memory_format=torch.channels_last), mod.weight.contiguous(memory_format=torch.channels_last), mod.bias, **conv)
            scale = ref.abs().mean().item()
            key = (tuple(mod.weight.shape), tuple(mod.stride), tuple(i.shape[2:]))
            rows[key].append(((y.double() - ref).abs().mean().item() / scale, (y_cl.double() - ref).abs().mean().item() / scale))

        hooks = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        net(xn[:4])
        for h in hooks:
            h.remove()
        out[arch] = [{"weight": list(w), "stride": list(st), "input_hw": list(hw), "reduction": w[1] * w[2] * w[3],
                      "calls": len(v), "nchw_rel": sum(a for a, _ in v) / len(v), "nhwc_rel": sum(b for _, b in v) / len(v)}
                     for (w, st, hw), v in rows.items()]
    return out


def _blocked(spec, src, xn) -> dict[str, dict[str, Any]]:
    """A candidate not adopted, measured: oneDNN's blocked layout kept between layers
    (``torch.jit.optimize_for_inference`` on the traced, BN-folded NCHW member), against ``plain``
    and ``fast`` for the first member of each architecture: s/image (the held batch; the call that
    gives the outputs is the warm-up, then best of 3 rounds, the three called in turn as the
    load-time choice times them), seconds to trace and optimise, largest difference to ``plain``
    and to float64."""
    import time
    import warnings

    import torch

    from cxr_lung_risk.engine import build_member
    from cxr_lung_risk.layout import time_alternating

    out: dict[str, dict[str, Any]] = {}
    for arch, member in _one_per_architecture(spec).items():
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocked = torch.jit.optimize_for_inference(torch.jit.trace(build_member(member, src, fold_bn=True), xn[:2]))
        prep = time.perf_counter() - t0
        runs = {"plain": (build_member(member, src), xn),
                "fast": (build_member(member, src, fold_bn=True, channels_last=True), xn.contiguous(memory_format=torch.channels_last)),
                "blocked": (blocked, xn)}
        ys = {k: net(x)[:, 0].double() for k, (net, x) in runs.items()}
        best = time_alternating({k: (lambda net=net, x=x: net(x)) for k, (net, x) in runs.items()}, rounds=3, warmup=0)
        ts = {k: s / len(xn) for k, s in best.items()}
        ref = build_member(member, src).double()(xn.double())[:, 0]
        out[arch] = {"s_per_image": ts, "prepare_s": prep,
                     "max_vs_plain": {k: float((y - ys["plain"]).abs().max()) for k, y in ys.items()},
                     "max_vs_fp64": {k: float((y - ref).abs().max()) for k, y in ys.items()}}
    return out


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
    with torch.inference_mode(), fp32_math():
        res["kernels"] = _kernel_errors(spec, src, xn)
    with torch.no_grad(), fp32_math():  # traced modules run under no_grad
        res["blocked"] = _blocked(spec, src, xn)
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


def _kernel_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Call-weighted mean local error per layout, the NHWC/NCHW ratio, and the same for the
    convolutions with a reduction over more than 1000 terms (where the orders differ most)."""
    def mean(rs, k):
        n = sum(r["calls"] for r in rs)
        return sum(r[k] * r["calls"] for r in rs) / n if n else None

    long = [r for r in rows if r["reduction"] > 1000]
    nchw, nhwc, lnchw, lnhwc = mean(rows, "nchw_rel"), mean(rows, "nhwc_rel"), mean(long, "nchw_rel"), mean(long, "nhwc_rel")
    return {"nchw_rel": nchw, "nhwc_rel": nhwc, "nhwc_over_nchw": nhwc / nchw,
            "reduction_over_1000": {"shapes": len(long), "nchw_rel": lnchw, "nhwc_rel": lnhwc,
                                    "nhwc_over_nchw": lnhwc / lnchw if long else None},
            "shapes": rows}


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
        per["kernel_local_error"] = {a: _kernel_summary(rows) for a, rows in r["kernels"].items()}
        per["blocked_layout_candidate"] = r["blocked"]
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
