"""Helpers of the Docker tests (tests/test_docker.py): the engine, the stand-in base image, the
127.0.0.1 file server and the model image build.

Network rule: everything a build fetches from this machine is served on 127.0.0.1 and the
builds use ``--network host``; a container that runs the model gets ``--network none``.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "cxr_lung_risk"
DOCKERFILE = REPO / "models" / MODEL / "dockerfiles" / "Dockerfile"
BASE_BUILD = REPO / "tools" / "mhub_base" / "build.sh"
BASE_TAG = "mhubai/base:latest"
IMAGE_TAG = "cxr_lung_risk:test"
PREFERRED_PORT = 48621  # a fixed port keeps the build arguments, hence Docker's cache, stable
DOCKER_ENV = dict(os.environ, DOCKER_BUILDKIT="0")  # the classic builder: uses the local base image


def docker(*args: str, check: bool = True, timeout: float = 1800, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, timeout=timeout,
                          env=DOCKER_ENV, stdin=subprocess.DEVNULL, **kw)


def engine_running() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return docker("info", check=False, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def start_engine(log: Path, wait_s: float = 60) -> subprocess.Popen | None:
    """Start dockerd (root only) and wait until it answers; None when it cannot be started."""
    dockerd = shutil.which("dockerd")
    if not dockerd or os.geteuid() != 0 or not shutil.which("docker"):
        return None
    f = open(log, "ab")
    proc = subprocess.Popen([dockerd], stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        if engine_running():
            return proc
        time.sleep(1)
    proc.terminate()
    return None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class LocalFiles:
    """A threaded static file server for one folder, on 127.0.0.1 only."""

    def __init__(self, root: Path):
        handler = functools.partial(_QuietHandler, directory=str(root))
        try:
            self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", PREFERRED_PORT), handler)
        except OSError:
            self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.root = root
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002
        pass


def find_cpu_torch_wheel() -> Path | None:
    """A CPU-only torch wheel for the image's Python (3.11, Debian bookworm) from pip's
    find-links folders (PIP_FIND_LINKS or pip's configuration), if this machine has one."""
    dirs = os.environ.get("PIP_FIND_LINKS", "").split()
    try:
        out = subprocess.run(["python3", "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60).stdout
        for line in out.splitlines():
            if "find-links" in line:
                dirs += line.split("=", 1)[1].strip().strip("'\"").split()
    except (OSError, subprocess.TimeoutExpired):
        pass
    for d in dirs:
        d = d.replace("file://", "")
        found = sorted(Path(d).glob("torch-*+cpu-cp311-cp311-manylinux*_x86_64.whl")) if Path(d).is_dir() else []
        if found:
            return found[-1]
    return None


def build_wheel(dest: Path) -> Path:
    """This package's wheel, built from the working tree."""
    dest.mkdir(parents=True, exist_ok=True)
    py = REPO / ".venv" / "bin" / "python"
    py = str(py) if py.exists() else "python3"
    base = [py, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), str(REPO)]
    # fixed zip entry times: the same sources give the same wheel, hence the same build argument
    # (its sha256) and Docker's cached layers
    env = dict(os.environ, SOURCE_DATE_EPOCH="315532800")
    proc = subprocess.run([*base[:4], "--no-build-isolation", *base[4:]], capture_output=True, text=True, env=env)
    if proc.returncode != 0:  # no setuptools here: let pip fetch the build backend
        subprocess.run(base, capture_output=True, text=True, check=True, env=env)
    return next(dest.glob("cxr_lung_risk-*.whl"))


def serve_repository(dest: Path) -> tuple[str, str]:
    """A bare clone of this repository for MHub's import (dumb HTTP: ``git update-server-info``),
    with the working tree's tracked files committed on a branch named after that commit, so that
    a changed model folder changes MHUB_MODELS_REPO (and Docker's cache key). Returns
    (bare repository folder name, branch)."""
    commit = subprocess.run(["git", "-C", str(REPO), "stash", "create"], capture_output=True, text=True, check=True).stdout.strip()
    if not commit:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    bare = dest / "models.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    branch = f"mhub-test-{commit[:12]}"
    subprocess.run(["git", "-C", str(REPO), "push", "-q", str(bare), f"{commit}:refs/heads/{branch}"], check=True,
                   capture_output=True, text=True)
    subprocess.run(["git", "-C", str(bare), "update-server-info"], check=True)
    return bare.name, branch
