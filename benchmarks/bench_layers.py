"""Where the model time goes, per architecture and per convolution shape, in both inference
layouts, on this CPU or restricted to an instruction set (issue 26 item 1).

    python benchmarks/bench_layers.py --weights SYNTH_DIR [--isa native|avx2] [--batch-size 16]
        [--runs 3] [--top 12] [--out FILE]

``--isa avx2`` re-runs itself with PyTorch, oneDNN and MKL restricted to AVX2
(``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``): the kernels an
AVX2-only CPU (Zen 3, Haswell..Comet Lake) runs, on this CPU's cores and caches. It is an
emulation of the code path, not of the other CPU's caches and clocks: name both in any result.

Measured, all in one process so the ratios compare:

* ``peak``: a 2048^3 float32 matmul (MKL), GFLOP/s, median of 10 after warm-up;
* ``architectures``: one member of each architecture in the ``fast`` layout (BatchNorm folded,
  channels_last) and the ``plain`` (published) layout, timed alternately (best of ``--runs``):
  s/image, GFLOP/s, fraction of the matmul peak; and per layout the convolution shapes that take
  the most time (``torch.profiler``: input shape, kernel, calls, ms/batch, GFLOP/s);
* ``ensemble``: the load-time choice (``layout='auto'`` with an empty cache: what it measured and
  chose per architecture) and the whole ensemble's s/image in ``fast``, ``plain`` and the choice.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def _cpu() -> dict[str, Any]:
    from cxr_lung_risk.layout import cpu_flags, cpu_name

    flags = cpu_flags()
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "loadavg": os.getloadavg()}


def _peak() -> float:
    """float32 matmul GFLOP/s (median), measured as ``bench_pipeline.py`` does."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_pipeline import matmul_peak

    return matmul_peak(runs=10, bf16=False)["fp32_gflops_median"]


def _conv_table(net, x, top: int) -> list[dict[str, Any]]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        net(x)
    rows = []
    for ev in prof.key_averages(group_by_input_shape=True):
        if ev.key != "aten::conv2d":
            continue
        ms = ev.cpu_time_total / 1000
        shapes = ev.input_shapes or []
        rows.append({
            "input": shapes[0] if shapes else None, "weight": shapes[1] if len(shapes) > 1 else None,
            "calls": ev.count, "ms": round(ms, 2),
            "gflops": round(ev.flops / 1e9 / (ms / 1000), 1) if ev.flops and ms else None,
        })
    total = sum(r["ms"] for r in rows)
    rows.sort(key=lambda r: -r["ms"])
    for r in rows:
        r["share"] = round(r["ms"] / total, 3) if total else None
    return rows[:top]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cxr_lung_risk import layout as lay
    from cxr_lung_risk.engine import LungRiskEnsemble, build_member, fp32_math
    from cxr_lung_risk.spec import lung_risk_spec
    from cxr_lung_risk.weights import WeightSource

    res: dict[str, Any] = {"machine": _cpu(), "isa": args.isa, "torch": torch.__version__,
                           "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                           "threads": torch.get_num_threads(), "batch_size": args.batch_size, "runs": args.runs,
                           "env": {k: os.environ.get(k) for k in AVX2_ENV}}
    peak = res["peak_fp32_gflops"] = _peak()
    spec, src = lung_risk_spec(), WeightSource(args.weights)
    x = torch.randn(args.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    xs = {"plain": x, "fast": x.contiguous(memory_format=torch.channels_last)}
    archs: dict[str, Any] = {}
    for m in spec.active_members():
        if m.architecture in archs:
            continue
        nets = {"fast": build_member(m, src, fold_bn=True, channels_last=True),
                "plain": build_member(m, src, fold_bn=False, channels_last=False)}
        with FlopCounterMode(display=False) as fc, torch.inference_mode():
            nets["plain"](x[:1])
        gflop = fc.get_total_flops() / 1e9
        with torch.inference_mode(), fp32_math():
            best = lay.time_alternating({k: (lambda k=k: nets[k](xs[k])) for k in nets}, rounds=args.runs)
        a: dict[str, Any] = {"member": m.name, "gflop_per_image": gflop}
        for k, s in best.items():
            spi = s / args.batch_size
            a[k] = {"s_per_image": spi, "gflops": gflop / spi, "fraction_of_peak": gflop / spi / peak,
                    "top_convolutions": _conv_table(nets[k], xs[k], args.top)}
        a["fast_over_plain_time"] = best["fast"] / best["plain"]
        archs[m.architecture] = a
        print(f"{m.architecture:12s} fast {a['fast']['s_per_image']*1000:7.1f} ms/img ({a['fast']['fraction_of_peak']:.2f} of peak)  "
              f"plain {a['plain']['s_per_image']*1000:7.1f} ms/img ({a['plain']['fraction_of_peak']:.2f})", flush=True)
    res["architectures"] = archs

    # the load-time choice and the whole ensemble in each layout
    ens_res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as home:
        os.environ["CXR_LUNG_RISK_HOME"] = home
        t = time.perf_counter()
        auto = LungRiskEnsemble.load(args.weights, layout="auto")
        ens_res["auto_load_s_with_timing"] = time.perf_counter() - t
        ens_res["choice"] = {k: c.as_dict() for k, c in auto.layouts.items()}
        ens_res["choice_parameter"] = lay.describe(auto.layouts)
        ensembles = {"auto": auto, "fast": LungRiskEnsemble.load(args.weights, layout="fast"),
                     "plain": LungRiskEnsemble.load(args.weights, layout="plain")}
        total_gflop = sum(archs[m.architecture]["gflop_per_image"] for m in auto.members)
        xu = (torch.rand(args.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
        best = lay.time_alternating({k: (lambda e=e: e.predict_uint8(xu)) for k, e in ensembles.items()}, rounds=args.runs)
    for k, s in best.items():
        spi = s / args.batch_size
        ens_res[k] = {"s_per_image": spi, "gflops": total_gflop / spi, "fraction_of_peak": total_gflop / spi / peak}
    ens_res["gflop_per_image"] = total_gflop
    res["ensemble"] = ens_res
    print("ensemble", {k: round(v["s_per_image"], 3) for k, v in ens_res.items() if isinstance(v, dict) and "s_per_image" in v},
          "s/image; choice", ens_res["choice_parameter"], flush=True)
    res["machine"]["loadavg_end"] = os.getloadavg()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, required=True, help="a folder of (synthetic) member files")
    ap.add_argument("--isa", choices=["native", "avx2"], default="native", help="restrict torch/oneDNN/MKL to AVX2 (default: native)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3, help="timed rounds (best of)")
    ap.add_argument("--top", type=int, default=12, help="convolution shapes listed per architecture and layout")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.isa == "avx2" and os.environ.get("ONEDNN_MAX_CPU_ISA") != "AVX2":  # restrict before torch loads
        env = {**os.environ, **AVX2_ENV}
        return subprocess.call([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env=env)
    res = measure(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
