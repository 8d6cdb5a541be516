#!/usr/bin/env bash
# Set up everything the tests need from the repository's own files, then run them.
#   bash scripts/test.sh [pytest args...]
# Installs Debian's dcmtk + ImageMagick + PixelMed's SR validator (pixelmed-apps) (and docker.io + debootstrap for the Docker tests, which
# start dockerd themselves) when missing (needs root), the package with its test
# extras into .venv, and, when they can be installed, the separate venvs of the slow suites:
# .venvs/oracle (original fastai pipeline) and .venvs/mhub (mhubio 0.0.2), the [ray] extra
# (the ray suite starts a local Ray on loopback) and the [report] extra (the cohort report, checked
# against Debian's R survival package; its HTML opened in Debian's Chromium). Suites whose dependencies could not be
# installed are skipped with a message; all others must pass.
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=()
command -v dcmj2pnm >/dev/null 2>&1 || need_apt+=(dcmtk)
command -v dsrdump >/dev/null 2>&1 || need_apt+=(dcmtk)
[ -x /usr/bin/mogrify-im6.q16 ] || need_apt+=(imagemagick)
command -v dockerd >/dev/null 2>&1 || need_apt+=(docker.io)      # the Docker tests (marker docker)
command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)  # ... build the MHub base stand-in
# the PACS suites (marker pacs): a real Orthanc with its DICOMweb plugin (the tests start their own
# servers on free 127.0.0.1 ports; the package's system service is never used)
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || need_apt+=(orthanc)
ls /usr/share/orthanc/plugins*/libOrthancDicomWeb.so >/dev/null 2>&1 || need_apt+=(orthanc-dicomweb)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)  # the TLS tests' throw-away certificates
# the cohort report's oracle (R's survival package) and its browser test (Chromium + chromedriver)
command -v Rscript >/dev/null 2>&1 || need_apt+=(r-base-core)
[ -d /usr/lib/R/site-library/survival ] || [ -d /usr/lib/R/library/survival ] || need_apt+=(r-cran-survival)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
# PixelMed's DicomSRValidator (IHE connectathons' SR validator; pulls in libpixelmed-java and a headless JRE)
{ command -v java >/dev/null 2>&1 && ls /usr/share/java/pixelmed*.jar >/dev/null 2>&1; } || need_apt+=(pixelmed-apps)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing Debian packages: ${need_apt[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    # the orthanc package may start its system service: the tests never use it (own ports, own storage)
    if [[ " ${need_apt[*]} " == *" orthanc"* ]] && command -v service >/dev/null 2>&1; then
      service orthanc stop >/dev/null 2>&1 || true
    fi
  else
    echo "warning: ${need_apt[*]} missing and cannot be installed here; the live-tool tests will skip" >&2
  fi
fi
echo "== installing the package and test extras into .venv"
bash scripts/install.sh --test .venv
export PATH="$PWD/.venv/bin:$PATH"
echo "== ray extra (Ray, pyarrow, fsspec) into .venv"
if ! .venv/bin/python -m pip --disable-pip-version-check -q install -e ".[ray]"; then
  echo "warning: the [ray] extra could not be installed; the ray suite (marker: ray) will skip" >&2
fi
echo "== report extra (lifelines, scikit-survival, matplotlib, jinja2, pandas) into .venv"
if ! .venv/bin/python -m pip --disable-pip-version-check -q install -e ".[report]"; then
  echo "warning: the [report] extra could not be installed; the report suite (marker: report) will skip" >&2
fi
if [ -f tools/oracle/setup_venv.sh ]; then
  echo "== oracle venv (.venvs/oracle)"
  if bash tools/oracle/setup_venv.sh .venvs/oracle; then
    export CXR_ORACLE_VENV="$PWD/.venvs/oracle"  # selects the live oracle suite (marker: oracle)
  else
    echo "warning: oracle venv could not be installed; the live oracle test will skip" >&2
  fi
fi
if [ -f scripts/mhub_local.sh ]; then
  echo "== mhub venv (.venvs/mhub)"
  bash scripts/mhub_local.sh --setup-only || echo "warning: mhub venv could not be installed; mhub tests will skip" >&2
fi
echo "== pytest"
set +e
.venv/bin/python -m pytest -ra "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit $rc
