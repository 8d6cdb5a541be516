"""Faults around a run: a second run into the same --out, SIGTERM, auxiliary files that cannot
be written. Real processes, real signals, real DICOM."""
from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _png_folder(d: Path, sample_pngs, n: int) -> Path:
    """``d`` holding ``n`` copies of the authors' sample PNGs (img00.png, img01.png, ...)."""
    d.mkdir()
    for k in range(n):
        shutil.copy(sample_pngs[k % len(sample_pngs)], d / f"img{k:02d}.png")
    return d


def _env() -> dict:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "2")
    return e


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxr_lung_risk.cli", *args], capture_output=True, text=True, env=_env(), timeout=timeout)


def test_second_run_into_the_same_out_is_refused(tmp_path, sample_pngs, synthetic_weights):
    out = tmp_path / "o"
    out.mkdir()
    with open(out / ".cxr-lung-risk.lock", "w") as held:  # what a running predict holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        p = run_cli("predict", str(sample_pngs[0]), "--out", str(out), "--weights", str(synthetic_weights))
    assert p.returncode == 1
    assert "another cxr-lung-risk run is writing into" in p.stderr and "Traceback" not in p.stderr
    assert not (out / "manifest.csv").exists()  # the running run's files were not touched
    p = run_cli("predict", str(sample_pngs[0]), "--out", str(out), "--weights", str(synthetic_weights))
    assert p.returncode == 0, p.stderr  # once the lock is free, it runs
    assert not (out / ".cxr-lung-risk.lock").exists()


def test_unwritable_timings_file_is_a_warning_not_a_failure(tmp_path, sample_pngs, synthetic_weights):
    p = run_cli("predict", str(sample_pngs[0]), "--out", str(tmp_path / "o"), "--weights", str(synthetic_weights),
                "--timings", str(tmp_path / "no" / "such" / "dir" / "t.json"))
    assert p.returncode == 0, p.stderr
    assert "warning: could not write the timings file" in p.stderr


def test_sigterm_is_handled_like_ctrl_c(tmp_path, sample_pngs, synthetic_weights):
    """docker stop / Kubernetes / timeout send SIGTERM: a message, exit 143, valid JSON, and the
    finished rows kept."""
    src = _png_folder(tmp_path / "in", sample_pngs, 40)
    out = tmp_path / "o"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cxr_lung_risk.cli", "predict", str(src), "--out", str(out), "--weights", str(synthetic_weights),
         "--format", "csv,json", "--batch-size", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # wait until some rows are written
            m = out / "manifest.csv"
            if m.exists() and len(m.read_text().splitlines()) >= 3:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be terminated"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    rows = json.loads((out / "cxr_lung_risk.json").read_text())  # closed properly: valid JSON
    with open(out / "manifest.csv", newline="") as f:
        manifest = list(csv.DictReader(f))
    assert 2 <= len(rows) < 40 and len(manifest) >= len(rows)
    records = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == len(manifest)
    assert not (out / ".cxr-lung-risk.lock").exists()


# ------------------------------------------------------------------------------ the decode fence
def _inputs(tmp_path: Path, sample_pngs, n: int):
    from cxr_lung_risk.dicom_io import discover

    return list(discover([_png_folder(tmp_path / "fence", sample_pngs, n)]))


def _killing_prepare(item, opts):
    from cxr_lung_risk.pipeline import _prepare

    if item.rel == "img03.png":
        os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does
    if item.rel == "img05.png":
        import numpy as np

        np.ones(3 << 30, dtype=np.uint8)  # 3 GiB: beyond the worker's allowance
    if item.rel == "img07.png":
        time.sleep(60)  # hangs
    return _prepare(item, opts)


def test_a_dying_hogging_or_hanging_worker_costs_one_input(tmp_path, sample_pngs, monkeypatch):
    from cxr_lung_risk import pipeline

    files = _inputs(tmp_path, sample_pngs, 10)
    monkeypatch.setattr(pipeline, "prepare", _killing_prepare)  # workers are forked: they see it too
    t = time.monotonic()
    got = list(pipeline.iter_prepared(files, pipeline.PrepareOptions(), workers=2, timeout_s=5, memory_bytes=1 << 30))
    assert time.monotonic() - t < 50
    assert [p.file.rel for p in got] == [f.rel for f in files]  # every input, in order
    by = {p.file.rel: p for p in got}
    assert by["img03.png"].status == "failed" and "SIGKILL" in by["img03.png"].reason
    assert by["img05.png"].status == "failed" and "memory" in by["img05.png"].reason
    assert by["img07.png"].status == "failed" and "longer than 5 s" in by["img07.png"].reason
    assert [p.status for r, p in by.items() if r not in ("img03.png", "img05.png", "img07.png")] == ["ok"] * 7


def test_preparing_ahead_in_the_background_keeps_the_fence(tmp_path, sample_pngs, monkeypatch):
    """The node's decode stage (:class:`PrepareAhead`): what is wanted is prepared before it is
    taken, by the same fenced worker processes -- a worker killed, hogging or hanging costs one
    input -- and what is no longer wanted is dropped."""
    from cxr_lung_risk import pipeline

    files = _inputs(tmp_path, sample_pngs, 10)
    monkeypatch.setattr(pipeline, "prepare", _killing_prepare)  # workers are forked: they see it too
    ahead = pipeline.PrepareAhead(pipeline.PrepareOptions(), workers=1, window=8, timeout_s=5, memory_bytes=1 << 30)
    try:
        ahead.want((f.rel, f) for f in files)  # more than the window: the first 8 are prepared
        t = time.monotonic()
        wait_until = t + 40
        while ahead.prepared < 8 and time.monotonic() < wait_until:
            time.sleep(0.1)
        assert ahead.prepared == 8  # ahead of any take, and no further than the window
        time.sleep(0.5)
        assert ahead.prepared == 8
        got = {f.rel: ahead.take(f.rel, f) for f in files[:8]}
        assert ahead.prepared == 8  # each was taken from what was prepared ahead
        assert got["img03.png"].status == "failed" and "SIGKILL" in got["img03.png"].reason
        assert got["img05.png"].status == "failed" and "memory" in got["img05.png"].reason
        assert got["img07.png"].status == "failed" and "longer than 5 s" in got["img07.png"].reason
        assert [p.status for r, p in got.items() if r not in ("img03.png", "img05.png", "img07.png")] == ["ok"] * 5
        assert [p.file.rel for p in got.values()] == [f.rel for f in files[:8]]
        ahead.want((f.rel, f) for f in files[:8])  # still listed (the node's spool until they are moved) ...
        time.sleep(0.5)
        assert ahead.prepared == 8  # ... but taken: not prepared again
        ahead.forget(f.rel for f in files[:8])
        # an input not wanted (yet) goes first; what is no longer wanted is dropped
        ahead.want([(files[8].rel, files[8])])
        last = ahead.take(files[9].rel, files[9])
        assert last.status == "ok" and last.file.rel == "img09.png"
        while ahead.prepared < 10 and time.monotonic() < wait_until + 20:
            time.sleep(0.05)
        assert list(ahead._done) == ["img08.png"]
        ahead.want([])
        assert ahead._done == {} and not ahead.error
        assert time.monotonic() - t < 60
    finally:
        ahead.close()
    assert not ahead._thread.is_alive()


def test_preparing_ahead_in_process(tmp_path, sample_pngs):
    """``--workers 0``: the same stage prepares in the caller's process, still ahead; with a
    ``source`` it finds what arrived on its own (the node's spool), except while paused (the
    node's models run)."""
    from cxr_lung_risk import pipeline

    files = _inputs(tmp_path, sample_pngs, 3)
    arrived: list = []
    ahead = pipeline.PrepareAhead(pipeline.PrepareOptions(), workers=0, window=4, source=lambda: list(arrived), refresh_s=0.05)
    try:
        time.sleep(0.3)
        assert ahead.prepared == 0
        with ahead.paused():
            arrived += [(f.rel, f) for f in files]  # no want(): the stage asks its source ...
            time.sleep(0.5)
            assert ahead.prepared == 0  # ... but hands nothing out while paused
        wait_until = time.monotonic() + 30
        while ahead.prepared < 3 and time.monotonic() < wait_until:
            time.sleep(0.05)
        got = [ahead.take(f.rel, f) for f in files]
        direct = [pipeline.prepare(f, pipeline.PrepareOptions()) for f in files]
        assert ahead.prepared == 3 and [p.status for p in got] == ["ok"] * 3
        assert all((a.image == b.image).all() for a, b in zip(got, direct))
    finally:
        ahead.close()


def test_outputs_are_never_written_through_planted_links(tmp_path, dicom_data, synthetic_weights):
    out = tmp_path / "o"
    out.mkdir()
    victim_dir = tmp_path / "victim_dir"
    victim_dir.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    for name in ("cxr_lung_risk.csv", "manifest.csv", "records.jsonl", "cxr_lung_risk.json", "run.json"):
        (out / name).symlink_to(victim)
    (out / "sr").symlink_to(victim_dir, target_is_directory=True)
    os.umask(old := os.umask(0o022))
    p = run_cli("predict", str(dicom_data / "RG1_UNCR.dcm"), "--out", str(out), "--weights", str(synthetic_weights),
                "--format", "csv,sr,json")
    assert p.returncode == 0, p.stderr
    assert victim.read_text() == "keep" and list(victim_dir.iterdir()) == []
    for name in ("cxr_lung_risk.csv", "manifest.csv", "records.jsonl", "cxr_lung_risk.json", "run.json"):
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 0, name
    assert not (out / "sr").is_symlink() and len(list((out / "sr").glob("*.dcm"))) == 1
    modes = {oct((out / n).stat().st_mode & 0o777) for n in ("cxr_lung_risk.csv", "manifest.csv")}
    modes |= {oct(f.stat().st_mode & 0o777) for f in (out / "sr").glob("*.dcm")}
    assert modes == {oct(0o666 & ~old)}  # SR and tables alike follow the umask


def test_backslash_in_sop_instance_uid_is_cleaned_for_every_writer(tmp_path, dicom_data, synthetic_weights):
    """A SOPInstanceUID read as two values: one clean UID in the CSV, the record and a valid SR."""
    import pydicom
    from conftest import dciodvfy

    ds = pydicom.dcmread(dicom_data / "RG1_UNCR.dcm")
    ds.SOPInstanceUID = "1.2.840.1234\\5678"
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=False)
    out = tmp_path / "o"
    p = run_cli("predict", str(tmp_path / "x.dcm"), "--out", str(out), "--weights", str(synthetic_weights), "--format", "csv,sr")
    assert p.returncode == 0, p.stderr
    with open(out / "cxr_lung_risk.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["SOPInstanceUID"] == "1.2.840.1234.5678"
    (rec,) = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()]
    assert rec["status"] == "ok" and rec["outputs"]["sr"] == ["sr/1.2.840.1234.5678.dcm"]
    assert any("backslash" in w for w in rec["warnings"])
    sr = pydicom.dcmread(out / "sr" / "1.2.840.1234.5678.dcm")
    assert sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == "1.2.840.1234.5678"
    errors, _ = dciodvfy(out / "sr" / "1.2.840.1234.5678.dcm")
    assert errors == []


# ------------------------------------------------------------------ a killed run, then a rerun
def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    except OSError:
        pass
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_mid_run_leaves_no_worker_and_the_rerun_resumes(tmp_path, sample_pngs, synthetic_weights):
    """kill -9 of the main process: its decode worker dies with it (it held ~1.4 GB and the
    --out lock for 15+ minutes), and a rerun at once takes the lock over and resumes."""
    n = 40
    src = _png_folder(tmp_path / "in", sample_pngs, n)
    out = tmp_path / "o"
    args = ["predict", str(src), "--out", str(out), "--weights", str(synthetic_weights), "--format", "csv,json",
            "--batch-size", "2", "--workers", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "cxr_lung_risk.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=_env())
    workers: list[int] = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            workers = _children(proc.pid)
            m = out / "manifest.csv"
            if workers and m.exists() and len(m.read_text().splitlines()) >= 5:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed"
        assert workers, "no decode worker was started"
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    t = time.time()
    while time.time() - t < 5 and any(_alive(w) for w in workers):
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers), "a decode worker outlived its killed parent"
    assert (out / ".cxr-lung-risk.lock").exists()  # left behind by the killed run
    p = run_cli(*args)  # at once
    assert p.returncode == 0, p.stderr
    assert "another cxr-lung-risk run is writing" not in p.stderr
    assert "ended without releasing its lock" in p.stderr and "taking it over" in p.stderr
    assert "already done in" in p.stderr and ", 0 already done" not in p.stderr  # resumed, not redone
    with open(out / "manifest.csv", newline="") as f:
        assert sorted(r["File"] for r in csv.DictReader(f)) == sorted(f"img{k:02d}.png" for k in range(n))
    assert len(json.loads((out / "cxr_lung_risk.json").read_text())) == n
    assert not (out / ".cxr-lung-risk.lock").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_lock_still_held_after_its_run_has_gone_is_taken_over(tmp_path, sample_pngs, synthetic_weights):
    """What an orphaned worker of an older version did: it keeps the flock of a run that no longer
    exists. The recorded holder is gone, so the folder is taken over with a warning."""
    out = tmp_path / "o"
    out.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    lock = out / ".cxr-lung-risk.lock"
    lock.write_text(f"{dead_pid} 12345\n")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'r+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        p = run_cli("predict", str(sample_pngs[0]), "--out", str(out), "--weights", str(synthetic_weights))
    finally:
        holder.kill()
        holder.wait()
    assert p.returncode == 0, p.stderr
    assert f"the run (pid {dead_pid})" in p.stderr and "taking the folder over" in p.stderr
    assert (out / "manifest.csv").exists()


# ------------------------------------------------------------------------------ a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted for the test (root needed; skipped with the reason otherwise)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not shutil.which("mount") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0777", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(mnt: Path, leave_kib: int) -> Path:
    """A file that takes all but ``leave_kib`` KiB of the file system."""
    st = os.statvfs(mnt)
    filler = mnt / "filler"
    with open(filler, "wb") as f:
        f.write(b"\xff" * (st.f_bavail * st.f_frsize - leave_kib * 1024))
    return filler


def test_disk_full_keeps_rows_whole_closes_the_tables_and_the_rerun_finishes(tmp_path, sample_pngs, synthetic_weights, small_disk):
    """--out fills up mid-run: before, exit 1 with the JSON unclosed and the CSV and records.jsonl
    ending mid-row. Now every row is whole, the JSON is a closed list, one sentence says the disk
    is full and how many inputs are done, and a rerun after freeing space completes."""
    n = 40
    src = _png_folder(tmp_path / "in", sample_pngs, n)
    out = small_disk / "o"
    filler = _fill(small_disk, 40)
    args = ["predict", str(src), "--out", str(out), "--weights", str(synthetic_weights), "--format", "csv,json",
            "--batch-size", "4", "--quiet"]
    p = run_cli(*args)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    lines = [l for l in p.stderr.splitlines() if "error:" in l]
    assert len(lines) == 1 and f"the disk holding {out} is full: " in lines[0], p.stderr
    done = int(lines[0].split("is full: ")[1].split(" of ")[0])
    assert 0 < done < n and f"{done} of {n} inputs are done" in lines[0]
    # every file holds whole rows only, and the same inputs
    records = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()]  # each line parses
    assert (out / "records.jsonl").read_bytes().endswith(b"\n")
    rows = json.loads((out / "cxr_lung_risk.json").read_text())  # a closed list
    raw_csv = (out / "cxr_lung_risk.csv").read_bytes()
    assert raw_csv.endswith(b"\r\n")
    with open(out / "cxr_lung_risk.csv", newline="") as f:
        table = list(csv.reader(f))
    assert all(len(r) == len(table[0]) for r in table)
    with open(out / "manifest.csv", newline="") as f:
        manifest = list(csv.DictReader(f))
    assert len(records) == len(manifest) == done
    assert {r["File"] for r in rows} == {r[0] for r in table[1:]} == {r["File"] for r in manifest}  # PNGs: all ok
    filler.unlink()  # free space, run again: it resumes and completes
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr
    with open(out / "manifest.csv", newline="") as f:
        assert sorted(r["File"] for r in csv.DictReader(f)) == sorted(f"img{k:02d}.png" for k in range(n))
    assert len(json.loads((out / "cxr_lung_risk.json").read_text())) == n
