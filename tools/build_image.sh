#!/usr/bin/env bash
# Build the MHub image (models/cxr_lung_risk/dockerfiles/Dockerfile, unchanged) from this
# checkout, offline: the stand-in base image when Docker Hub's is absent, this checkout's wheel
# and model folder, a CPU torch wheel and the weights, all served on 127.0.0.1.
#
#   bash tools/build_image.sh [--tag cxr_lung_risk] [--weights-zip ZIP] [--torch-wheel WHL | --torch-spec SPEC]
#
# Default weights: SYNTHETIC (scores mean nothing); --weights-zip: e.g. the published Zenodo zip.
# Needs a running Docker engine (root: dockerd &) and, for the synthetic weights and the wheel,
# this repository's .venv (bash scripts/install.sh). Details: tools/build_image.py.
# Exit status: 0 built, 1 failed (one sentence on stderr), 64 usage error.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$REPO/.venv/bin/python"
[ -x "$PY" ] || PY="$(command -v python3)"
exec "$PY" "$REPO/tools/build_image.py" "$@"
