"""Peak memory and time per hostile input, in a real ``cxr-lung-risk predict`` run.

Builds one input per hostile class (small on disk: sparse files, deflate streams; built by the
tests' own builders, ``tests/hostile_files.py``), plus two normal chest CRs as controls, then

(a) runs ``cxr-lung-risk predict CASES --out OUT --weights W --format csv,sr`` once on all of
    them as a subprocess and samples, every 0.1 s, the main process's VmRSS/VmHWM and the
    summed VmRSS of its whole process tree (the decode workers), plus the tree's PSS once a
    second (forked workers share the loaded weights' pages with the main process: summed RSS
    counts those pages twice, PSS once); reports wall time, exit code and the manifest rows;
(b) for each input alone, times ``discover`` + ``pipeline.prepare(item, PrepareOptions())`` in
    a fresh subprocess (after a warm-up ``prepare`` of a small valid file, so lazy imports are
    not charged to the case) and records that process's peak RSS growth: its high-water mark is
    reset (``/proc/self/clear_refs`` 5) just before the case, so VmHWM after it minus the RSS
    before it is the case's own peak (``peak_growth_mib``); and its manifest row. ``ru_maxrss``
    is recorded too, but Linux carries the launching process's high-water mark across exec into
    it, so it can only show growth above the benchmark's own RSS;
(c) unless ``--no-baseline``, runs the same predict on the two controls alone, for comparison;
(d) for each case of the second round (issue 25: structure bombs, empty file, invalid UID,
    100-megapixel DICOM and PNG, a 156-megapixel PNG, a folder with a '..' link) a predict run
    of its own with one decode worker, sampled as in (a): the tree's peak per case.
    ``--round2-only`` runs (b) and (d) for those cases only.

It is never run as a test. Writes JSON (default ``benchmarks/results/hostile_cpu_2core.json``)
and prints a table. The goal it checks (the hostile-input issue): no input may make the run
exceed 2.5 GB RSS with the 13 members loaded, and the time per input is bounded.

    python benchmarks/bench_hostile.py --weights SYNTH_DIR [--scratch DIR] [--out FILE]

Without ``--weights`` the 13 active members' SYNTHETIC weights are generated into the scratch
folder from the oracle fixture's recipe and calibrated BatchNorm statistics (about 1.2 GB).
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime as _dt
import json
import os
import platform
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ORACLE = REPO / "tests" / "data" / "oracle"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "hostile_cpu_2core.json"
sys.path.insert(0, str(REPO / "tests"))
from hostile_files import (  # noqa: E402 - the tests' builders, found through the path above
    PRIVATE_CREATOR,
    dataset_start,
    deflated_file,
    explicit,
    large_dicom,
    large_png,
    patch_j2k,
    pixel_element_at,
    rg1_crop,
    save,
    with_empty_items,
    with_nested_sequences,
    zeros,
)
GOAL_BYTES = 2.5e9  # the limit: 2.5 GB RSS for the whole run with the 13 members loaded
NON_UTF8_NAME = b"12_caf\xe9_non_utf8.dcm"


# ---------------------------------------------------------------------------------------------
# builders: the tests' own (tests/hostile_files.py; all from pydicom-data's real RG1 chest CR)
def dicom_data() -> Path:
    import data_store  # PyPI's pydicom-data

    return Path(data_store.__file__).parent / "data"


def build_cases(root: Path) -> list[dict[str, Any]]:
    """Write every case into ``root`` (emptied first); return [{name, class, path(bytes)}]."""
    import numpy as np
    import pydicom
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

    if root.exists() or root.is_symlink():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    src = pydicom.dcmread(dicom_data() / "RG1_UNCR.dcm")
    rg1 = (src, src.pixel_array)
    cases: list[dict[str, Any]] = []

    def add(name: str | bytes, what: str) -> Path:
        raw = os.fsencode(root) + b"/" + (name if isinstance(name, bytes) else name.encode())
        shown = name if isinstance(name, str) else name.decode("utf-8", "backslashreplace")  # as the manifest
        cases.append({"name": shown, "class": what, "raw": raw})
        return Path(os.fsdecode(raw))

    plain = save(rg1_crop(rg1), root.parent / "_plain_64.dcm")  # also the per-case warm-up file
    data = plain.read_bytes()
    pix, start = pixel_element_at(data), dataset_start(data)

    p = add("01_j2k_claims_8000x8000.dcm", "J2K codestream SIZ claims 8000 x 8000 (header 64 x 64)")
    patch_j2k(save(rg1_crop(rg1), p, JPEG2000Lossless), 8000, 8000)

    p = add("02_jpegls_claims_8000x8000.dcm", "JPEG-LS SOF55 claims 8000 x 8000 (header 64 x 64)")
    save(rg1_crop(rg1), p, JPEGLSLossless)
    b = bytearray(p.read_bytes())
    i = b.find(b"\xff\xf7")
    struct.pack_into(">HH", b, i + 5, 8000, 8000)
    p.write_bytes(bytes(b))

    p = add("03_deflate_bomb_declared_300MB.dcm", "deflated data set: private OB element of 300 MB of zeros")
    deflated_file(rg1, p, [data[start:pix], PRIVATE_CREATOR, explicit(0x7FDF1001, b"OB", 300 << 20),
                           *zeros(300 << 20), data[pix:]])

    p = add("04_deflate_bomb_undefined_length.dcm", "deflated data set: undefined-length OB, 300 MB of zeros")
    deflated_file(rg1, p, [data[start:pix], PRIVATE_CREATOR, explicit(0x7FDF1001, b"OB", 0xFFFFFFFF),
                           *zeros(300 << 20)])

    p = add("05_pixeldata_len_0xFFFFFFF0.dcm", "PixelData declares 0xFFFFFFF0 bytes")
    p.write_bytes(data[:pix] + explicit(0x7FE00010, b"OW", 0xFFFFFFF0) + data[pix + 12:])

    p = add("06_element_len_0xFFFFFFF0.dcm", "private element declares 0xFFFFFFF0 bytes")
    p.write_bytes(data[:pix] + PRIVATE_CREATOR + explicit(0x7FDF1001, b"OB", 0xFFFFFFF0) + bytes(1000))

    p = add("07_rg1_plus_200MB_zeros.dcm", "real chest CR followed by 200 MB of zeros (sparse)")
    full = (dicom_data() / "RG1_UNCR.dcm").read_bytes()
    with open(p, "wb") as f:
        f.write(full)
        f.truncate(len(full) + (200 << 20))

    p = add("08_strip_8x8000.dcm", "8 x 8000 image (aspect 1:1000)")
    ds = copy.deepcopy(src)
    strip = np.tile(rg1[1][900:908, :], (1, 5))[:, :8000]
    ds.PixelData = np.ascontiguousarray(strip).astype("<u2").tobytes()
    ds.Rows, ds.Columns = 8, 8000
    save(ds, p)

    p = add("09_rescale_1e-30.dcm", "RescaleSlope 1E-30 (blank rendering)")
    save(rg1_crop(rg1, 64, RescaleSlope="1E-30", RescaleIntercept="0"), p)

    p = add("10_fifo.dcm", "FIFO (named pipe)")
    os.mkfifo(p)

    p = add("11_dangling_symlink.dcm", "symbolic link to a missing file")
    os.symlink(root / "missing.dcm", p)

    p = add(NON_UTF8_NAME, "valid 64 x 64 crop under a name with a latin-1 byte (non-UTF-8)")
    fd = os.open(os.fsencode(p), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, data)
    os.close(fd)

    # round 2 (issue 25); "new": each also gets a predict run of its own (the tree's peak per case)
    p = add("13_items_plain_128MiB.dcm", "16.7 M empty sequence items (128 MiB, plain)")
    with_empty_items(rg1, p, 16 << 20)
    cases[-1]["new"] = True
    p = add("14_items_deflated.dcm", "3.5 M empty sequence items, deflated (28 MiB inflated)")
    with_empty_items(rg1, p, 3_500_000, deflate=True)
    cases[-1]["new"] = True
    p = add("15_nested_100.dcm", "sequences nested 100 deep")
    with_nested_sequences(rg1, p, 100)
    cases[-1]["new"] = True
    p = add("16_empty.dcm", "0-byte .dcm")
    p.write_bytes(b"")
    cases[-1]["new"] = True
    p = add("17_invalid_uid.dcm", "StudyInstanceUID '1.2.abc.4' (pydicom warns again when unpickled)")
    ds = rg1_crop(rg1)
    ds.StudyInstanceUID = "9.9"
    raw = save(ds, p).read_bytes()
    elem = struct.pack("<HH2sH", 0x0020, 0x000D, b"UI", 4) + b"9.9\0"
    p.write_bytes(raw.replace(elem, struct.pack("<HH2sH", 0x0020, 0x000D, b"UI", 10) + b"1.2.abc.4\0"))
    cases[-1]["new"] = True
    p = add("18_dicom_100MP.dcm", "100-megapixel 16-bit DICOM (10000 x 10000, the largest accepted)")
    large_dicom(rg1, p, 10000, 10000)
    cases[-1]["new"] = True
    p = add("19_png_100MP.png", "100-megapixel 8-bit PNG (10000 x 10000)")
    large_png(rg1, p, 10000, 10000)
    cases[-1]["new"] = True
    p = add("20_png_156MP.png", "156-megapixel 8-bit PNG (12490 x 12490), over the limit")
    large_png(rg1, p, 12490, 12490)
    cases[-1]["new"] = True

    for n in ("RG1_UNCR.dcm", "RG1_J2KR.dcm"):
        p = add(f"control_{n}", f"control: pydicom-data {n} (real chest CR)")
        shutil.copyfile(dicom_data() / n, p)

    for c in cases:
        st = os.lstat(c["raw"])
        c["apparent_bytes"] = st.st_size
        c["disk_bytes"] = st.st_blocks * 512
    return cases


def build_link_case(root: Path) -> Path:
    """A folder of 23 entries with a '..' link, inside a folder of 2,000 other files (issue 25:
    it became 25,203 inputs). Returned: the folder to give predict."""
    if root.exists():
        shutil.rmtree(root)
    study = root / "study"
    study.mkdir(parents=True)
    for k in range(2000):
        (root / f"other_{k:04d}.txt").write_bytes(b"not selected")
    for k in range(21):  # + chest.dcm + the link: 23 entries
        (study / f"note_{k:02d}.txt").write_bytes(b"x")
    shutil.copyfile(dicom_data() / "RG1_UNCR.dcm", study / "chest.dcm")
    os.symlink("..", study / "up")
    return study


# ---------------------------------------------------------------------------------------------
# weights
def ensure_weights(scratch: Path) -> Path:
    import numpy as np

    from cxr_lung_risk.spec import lung_risk_spec
    from cxr_lung_risk.synthetic import SyntheticRecipe, write_synthetic_weights

    d = scratch / "weights"
    active = list(lung_risk_spec().active_members())
    if (d / "SYNTHETIC_WEIGHTS_README.txt").exists() and all((d / m.file).exists() for m in active):
        return d
    stats = {}
    for m in active:
        with np.load(ORACLE / "bn_stats" / f"member_{m.index:02d}.npz") as z:
            stats[m.index] = {k: z[k] for k in z.files}
    recipe = SyntheticRecipe.from_json(json.loads((ORACLE / "recipe.json").read_text())["recipe"])
    t = time.perf_counter()
    write_synthetic_weights(d, recipe, stats, members=[m.index for m in active])
    print(f"wrote synthetic weights for {len(active)} members into {d} in {time.perf_counter() - t:.0f} s", flush=True)
    return d


# ---------------------------------------------------------------------------------------------
# process measurement
def _status(pid: int | str) -> dict[str, int] | None:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("PPid:", "VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except (OSError, ValueError):
        return None
    return out


def _tree(root: int) -> dict[int, dict[str, int]]:
    """{pid: status} of ``root`` and its descendants (parents found through PPid)."""
    info: dict[int, dict[str, int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            s = _status(d)
            if s is not None:
                info[int(d)] = s
    tree = {root}
    changed = True
    while changed:
        changed = False
        for pid, s in info.items():
            if pid not in tree and s.get("PPid") in tree:
                tree.add(pid)
                changed = True
    return {p: info[p] for p in tree if p in info}


def _smaps(pids) -> dict[int, tuple[int, int]]:
    """{pid: (PSS kB, USS kB)}: proportional set size (pages shared with the forking parent
    counted once over the tree) and private pages (Private_Clean + Private_Dirty, including
    copy-on-write copies). Reading smaps_rollup walks the page tables under the process's mmap
    lock, so it is sampled only once a second (see benchmarks/README.md)."""
    out: dict[int, tuple[int, int]] = {}
    for pid in pids:
        pss = uss = 0
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss = int(line.split()[1])
                    elif line.startswith(("Private_Clean:", "Private_Dirty:")):
                        uss += int(line.split()[1])
        except (OSError, ValueError):
            continue
        out[pid] = (pss, uss)
    return out


def run_sampled(cmd: list[str], poll_s: float = 0.1, pss_every_s: float = 1.0, timeout_s: float = 900) -> dict[str, Any]:
    """Run ``cmd``; sample the main process and its tree every ``poll_s``."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = {"main_rss": 0, "main_hwm": 0, "tree_rss_sum": 0, "tree_pss": 0, "samples": 0, "max_procs": 0,
            "pss_discarded": 0}
    per_pid_hwm: dict[int, int] = {}
    per_pid_first: dict[int, int] = {}  # RSS when first seen (a forked worker: what it inherited)
    per_pid_uss: dict[int, int] = {}
    stop = threading.Event()

    def sample() -> None:
        last_pss = -1e9
        while not stop.is_set():
            tree = _tree(p.pid)
            if p.pid in tree:
                m = tree[p.pid]
                peak["main_rss"] = max(peak["main_rss"], m.get("VmRSS", 0))
                peak["main_hwm"] = max(peak["main_hwm"], m.get("VmHWM", 0))
            peak["tree_rss_sum"] = max(peak["tree_rss_sum"], sum(s.get("VmRSS", 0) for s in tree.values()))
            peak["max_procs"] = max(peak["max_procs"], len(tree))
            for pid, s in tree.items():
                per_pid_hwm[pid] = max(per_pid_hwm.get(pid, 0), s.get("VmHWM", 0))
                per_pid_first.setdefault(pid, s.get("VmRSS", 0))
            now = time.perf_counter()
            if now - last_pss >= pss_every_s:
                sm = _smaps(sorted(tree))
                # PSS summed over processes read one after another is only valid if no process
                # forked or exited meanwhile: a worker read while it shares the weights (half
                # counted) and the main process read after the worker exited (all counted) would
                # count them 1.5 times. Keep the sample only if the tree is unchanged and alive.
                after = _tree(p.pid)
                if set(after) == set(tree) and set(sm) == set(tree) and all("VmRSS" in v for v in after.values()):
                    peak["tree_pss"] = max(peak["tree_pss"], sum(v[0] for v in sm.values()))
                    for pid, (_, uss) in sm.items():
                        per_pid_uss[pid] = max(per_pid_uss.get(pid, 0), uss)
                    last_pss = now
                else:
                    peak["pss_discarded"] += 1
            peak["samples"] += 1
            stop.wait(poll_s)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    timer = threading.Timer(timeout_s, p.kill)
    timer.start()
    out = p.stdout.read() if p.stdout else b""
    _, status, ru = os.wait4(p.pid, 0)
    timer.cancel()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    kib = 1 / 1024
    workers = {pid: v for pid, v in per_pid_hwm.items() if pid != p.pid}
    return {
        "cmd": [str(c) for c in cmd],
        "wall_s": round(wall, 2),
        "exit_code": os.waitstatus_to_exitcode(status),
        "peak_main_rss_mib": round(peak["main_rss"] * kib, 1),  # largest sampled VmRSS
        "peak_main_vmhwm_mib": round(peak["main_hwm"] * kib, 1),  # kernel high-water mark (last sample)
        "peak_tree_rss_sum_mib": round(peak["tree_rss_sum"] * kib, 1),  # counts fork-shared pages per process
        "peak_tree_pss_mib": round(peak["tree_pss"] * kib, 1),  # shared pages counted once (1 Hz)
        # per decode worker: VmHWM, RSS when first seen (inherited from the fork), peak private (1 Hz)
        # and growth = VmHWM - first RSS (the worker's largest rise above what it inherited, 10 Hz)
        "workers": [{"vmhwm_mib": round(v * kib, 1), "first_rss_mib": round(per_pid_first.get(pid, 0) * kib, 1),
                     "growth_mib": round((v - per_pid_first.get(pid, 0)) * kib, 1),
                     "peak_private_mib": round(per_pid_uss.get(pid, 0) * kib, 1)} for pid, v in workers.items()],
        # main's high-water mark plus every worker's largest private set: the tree's footprint
        # with shared pages once (an estimate: private sets are sampled at 1 Hz)
        "peak_main_plus_worker_private_mib": round((peak["main_hwm"] + sum(per_pid_uss.get(pid, 0) for pid in workers)) * kib, 1),
        "max_processes": peak["max_procs"],
        "pss_samples_discarded": peak["pss_discarded"],
        "samples": peak["samples"],
        "user_s": round(ru.ru_utime, 2),
        "sys_s": round(ru.ru_stime, 2),
        "output_tail": out.decode(errors="replace")[-1500:],
    }


def read_manifest(out: Path) -> list[dict[str, str]]:
    try:
        with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
            return [{"file": r["File"], "status": r["status"], "reason": r["reason"]} for r in csv.DictReader(f)]
    except OSError as e:
        return [{"file": "", "status": "no manifest", "reason": str(e)}]


def read_scores(out: Path) -> dict[str, str]:
    try:
        with open(out / "cxr_lung_risk.csv", newline="", encoding="utf-8") as f:
            return {r["File"]: r.get("CXR_Lung_Risk", "") for r in csv.DictReader(f)}
    except OSError:
        return {}


def predict_run(cases_dir: Path | bytes, out: Path, weights: Path, timeout_s: float, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    if out.exists():
        shutil.rmtree(out)
    timings = out.parent / (out.name + "_timings.json")
    cmd = [sys.executable, "-m", "cxr_lung_risk.cli", "predict", os.fsdecode(cases_dir), "--out", str(out),
           "--weights", str(weights), "--format", "csv,sr", "--timings", str(timings), "--quiet", *extra]
    res = run_sampled(cmd, timeout_s=timeout_s)
    res["manifest"] = read_manifest(out)
    scores = read_scores(out)
    for row in res["manifest"]:
        if row["file"] in scores:
            row["CXR_Lung_Risk"] = scores[row["file"]]
    try:
        res["timings"] = json.loads(timings.read_text())
    except (OSError, ValueError):
        res["timings"] = None
    return res


# ---------------------------------------------------------------------------------------------
# one case alone, in a fresh process
def child_main(path: str, warmup: str) -> None:
    """(in the child) discover + prepare ``path``; print JSON on the last line."""
    import gc

    from cxr_lung_risk.dicom_io import discover
    from cxr_lung_risk.pipeline import PrepareOptions, prepare

    opts = PrepareOptions()
    (w,) = list(discover([warmup]))
    assert prepare(w, opts).status == "ok"
    del w
    gc.collect()
    hwm_reset = True
    try:  # reset VmHWM to the current RSS (Linux >= 4.0), so the case's own peak is visible
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        hwm_reset = False
    now0 = _status("self") or {}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # after the reset: the RSS now
    t0 = time.perf_counter()
    items = list(discover([path]))
    t1 = time.perf_counter()
    rows = []
    for it in items:
        r = prepare(it, opts)
        rows.append({"file": it.rel, "status": str(r.status), "reason": r.reason, "warnings": r.warnings})
    t2 = time.perf_counter()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    now1 = _status("self") or {}
    out = {"rows": rows, "discover_s": t1 - t0, "prepare_s": t2 - t1, "total_s": t2 - t0,
           "ru_maxrss_before_mib": rss0 / 1024, "ru_maxrss_after_mib": rss1 / 1024,
           "ru_maxrss_growth_mib": (rss1 - rss0) / 1024, "hwm_reset": hwm_reset}
    if hwm_reset and "VmRSS" in now0 and "VmHWM" in now1:
        # peak RSS while reading the case above the RSS it started from
        out.update(rss_before_mib=now0["VmRSS"] / 1024, vmhwm_during_mib=now1["VmHWM"] / 1024,
                   peak_growth_mib=(now1["VmHWM"] - now0["VmRSS"]) / 1024)
    else:
        out["peak_growth_mib"] = out["ru_maxrss_growth_mib"]
    print(json.dumps(out))


def run_case(raw: bytes, warmup: Path, timeout_s: float) -> dict[str, Any]:
    cmd = [os.fsencode(sys.executable), os.fsencode(__file__), b"--_child", raw, os.fsencode(warmup)]
    t0 = time.perf_counter()
    try:
        cp = subprocess.run(cmd, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s", "wall_s": timeout_s}
    wall = time.perf_counter() - t0
    try:
        res = json.loads(cp.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"exit {cp.returncode}: {cp.stderr.decode(errors='replace')[-500:]}", "wall_s": wall}
    res["process_wall_s"] = wall
    return res


# ---------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    import numpy
    import pydicom
    import torch

    from cxr_lung_risk.layout import cpu_name

    cpu = cpu_name()
    commit = ""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pydicom": pydicom.__version__,
        "git_commit": commit,
        "loadavg_start": os.getloadavg(),
    }


def _short(s: str, n: int = 78) -> str:
    s = s.removeprefix("failed: ").removeprefix("skipped: ")
    return s if len(s) <= n else s[: n - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scratch", type=Path, default=None, help="scratch folder (default: a new temp dir)")
    ap.add_argument("--weights", type=Path, default=None, help="folder of the 13 active members' files "
                    "(default: generate SYNTHETIC ones into SCRATCH/weights)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    ap.add_argument("--case-timeout", type=float, default=120.0, help="seconds allowed per single-case process")
    ap.add_argument("--run-timeout", type=float, default=900.0, help="seconds allowed per predict run")
    ap.add_argument("--max-case-s", type=float, default=10.0, help="per-input time bound checked (seconds)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the controls-only predict run")
    ap.add_argument("--round2-only", action="store_true", help="only the issue-25 cases: each alone (prepare) and "
                    "one predict run per case (the tree's peak per case); no run on all inputs")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        child_main(*args._child)
        return 0

    sys.path.insert(0, str(REPO / "src"))
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="cxr_hostile_"))
    scratch.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": machine_info(), "goal_bytes": GOAL_BYTES}
    t_all = time.perf_counter()

    weights = args.weights or ensure_weights(scratch)
    result["weights"] = str(weights)
    cases_dir = scratch / "cases"
    t = time.perf_counter()
    cases = build_cases(cases_dir)
    result["build_s"] = round(time.perf_counter() - t, 1)
    warmup = scratch / "_plain_64.dcm"
    print(f"built {len(cases)} inputs in {cases_dir} ({result['build_s']} s; "
          f"{sum(c['disk_bytes'] for c in cases) / 2**20:.1f} MiB on disk, "
          f"{sum(c['apparent_bytes'] for c in cases) / 2**20:.0f} MiB apparent)", flush=True)

    if args.round2_only:
        cases = [c for c in cases if c.get("new")]
    # (b) each case alone
    per_case = []
    for c in cases:
        r = run_case(c["raw"], warmup, args.case_timeout)
        row = (r.get("rows") or [{}])[0]
        per_case.append({"name": c["name"], "class": c["class"], "apparent_bytes": c["apparent_bytes"],
                         "disk_bytes": c["disk_bytes"], "status": row.get("status", "error"),
                         "reason": row.get("reason", r.get("error", "")), "warnings": row.get("warnings", []),
                         "seconds": round(r.get("total_s", r.get("wall_s", 0.0)), 4),
                         "prepare_s": round(r.get("prepare_s", 0.0), 4),
                         "peak_growth_mib": round(r.get("peak_growth_mib", float("nan")), 1),
                         "ru_maxrss_growth_mib": round(r.get("ru_maxrss_growth_mib", float("nan")), 1),
                         "ru_maxrss_after_mib": round(r.get("ru_maxrss_after_mib", float("nan")), 1),
                         "rss_before_mib": round(r.get("rss_before_mib", float("nan")), 1),
                         "vmhwm_during_mib": round(r.get("vmhwm_during_mib", float("nan")), 1),
                         "process_wall_s": round(r.get("process_wall_s", r.get("wall_s", 0.0)), 2)})
        print(f"  {c['name']}: {per_case[-1]['status']} in {per_case[-1]['seconds']:.3f} s, "
              f"+{per_case[-1]['peak_growth_mib']:.0f} MiB", flush=True)
    result["per_case"] = per_case

    # (d) issue 25: one predict run per new case, the tree's peak for each (1 decode worker)
    per_case_tree = []
    link_case = build_link_case(scratch / "link_case")
    for name, target in [(c["name"], c["raw"]) for c in cases if c.get("new")] + [("21_folder_with_parent_link/", os.fsencode(link_case))]:
        print(f"predict on {name} alone ...", flush=True)
        r = predict_run(target, scratch / "out_case", weights, args.run_timeout, ("--workers", "1"))
        rows = r["manifest"]
        per_case_tree.append({
            "name": name, "exit_code": r["exit_code"], "wall_s": r["wall_s"], "rows": len(rows),
            "status": ";".join(sorted({row["status"] for row in rows})),
            "reason": rows[0]["reason"] if len(rows) == 1 else f"{len(rows)} rows: " + ", ".join(
                f"{k} {sum(1 for row in rows if row['status'] == k)}" for k in ("ok", "skipped", "failed")),
            "peak_tree_pss_mib": r["peak_tree_pss_mib"], "peak_main_vmhwm_mib": r["peak_main_vmhwm_mib"],
            "peak_main_plus_worker_private_mib": r["peak_main_plus_worker_private_mib"],
            # main's high-water mark plus each worker's rise above what it inherited (both 10 Hz):
            # the tree's peak with the shared weights once, not missed between 1 Hz PSS samples
            "peak_main_plus_worker_growth_mib": round(r["peak_main_vmhwm_mib"] + sum(w["growth_mib"] for w in r["workers"]), 1),
            "peak_tree_rss_sum_mib": r["peak_tree_rss_sum_mib"], "workers": r["workers"],
            "stderr_has_traceback": "Traceback" in r["output_tail"],
            "stderr_has_raw_warning": "UserWarning" in r["output_tail"] or "Invalid value" in r["output_tail"],
        })
        t = per_case_tree[-1]
        print(f"  {t['status']} ({t['rows']} rows) in {t['wall_s']} s: main VmHWM + worker growth "
              f"{t['peak_main_plus_worker_growth_mib']:.0f} MiB, tree PSS {t['peak_tree_pss_mib']:.0f} MiB, main VmHWM + "
              f"worker private {t['peak_main_plus_worker_private_mib']:.0f} MiB, summed RSS {t['peak_tree_rss_sum_mib']:.0f} MiB",
              flush=True)
    result["per_case_tree"] = per_case_tree
    if args.round2_only:
        result["machine"]["loadavg_end"] = os.getloadavg()
        result["total_s"] = round(time.perf_counter() - t_all, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {args.out} (total {result['total_s']} s)")
        return 0

    # (a) one run with every case
    print("predict on all inputs ...", flush=True)
    result["run_all"] = predict_run(cases_dir, scratch / "out_all", weights, args.run_timeout)
    # (c) the controls alone
    if not args.no_baseline:
        ctrl = scratch / "controls"
        if ctrl.exists():
            shutil.rmtree(ctrl)
        ctrl.mkdir()
        for c in cases:
            if c["name"].startswith("control_"):
                shutil.copyfile(os.fsdecode(c["raw"]), ctrl / c["name"])
        print("predict on the 2 controls ...", flush=True)
        result["run_controls"] = predict_run(ctrl, scratch / "out_controls", weights, args.run_timeout)

    # goal
    ra = result["run_all"]
    main_peak = max(ra["peak_main_rss_mib"], ra["peak_main_vmhwm_mib"]) * 2**20
    slowest = max(per_case, key=lambda c: c["seconds"])
    in_run = {r["file"]: r for r in ra["manifest"]}
    result["goal"] = {
        "peak_main_bytes": main_peak,
        "peak_tree_pss_bytes": ra["peak_tree_pss_mib"] * 2**20,
        "peak_tree_rss_sum_bytes": ra["peak_tree_rss_sum_mib"] * 2**20,
        "memory_ok_main": main_peak <= GOAL_BYTES,
        "memory_ok_tree_pss": ra["peak_tree_pss_mib"] * 2**20 <= GOAL_BYTES,
        "peak_main_plus_worker_private_bytes": ra["peak_main_plus_worker_private_mib"] * 2**20,
        "memory_ok_main_plus_worker_private": ra["peak_main_plus_worker_private_mib"] * 2**20 <= GOAL_BYTES,
        # summed RSS counts the weights' pages once in the main process and again in each forked
        # worker (they are shared copy-on-write), so it overstates the tree's footprint
        "memory_ok_tree_rss_sum": ra["peak_tree_rss_sum_mib"] * 2**20 <= GOAL_BYTES,
        "max_case_s": slowest["seconds"],
        "slowest_case": slowest["name"],
        "time_bound_s": args.max_case_s,
        "time_ok": slowest["seconds"] <= args.max_case_s,
        "every_input_has_a_row": all(c["name"] in in_run for c in cases),
        "same_status_alone_and_in_run": all(in_run.get(c["name"], {}).get("status") == c["status"] for c in per_case),
    }
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["total_s"] = round(time.perf_counter() - t_all, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")

    # table
    print()
    print(f"{'case':38} {'status':8} {'s':>7} {'+MiB':>6}  reason (alone; run status)")
    for c in per_case:
        rs = in_run.get(c["name"], {}).get("status", "-")
        print(f"{c['name'][:38]:38} {c['status']:8} {c['seconds']:7.3f} {c['peak_growth_mib']:6.1f}  "
              f"{_short(c['reason']) or '-'}; run: {rs}")
    for key in ("run_all", "run_controls"):
        r = result.get(key)
        if r:
            print(f"\n{key}: exit {r['exit_code']}, wall {r['wall_s']} s, peak main RSS {r['peak_main_rss_mib']:.0f} MiB "
                  f"(VmHWM {r['peak_main_vmhwm_mib']:.0f}), tree RSS sum {r['peak_tree_rss_sum_mib']:.0f} MiB, "
                  f"tree PSS {r['peak_tree_pss_mib']:.0f} MiB, main VmHWM + worker private "
                  f"{r['peak_main_plus_worker_private_mib']:.0f} MiB; workers {r['workers']}")
    g = result["goal"]
    print(f"\ngoal <= {GOAL_BYTES / 1e9:.1f} GB: main {g['peak_main_bytes'] / 1e9:.2f} GB "
          f"({'ok' if g['memory_ok_main'] else 'EXCEEDED'}), tree PSS {g['peak_tree_pss_bytes'] / 1e9:.2f} GB "
          f"({'ok' if g['memory_ok_tree_pss'] else 'EXCEEDED'}), main + worker private "
          f"{g['peak_main_plus_worker_private_bytes'] / 1e9:.2f} GB "
          f"({'ok' if g['memory_ok_main_plus_worker_private'] else 'EXCEEDED'}), tree RSS sum {g['peak_tree_rss_sum_bytes'] / 1e9:.2f} GB "
          f"({'ok' if g['memory_ok_tree_rss_sum'] else 'EXCEEDED'}; shared pages counted per process); slowest input "
          f"{g['slowest_case']} {g['max_case_s']:.2f} s ({'ok' if g['time_ok'] else 'over'} {g['time_bound_s']:.0f} s)")
    print(f"wrote {args.out} (total {result['total_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
