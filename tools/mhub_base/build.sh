#!/usr/bin/env bash
# Build a local stand-in for MHub's base image `mhubai/base:latest` (Docker Hub is not reachable
# here), so that the model's Dockerfile (FROM mhubai/base:latest) builds unchanged.
#
#   bash tools/mhub_base/build.sh [--tag mhubai/base:latest] [--rootfs-tag cxr-mhub-rootfs:bookworm]
#
# It reproduces what the real base image documents, and nothing more:
#   * Debian bookworm (debootstrap --variant=minbase from the Debian mirror, then `docker import`);
#   * WORKDIR /app, with /app/data/input_data and /app/data/output_data;
#   * a Python >= 3.10 venv at /app/.venv (Debian's 3.11) with mhubio from PyPI (0.0.2: the only
#     release there; the real base installs a newer mhubio from git) and the packages its
#     importer/exporters need (pydicom < 3, thedicomsort, PyYAML, typing-extensions 4.5.0);
#   * `mhub.run` on the PATH, running `python -m mhubio.run "$@"` in that venv (activated, as
#     `uv run` does in the real base);
#   * PYTHONPATH=/app;
#   * /app/buildutils/import_mhub_model.sh (tools/mhub_base/import_mhub_model.sh: our own script
#     with the documented behaviour: git init; git fetch <repo> <branch>; git merge FETCH_HEAD;
#     git sparse-checkout set models/<name>).
# Plus one thing of this machine: its CA bundle (/etc/ssl/certs/ca-certificates.crt, or
# $CA_BUNDLE) and a pip.conf naming it, because TLS to PyPI goes through an intercepting proxy
# here. Builds of the model image must use `docker build --network host`.
#
# Both images are cached: the rootfs image is rebuilt only when missing (or with --rebuild), the
# base image by Docker's layer cache. Needs root, docker (a running dockerd) and debootstrap.
# Exit status: 0 built, 1 failed, 64 usage error.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TAG="mhubai/base:latest"
ROOTFS_TAG="cxr-mhub-rootfs:bookworm"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CA="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
REBUILD=0
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) TAG="$2"; shift 2 ;;
    --rootfs-tag) ROOTFS_TAG="$2"; shift 2 ;;
    --rebuild) REBUILD=1; shift ;;
    -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "mhub_base/build.sh: unknown argument '$1'" >&2; exit 64 ;;
  esac
done
log() { echo "mhub_base: $*" >&2; }
command -v docker >/dev/null || { log "docker not found"; exit 1; }
[ -f "$CA" ] || { log "CA bundle $CA not found"; exit 1; }

# 1. the Debian root file system, imported as an image
if [ "$REBUILD" = 1 ] || ! docker image inspect "$ROOTFS_TAG" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { log "debootstrap not found (apt-get install debootstrap)"; exit 1; }
  ROOT="$(mktemp -d "${TMPDIR:-/tmp}/mhub_rootfs.XXXXXX")"
  trap 'rm -rf "$ROOT"' EXIT
  t0=$(date +%s)
  log "debootstrap bookworm (minbase) from $MIRROR"
  debootstrap --variant=minbase --include=ca-certificates,git,python3,python3-venv \
    bookworm "$ROOT" "$MIRROR" >&2
  # no package caches or lists in the image
  rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/* "$ROOT"/tmp/*
  log "docker import -> $ROOTFS_TAG"
  tar -C "$ROOT" --numeric-owner -c . | docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV LANG=C.UTF-8' - "$ROOTFS_TAG" >/dev/null
  rm -rf "$ROOT"; trap - EXIT
  log "rootfs image built in $(( $(date +%s) - t0 )) s"
fi

# 2. the base image proper, from a throw-away build context
CTX="$(mktemp -d "${TMPDIR:-/tmp}/mhub_base_ctx.XXXXXX")"
trap 'rm -rf "$CTX"' EXIT
cp "$CA" "$CTX/ca-certificates.crt"
cp "$HERE/import_mhub_model.sh" "$CTX/import_mhub_model.sh"
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$CTX/pip.conf"
cat > "$CTX/mhub.run" <<'SH'
#!/bin/sh
# MHub entry point (stand-in): like the real `uv run python -m mhubio.run`, with the /app/.venv
# environment active (its bin/ first on PATH: mhubio runs tools such as dicomsort from there)
export VIRTUAL_ENV=/app/.venv PATH="/app/.venv/bin:$PATH"
exec python -m mhubio.run "$@"
SH
chmod 755 "$CTX/import_mhub_model.sh" "$CTX/mhub.run"
cat > "$CTX/Dockerfile" <<DOCKERFILE
FROM $ROOTFS_TAG
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY pip.conf /etc/pip.conf
RUN mkdir -p /app/data/input_data /app/data/output_data /app/buildutils
WORKDIR /app
RUN python3 -m venv /app/.venv \\
 && /app/.venv/bin/pip install --no-cache-dir --disable-pip-version-check -q --no-deps mhubio==0.0.2 \\
 && /app/.venv/bin/pip install --no-cache-dir --disable-pip-version-check -q \\
      "pyyaml>=5" "typing-extensions==4.5.0" "pydicom>=2.4,<3" "thedicomsort>=1.0"
COPY import_mhub_model.sh /app/buildutils/import_mhub_model.sh
COPY mhub.run /usr/bin/mhub.run
ENV PYTHONPATH=/app
LABEL org.opencontainers.image.description="Local stand-in for mhubai/base:latest (tools/mhub_base/build.sh); not the MHub image"
CMD ["echo", "stand-in for the MHub base image (tools/mhub_base/build.sh)"]
DOCKERFILE
t0=$(date +%s)
DOCKER_BUILDKIT=0 docker build -q --network host -t "$TAG" "$CTX" >/dev/null
log "base image $TAG built in $(( $(date +%s) - t0 )) s"
