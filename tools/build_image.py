"""Build the MHub image of this checkout offline: the implementation of ``tools/build_image.sh``.

    bash tools/build_image.sh [--tag cxr_lung_risk] [--weights-zip ZIP] [--torch-wheel WHL | --torch-spec SPEC]

The Dockerfile (``models/cxr_lung_risk/dockerfiles/Dockerfile``) is built unchanged, on stdin (no
build context), with ``docker build --network host``; everything it fetches is served by this
script on 127.0.0.1 and taken from this checkout:

* ``mhubai/base:latest``: when missing (or when it is our stand-in), ``tools/mhub_base/build.sh``
  builds the stand-in (Docker Hub is not needed);
* ``MHUB_MODELS_REPO``: a bare clone of this checkout (its working tree's tracked files
  committed on a branch named after that commit), over git's dumb HTTP;
* ``CXR_LUNG_RISK_PACKAGE``: this checkout's wheel (``pip wheel``), pinned by its sha256;
* ``TORCH_SPEC``: ``--torch-wheel``, else a CPU-only torch wheel for Python 3.11 from pip's
  find-links folders, else ``--torch-spec`` / the Dockerfile's default (PyPI's CUDA build);
* the weights: ``--weights-zip`` (e.g. your download of the published Zenodo zip, verified by
  its size and sha256 at build time), else a SYNTHETIC zip of the Zenodo layout, made once from
  the oracle fixture's recipe (``tests/data/oracle``) and kept in
  ``$XDG_CACHE_HOME/cxr-lung-risk/build_image/``: its scores mean nothing and say
  ``lung-risk=unverified``.

The same sources give the same build arguments (fixed port, reproducible wheel and zip), so
Docker's layer cache is reused. ``tests/test_docker.py`` builds its image with this script.
Exit status: 0 built, 1 failed (one sentence on stderr), 64 usage error.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "models" / "cxr_lung_risk" / "dockerfiles" / "Dockerfile"
BASE_BUILD = REPO / "tools" / "mhub_base" / "build.sh"
BASE_TAG = "mhubai/base:latest"
STAND_IN_LABEL = "Local stand-in for mhubai/base:latest"
PORT = 48621  # a fixed port keeps the build arguments, hence Docker's cache, stable
DOCKER_ENV = dict(os.environ, DOCKER_BUILDKIT="0")  # the classic builder: uses the local base image
ZIP_TIME = (2023, 5, 16, 0, 0, 0)


class BuildError(Exception):
    """A reason the image cannot be built, in one sentence."""


def log(msg: str) -> None:
    print(f"build_image: {msg}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def docker(*args: str, check: bool = False, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, env=DOCKER_ENV,
                          stdin=subprocess.DEVNULL, **kw)


# --------------------------------------------------------------------------- sources


def make_weights_zip(members: Path, out: Path) -> Path:
    """The member files of ``members`` as a zip of the Zenodo layout (STORED, fixed entry times:
    the same weights give the same bytes, hence the same sha256 build argument)."""
    from cxr_lung_risk.spec import lung_risk_spec

    spec = lung_risk_spec()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for m in spec.members:
            info = zipfile.ZipInfo(f"{spec.weights['archive_folder']}/{m.file}", ZIP_TIME)
            with open(members / m.file, "rb") as src, zf.open(info, "w", force_zip64=True) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    tmp.replace(out)
    return out


def synthetic_weights_zip(cache: Path) -> Path:
    """The SYNTHETIC weights zip (the oracle fixture's recipe), made once into ``cache``."""
    try:
        import numpy as np

        from cxr_lung_risk.spec import lung_risk_spec
        from cxr_lung_risk.synthetic import SyntheticRecipe, write_synthetic_weights
    except ImportError as e:
        raise BuildError(f"making the synthetic weights needs this package installed ({e}): run "
                         "`bash scripts/install.sh` first, or pass --weights-zip") from e
    import json

    spec = lung_risk_spec()
    out = cache / "synthetic" / spec.weights["archive"]
    if out.is_file():
        return out
    oracle = REPO / "tests" / "data" / "oracle"
    recipe = json.loads((oracle / "recipe.json").read_text())["recipe"]
    stats = {}
    for m in spec.members:
        with np.load(oracle / "bn_stats" / f"member_{m.index:02d}.npz") as z:
            stats[m.index] = {k: z[k] for k in z.files}
    log("making SYNTHETIC weights (once; about 2.2 GB) into " + str(out.parent))
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        write_synthetic_weights(Path(tmp), SyntheticRecipe.from_json(recipe), stats)
        make_weights_zip(Path(tmp), out)
    return out


def find_cpu_torch_wheel() -> Path | None:
    """A CPU-only torch wheel for the image's Python (3.11, x86_64) from pip's find-links
    folders (PIP_FIND_LINKS or pip's configuration), if this machine has one."""
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
    """This package's wheel, built from the working tree (fixed zip entry times: the same
    sources give the same wheel, hence the same build argument and Docker's cached layers)."""
    dest.mkdir(parents=True, exist_ok=True)
    py = REPO / ".venv" / "bin" / "python"
    py = str(py) if py.exists() else sys.executable
    base = [py, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), str(REPO)]
    env = dict(os.environ, SOURCE_DATE_EPOCH="315532800")
    proc = subprocess.run([*base[:4], "--no-build-isolation", *base[4:]], capture_output=True, text=True, env=env)
    if proc.returncode != 0:  # no setuptools here: let pip fetch the build backend
        proc = subprocess.run(base, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise BuildError("cannot build this package's wheel: " + (proc.stderr.strip().splitlines() or ["?"])[-1])
    return next(dest.glob("cxr_lung_risk-*.whl"))


def serve_repository(dest: Path) -> tuple[str, str]:
    """A bare clone of this repository for MHub's import (dumb HTTP: ``git update-server-info``),
    with the working tree's tracked files committed on a branch named after that commit, so that
    a changed model folder changes MHUB_MODELS_REPO (and Docker's cache key). Returns
    (bare repository folder name, branch)."""
    def git(*args: str, cwd: Path = REPO) -> str:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"git {args[0]} failed in {cwd}: {proc.stderr.strip()}")
        return proc.stdout.strip()

    if not (REPO / ".git").exists():
        raise BuildError(f"{REPO} is not a git checkout (the model definition is imported from a git repository)")
    commit = git("stash", "create") or git("rev-parse", "HEAD")
    bare = dest / "models.git"
    git("init", "-q", "--bare", str(bare))
    branch = f"mhub-build-{commit[:12]}"
    git("push", "-q", str(bare), f"{commit}:refs/heads/{branch}")
    git("update-server-info", cwd=bare)
    return bare.name, branch


class LocalFiles:
    """A threaded static file server for one folder, on 127.0.0.1 only."""

    def __init__(self, root: Path, port: int = PORT):
        handler = functools.partial(_QuietHandler, directory=str(root))
        try:
            self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        except OSError:
            self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002
        pass


# --------------------------------------------------------------------------- images


def ensure_base(rebuild: bool) -> None:
    """``mhubai/base:latest``: kept when it is MHub's real image; else (missing, or our stand-in:
    Docker's cache makes that quick) built by tools/mhub_base/build.sh."""
    proc = docker("image", "inspect", "-f", "{{index .Config.Labels \"org.opencontainers.image.description\"}}", BASE_TAG)
    if proc.returncode == 0 and STAND_IN_LABEL not in proc.stdout and not rebuild:
        log(f"using {BASE_TAG} as found (not the stand-in)")
        return
    if proc.returncode != 0 and not shutil.which("debootstrap"):
        raise BuildError(f"no {BASE_TAG} and no debootstrap to build its stand-in (apt-get install debootstrap)")
    t0 = time.monotonic()
    base = subprocess.run(["bash", str(BASE_BUILD)], stdin=subprocess.DEVNULL)
    if base.returncode != 0:
        raise BuildError(f"the stand-in base image could not be built (tools/mhub_base/build.sh, exit status {base.returncode})")
    log(f"base image ready in {time.monotonic() - t0:.0f} s")


def build(tag: str, weights_zip: Path | None, torch_wheel: Path | None, torch_spec: str | None,
          cache: Path, rebuild_base: bool = False, quiet: bool = False) -> dict[str, str]:
    """Build the image; returns the build arguments it used."""
    if not shutil.which("docker"):
        raise BuildError("docker is not installed (apt-get install docker.io)")
    if docker("info").returncode != 0:
        raise BuildError("the Docker engine is not running (as root: dockerd > /tmp/dockerd.log 2>&1 &)")
    ensure_base(rebuild_base)
    cache.mkdir(parents=True, exist_ok=True)
    if weights_zip is None:
        weights_zip = synthetic_weights_zip(cache)
        synthetic = True
    else:
        synthetic = False
        if not weights_zip.is_file():
            raise BuildError(f"--weights-zip: no such file: {weights_zip}")
    if torch_wheel is None and torch_spec is None:
        torch_wheel = find_cpu_torch_wheel()
        if torch_wheel is None:
            log("no CPU-only torch wheel in pip's find-links: the image gets PyPI's torch (CUDA build, large)")
    with tempfile.TemporaryDirectory(prefix="cxr_build_image_") as tmp:
        root = Path(tmp)
        wheel = build_wheel(root)
        weights_link = root / weights_zip.name
        try:
            os.link(weights_zip, weights_link)
        except OSError:
            os.symlink(weights_zip.resolve(), weights_link)
        repo_dir, branch = serve_repository(root)
        server = LocalFiles(root)
        try:
            args = {
                "MHUB_MODELS_REPO": f"{server.url}/{repo_dir}::{branch}",
                "CXR_LUNG_RISK_PACKAGE": f"cxr-lung-risk @ {server.url}/{wheel.name}#sha256={sha256(wheel)}",
                "CXR_LUNG_RISK_WEIGHTS_URL": f"{server.url}/{weights_link.name}",
                "CXR_LUNG_RISK_WEIGHTS_SIZE": str(weights_zip.stat().st_size),
                "CXR_LUNG_RISK_WEIGHTS_SHA256": sha256(weights_zip),
            }
            if torch_wheel is not None:
                os.symlink(torch_wheel.resolve(), root / torch_wheel.name)
                args["TORCH_SPEC"] = f"torch @ {server.url}/{torch_wheel.name}#sha256={sha256(torch_wheel)}"
            elif torch_spec:
                args["TORCH_SPEC"] = torch_spec
            build_args = [a for k, v in args.items() for a in ("--build-arg", f"{k}={v}")]
            t0 = time.monotonic()
            log(f"docker build -t {tag} (sources on {server.url})")
            with open(DOCKERFILE, "rb") as f:  # the Dockerfile, unchanged, on stdin: no build context
                proc = subprocess.run(["docker", "build", "--network", "host", "-t", tag, *build_args, "-"],
                                      stdin=f, env=DOCKER_ENV,
                                      stdout=subprocess.DEVNULL if quiet else None)
            if proc.returncode != 0:
                raise BuildError(f"docker build failed (exit status {proc.returncode}; its output is above)")
            log(f"built {tag} in {time.monotonic() - t0:.0f} s")
        finally:
            server.close()
    if synthetic:
        log(f"{tag} holds SYNTHETIC weights: its scores mean nothing (they say lung-risk=unverified); "
            "for real scores pass --weights-zip with the published zip (Zenodo record 7941660)")
    return args


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/build_image.sh", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tag", default="cxr_lung_risk", help="image tag (default: cxr_lung_risk)")
    ap.add_argument("--weights-zip", type=Path, help="the weights zip to bake in (default: SYNTHETIC weights)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--torch-wheel", type=Path, help="a torch wheel for Python 3.11 (default: a CPU wheel from pip's find-links)")
    g.add_argument("--torch-spec", help="TORCH_SPEC as given (e.g. 'torch>=2.1': PyPI's CUDA build)")
    ap.add_argument("--cache", type=Path, help="where the synthetic weights zip is kept "
                    "(default: $XDG_CACHE_HOME/cxr-lung-risk/build_image)")
    ap.add_argument("--rebuild-base", action="store_true", help="rebuild mhubai/base:latest as the stand-in even if present")
    ap.add_argument("--quiet", action="store_true", help="no docker build output")
    try:
        a = ap.parse_args(argv)
    except SystemExit as e:
        return 64 if e.code else 0
    cache = a.cache or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cxr-lung-risk" / "build_image"
    try:
        build(a.tag, a.weights_zip, a.torch_wheel, a.torch_spec, cache, a.rebuild_base, a.quiet)
    except BuildError as e:
        log(f"error: {e}")
        return 1
    log(f"run it: docker run --rm --network none -v /abs/in:/app/data/input_data:ro -v /abs/out:/app/data/output_data {a.tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
