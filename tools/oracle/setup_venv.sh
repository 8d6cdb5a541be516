#!/usr/bin/env bash
# Create the oracle venv: the ORIGINAL fastai pipeline's dependencies, isolated from the package.
# Usage: tools/oracle/setup_venv.sh [VENV_DIR]   (default: <repo>/.venvs/oracle)
# Idempotent: does nothing when VENV_DIR's python already imports fastai and pretrainedmodels.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-$REPO/.venvs/oracle}"
PY="${PYTHON:-python3}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import fastai, pretrainedmodels" >/dev/null 2>&1; then
  echo "oracle venv ready: $VENV"
  exit 0
fi
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" fastai pretrainedmodels six
"$VENV/bin/python" -c "import fastai, pretrainedmodels, torch; print('oracle venv ready:', '$VENV', 'fastai', fastai.__version__, 'torch', torch.__version__)"
