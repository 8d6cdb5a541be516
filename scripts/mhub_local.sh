#!/usr/bin/env bash
# Run the MHub workflow of this repository with the real mhubio runner, outside Docker.
#
#   scripts/mhub_local.sh --input DIR --output DIR [--workflow default|png | --config FILE]
#                         [--weights PATH] [--cli PATH] [--device auto|cpu|cuda] [-- MHUBIO_ARGS...]
#
# mhubio 0.0.2 (PyPI) needs pydicom < 3 (its DicomImporter calls pydicom.read_file, and
# thedicomsort needs pydicom 2), while this package needs pydicom 3 and highdicom. So mhubio lives
# in its own venv, .venvs/mhub (created on first use; override with $CXR_MHUB_VENV), installed
# with `--no-deps` plus what it really imports for these workflows: PyYAML, typing-extensions
# 4.5.0 (its pin), pydicom<3 and thedicomsort (the `dicomsort` tool DicomImporter runs). Our
# modules in utils/ run inside mhubio and call this package's CLI (from the main environment:
# --cli, $CXR_LUNG_RISK_CLI or `cxr-lung-risk` on PATH) as a subprocess.
#
# mhubio's entry point (`python -m mhubio.run`) only looks for model modules and workflows under
# the hard-coded /app/models, so this script lays out a throw-away MHub tree instead
# (<tmp>/models/cxr_lung_risk -> this repository, <tmp>/data/{input_data,output_data} -> your
# folders), points mhubio's own scan_local_modules/scan_configurations at it and calls
# mhubio.run.run(), i.e. exactly what `mhub.run --workflow default` does in the container.
#
# Exit status: mhubio's (0 even when a module logged an error), except that the workflow's
# last module, CxrLungRiskStatus, exits 1 when an instance failed (listed in
# OUTPUT/cxr_lung_risk_errors.txt); 64 for a usage error; 69 when the venv cannot be set up.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CXR_MHUB_VENV:-$REPO/.venvs/mhub}"
MHUBIO_REQS=("pyyaml>=5" "typing-extensions==4.5.0" "pydicom>=2.4,<3" "thedicomsort>=1.0")
STAMP="mhubio==0.0.2 ${MHUBIO_REQS[*]}"

usage() { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 64; }
die() { echo "mhub_local.sh: error: $*" >&2; exit "${2:-64}"; }

INPUT="" OUTPUT="" WORKFLOW="default" CONFIG="" WEIGHTS="" CLI="${CXR_LUNG_RISK_CLI:-}" DEVICE=""
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --input) INPUT="${2:-}"; shift 2 ;;
    --output) OUTPUT="${2:-}"; shift 2 ;;
    --workflow) WORKFLOW="${2:-}"; shift 2 ;;
    --config) CONFIG="${2:-}"; shift 2 ;;
    --weights) WEIGHTS="${2:-}"; shift 2 ;;
    --cli) CLI="${2:-}"; shift 2 ;;
    --device) DEVICE="${2:-}"; shift 2 ;;
    --setup-only) INPUT="-"; OUTPUT="-"; shift ;;
    -h|--help) usage ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ -n "$INPUT" ] && [ -n "$OUTPUT" ] || usage

# 1. the mhubio venv (cached; rebuilt when the pinned requirements change)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.mhub_stamp" 2>/dev/null)" != "$STAMP" ] \
   || ! "$VENV/bin/python" -c "import mhubio.run, yaml, pydicom, sys; sys.exit(pydicom.__version__ >= '3')" >/dev/null 2>&1; then
  echo "mhub_local.sh: creating the mhubio venv in $VENV" >&2
  rm -rf "$VENV"
  PY="$(command -v python3 || command -v python)" || die "python3 not found" 69
  "$PY" -m venv "$VENV" || die "cannot create a venv in $VENV" 69
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "mhubio==0.0.2" \
    || die "cannot install mhubio 0.0.2" 69
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${MHUBIO_REQS[@]}" \
    || die "cannot install mhubio's requirements" 69
  echo "$STAMP" > "$VENV/.mhub_stamp"
fi
[ "$INPUT" = "-" ] && exit 0

# 2. inputs
[ -d "$INPUT" ] || die "input folder not found: $INPUT"
if [ -z "$CONFIG" ]; then
  CONFIG="$REPO/config/$WORKFLOW.yml"
fi
[ -f "$CONFIG" ] || die "workflow config not found: $CONFIG"
if [ -z "$CLI" ]; then
  CLI="$(command -v cxr-lung-risk || true)"
fi
[ -n "$CLI" ] && [ -x "$CLI" ] || die "cxr-lung-risk CLI not found (pip install the package, or pass --cli / set CXR_LUNG_RISK_CLI)"
mkdir -p "$OUTPUT"
INPUT="$(cd "$INPUT" && pwd)"; OUTPUT="$(cd "$OUTPUT" && pwd)"; CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"

# 3. a throw-away MHub tree: models/cxr_lung_risk -> repo, data/{input,output}_data -> folders
WORK="$(mktemp -d "${TMPDIR:-/tmp}/cxr_mhub.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/models" "$WORK/data"
ln -s "$REPO" "$WORK/models/cxr_lung_risk"
ln -s "$INPUT" "$WORK/data/input_data"
ln -s "$OUTPUT" "$WORK/data/output_data"

ARGS=(--config "$CONFIG" "--config:general.data_base_dir=$WORK/data")
[ -n "$WEIGHTS" ] && ARGS+=("--config:modules.CxrLungRiskRunner.weights=$(cd "$(dirname "$WEIGHTS")" && pwd)/$(basename "$WEIGHTS")")
[ -n "$DEVICE" ] && ARGS+=("--config:modules.CxrLungRiskRunner.device=$DEVICE")
[ ${#EXTRA[@]} -gt 0 ] && ARGS+=("${EXTRA[@]}")

# 4. run mhubio's real runner with its model scan pointed at the throw-away tree
cd "$WORK"
export PATH="$VENV/bin:$PATH" CXR_LUNG_RISK_CLI="$CLI" PYTHONPATH="$WORK" MHUB_MODELS_DIR="$WORK/models"
exec "$VENV/bin/python" - "${ARGS[@]}" <<'PY'
import os, sys
sys.argv[0] = "mhubio.run"
import mhubio.run as runner  # parses sys.argv like `python -m mhubio.run`

models = os.environ["MHUB_MODELS_DIR"]
runner.scan_local_modules.__defaults__ = (models,)
runner.scan_configurations.__defaults__ = (models,)
runner.run(runner.get_config_path(runner.scan_configurations()))
PY
