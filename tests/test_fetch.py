"""Weights download, verification, extraction and cache lookup against a real local HTTP server.

The published files (2.2 GB zip, 258 MB .pth) cannot be reached here, so the server serves a
zip with the published layout (``ensamble-model-weights/Lung_Age_081221_{0..19}.pth``, small
``torch.save``'d dicts) and a small CXR-Age stand-in; expected sizes and SHA-256s are computed
independently with ``len``/``hashlib`` in the tests.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import socket
import stat
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from http_server import LocalServer

from cxr_lung_risk import fetch
from cxr_lung_risk.errors import WeightsError, WeightsNotFoundError
from cxr_lung_risk.fetch import FetchError

FOLDER = "ensamble-model-weights"  # published archive folder (Zenodo record 7941660)
NAMES = [f"Lung_Age_081221_{i}.pth" for i in range(20)]
ENV_VARS = ["CXR_LUNG_RISK_HOME", *[v for vs in fetch.ENV_OVERRIDES.values() for v in vs]]


def _pth_bytes(i: int) -> bytes:
    buf = io.BytesIO()
    torch.save({"layer.weight": torch.full((4, 4), float(i)), "layer.bias": torch.arange(4.0) + i}, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def members() -> dict[str, bytes]:
    return {f"{FOLDER}/{n}": _pth_bytes(i) for i, n in enumerate(NAMES)}


def make_zip(files: dict[str, bytes], compression: int = zipfile.ZIP_STORED, folder_entry: str | None = FOLDER + "/") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        if folder_entry:
            zf.writestr(zipfile.ZipInfo(folder_entry), b"")
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def flip_member_byte(data: bytes, member: str, delta: int = 40) -> bytes:
    """Flip one byte inside ``member``'s stored/compressed data (found from its local header)."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo(member)
    off = info.header_offset
    sig, *_rest = struct.unpack("<4s5H3L2H", data[off : off + 30])
    assert sig == b"PK\x03\x04"
    name_len, extra_len = struct.unpack("<2H", data[off + 26 : off + 30])
    pos = off + 30 + name_len + extra_len + min(delta, info.compress_size // 2)
    b = bytearray(data)
    b[pos] ^= 0xFF
    return bytes(b)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def server():
    srv = LocalServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    for v in ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    h = tmp_path / "home"
    monkeypatch.setenv("CXR_LUNG_RISK_HOME", str(h))
    return h


def _junk(root: Path) -> list[Path]:
    """Leftovers that must never survive: partial downloads, staging folders, locks."""
    return [p for p in root.rglob("*") if p.name.endswith((".part", ".lock", ".tmp")) or p.name.startswith((".extract-", ".old-"))]


# --------------------------------------------------------------------------- layout


def test_cache_layout_follows_env_and_spec(home):
    assert fetch.cache_dir() == home
    assert fetch.lung_risk_weights_dir() == home / "cxr_lung_risk" / FOLDER
    assert fetch.age_weights_path() == home / "cxr_age" / "PLCO_Fine_Tuned_120419.pth"
    assert fetch.lung_risk_expected_members() == [f"{FOLDER}/{n}" for n in NAMES]
    assert fetch.find_lung_risk_weights() is None
    assert fetch.find_age_weights() is None


def test_cache_dir_default_is_platform_user_cache(monkeypatch):
    import platformdirs

    monkeypatch.delenv("CXR_LUNG_RISK_HOME", raising=False)
    assert fetch.cache_dir() == Path(platformdirs.user_cache_dir("cxr-lung-risk"))


# --------------------------------------------------------------------------- lung-risk zip


def test_full_lung_risk_fetch_extracts_records_and_is_found(server, home, members):
    data = make_zip(members)
    url = server.add("/ensamble-model-weights.zip", data)
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    paths = fetch.fetch_weights("lung-risk", url=url, expected_size=len(data), progress=False)
    d = home / "cxr_lung_risk" / FOLDER
    assert paths == {"lung-risk": d}
    assert sorted(p.name for p in d.iterdir()) == sorted(NAMES)
    for name, content in members.items():
        assert (home / "cxr_lung_risk" / name).read_bytes() == content
    sd = torch.load(d / "Lung_Age_081221_7.pth", weights_only=True)
    assert torch.equal(sd["layer.weight"], torch.full((4, 4), 7.0))

    rec = json.loads((home / "cxr_lung_risk" / "SOURCE.json").read_text())
    assert rec["url"] == url
    assert rec["size"] == len(data)
    assert rec["sha256"] == sha(data)
    assert dt.datetime.fromisoformat(rec["date"]) >= before
    assert rec["files"]["Lung_Age_081221_3.pth"] == {"size": len(members[f"{FOLDER}/Lung_Age_081221_3.pth"]),
                                                      "sha256": sha(members[f"{FOLDER}/Lung_Age_081221_3.pth"])}
    assert not (home / "cxr_lung_risk" / "ensamble-model-weights.zip").exists()
    assert _junk(home) == []
    assert fetch.find_lung_risk_weights() == d

    # Installed: a second fetch makes no request; --force downloads again.
    n = len(server.requests)
    assert fetch.fetch_weights("lung-risk", url=url, expected_size=len(data), progress=False) == paths
    assert len(server.requests) == n
    fetch.fetch_weights("lung-risk", url=url, expected_size=len(data), progress=False, force=True)
    assert len(server.requests) == n + 1


def test_zip_without_folder_and_deflated_is_accepted(server, home, members):
    flat = {k.split("/", 1)[1]: v for k, v in members.items()}
    data = make_zip(flat, zipfile.ZIP_DEFLATED, folder_entry=None)
    url = server.add("/flat.zip", data)
    d = fetch.fetch_weights("lung-risk", url=url, expected_size=len(data), progress=False)["lung-risk"]
    assert d == home / "cxr_lung_risk" / FOLDER
    assert all((d / n).read_bytes() == members[f"{FOLDER}/{n}"] for n in NAMES)


def test_env_overrides_for_mirror(server, home, members, monkeypatch):
    data = make_zip(members)
    url = server.add("/mirror.zip", data)
    monkeypatch.setenv("CXR_LUNG_RISK_WEIGHTS_URL", url)
    monkeypatch.setenv("CXR_LUNG_RISK_WEIGHTS_SIZE", str(len(data)))
    monkeypatch.setenv("CXR_LUNG_RISK_WEIGHTS_SHA256", sha(data))
    assert fetch.fetch_weights("lung-risk", progress=False)["lung-risk"] == home / "cxr_lung_risk" / FOLDER
    assert server.requests_for("/mirror.zip")


def test_spec_size_applies_to_a_mirror_by_default(server, home, members):
    data = make_zip(members)
    url = server.add("/mirror.zip", data)
    with pytest.raises(FetchError, match="2159460140"):  # the published zip's size (Zenodo)
        fetch.fetch_weights("lung-risk", url=url, progress=False)
    assert not (home / "cxr_lung_risk" / FOLDER).exists()


def test_corrupt_member_crc_error_is_clean(server, home, members):
    data = flip_member_byte(make_zip(members), f"{FOLDER}/Lung_Age_081221_5.pth")
    url = server.add("/bad.zip", data)
    with pytest.raises(FetchError) as ei:
        fetch.fetch_weights("lung-risk", url=url, expected_size=len(data), progress=False)
    msg = str(ei.value)
    assert "is corrupt" in msg and "Lung_Age_081221_5.pth" in msg and "delete it and run fetch-weights again" in msg
    assert "\n" not in msg
    assert not (home / "cxr_lung_risk" / FOLDER).exists()
    assert fetch.find_lung_risk_weights() is None
    assert _junk(home) == []


def test_corrupt_deflated_member_is_clean(tmp_path, members):
    data = flip_member_byte(make_zip(members, zipfile.ZIP_DEFLATED), f"{FOLDER}/Lung_Age_081221_12.pth", delta=100)
    z = tmp_path / "x.zip"
    z.write_bytes(data)
    with pytest.raises(FetchError, match=r"is corrupt.*Lung_Age_081221_12\.pth.*delete it"):
        fetch.extract_zip_safely(z, tmp_path / "out", expected_members=list(members))
    assert not (tmp_path / "out" / FOLDER).exists()


def test_truncated_zip_is_corrupt(tmp_path, members):
    z = tmp_path / "x.zip"
    z.write_bytes(make_zip(members)[:-100])  # central directory cut
    with pytest.raises(FetchError, match="is corrupt: .*delete it and run fetch-weights again"):
        fetch.extract_zip_safely(z, tmp_path / "out", expected_members=list(members))


def test_server_corrupting_the_body_gives_clean_error(server, home, members):
    data = make_zip(members)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo(f"{FOLDER}/Lung_Age_081221_9.pth")
    url = server.add("/z.zip", data, corrupt_at=info.header_offset + 200)
    with pytest.raises(FetchError, match="is corrupt"):
        fetch.fetch_weights("lung-risk", url=url, expected_size=len(data), progress=False)


@pytest.mark.parametrize("evil", ["../evil.pth", f"{FOLDER}/../../evil.pth", "/tmp/evil_abs.pth", "..\\evil.pth"])
def test_path_traversal_member_rejected_nothing_written(tmp_path, members, evil):
    files = dict(members)
    files[evil] = b"owned"
    z = tmp_path / "evil.zip"
    z.write_bytes(make_zip(files))
    out = tmp_path / "a" / "b"
    with pytest.raises(FetchError, match="unsafe"):
        fetch.extract_zip_safely(z, out, expected_members=list(members))
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != z]
    assert written == []
    assert not Path("/tmp/evil_abs.pth").exists()


def test_symlink_member_rejected(tmp_path, members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        link = zipfile.ZipInfo(f"{FOLDER}/link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    z = tmp_path / "link.zip"
    z.write_bytes(buf.getvalue())
    with pytest.raises(FetchError, match="symbolic link"):
        fetch.extract_zip_safely(z, tmp_path / "out", expected_members=list(members))
    assert not any(p.is_file() for p in (tmp_path / "out").rglob("*"))


def test_missing_member_is_named(server, home, members):
    files = {k: v for k, v in members.items() if not k.endswith("_13.pth")}
    data = make_zip(files)
    url = server.add("/short.zip", data)
    with pytest.raises(FetchError, match=r"Lung_Age_081221_13\.pth"):
        fetch.fetch_weights("lung-risk", url=url, expected_size=len(data), progress=False)
    assert fetch.find_lung_risk_weights() is None


def test_failed_force_refetch_keeps_installed_weights(server, home, members):
    good = make_zip(members)
    fetch.fetch_weights("lung-risk", url=server.add("/good.zip", good), expected_size=len(good), progress=False)
    bad = flip_member_byte(good, f"{FOLDER}/Lung_Age_081221_0.pth")
    with pytest.raises(FetchError, match="is corrupt"):
        fetch.fetch_weights("lung-risk", url=server.add("/bad.zip", bad), expected_size=len(bad), progress=False, force=True)
    d = fetch.find_lung_risk_weights()
    assert d == home / "cxr_lung_risk" / FOLDER
    assert (d / "Lung_Age_081221_0.pth").read_bytes() == members[f"{FOLDER}/Lung_Age_081221_0.pth"]


def test_find_lung_risk_weights_explicit(tmp_path, members):
    z = tmp_path / "w.zip"
    z.write_bytes(make_zip(members))
    assert fetch.find_lung_risk_weights(z) == z
    fetch.extract_zip_safely(z, tmp_path / "x", expected_members=list(members))
    assert fetch.find_lung_risk_weights(tmp_path / "x") == tmp_path / "x" / FOLDER
    assert fetch.find_lung_risk_weights(tmp_path / "x" / FOLDER) == tmp_path / "x" / FOLDER
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        fetch.find_lung_risk_weights(tmp_path / "nope")
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(WeightsError, match="neither a folder nor a zip"):
        fetch.find_lung_risk_weights(tmp_path / "t.txt")


# --------------------------------------------------------------------------- download() mechanics


@pytest.fixture(scope="module")
def blob() -> bytes:
    return os.urandom(300_000)


def test_interrupted_download_resumes_with_range(server, tmp_path, blob):
    url = server.add("/blob", blob, drop_after=123_457)
    dest = tmp_path / "blob.bin"
    with pytest.raises(FetchError, match="interrupted after 123457 of 300000 bytes.*run fetch-weights again"):
        fetch.download(url, dest, expected_size=len(blob), expected_sha256=sha(blob), progress=False, retries=0)
    part = tmp_path / "blob.bin.part"
    assert part.read_bytes() == blob[:123_457]
    assert not dest.exists()

    digest = fetch.download(url, dest, expected_size=len(blob), expected_sha256=sha(blob), progress=False, retries=0)
    assert digest == sha(blob)
    assert dest.read_bytes() == blob
    reqs = server.requests_for("/blob")
    assert [r.range for r in reqs] == [None, "bytes=123457-"]
    assert reqs[1].status == 206
    assert _junk(tmp_path) == []


def test_dropped_connection_is_retried_within_one_call(server, tmp_path, blob):
    url = server.add("/blob", blob, drop_after=50_000, drop_times=2)
    dest = tmp_path / "blob.bin"
    digest = fetch.download(url, dest, expected_size=len(blob), expected_sha256=None, progress=False, retries=3, retry_delay=0)
    assert digest == sha(blob) and dest.read_bytes() == blob
    assert [r.range for r in server.requests_for("/blob")] == [None, "bytes=50000-", "bytes=100000-"]


def test_server_ignoring_range_restarts(server, tmp_path, blob):
    url = server.add("/blob", blob, ignore_range=True)
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(b"\0" * 1000)  # a wrong prefix: must not be kept
    digest = fetch.download(url, dest, expected_size=len(blob), expected_sha256=sha(blob), progress=False)
    assert digest == sha(blob) and dest.read_bytes() == blob
    reqs = server.requests_for("/blob")
    assert reqs[0].range == "bytes=1000-" and reqs[0].status == 200


def test_redirect_and_resume_across_it(server, tmp_path, blob):
    server.add("/real/blob", blob, drop_after=70_000)
    server.redirects["/records/1/files/blob"] = "/real/blob"
    url = server.url("/records/1/files/blob")
    dest = tmp_path / "blob.bin"
    assert fetch.download(url, dest, expected_size=len(blob), expected_sha256=sha(blob), progress=False, retry_delay=0) == sha(blob)
    assert [r.range for r in server.requests_for("/records/1/files/blob")] == [None, "bytes=70000-"]
    assert [(r.range, r.status) for r in server.requests_for("/real/blob")] == [(None, 200), ("bytes=70000-", 206)]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file locks")
def test_concurrent_fetch_is_refused(server, tmp_path, blob):
    url = server.add("/blob", blob)
    dest = tmp_path / "blob.bin"
    with fetch.downloading._lock(dest.with_suffix(".bin.lock")):
        with pytest.raises(FetchError, match="another fetch-weights is already writing"):
            fetch.download(url, dest, expected_size=len(blob), expected_sha256=None, progress=False)
    assert server.requests_for("/blob") == []
    assert fetch.download(url, dest, expected_size=len(blob), expected_sha256=None, progress=False) == sha(blob)


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_progress_bar_only_on_a_terminal(server, tmp_path, blob):
    import fcntl
    import pty
    import termios

    url = server.add("/blob", blob)
    code = (
        "import sys; from pathlib import Path; from cxr_lung_risk.fetch import download; "
        f"download({url!r}, Path(sys.argv[1]), expected_size={len(blob)}, expected_sha256=None, progress=True)"
    )
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    try:
        p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.bin")], stderr=slave, stdout=subprocess.PIPE, timeout=60)
        os.close(slave)
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
    assert p.returncode == 0
    assert b"t.bin:" in out and b"|" in out and b"B/s" in out  # tqdm's bar, drawn on the terminal


def test_416_on_complete_part_finishes(server, tmp_path, blob):
    url = server.add("/blob", blob)
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(blob)
    assert fetch.download(url, dest, expected_size=None, expected_sha256=sha(blob), progress=False) == sha(blob)
    assert [r.status for r in server.requests_for("/blob")] == [416]
    assert dest.read_bytes() == blob


def test_416_on_oversized_part_restarts(server, tmp_path, blob):
    url = server.add("/blob", blob)
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(blob + b"garbage")
    assert fetch.download(url, dest, expected_size=None, expected_sha256=None, progress=False) == sha(blob)
    assert [(r.range, r.status) for r in server.requests_for("/blob")] == [(f"bytes={len(blob) + 7}-", 416), (None, 200)]
    assert dest.read_bytes() == blob


def test_size_mismatch_from_content_length(server, tmp_path, blob):
    url = server.add("/blob", blob)
    dest = tmp_path / "blob.bin"
    with pytest.raises(FetchError, match="300000 bytes but 300001 were expected"):
        fetch.download(url, dest, expected_size=len(blob) + 1, expected_sha256=None, progress=False)
    assert not dest.exists() and _junk(tmp_path) == []


def test_server_sending_more_than_expected(server, tmp_path, blob):
    url = server.add("/blob", blob, extra=b"x" * 5000, no_length=True)
    dest = tmp_path / "blob.bin"
    with pytest.raises(FetchError, match="more than the expected 300000 bytes"):
        fetch.download(url, dest, expected_size=len(blob), expected_sha256=None, progress=False)
    assert not dest.exists() and _junk(tmp_path) == []


def test_short_body_without_length_is_size_mismatch(server, tmp_path, blob):
    url = server.add("/blob", blob, no_length=True)
    dest = tmp_path / "blob.bin"
    with pytest.raises(FetchError, match="300000 bytes but 400000 were expected"):
        fetch.download(url, dest, expected_size=400_000, expected_sha256=None, progress=False)
    assert not dest.exists()


def test_transient_503_is_retried_then_reported(server, tmp_path, blob):
    url = server.add("/blob", blob, fail_status=503, drop_times=2)
    dest = tmp_path / "blob.bin"
    with pytest.raises(FetchError, match=r"interrupted.*HTTP 503.*run fetch-weights again"):
        fetch.download(url, dest, expected_size=len(blob), expected_sha256=None, progress=False, retries=1, retry_delay=0)
    assert fetch.download(url, dest, expected_size=len(blob), expected_sha256=None, progress=False, retries=1, retry_delay=0) == sha(blob)
    assert [r.status for r in server.requests_for("/blob")] == [503, 503, 200]


def test_http_404_and_unreachable(server, tmp_path):
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch.download(server.url("/missing"), tmp_path / "m", expected_size=None, expected_sha256=None, progress=False)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(FetchError, match="could not reach"):
        fetch.download(f"http://127.0.0.1:{port}/x", tmp_path / "m", expected_size=None, expected_sha256=None, progress=False)


def test_local_path_as_url(tmp_path, blob):
    src = tmp_path / "src.bin"
    src.write_bytes(blob)
    assert fetch.download(str(src), tmp_path / "d.bin", expected_size=len(blob), expected_sha256=sha(blob), progress=False) == sha(blob)
    assert (tmp_path / "d.bin").read_bytes() == blob


# --------------------------------------------------------------------------- CXR-Age


def test_age_download_with_sha256(server, home, blob):
    url = server.add("/PLCO_Fine_Tuned_120419.pth", blob)
    expected = hashlib.sha256(blob).hexdigest()
    paths = fetch.fetch_weights("age", url=url, expected_size=len(blob), expected_sha256=expected, progress=False)
    f = home / "cxr_age" / "PLCO_Fine_Tuned_120419.pth"
    assert paths == {"age": f}
    assert f.read_bytes() == blob
    rec = json.loads((home / "cxr_age" / "SOURCE.json").read_text())
    assert rec["sha256"] == expected and rec["size"] == len(blob) and rec["url"] == url
    assert fetch.find_age_weights() == f
    n = len(server.requests)
    fetch.fetch_weights("age", url=url, expected_size=len(blob), expected_sha256=expected, progress=False)
    assert len(server.requests) == n  # installed and verified: no new request


def test_age_file_copied_by_hand_is_verified_not_downloaded(server, home, blob):
    url = server.add("/age.pth", blob)
    f = home / "cxr_age" / "PLCO_Fine_Tuned_120419.pth"
    f.parent.mkdir(parents=True)
    f.write_bytes(blob)
    assert fetch.fetch_weights("age", url=url, expected_size=len(blob), expected_sha256=sha(blob), progress=False) == {"age": f}
    assert server.requests_for("/age.pth") == []
    f.write_bytes(blob[::-1])  # same size, wrong content: replaced by a verified download
    assert fetch.fetch_weights("age", url=url, expected_size=len(blob), expected_sha256=sha(blob), progress=False) == {"age": f}
    assert f.read_bytes() == blob


def test_age_wrong_sha256(server, home, blob):
    url = server.add("/age.pth", blob)
    wrong = "0" * 64
    with pytest.raises(FetchError) as ei:
        fetch.fetch_weights("age", url=url, expected_size=len(blob), expected_sha256=wrong, progress=False)
    assert hashlib.sha256(blob).hexdigest() in str(ei.value) and wrong in str(ei.value)
    assert not (home / "cxr_age" / "PLCO_Fine_Tuned_120419.pth").exists()
    assert fetch.find_age_weights() is None
    assert _junk(home) == []


def test_age_default_expectations_come_from_spec(server, home, blob):
    url = server.add("/age.pth", blob)
    with pytest.raises(FetchError, match="257734705"):  # the published file's size (GitHub LFS)
        fetch.fetch_weights("age", url=url, progress=False)
    # With only the size overridden, the published SHA-256 still applies and rejects it.
    wrong = bytes(1000)
    url2 = server.add("/age2.pth", wrong)
    with pytest.raises(FetchError, match="0b5a0dbcb91709420c261c749bb9e8f9a8f9287617c2713b86a183c8dbfb7aa7"):
        fetch.fetch_weights("age", url=url2, expected_size=len(wrong), progress=False)


# --------------------------------------------------------------------------- CLI


def _cli(args: list[str], env_home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env["CXR_LUNG_RISK_HOME"] = str(env_home)
    return subprocess.run([sys.executable, "-m", "cxr_lung_risk.cli", "fetch-weights", *args], capture_output=True, text=True, env=env, timeout=60)


def test_cli_success_and_errors(server, tmp_path, blob):
    url = server.add("/age.pth", blob)
    cache = tmp_path / "c"
    ok = _cli(["--model", "age", "--url", url, "--expected-size", str(len(blob)), "--sha256", sha(blob), "--cache", str(cache)], tmp_path / "h")
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == ""  # no progress bar when stderr is not a terminal
    assert str(cache / "cxr_age" / "PLCO_Fine_Tuned_120419.pth") in ok.stdout
    assert (cache / "cxr_age" / "PLCO_Fine_Tuned_120419.pth").read_bytes() == blob

    for args in (
        ["--model", "age", "--url", url, "--expected-size", str(len(blob)), "--sha256", "f" * 64, "--force"],
        ["--model", "age", "--url", server.url("/nothing")],
        ["--model", "all", "--url", url],
        ["--model", "age", "--url", url, "--sha256", "xyz"],
    ):
        r = _cli(args, tmp_path / "h2")
        assert r.returncode != 0
        assert "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cxr-lung-risk: error:"), r.stderr


def test_fetch_through_the_cli_main(server, home, members, capsys):
    from cxr_lung_risk.cli import main

    data = make_zip({k: v for k, v in members.items() if not k.endswith("_19.pth")})
    url = server.add("/z.zip", data)
    rc = main(["fetch-weights", "--url", url, "--expected-size", str(len(data)), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Lung_Age_081221_19.pth" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err

    good = make_zip(members)
    url = server.add("/good.zip", good)
    rc = main(["fetch-weights", "--url", url, "--expected-size", str(len(good)), "--no-progress"])
    assert rc == 0
    assert str(home / "cxr_lung_risk" / FOLDER) in capsys.readouterr().out


# --------------------------------------------------------------------------- failed fetch: no empty folders left


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


def test_failed_fetch_removes_the_empty_folders_it_created(server, home, members, blob):
    assert not home.exists()
    # HTTP 404
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch.fetch_weights("lung-risk", url=server.url("/missing.zip"), expected_size=10, progress=False)
    assert not home.exists()
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch.fetch_weights("age", url=server.url("/missing.pth"), expected_size=10, progress=False)
    assert not home.exists()
    # connection refused
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    for model in ("lung-risk", "age"):
        with pytest.raises(FetchError, match="could not reach"):
            fetch.fetch_weights(model, url=f"http://127.0.0.1:{port}/x", expected_size=10, progress=False)
        assert not home.exists()
    # size mismatch (Content-Length), checksum mismatch, a zip lacking a member
    url = server.add("/blob", blob)
    with pytest.raises(FetchError, match="were expected"):
        fetch.fetch_weights("age", url=url, expected_size=len(blob) + 1, progress=False)
    assert not home.exists()
    with pytest.raises(FetchError, match="SHA-256"):
        fetch.fetch_weights("age", url=url, expected_size=len(blob), expected_sha256="0" * 64, progress=False)
    assert not home.exists()
    data = make_zip({k: v for k, v in members.items() if not k.endswith("_5.pth")})
    with pytest.raises(FetchError, match=r"Lung_Age_081221_5\.pth"):
        fetch.fetch_weights("lung-risk", url=server.add("/short.zip", data), expected_size=len(data), progress=False)
    assert _tree(home) == ["cxr_lung_risk", "cxr_lung_risk/ensamble-model-weights.zip"]  # the verified download stays


def test_failed_fetch_keeps_existing_folders_and_files(server, home):
    (home / "cxr_age").mkdir(parents=True)  # the user's (empty) folder: not ours to remove
    (home / "notes.txt").write_text("mine")
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch.fetch_weights("lung-risk", url=server.url("/missing.zip"), expected_size=10, progress=False)
    assert _tree(home) == ["cxr_age", "notes.txt"]  # cxr_lung_risk/ (created by the fetch) is gone
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch.fetch_weights("age", url=server.url("/missing.pth"), expected_size=10, progress=False)
    assert _tree(home) == ["cxr_age", "notes.txt"]


def test_failed_fetch_keeps_a_resumable_partial_download(server, home, blob, monkeypatch):
    monkeypatch.setattr(fetch.downloading.time, "sleep", lambda s: None)
    url = server.add("/age.pth", blob, drop_after=1000, drop_times=100)
    with pytest.raises(FetchError, match="interrupted after 4000 of"):  # 1 try + 3 retries, 1000 bytes each
        fetch.fetch_weights("age", url=url, expected_size=len(blob), expected_sha256=sha(blob), progress=False)
    assert _tree(home) == ["cxr_age", "cxr_age/PLCO_Fine_Tuned_120419.pth.part"]
    server.behaviour["/age.pth"].drop_times = 0  # the server recovers: the next fetch resumes
    fetch.fetch_weights("age", url=url, expected_size=len(blob), expected_sha256=sha(blob), progress=False)
    assert server.requests_for("/age.pth")[-1].range == "bytes=4000-"
    assert (home / "cxr_age" / "PLCO_Fine_Tuned_120419.pth").read_bytes() == blob


def test_failed_second_model_keeps_the_first(server, home, members, monkeypatch):
    data = make_zip(members)
    monkeypatch.setitem(fetch.lung_risk_spec().weights, "url", server.add("/z.zip", data))
    monkeypatch.setitem(fetch.lung_risk_spec().weights, "archive_size", len(data))
    monkeypatch.setitem(fetch.age_spec().weights, "url", server.url("/missing.pth"))
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch.fetch_weights("all", progress=False)
    assert fetch.find_lung_risk_weights() == home / "cxr_lung_risk" / FOLDER
    assert not (home / "cxr_age").exists()


# --------------------------------------------------------------------------- weights_identity


@pytest.fixture
def count_hashing(monkeypatch):
    """Counts the files fetch hashes from their content (and empties the in-process cache)."""
    monkeypatch.setattr(fetch.identity, "_SHA256_CACHE", {})
    hashed: list[str] = []
    real = fetch.identity.hash_file

    def spy(path, h):
        hashed.append(Path(path).name)
        real(path, h)

    monkeypatch.setattr(fetch.identity, "hash_file", spy)
    return hashed


def _combined(files: dict[str, bytes]) -> str:
    """sha256sum's lines of the files sorted by name, hashed: computed independently here."""
    return sha("".join(f"{sha(files[n])}  {n}\n" for n in sorted(files)).encode())


def test_identity_of_a_plain_folder_is_the_combined_member_sha256(tmp_path, members, count_hashing):
    d = tmp_path / "w"
    d.mkdir()
    files = {k.split("/", 1)[1]: v for k, v in members.items()}
    for n, b in files.items():
        (d / n).write_bytes(b)
    (d / "notes.txt").write_text("not a member")
    ident = fetch.weights_identity(d)
    assert ident == {
        "model": "lung-risk", "kind": "folder", "source": "local folder w", "sha256": _combined(files),
        "sha256_from": "computed", "files": {n: {"size": len(files[n]), "sha256": sha(files[n])} for n in sorted(files)},
        "published": False, "synthetic": False,
    }
    json.dumps(ident)  # JSON-able
    assert len(count_hashing) == 20
    assert fetch.weights_identity(d) == ident and len(count_hashing) == 20  # hashed once per process
    (d / "Lung_Age_081221_4.pth").write_bytes(b"changed")
    changed = fetch.weights_identity(d)
    assert count_hashing[20:] == ["Lung_Age_081221_4.pth"]
    assert changed["sha256"] == _combined({**files, "Lung_Age_081221_4.pth": b"changed"}) != ident["sha256"]
    # a folder holding the archive folder (as --weights accepts) is that folder
    (tmp_path / "p" / FOLDER).mkdir(parents=True)
    for n, b in files.items():
        (tmp_path / "p" / FOLDER / n).write_bytes(b)
    assert fetch.weights_identity(tmp_path / "p")["sha256"] == ident["sha256"]


def test_identity_of_synthetic_weights(tmp_path):
    from cxr_lung_risk.synthetic import SyntheticRecipe, write_synthetic_weights

    d = tmp_path / "synth"
    recipe = SyntheticRecipe(base_seed=7)
    hashes = write_synthetic_weights(d, recipe, members=[3, 4])  # two small 'tiny' members
    assert sorted(hashes) == ["Lung_Age_081221_3.pth", "Lung_Age_081221_4.pth"]
    ident = fetch.weights_identity(d)
    assert ident["synthetic"] is True and ident["published"] is False
    assert ident["source"].startswith("synthetic (cxr_lung_risk.synthetic, recipe ")
    assert ident["recipe"] == recipe.to_json()
    files = {n: (d / n).read_bytes() for n in hashes}
    assert ident["sha256"] == _combined(files)
    assert sorted(ident["files"]) == sorted(hashes)
    other = tmp_path / "synth2"
    write_synthetic_weights(other, SyntheticRecipe(base_seed=8), members=[3, 4])
    assert fetch.weights_identity(other)["source"] != ident["source"]  # the recipe is named


def test_identity_of_fetched_weights_uses_source_json(server, home, members, monkeypatch, count_hashing):
    data = make_zip(members)
    url = server.add("/ensamble-model-weights.zip", data)
    # as if the local server were Zenodo: its URL and size are the published ones
    monkeypatch.setitem(fetch.lung_risk_spec().weights, "url", url)
    monkeypatch.setitem(fetch.lung_risk_spec().weights, "archive_size", len(data))
    d = fetch.fetch_weights("lung-risk", progress=False)["lung-risk"]
    del count_hashing[:]
    ident = fetch.weights_identity(d)
    assert count_hashing == []  # nothing hashed: SOURCE.json records it
    assert ident["source"] == url and ident["sha256"] == sha(data) and ident["sha256_from"] == "SOURCE.json"
    assert ident["published"] is True and ident["synthetic"] is False
    assert ident["files"]["Lung_Age_081221_9.pth"]["sha256"] == sha(members[f"{FOLDER}/Lung_Age_081221_9.pth"])
    assert fetch.weights_identity(home / "cxr_lung_risk") == ident  # the folder holding the archive folder

    # the zip itself is the same identity (computed), published: its sha256 is the recorded one
    z = home.parent / "copy.zip"
    z.write_bytes(data)
    zi = fetch.weights_identity(z)
    assert (zi["kind"], zi["sha256"], zi["published"], zi["sha256_from"]) == ("zip", sha(data), True, "computed")
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo(f"{FOLDER}/Lung_Age_081221_0.pth")
    assert zi["files"]["Lung_Age_081221_0.pth"] == {"size": info.file_size, "crc32": f"{info.CRC:08x}"}

    # a member changed by hand (other size): the record no longer describes the folder
    (d / "Lung_Age_081221_2.pth").write_bytes(b"tampered")
    t = fetch.weights_identity(d)
    assert t["sha256_from"] == "computed" and t["published"] is False and t["sha256"] != sha(data)
    assert t["source"] == f"local folder {FOLDER}"


def test_identity_of_a_mirror_fetch_is_not_published(server, home, members):
    data = make_zip(members)
    url = server.add("/mirror.zip", data)
    d = fetch.fetch_weights("lung-risk", url=url, expected_size=len(data), progress=False)["lung-risk"]
    ident = fetch.weights_identity(d)
    assert (ident["source"], ident["sha256"], ident["published"]) == (url, sha(data), False)


def test_identity_of_a_zip_against_a_published_sha256(tmp_path, members, monkeypatch, count_hashing):
    data = make_zip(members)
    z = tmp_path / "w.zip"
    z.write_bytes(data)
    ident = fetch.weights_identity(z)
    assert ident["model"] == "lung-risk" and ident["source"] == "local zip w.zip"
    assert ident["sha256"] == sha(data) and ident["published"] is False and sorted(ident["files"]) == sorted(NAMES)
    monkeypatch.setitem(fetch.lung_risk_spec().weights, "sha256", sha(data))
    assert fetch.weights_identity(z)["published"] is True
    assert count_hashing == ["w.zip"]  # the 2 GB zip is hashed once per process


def test_identity_of_the_age_file(tmp_path, blob, monkeypatch, count_hashing):
    f = tmp_path / "age" / "PLCO_Fine_Tuned_120419.pth"
    f.parent.mkdir()
    f.write_bytes(blob)
    ident = fetch.weights_identity(f)
    assert ident == {"model": "age", "kind": "file", "source": f"local file {f.name}", "sha256": sha(blob),
                     "sha256_from": "computed", "files": {f.name: {"size": len(blob), "sha256": sha(blob)}},
                     "published": False, "synthetic": False}
    assert fetch.weights_identity(f.parent) == ident  # the folder holding it
    monkeypatch.setitem(fetch.age_spec().weights, "sha256", sha(blob))
    assert fetch.weights_identity(f)["published"] is True
    assert count_hashing == [f.name]

    # SOURCE.json with the file's size: its sha256 is used, the file is not read
    rec = {"model": "cxr-age", "url": "https://example.org/a.pth", "file": f.name, "size": len(blob), "sha256": "ab" * 32}
    (f.parent / "SOURCE.json").write_text(json.dumps(rec))
    g = fetch.weights_identity(f)
    assert (g["source"], g["sha256"], g["sha256_from"], g["published"]) == (rec["url"], "ab" * 32, "SOURCE.json", False)
    rec["size"] += 1  # it describes another file: computed again (from the in-process cache)
    (f.parent / "SOURCE.json").write_text(json.dumps(rec))
    assert fetch.weights_identity(f)["sha256"] == sha(blob)
    assert count_hashing == [f.name]


def test_identity_of_a_fetched_age_file(server, home, blob, monkeypatch, count_hashing):
    url = server.add("/age.pth", blob)
    monkeypatch.setitem(fetch.age_spec().weights, "sha256", sha(blob))
    f = fetch.fetch_weights("age", url=url, expected_size=len(blob), progress=False)["age"]
    del count_hashing[:]
    ident = fetch.weights_identity(f)
    assert (ident["source"], ident["sha256"], ident["sha256_from"], ident["published"]) == (url, sha(blob), "SOURCE.json", True)
    assert count_hashing == []


def test_identity_of_a_missing_path(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        fetch.weights_identity(tmp_path / "nope")
