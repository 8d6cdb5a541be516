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
# modules in utils/ run inside mhubio and call this package's CLI (from the main environment,
# first found of: --cli, $CXR_LUNG_RISK_CLI, this repository's .venv/bin/cxr-lung-risk (what
# `bash scripts/install.sh` makes), `cxr-lung-risk` on PATH, /app/venv/bin/cxr-lung-risk) as a
# subprocess.
#
# mhubio's entry point (`python -m mhubio.run`) only looks for model modules and workflows under
# the hard-coded /app/models, so this script lays out a throw-away MHub tree instead
# (<tmp>/models/cxr_lung_risk -> this repository's models/cxr_lung_risk, <tmp>/data/{input_data,output_data} -> your
# folders), points mhubio's own scan_local_modules/scan_configurations at it and calls
# mhubio.run.run(), i.e. exactly what `mhub.run --workflow default` does in the container.
# The tree (with mhubio's sorted copy of the input DICOM) is removed when the run ends, also
# when it fails or is interrupted (SIGINT/SIGTERM stop the whole run, then clean up).
#
# Besides the workflow's outputs, OUTPUT gets the CLI's manifest.csv (every file the CLI was
# given: File,status,reason) and, when the CLI writes one, its records.jsonl. Their file names
# are the file's path under mhubio's data folder (e.g. sorted_data/<series>/dicom/<sop>.dcm, or
# input_data/<path> for the png workflow) instead of the runner's internal staging name.
#
# Exit status: mhubio's (0 even when a module logged an error), except that the workflow's
# last module, CxrLungRiskStatus, exits 1 when an instance failed (listed in
# OUTPUT/cxr_lung_risk_errors.txt); 64 for a usage error; 69 when the venv cannot be set up;
# 130/143 when interrupted by SIGINT/SIGTERM.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CXR_MHUB_VENV:-$REPO/.venvs/mhub}"
MHUBIO_REQS=("pyyaml>=5" "typing-extensions==4.5.0" "pydicom>=2.4,<3" "thedicomsort>=1.0")
STAMP="mhubio==0.0.2 ${MHUBIO_REQS[*]}"

usage() { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 64; }
die() { echo "mhub_local.sh: error: $1" >&2; exit "${2:-64}"; }

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
  # after --cli and $CXR_LUNG_RISK_CLI: the README's install (.venv here), PATH, the container's
  for cand in "$REPO/.venv/bin/cxr-lung-risk" "$(command -v cxr-lung-risk || true)" /app/venv/bin/cxr-lung-risk; do
    if [ -n "$cand" ] && [ -f "$cand" ] && [ -x "$cand" ]; then CLI="$cand"; break; fi
  done
fi
case "$CLI" in ""|*/*) ;; *) CLI="$(command -v "$CLI" || echo "$CLI")" ;; esac  # a bare name: from PATH
[ -n "$CLI" ] && [ -f "$CLI" ] && [ -x "$CLI" ] || die "cxr-lung-risk CLI not found (run 'bash scripts/install.sh', or pass --cli / set CXR_LUNG_RISK_CLI)"
CLI="$(cd "$(dirname "$CLI")" && pwd)/$(basename "$CLI")"  # absolute: the run starts elsewhere
mkdir -p "$OUTPUT"
INPUT="$(cd "$INPUT" && pwd)"; OUTPUT="$(cd "$OUTPUT" && pwd)"; CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"

# 3. a throw-away MHub tree: models/cxr_lung_risk -> the repo's MHub folder, data/{input,output}_data -> folders
# It is removed on every exit: the run is a child (not exec'd) so that this trap still fires.
WORK="" CHILD=""
cleanup() { if [ -n "$WORK" ]; then rm -rf "$WORK"; fi; }
on_signal() {  # stop the whole run (mhubio, dicomsort, the CLI: the child's process group)
  trap '' INT TERM
  if [ -n "$CHILD" ]; then
    kill -TERM -- "-$CHILD" 2>/dev/null || kill -TERM "$CHILD" 2>/dev/null || true
    wait "$CHILD" 2>/dev/null || true
  fi
  echo "mhub_local.sh: interrupted" >&2
  exit "$1"
}
trap cleanup EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
WORK="$(mktemp -d "${TMPDIR:-/tmp}/cxr_mhub.XXXXXX")"
mkdir -p "$WORK/models" "$WORK/data"
ln -s "$REPO/models/cxr_lung_risk" "$WORK/models/cxr_lung_risk"
ln -s "$INPUT" "$WORK/data/input_data"
ln -s "$OUTPUT" "$WORK/data/output_data"

# The runner calls this wrapper instead of the CLI: it runs the CLI unchanged (same arguments,
# output and exit status), then collects its manifest.csv / records.jsonl under $WORK/collected.
mkdir -p "$WORK/bin" "$WORK/collected"
cat > "$WORK/collect.py" <<'PY'
import csv, json, os, sys
out_dir, staging, data_dir, dest = sys.argv[1:5]

def source(value):
    # the runner's staging entry <k>/<file> is a link to the file under mhubio's data folder
    path = os.path.join(staging, value)  # relative to the staging folder, or absolute
    if os.path.relpath(path, staging).startswith(".."):
        return value
    try:
        target = os.readlink(path)
    except OSError:
        return value
    rel = os.path.relpath(os.path.join(os.path.dirname(path), target), data_dir)
    return value if rel.startswith("..") else rel.replace(os.sep, "/")

src = os.path.join(out_dir, "manifest.csv")
if os.path.isfile(src):
    with open(src, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    target = os.path.join(dest, "manifest.csv")
    new = not os.path.exists(target)
    with open(target, "a", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        if rows:
            col = rows[0].index("File") if "File" in rows[0] else None
            for i, row in enumerate(rows):
                if i == 0 and not new:
                    continue
                if i > 0 and col is not None and col < len(row):
                    row[col] = source(row[col])
                w.writerow(row)
src = os.path.join(out_dir, "records.jsonl")
if os.path.isfile(src):
    with open(src, encoding="utf-8") as f, open(os.path.join(dest, "records.jsonl"), "a", encoding="utf-8") as g:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                g.write(line.rstrip("\n") + "\n")
                continue
            if isinstance(rec, dict):
                for key in ("File", "file", "input"):
                    if isinstance(rec.get(key), str):
                        rec[key] = source(rec[key])
            g.write(json.dumps(rec) + "\n")
PY
{
  echo '#!/usr/bin/env bash'
  echo '# mhub_local.sh: run the real CLI, then keep its manifest (the runner deletes its folder)'
  printf 'CLI=%q PY=%q COLLECT=%q DATA=%q DEST=%q\n' "$CLI" "$VENV/bin/python" "$WORK/collect.py" "$WORK/data" "$WORK/collected"
  cat <<'SH'
"$CLI" "$@"
rc=$?
if [ "${1:-}" = predict ]; then
  prev="" out="" in="${2:-}"
  for a in "$@"; do
    case "$a" in --out=*) out="${a#--out=}" ;; esac
    [ "$prev" = --out ] && out="$a"
    prev="$a"
  done
  if [ -n "$out" ] && [ -d "$out" ]; then
    "$PY" -I "$COLLECT" "$out" "$in" "$DATA" "$DEST" || echo "mhub_local.sh: warning: could not collect the CLI's manifest" >&2
  fi
fi
exit $rc
SH
} > "$WORK/bin/cxr-lung-risk"
chmod +x "$WORK/bin/cxr-lung-risk"

ARGS=(--config "$CONFIG" "--config:general.data_base_dir=$WORK/data"
      "--config:modules.CxrLungRiskRunner.cli=$WORK/bin/cxr-lung-risk")
[ -n "$WEIGHTS" ] && ARGS+=("--config:modules.CxrLungRiskRunner.weights=$(cd "$(dirname "$WEIGHTS")" && pwd)/$(basename "$WEIGHTS")")
[ -n "$DEVICE" ] && ARGS+=("--config:modules.CxrLungRiskRunner.device=$DEVICE")
[ ${#EXTRA[@]} -gt 0 ] && ARGS+=("${EXTRA[@]}")

# 4. run mhubio's real runner with its model scan pointed at the throw-away tree; as a child in
#    its own process group (set -m), so that a signal can stop all of it before the cleanup
cd "$WORK"
export PATH="$VENV/bin:$PATH" CXR_LUNG_RISK_CLI="$CLI" PYTHONPATH="$WORK" MHUB_MODELS_DIR="$WORK/models"
set -m
"$VENV/bin/python" - "${ARGS[@]}" <<'PY' &
import os, sys
sys.argv[0] = "mhubio.run"
import mhubio.run as runner  # parses sys.argv like `python -m mhubio.run`

models = os.environ["MHUB_MODELS_DIR"]
runner.scan_local_modules.__defaults__ = (models,)
runner.scan_configurations.__defaults__ = (models,)
runner.run(runner.get_config_path(runner.scan_configurations()))
PY
CHILD=$!
set +m
set +e
wait "$CHILD"
rc=$?
set -e
CHILD=""

# 5. the CLI's manifest (and per-input records) next to the workflow's outputs
for f in manifest.csv records.jsonl; do
  if [ -f "$WORK/collected/$f" ]; then
    cp "$WORK/collected/$f" "$OUTPUT/.$f.tmp" && mv -f "$OUTPUT/.$f.tmp" "$OUTPUT/$f"
  fi
done
exit "$rc"
