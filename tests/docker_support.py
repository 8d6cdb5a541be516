"""Helpers of the Docker tests (tests/test_docker.py): the engine. The image itself is built by
``tools/build_image.sh`` (the README's command), which serves its sources on 127.0.0.1 and
builds with ``--network host``; a container that runs the model gets ``--network none``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "cxr_lung_risk"
DOCKERFILE = REPO / "models" / MODEL / "dockerfiles" / "Dockerfile"
BUILD_IMAGE = REPO / "tools" / "build_image.sh"
BASE_TAG = "mhubai/base:latest"
IMAGE_TAG = "cxr_lung_risk:test"
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
