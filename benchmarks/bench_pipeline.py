"""Benchmark: the original fastai pipeline vs ``cxr-lung-risk predict``, plus model-only numbers.

Never a test. Every timed quantity is the median of ``--runs`` (>= 3) runs; the JSON also keeps
every run. Both sides run as fresh subprocesses under the same conditions (same inputs, same
environment, same thread count) on inputs copied to a scratch folder.

Sections of the JSON written to ``benchmarks/results/`` (``--out`` to change):

* ``machine``: CPU, cores, torch, load average at start and end (other processes disturb timings).
* ``peak``: measured 2048^3 matmul GFLOP/s (fp32, bf16): the roofline the ensemble is held to.
* ``model_only``: in-process, our engine: load time of the 13 members, steady-state s/image at
  ``--batch-size``, FLOPs/image (``torch.utils.flop_counter``), achieved GFLOP/s and fraction of
  the fp32 matmul peak; also per ``--precision`` option.
* ``accuracy``: per-member and score max |error| of each engine option against the plain float32
  engine (published layout, no BN folding, contiguous) and against float64, on the authors' sample
  images and their mirror images, with the weights given (use calibrated synthetic weights).
* ``end_to_end``: per input kind (png, dicom, dicom_j2k) and N: wall time, phase times, images/s
  and peak RSS (largest process and whole process tree) for the original and for ours, and the
  ratios ours/original.

Usage:
  python benchmarks/bench_pipeline.py --weights SYNTH_DIR [--oracle-python .venvs/oracle/bin/python]
      [--n 5,32] [--dicom-n 5] [--n256] [--runs 3] [--skip-original] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "tests" / "data" / "reference" / "sample_png"  # the authors' A..E (PROVENANCE.md there)


# ---------------------------------------------------------------------------------------------
# machine and roofline
def machine_info() -> dict[str, Any]:
    import torch

    from cxr_lung_risk.layout import cpu_flags, cpu_name

    flags = cpu_flags()
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_tile" in flags,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "loadavg_start": os.getloadavg(),
    }


def native_bf16(info: dict[str, Any]) -> bool:
    """Whether the CPU has bf16 arithmetic (AVX512_BF16 or AMX); without it PyTorch emulates bf16
    matmuls and convolutions, which are no roofline and take many minutes (15+ on a 2-core Zen 3)."""
    return bool(info.get("avx512_bf16") or info.get("amx"))


def matmul_peak(runs: int = 15, n: int = 2048, bf16: bool = True) -> dict[str, Any]:
    """Median and best GFLOP/s of an n^3 matmul in fp32 (and bf16 when ``bf16``) on all threads."""
    import torch

    out: dict[str, Any] = {}
    kinds = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if bf16 else [])
    if not bf16:
        out["bf16_skipped"] = "no native bf16 on this CPU (AVX512_BF16/AMX absent): emulated bf16 is not measured"
    for name, dt in kinds:
        a = torch.randn(n, n, dtype=dt)
        b = torch.randn(n, n, dtype=dt)
        for _ in range(3):
            a @ b
        ts = []
        for _ in range(runs):
            t = time.perf_counter()
            a @ b
            ts.append(time.perf_counter() - t)
        out[f"{name}_gflops_median"] = 2 * n**3 / statistics.median(ts) / 1e9
        out[f"{name}_gflops_best"] = 2 * n**3 / min(ts) / 1e9
    return out


def gpu_matmul_peak(device: str, runs: int = 20, n: int = 8192) -> dict[str, float]:
    """Median TFLOP/s of an n^3 matmul on the GPU: IEEE fp32, TF32, bf16, fp16."""
    import torch

    from cxr_lung_risk.engine import fp32_math

    out = {}
    for name, dt, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True), ("bf16", torch.bfloat16, False), ("fp16", torch.float16, False)):
        a = torch.randn(n, n, dtype=dt, device=device)
        b = torch.randn(n, n, dtype=dt, device=device)
        with fp32_math(allow_tf32=tf32):
            for _ in range(3):
                a @ b
            torch.cuda.synchronize()
            ts = []
            for _ in range(runs):
                t = time.perf_counter()
                a @ b
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t)
        out[f"{name}_tflops_median"] = 2 * n**3 / statistics.median(ts) / 1e12
        del a, b
    return out


class GpuSampler:
    """Samples GPU utilisation (%) and memory (MiB) with ``nvidia-smi`` every ``period_ms`` while
    the block runs; ``result`` is None where there is no nvidia-smi."""

    def __init__(self, period_ms: int = 100) -> None:
        self.period_ms = period_ms
        self.result: dict[str, Any] | None = None
        self._p: subprocess.Popen | None = None

    def __enter__(self) -> "GpuSampler":
        exe = shutil.which("nvidia-smi")
        if exe:
            self._p = subprocess.Popen(
                [exe, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", f"-lms={self.period_ms}", "-i", "0"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._p is None:
            return
        self._p.terminate()
        out, _ = self._p.communicate(timeout=10)
        util, mem = [], []
        for line in out.splitlines():
            try:
                u, m = (float(v) for v in line.split(","))
            except ValueError:
                continue
            util.append(u)
            mem.append(m)
        if util:
            busy = util[len(util) // 10 : len(util) - len(util) // 10] or util  # drop ramp-up and tail
            self.result = {"util_mean_pct": statistics.mean(busy), "util_median_pct": statistics.median(busy), "util_max_pct": max(util), "mem_max_mib": max(mem), "samples": len(util)}


# ---------------------------------------------------------------------------------------------
# inputs
def sample_images() -> list[np.ndarray]:
    """The 5 shared samples and their mirror images as uint8 CHW 224x224 crops."""
    from cxr_lung_risk import transforms as T

    imgs = [T.to_uint8_chw(T.center_crop_resize(T.open_raster(p))) for p in sorted(SAMPLES.glob("*.png"))]
    return imgs + [np.ascontiguousarray(i[:, :, ::-1]) for i in imgs]


def make_png_inputs(dest: Path, n: int) -> Path:
    """N PNGs: the 5 samples, then derived copies (mirrored, resized 256/320/400, flipped)."""
    from PIL import Image, ImageOps

    dest.mkdir(parents=True, exist_ok=True)
    srcs = [Image.open(p).convert("L") for p in sorted(SAMPLES.glob("*.png"))]
    variants = [
        lambda im: im,
        ImageOps.mirror,
        lambda im: im.resize((256, 256), Image.BICUBIC),
        lambda im: ImageOps.mirror(im.resize((320, 300), Image.BICUBIC)),
        lambda im: im.resize((400, 420), Image.LANCZOS),
        ImageOps.flip,
        lambda im: im.rotate(3, resample=Image.BILINEAR),
    ]
    for i in range(n):
        im = variants[(i // len(srcs)) % len(variants)](srcs[i % len(srcs)])
        if i >= len(srcs) * len(variants):
            im = im.resize((224 + i % 97, 224 + i % 89), Image.BILINEAR)
        im.save(dest / f"img_{i:04d}.png")
    return dest


def _dicom_source(name: str) -> Path:
    from pydicom.data import get_testdata_file

    p = get_testdata_file(name)
    if p is None:
        raise SystemExit(f"{name} not found: pip install pydicom-data")
    return Path(p)


def make_dicom_inputs(dest: Path, n: int, name: str = "RG1_UNCR.dcm") -> Path:
    """N copies of a pydicom-data chest CR (each with its own SOP Instance UID)."""
    import pydicom
    from pydicom.uid import generate_uid

    dest.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(_dicom_source(name))
    for i in range(n):
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[name, str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(dest / f"img_{i:04d}.dcm", enforce_file_format=True)
    return dest


# ---------------------------------------------------------------------------------------------
# process measurement
def _tree_pids(root: int) -> dict[int, int]:
    """{pid: VmHWM kB} of ``root`` and its descendants, from /proc/<pid>/status (cheap: kernel
    counters, no page-table walk)."""
    parents: dict[int, int] = {}
    hwm: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status") as f:
                ppid, peak = 0, 0
                for line in f:
                    if line.startswith("PPid:"):
                        ppid = int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        peak = int(line.split()[1])
            parents[int(d)] = ppid
            hwm[int(d)] = peak
        except (OSError, ValueError):
            continue
    tree = {root}
    changed = True
    while changed:
        changed = False
        for pid, pp in parents.items():
            if pp in tree and pid not in tree:
                tree.add(pid)
                changed = True
    return {p: hwm.get(p, 0) for p in tree}


def _tree_pss_kb(pids: list[int]) -> int:
    """Sum of PSS (proportional set size: pages shared by forked workers counted once) over
    ``pids``. Reading smaps_rollup walks the process's page tables under its mmap lock, which
    slows a process that maps and unmaps large buffers (measured: ~20% on our predict at 10 Hz),
    so it is read only once a second."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def run_measured(cmd: list[str], env: dict[str, str] | None = None, poll_s: float = 0.1, pss_every_s: float = 1.0) -> dict[str, Any]:
    """Run ``cmd``; wall time, exit code, peak RSS of the largest process (its VmHWM, the
    kernel's own high-water mark, polled every ``poll_s``) and peak PSS of the whole process
    tree (sampled every ``pss_every_s``)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = {"tree": 0, "single": 0}
    stop = threading.Event()

    def sample() -> None:
        last_pss = 0.0
        while not stop.is_set():
            hwm = _tree_pids(p.pid)
            peak["single"] = max([peak["single"], *hwm.values()])
            now = time.perf_counter()
            if now - last_pss >= pss_every_s:
                peak["tree"] = max(peak["tree"], _tree_pss_kb(list(hwm)))
                last_pss = now
            stop.wait(poll_s)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out = p.stdout.read() if p.stdout else b""
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    return {
        "wall_s": wall,
        "rc": p.returncode,
        # not ru.ru_maxrss: Linux carries the forking parent's high-water mark across exec
        "peak_rss_mb": peak["single"] / 1024,
        "peak_tree_pss_mb": peak["tree"] / 1024,
        "user_s": ru.ru_utime,
        "sys_s": ru.ru_stime,
        "tail": out.decode(errors="replace")[-600:] if p.returncode else "",
    }


def _median_summary(runs: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    return {k: statistics.median(r[k] for r in runs) for k in keys if all(k in r for r in runs)}


# ---------------------------------------------------------------------------------------------
# model-only (in process)
def model_only(weights: Path, runs: int, batch_size: int, precisions: list[str], threads: list[int], device: str = "cpu") -> dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cxr_lung_risk.engine import LungRiskEnsemble

    res: dict[str, Any] = {"batch_size": batch_size, "device": device}
    loads = []
    for _ in range(runs):
        t = time.perf_counter()
        ens = LungRiskEnsemble.load(weights, device=device)
        if device != "cpu":
            torch.cuda.synchronize()
        loads.append(time.perf_counter() - t)
        del ens
    res["load_s_runs"] = loads
    res["load_s"] = statistics.median(loads)
    res["load_fresh_process"] = load_fresh_process(weights, runs)
    ens = LungRiskEnsemble.load(weights, fold_bn=False, channels_last=False)
    x1 = torch.zeros(1, 3, 224, 224)
    with FlopCounterMode(display=False) as fc:
        ens.member_outputs(x1)
    flops = fc.get_total_flops()
    res["members"] = len(ens.models)
    res["gflop_per_image"] = flops / 1e9
    del ens
    imgs = sample_images()
    xb = torch.from_numpy(np.stack([imgs[i % len(imgs)] for i in range(batch_size)]))
    configs = [("fp32_plain", dict(fold_bn=False, channels_last=False), None)]
    configs += [(f"{p}", dict(precision=p), None) for p in precisions]
    if device == "cpu":
        configs += [(f"fp32_threads{t}", dict(), t) for t in threads]
    n0 = torch.get_num_threads()
    for name, kw, nt in configs:
        try:
            ens = LungRiskEnsemble.load(weights, device=device, **kw)
        except Exception as e:  # e.g. bf16 not supported
            res[name] = {"error": str(e)}
            continue
        torch.set_num_threads(nt or n0)
        ens.predict_uint8(xb)  # warm-up (oneDNN primitive creation / cuDNN autotuning)
        ts = []
        # predict_uint8 returns numpy, so each timed call includes the host-device round trip
        with GpuSampler() as gs:
            for _ in range(runs):
                t = time.perf_counter()
                ens.predict_uint8(xb)
                ts.append(time.perf_counter() - t)
        torch.set_num_threads(n0)
        spi = statistics.median(ts) / batch_size
        res[name] = {
            "s_per_image": spi,
            "s_per_image_best": min(ts) / batch_size,
            "images_per_s": 1 / spi,
            "gflops": flops / 1e9 / spi,
            "runs_s": ts,
        }
        if gs.result is not None:
            res[name]["gpu"] = gs.result
        del ens
    return res


_LOAD_SNIPPET = r"""
import os, sys, time, json
from pathlib import Path
mode, weights = sys.argv[1], Path(sys.argv[2])
import torch
from cxr_lung_risk.engine import LungRiskEnsemble
from cxr_lung_risk.spec import lung_risk_spec
files = [weights / m.file for m in lung_risk_spec().active_members(False)]
if mode != "warm":
    for f in files:  # drop the member files from the page cache (clean pages; no root needed)
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    time.sleep(0.2)
t = time.perf_counter()
if mode == "read":
    buf = bytearray(8 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
else:
    LungRiskEnsemble.load(weights, prefetch=(mode != "cold_noprefetch"))
print(json.dumps({"s": time.perf_counter() - t, "bytes": sum(f.stat().st_size for f in files)}))
"""


def load_fresh_process(weights: Path, runs: int) -> dict[str, Any]:
    """Load of the 13 members in a fresh process (templates built, nothing cached in Python):
    ``warm`` (files in the page cache), ``cold`` (files dropped from the page cache first, with the
    engine's parallel prefetch), ``cold_noprefetch``, and ``read``: a plain sequential read of the
    same bytes after dropping them, the I/O reference. On a VM the host may still cache the disk,
    so "cold" here is the guest's cold cache, not necessarily a cold physical disk."""
    out: dict[str, Any] = {}
    for mode in ("warm", "cold", "cold_noprefetch", "read"):
        ts = []
        for _ in range(runs):
            r = subprocess.run([sys.executable, "-c", _LOAD_SNIPPET, mode, str(weights)], capture_output=True, text=True)
            if r.returncode != 0:
                out[mode] = {"error": r.stderr[-400:]}
                break
            d = json.loads(r.stdout.strip().splitlines()[-1])
            ts.append(d["s"])
            out["bytes"] = d["bytes"]
        else:
            out[mode] = {"s": statistics.median(ts), "runs_s": ts}
    if "s" in out.get("read", {}) and "bytes" in out:
        out["read"]["mb_per_s"] = out["bytes"] / 1e6 / out["read"]["s"]
    return out


def compile_check(weights: Path, batch_size: int, runs: int, device: str = "cpu") -> dict[str, Any]:
    """Does ``torch.compile`` (inductor, weight freezing) pay? One member per architecture:
    steady-state s/batch eager vs compiled, the compile time, the max |difference| of the outputs,
    and the number of images after which the compile time is paid back for the whole ensemble."""
    import torch

    from cxr_lung_risk.engine import LungRiskEnsemble, fp32_math

    try:
        import torch._inductor.config as inductor_config
    except Exception as e:  # pragma: no cover
        return {"error": f"inductor unavailable: {e}"}
    inductor_config.freezing = True
    ens = LungRiskEnsemble.load(weights, device=device)
    x = torch.randn(batch_size, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    # on CUDA, "reduce-overhead" adds CUDA graphs to the compiled kernels
    mode = "reduce-overhead" if device != "cpu" else "default"
    per_arch: dict[str, Any] = {}
    count: dict[str, int] = {}
    for m in ens.members:
        count[m.architecture] = count.get(m.architecture, 0) + 1
    for arch in count:
        i = next(j for j, m in enumerate(ens.members) if m.architecture == arch)
        model = ens.models[i]
        with torch.inference_mode(), fp32_math():
            y0 = model(x)
            ts = []
            for _ in range(runs):
                t = time.perf_counter()
                model(x)
                sync()
                ts.append(time.perf_counter() - t)
        eager = statistics.median(ts)
        try:
            torch._dynamo.reset()
            t = time.perf_counter()
            cm = torch.compile(model, mode=mode)
            with torch.no_grad(), fp32_math():
                y1 = cm(x).clone()
                sync()
            compile_s = time.perf_counter() - t
            ts = []
            with torch.no_grad(), fp32_math():
                for _ in range(runs):
                    t = time.perf_counter()
                    cm(x)
                    sync()
                    ts.append(time.perf_counter() - t)
        except Exception as e:
            per_arch[arch] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        comp = statistics.median(ts)
        per_arch[arch] = {
            "members": count[arch],
            "eager_s_per_batch": eager,
            "compiled_s_per_batch": comp,
            "speedup": eager / comp,
            "compile_s_first_member": compile_s,
            "mode": mode,
            "max_abs_diff": float((y0 - y1).abs().max()),
        }
    ok = [v for v in per_arch.values() if "speedup" in v]
    if len(ok) == len(per_arch):
        saved = sum(v["members"] * (v["eager_s_per_batch"] - v["compiled_s_per_batch"]) for v in ok) / batch_size
        cost = sum(v["members"] * v["compile_s_first_member"] for v in ok)
        per_arch["ensemble_saved_s_per_image"] = saved
        per_arch["ensemble_compile_s_estimate"] = cost
        per_arch["pays_back_after_images"] = cost / saved if saved > 0 else None
    torch._dynamo.reset()
    return per_arch


def accuracy(weights: Path, precisions: list[str], device: str = "cpu") -> dict[str, Any]:
    """Max |error| per member and of the score vs the plain float32 engine (on the CPU) and vs
    float64; each option runs on ``device``."""
    import torch

    from cxr_lung_risk.engine import LungRiskEnsemble
    from cxr_lung_risk.transforms import normalize

    x = torch.from_numpy(np.stack(sample_images()))
    plain = LungRiskEnsemble.load(weights, fold_bn=False, channels_last=False)
    ref = plain.predict_uint8(x)
    for m in plain.models:
        m.double()
    xd = normalize(x, plain.spec.mean, plain.spec.std).double()
    with torch.inference_mode():
        per64 = torch.stack([m(xd)[:, 0] for m in plain.models], 1).numpy()
    score64 = plain.combine(per64)
    names = plain.member_names
    del plain

    def errs(per: np.ndarray, score: np.ndarray, per_ref: np.ndarray, score_ref: np.ndarray) -> dict[str, Any]:
        d = np.abs(per - per_ref).max(0)
        return {
            "member_max": float(d.max()),
            "score_max_years": float(np.abs(score - score_ref).max()),
            "per_member": {n: float(v) for n, v in zip(names, d)},
        }

    out: dict[str, Any] = {
        "images": int(x.shape[0]),
        "member_output_range": [float(ref.per_member.min()), float(ref.per_member.max())],
        "fp32_plain_vs_fp64": errs(ref.per_member, ref.scores, per64, score64),
    }
    for name, kw in [("fp32_default", {})] + [(p, {"precision": p}) for p in precisions if p != "fp32"]:
        try:
            r = LungRiskEnsemble.load(weights, device=device, **kw).predict_uint8(x)
        except Exception as e:
            out[name] = {"error": str(e)}
            continue
        out[name] = {"vs_fp32_plain": errs(r.per_member, r.scores, ref.per_member, ref.scores), "vs_fp64": errs(r.per_member, r.scores, per64, score64)}
    return out


# ---------------------------------------------------------------------------------------------
# end to end
def prepare_original_work(oracle_python: str, weights: Path, work: Path) -> None:
    """Untimed: fastai's learn.save of every member (what the published files are) into work/models."""
    if (work / "models").is_dir() and len(list((work / "models").glob("*.pth"))) >= 20:
        return
    one = work / "one"
    one.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sorted(SAMPLES.glob("*.png"))[0], one / "A.png")
    subprocess.run(
        [oracle_python, str(REPO / "tools" / "oracle" / "run_oracle.py"), "--weights", str(weights), "--images", str(one), "--work", str(work), "--out", str(work / "prep.csv")],
        check=True,
        capture_output=True,
    )


def run_original(oracle_python: str, work: Path, images: Path, dicom: bool, scratch: Path) -> dict[str, Any]:
    timing = scratch / "orig_timing.json"
    cmd = [oracle_python, str(REPO / "benchmarks" / "_original_runner.py"), "--work", str(work), "--images", str(images), "--out", str(scratch / "orig.csv"), "--timing", str(timing)]
    if dicom:
        cmd.append("--dicom")
    r = run_measured(cmd)
    if r["rc"] == 0:
        r.update(json.loads(timing.read_text()))
    return r


def run_ours(weights: Path, images: Path, scratch: Path, extra: list[str]) -> dict[str, Any]:
    out = scratch / "ours_out"
    if out.exists():
        shutil.rmtree(out)
    timing = scratch / "ours_timing.json"
    timing.unlink(missing_ok=True)
    exe = shutil.which("cxr-lung-risk") or str(Path(sys.executable).with_name("cxr-lung-risk"))
    base = [exe] if Path(exe).exists() else [sys.executable, "-m", "cxr_lung_risk.cli"]
    cmd = base + ["predict", str(images), "--out", str(out), "--weights", str(weights), "--format", "csv", "--timings", str(timing)] + extra
    r = run_measured(cmd)
    if r["rc"] == 0 and timing.exists():
        t = json.loads(timing.read_text())
        r.update({k: t[k] for k in ("startup_s", "load_s", "prepare_s", "infer_s", "write_s") if t.get(k) is not None})
        r["images_s"] = t["prepare_s"] + t["infer_s"] + t["write_s"]
    return r


# phase of ours -> the original's phase it replaces (ours/original ratio per phase)
PHASES = {
    "startup": ("startup_s", "import_s"),  # interpreter + imports
    "load": ("load_s", "build_load_s"),  # build the networks, read the weights
    "images": ("images_s", "images_s"),  # decode/convert + preprocess + models + write
}


def end_to_end(args: argparse.Namespace, scratch: Path, on_case=None) -> dict[str, Any]:
    res: dict[str, Any] = {}
    cases: list[tuple[str, int]] = [("png", n) for n in args.n] + [("dicom", n) for n in args.dicom_n] + [("dicom_j2k", n) for n in args.dicom_n[:1]]
    if args.n256:
        cases += [("png", 256), ("dicom", 256)]
    work = args.original_work or scratch / "original_work"
    if not args.skip_original:
        prepare_original_work(args.oracle_python, args.weights, work)
    for kind, n in cases:
        src = scratch / f"in_{kind}_{n}"
        if kind == "png":
            make_png_inputs(src, n)
        else:
            make_dicom_inputs(src, n, "RG1_J2KR.dcm" if kind == "dicom_j2k" else "RG1_UNCR.dcm")
        entry: dict[str, Any] = {"n": n}
        sides: dict[str, list[str] | None] = {}
        for label, extra in args.ours_variants:
            sides[f"ours{label}"] = extra
        if not args.skip_original and kind != "dicom_j2k" and (n <= max(args.n + args.dicom_n) or args.original_256):
            sides["original"] = None
        for side, extra in sides.items():
            runs = []
            for _ in range(args.runs):
                if side == "original":
                    r = run_original(args.oracle_python, work, src, kind == "dicom", scratch)
                    if r["rc"] == 0:
                        r["images_s"] = r["convert_s"] + r["predict_s"]
                else:
                    dev_args = ["--device", args.device] if args.device != "cpu" else []
                    with GpuSampler() as gs:
                        r = run_ours(args.weights, src, scratch, dev_args + (extra or []))
                    if gs.result is not None:
                        r["gpu_util_mean_pct"] = gs.result["util_mean_pct"]
                        r["gpu"] = gs.result
                if r["rc"] != 0:
                    print(f"{side} {kind} N={n} failed (rc {r['rc']}): {r['tail']}", file=sys.stderr)
                runs.append(r)
            ok = [r for r in runs if r["rc"] == 0]
            summ = _median_summary(
                ok,
                ["wall_s", "peak_rss_mb", "peak_tree_pss_mb", "user_s", "import_s", "convert_s", "build_load_s", "predict_s",
                 "startup_s", "load_s", "prepare_s", "infer_s", "write_s", "images_s", "gpu_util_mean_pct"],
            )
            if "wall_s" in summ:
                summ["images_per_s"] = n / summ["wall_s"]
            entry[side] = {"median": summ, "runs": runs, "args": extra}
            print(f"{kind:9s} N={n:3d} {side:16s} wall {summ.get('wall_s', float('nan')):7.2f}s  "
                  f"{summ.get('images_per_s', float('nan')):6.3f} img/s  rss {summ.get('peak_tree_pss_mb', float('nan')):6.0f} MB (tree PSS)", flush=True)
        if "original" in entry and "ours" in entry:
            o, u = entry["original"]["median"], entry["ours"]["median"]
            entry["ratio_ours_over_original"] = {k: u[k] / o[k] for k in ("wall_s", "images_per_s", "peak_rss_mb", "peak_tree_pss_mb") if k in o and k in u and o[k]}
            entry["ratio_ours_over_original_per_phase"] = {
                ph: u[ku] / o[ko] for ph, (ku, ko) in PHASES.items() if ku in u and ko in o and o[ko]
            }
        res[f"{kind}_{n}"] = entry
        if on_case is not None:
            on_case(res)
    # wall(N) = fixed + N * per_image (two-point fit): load/start-up vs steady state
    for side in ["ours", "original"]:
        for kind in ("png", "dicom"):
            pts = [(e["n"], e[side]["median"]["wall_s"]) for k, e in res.items() if k.startswith(kind + "_") and side in e and "wall_s" in e[side]["median"]]
            if len({n for n, _ in pts}) >= 2:
                (n1, w1), (n2, w2) = sorted(pts)[0], sorted(pts)[-1]
                per = (w2 - w1) / (n2 - n1)
                res.setdefault("fit", {})[f"{side}_{kind}"] = {"fixed_s": w1 - n1 * per, "s_per_image": per}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", type=Path, required=True, help="folder of (synthetic) member files")
    ap.add_argument("--oracle-python", default=str(next((p for p in [REPO / ".venvs" / "oracle" / "bin" / "python"] if p.exists()), "")))
    ap.add_argument("--n", default="5,32", help="PNG input counts (default 5,32)")
    ap.add_argument("--dicom-n", default="5,32", help="DICOM input counts (default 5,32; J2K runs at the first)")
    ap.add_argument("--n256", action="store_true", help="also N=256 PNG and DICOM for ours (memory vs N)")
    ap.add_argument("--original-256", action="store_true", help="with --n256, run the original on 256 too (~10-14 min a run)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: model-only, accuracy, compile check and ours end to end")
    ap.add_argument("--no-compile-check", dest="compile_check", action="store_false", help="skip the torch.compile measurement")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--precisions", default="fp32,bf16", help="model-only/accuracy precisions")
    ap.add_argument("--force-bf16", action="store_true", help="measure bf16 even on a CPU without native bf16 (emulated: very slow)")
    ap.add_argument("--threads", default="1", help="model-only thread counts to compare besides the default")
    ap.add_argument("--ours-variant", action="append", default=[], metavar="LABEL=ARGS", help="extra runs of ours, e.g. '_w1=--workers 1'")
    ap.add_argument("--original-work", type=Path, help="reuse a folder of fastai-saved members (made once, untimed, by run_oracle.py)")
    ap.add_argument("--skip-original", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--load-only", action="store_true", help="only the fresh-process load measurements (warm, cold, I/O reference)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.runs < 3:
        ap.error("--runs must be at least 3 (medians of >= 3 runs)")
    args.n = [int(v) for v in args.n.split(",") if v]
    args.dicom_n = [int(v) for v in args.dicom_n.split(",") if v]
    args.ours_variants = [("", [])] + [(v.split("=", 1)[0], v.split("=", 1)[1].split()) for v in args.ours_variant]
    if not args.skip_original and not Path(args.oracle_python or "/nonexistent").exists():
        ap.error("the oracle venv's python was not found: pass --oracle-python or --skip-original")
    precisions = [p for p in args.precisions.split(",") if p]
    result: dict[str, Any] = {"machine": machine_info(), "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    bf16_ok = args.device != "cpu" or native_bf16(result["machine"]) or args.force_bf16
    if not bf16_ok and "bf16" in precisions:
        precisions.remove("bf16")
        result["skipped"] = {"bf16": "no native bf16 on this CPU (AVX512_BF16/AMX absent): PyTorch would emulate it, "
                                     "which measures nothing useful and takes 15+ minutes on 2 cores; --force-bf16 runs it anyway"}
        print("bf16 skipped:", result["skipped"]["bf16"], flush=True)
    t0 = time.perf_counter()
    if args.load_only:
        result["load_fresh_process"] = load_fresh_process(args.weights, args.runs)
        out = args.out or REPO / "benchmarks" / "results" / f"load_{time.strftime('%Y%m%d_%H%M%S')}.json"
        result["machine"]["loadavg_end"] = os.getloadavg()
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(json.dumps(result["load_fresh_process"]), "\nwrote", out)
        return 0
    result["peak"] = matmul_peak(bf16=bf16_ok)
    print("matmul peak", {k: round(v, 1) for k, v in result["peak"].items()}, flush=True)
    if args.device != "cpu":
        result["gpu_peak"] = gpu_matmul_peak(args.device)
        print("GPU matmul peak", {k: round(v, 1) for k, v in result["gpu_peak"].items()}, flush=True)
    if not args.skip_model:
        mo = model_only(args.weights, args.runs, args.batch_size, precisions, [int(t) for t in args.threads.split(",") if t], args.device)
        pk = result["peak"]["fp32_gflops_median"]
        for k, v in mo.items():
            if isinstance(v, dict) and "gflops" in v:
                if args.device == "cpu":
                    v["fraction_of_fp32_matmul_peak"] = v["gflops"] / pk
                else:  # against the GPU matmul peak of the same arithmetic
                    prec = k.split("_")[0]
                    gpk = result["gpu_peak"].get(f"{prec}_tflops_median")
                    if gpk:
                        v[f"fraction_of_gpu_{prec}_matmul_peak"] = v["gflops"] / (gpk * 1000)
        result["model_only"] = mo
        if args.compile_check:
            result["compile"] = compile_check(args.weights, args.batch_size, args.runs, args.device)
            print("compile", json.dumps(result["compile"], default=str)[:800], flush=True)
        print("model-only", json.dumps({k: (round(v["s_per_image"], 3) if isinstance(v, dict) and "s_per_image" in v else v) for k, v in mo.items() if not k.endswith("runs")}), flush=True)
        result["accuracy"] = accuracy(args.weights, precisions, args.device)
        print("accuracy", json.dumps({k: v for k, v in result["accuracy"].items() if k != "images"}, default=str)[:1500], flush=True)
    out = args.out or REPO / "benchmarks" / "results" / f"bench_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(partial: bool) -> None:
        result["complete"] = not partial
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")

    save(partial=True)
    if not args.skip_e2e:
        with tempfile.TemporaryDirectory(prefix="cxr_bench_") as tmp:

            def on_case(res: dict[str, Any]) -> None:  # keep what is measured if the run is cut short
                result["end_to_end"] = res
                save(partial=True)

            result["end_to_end"] = end_to_end(args, Path(tmp), on_case)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["bench_wall_s"] = time.perf_counter() - t0
    save(partial=False)
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
