"""Benchmark: what ``predict --saliency`` costs per image against the models' own forward pass.

Never a test. Builds the SYNTHETIC ensemble (the oracle fixture's recipe and calibrated BatchNorm
statistics, as the tests do) unless ``--weights`` names a folder of member files, loads the 13
active members on the CPU, and times on ``--n`` random 224x224 crops:

* ``forward``: the ensemble's inference (``LungRiskEnsemble.predict_uint8``), batch ``--n``
  and batch 1: s/image;
* ``saliency_old``: the code before batching, verbatim: ``SaliencyWriter.heatmap`` one image
  at a time through ``combined`` (all 13 members in one autograd graph, contiguous input):
  s/image on ``--n-old`` images (it is slow);
* ``saliency_new``: ``SaliencyWriter.heatmaps`` for the whole batch (one forward + backward
  per member, channels_last input), batch ``--n`` and batch 1: s/image;
* the ratios saliency / forward at batch ``--n``, and the largest difference between the old
  and new maps (before and after the [0, 1] display scaling);
* ``age``: CXR-Age with its deterministic TTA (plain pass + 4 zoomed views; randomly
  initialised ResNet34, timing does not depend on the values): inference, saliency for the
  batch and one image at a time (the old path) (``--no-age`` to skip);
* ``per_architecture``: one member of each architecture alone, forward (inference) and
  forward + input-gradient backward at batch 1 and batch ``--n``, channels_last input, and at
  batch 1 also with the contiguous input the old path gave it (``--no-per-arch`` to skip).

Each timed quantity is the median of ``--runs`` runs (every run kept), the cases interleaved
round by round; wall and process CPU time are both kept (with ``--threads 1`` CPU time hardly
depends on other processes). The machine's load average is recorded at start and end (a shared
machine disturbs timings; compare ratios taken in the same run). Writes JSON to ``--out``
(default ``benchmarks/results/saliency_cpu_2core.json``).

Usage:
  python benchmarks/bench_saliency.py [--weights DIR] [--n 16] [--n-old 4] [--runs 3] [--threads T]
      [--no-per-arch] [--no-age] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _synthetic_weights(d: Path) -> Path:
    """The tests' synthetic ensemble (tests/conftest.py: fixture recipe + calibrated BN stats)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import fixture_bn_stats, fixture_recipe

    from cxr_lung_risk.synthetic import SyntheticRecipe, write_synthetic_weights

    write_synthetic_weights(d, SyntheticRecipe.from_json(fixture_recipe()["recipe"]), fixture_bn_stats())
    return d


def old_heatmap(ens: Any, image_chw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The saliency map as the code before batching computed it, verbatim: a batch of ONE image,
    all members in one graph (``target_for``'s ``combined``), contiguous input. Returns the raw
    ``max |grad|`` map and its [0, 1] display scaling."""
    import torch

    from cxr_lung_risk.engine import fp32_math
    from cxr_lung_risk.saliency import scale_map
    from cxr_lung_risk.transforms import normalize

    weights = [float(mem.weight) for mem in ens.members]
    intercept = float(ens.spec.intercept)
    models = list(ens.models)

    def combined(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device) + intercept
        for w, net in zip(weights, models):
            out = out + w * net(x)[:, 0].to(x.dtype)
        return out

    x = normalize(torch.from_numpy(np.ascontiguousarray(image_chw))[None].to(ens.device), ens.spec.mean, ens.spec.std)
    with fp32_math():
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            y = combined(x)
            (g,) = torch.autograd.grad(y.sum(), x)
        raw = g.abs().amax(dim=1).double().cpu().numpy()
    return raw[0], scale_map(raw[0], 99.0)


def age_section(writer: Any, imgs: np.ndarray, runs: int) -> dict[str, Any]:
    """CXR-Age with TTA: inference vs saliency (batched, and one image at a time as before)."""
    import torch

    from cxr_lung_risk.age import AgeModel, CXRAge, build_age_model
    from cxr_lung_risk.saliency import target_for

    torch.manual_seed(0)
    net = build_age_model().eval()
    for prm in net.parameters():
        prm.requires_grad_(False)
    model = CXRAge(net, tta=True)
    target = target_for(AgeModel(model))
    x = torch.from_numpy(imgs)
    model.predict_uint8(x)
    writer.heatmaps(target, imgs)
    writer.heatmaps(target, imgs[:1])
    n1 = min(4, len(imgs))

    def one_by_one():
        for i in range(n1):
            writer.heatmaps(target, imgs[i : i + 1])

    out = _interleaved(
        {
            "forward_batch": (lambda: model.predict_uint8(x), len(imgs)),
            "saliency_new_batch": (lambda: writer.heatmaps(target, imgs), len(imgs)),
            "saliency_old_1": (one_by_one, n1),
        },
        runs,
    )
    fwd = out["forward_batch"]["s_per_image"]
    return {
        "timings": out,
        "ratio_saliency_new_over_forward": out["saliency_new_batch"]["s_per_image"] / fwd,
        "ratio_saliency_old_over_forward": out["saliency_old_1"]["s_per_image"] / fwd,
    }


def per_architecture(ens: Any, imgs: np.ndarray, runs: int) -> dict[str, Any]:
    """One member per architecture: s/image of forward and forward + input-gradient backward."""
    import torch

    from cxr_lung_risk.transforms import normalize

    x = normalize(torch.from_numpy(imgs), ens.spec.mean, ens.spec.std)
    out: dict[str, Any] = {}
    seen: set[str] = set()
    for mem, net in zip(ens.members, ens.models):
        if mem.architecture in seen:
            continue
        seen.add(mem.architecture)
        row: dict[str, Any] = {"members": sum(m.architecture == mem.architecture for m in ens.members)}

        def fwd(xb):
            with torch.inference_mode():
                net(xb)

        def fwd_bwd(xb):
            xg = xb.clone().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(net(xg)[:, 0].sum(), xg)

        for label, xb in (("1", x[:1]), (str(len(x)), x)):
            cl = xb.contiguous(memory_format=torch.channels_last)
            fwd(cl)
            fwd_bwd(cl)
            row[f"forward_b{label}"] = _timed(lambda: fwd(cl), runs)[0] / len(xb)
            row[f"forward_backward_b{label}"] = _timed(lambda: fwd_bwd(cl), runs)[0] / len(xb)
            if label == "1":
                fwd_bwd(xb)
                row["forward_backward_b1_contiguous_input"] = _timed(lambda: fwd_bwd(xb), runs)[0]
        out[mem.architecture] = row
    return out


def _timed(f, runs: int) -> tuple[float, list[float]]:
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


def _interleaved(cases: dict[str, tuple[Any, int]], runs: int) -> dict[str, Any]:
    """Run every case once per round, ``runs`` rounds (load changes hit all cases alike): per
    case the median wall and process CPU seconds per image, and every run's wall seconds."""
    walls: dict[str, list[float]] = {k: [] for k in cases}
    cpus: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(runs):
        for k, (f, n) in cases.items():
            t, c = time.perf_counter(), time.process_time()
            f()
            walls[k].append(time.perf_counter() - t)
            cpus[k].append(time.process_time() - c)
    return {
        k: {
            "s_per_image": statistics.median(walls[k]) / n,
            "cpu_s_per_image": statistics.median(cpus[k]) / n,
            "runs_s": walls[k],
        }
        for k, (f, n) in cases.items()
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, help="folder of (synthetic) member files; default: generate them")
    ap.add_argument("--n", type=int, default=16, help="images per batch (default 16, predict's default batch)")
    ap.add_argument("--n-old", type=int, default=4, help="images for the old one-at-a-time path (default 4)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, one per core)")
    ap.add_argument("--no-per-arch", dest="per_arch", action="store_false")
    ap.add_argument("--no-age", dest="age", action="store_false")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "saliency_cpu_2core.json")
    a = ap.parse_args(argv)

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)

    from cxr_lung_risk import saliency
    from cxr_lung_risk.engine import LungRiskEnsemble
    from cxr_lung_risk.transforms import normalize

    res: dict[str, Any] = {
        "machine": {
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "loadavg_start": os.getloadavg(),
        },
        "n": a.n,
        "n_old": a.n_old,
        "runs": a.runs,
    }
    with tempfile.TemporaryDirectory(prefix="bench_saliency_") as tmp:
        weights = a.weights or _synthetic_weights(Path(tmp) / "weights")
        res["weights"] = "given" if a.weights else "synthetic (tests/data/oracle recipe)"
        t = time.perf_counter()
        ens = LungRiskEnsemble.load(weights, device="cpu")
        res["load_s"] = time.perf_counter() - t
    res["members"] = len(ens.models)

    class _Holder:  # what target_for needs: an object holding the ensemble
        ensemble = ens

    writer = saliency.SaliencyWriter(Path(tempfile.gettempdir()), [_Holder()])
    target = writer.targets[0]
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (a.n, 3, 224, 224), dtype=np.uint8)
    x = torch.from_numpy(imgs)

    # warm-up (oneDNN primitives for both batch sizes, forward and backward)
    ens.predict_uint8(x)
    ens.predict_uint8(x[:1])
    writer.heatmaps(target, imgs[:1])
    new_maps = writer.heatmaps(target, imgs)
    t_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    old_maps: list[tuple[np.ndarray, np.ndarray]] = []

    def run_old():
        old_maps.clear()
        for i in range(a.n_old):
            old_maps.append(old_heatmap(ens, imgs[i]))

    old_heatmap(ens, imgs[0])  # warm-up
    out = _interleaved(
        {
            "forward_batch": (lambda: ens.predict_uint8(x), a.n),
            "saliency_new_batch": (lambda: writer.heatmaps(target, imgs), a.n),
            "forward_1": (lambda: ens.predict_uint8(x[:1]), 1),
            "saliency_new_1": (lambda: writer.heatmaps(target, imgs[:1]), 1),
            "saliency_old_1": (run_old, a.n_old),
        },
        a.runs,
    )
    res["timings"] = out
    for unit in ("s_per_image", "cpu_s_per_image"):
        sfx = "" if unit == "s_per_image" else "_cpu"
        fwd = out["forward_batch"][unit]
        res[f"ratio_saliency_new_over_forward{sfx}"] = out["saliency_new_batch"][unit] / fwd
        res[f"ratio_saliency_old_over_forward{sfx}"] = out["saliency_old_1"][unit] / fwd
        res[f"speedup_new_over_old{sfx}"] = out["saliency_old_1"][unit] / out["saliency_new_batch"][unit]
    # round by round (forward and saliency timed back to back: least disturbed by load changes)
    res["ratio_saliency_new_over_forward_per_round"] = [
        sal / fwd for fwd, sal in zip(out["forward_batch"]["runs_s"], out["saliency_new_batch"]["runs_s"])
    ]
    # the maps agree: raw max|grad| (relative to the map's own 99th percentile) and displayed [0, 1]
    raw_new = saliency.gradient_saliency(target, normalize(x[: a.n_old], ens.spec.mean, ens.spec.std))
    diffs_raw, diffs_disp = [], []
    for i, (raw_o, disp_o) in enumerate(old_maps):
        ref = float(np.percentile(raw_o, 99.0)) or 1.0
        diffs_raw.append(float(np.max(np.abs(raw_new[i] - raw_o)) / ref))
        diffs_disp.append(float(np.max(np.abs(new_maps[i] - disp_o))))
    res["agreement"] = {"max_abs_diff_raw_over_p99": max(diffs_raw), "max_abs_diff_display_01": max(diffs_disp)}
    res["peak_rss_gb_after_ensemble"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if a.age:
        res["age"] = age_section(writer, imgs, a.runs)
    if a.per_arch:
        res["per_architecture"] = per_architecture(ens, imgs, a.runs)
    res["peak_rss_gb_after_warmup"] = t_rss
    res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    res["machine"]["loadavg_end"] = os.getloadavg()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "timings"}, indent=1))
    for k, v in out.items():
        print(f"{k:20s} {v['s_per_image']:.3f} s/image (CPU {v['cpu_s_per_image']:.3f} s)  runs {['%.2f' % r for r in v['runs_s']]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
