"""The shell scripts' own mechanics, with stand-ins instead of mhubio, pip and the CLI (fast).

``scripts/mhub_local.sh`` runs in a copy of the repository layout with a stand-in mhubio venv
(``$CXR_MHUB_VENV``): its ``python`` runs a small fake runner that behaves like mhubio's
DicomImporter + CxrLungRiskRunner (a sorted copy of the input under the data folder, a staging
folder of links, one CLI call, the staging folder removed). That checks what real runs cannot
check cheaply: the throw-away tree is removed on every exit (status passed through) and on
SIGINT/SIGTERM (the whole process group stopped), the CLI lookup order, and the CLI's
manifest/records collected into the output. The real mhubio run is in test_mhub.py.

``scripts/install.sh`` runs with a stand-in ``$PYTHON`` whose venv's pip only logs its
arguments: the progress lines, the quiet pip calls and the final ``--version``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO

MHUB_SCRIPT = REPO / "scripts" / "mhub_local.sh"
INSTALL_SCRIPT = REPO / "scripts" / "install.sh"
BASE_PATH = "/usr/bin:/bin"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="bash scripts")


def _write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(0o755)
    return path


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


# --------------------------------------------------------------------------- mhub_local.sh

FAKE_RUNNER = r'''
import json, os, subprocess, sys, time
# Stand-in for `python - <mhubio.run ...>`: like DicomImporter + CxrLungRiskRunner.
args = sys.argv[1:]
conf = dict(a.split("=", 1) for a in args if a.startswith("--config:"))
data = conf["--config:general.data_base_dir"]
cli = conf.get("--config:modules.CxrLungRiskRunner.cli", os.environ.get("CXR_LUNG_RISK_CLI"))
log = {"cwd": os.getcwd(), "data": data, "cli": cli, "env_cli": os.environ.get("CXR_LUNG_RISK_CLI"), "args": args, "pid": os.getpid()}
# dicomsort's copy of the input, inside the throw-away tree
sorted_dir = os.path.join(data, "sorted_data", "s1", "dicom")
os.makedirs(sorted_dir)
with open(os.path.join(data, "input_data", "a.dcm"), "rb") as f, open(os.path.join(sorted_dir, "a.dcm"), "wb") as g:
    g.write(f.read())
mode = os.environ.get("FAKE_MODE", "run")
if mode == "sleep":  # a long step with a child of its own (like the CLI subprocess)
    child = subprocess.Popen(["sleep", "300"])
    log["child"] = child.pid
    with open(os.environ["FAKE_LOG"], "w") as f:
        json.dump(log, f)
    time.sleep(300)
    sys.exit(0)
work = os.path.join(data, "cxr_lung_risk_x")
os.makedirs(os.path.join(work, "in", "0"))
os.symlink(os.path.join(sorted_dir, "a.dcm"), os.path.join(work, "in", "0", "a.dcm"))
proc = subprocess.run([cli, "predict", os.path.join(work, "in"), "--out", os.path.join(work, "out"),
                       "--format", "csv,sr,json"], capture_output=True, text=True)
log.update(cli_rc=proc.returncode, cli_stdout=proc.stdout, cli_stderr=proc.stderr)
subprocess.run(["rm", "-rf", work], check=True)  # the runner removes its folder
with open(os.environ["FAKE_LOG"], "w") as f:
    json.dump(log, f)
sys.exit(int(os.environ.get("FAKE_RC", "0")))
'''

FAKE_CLI = r'''#!/usr/bin/env bash
# stand-in CLI: says who it is, writes a manifest (and records) like `predict`
echo "fake cli $0"
[ "$1" = predict ] || exit 0
in="$2" out=""
prev=""
for a in "$@"; do [ "$prev" = --out ] && out="$a"; prev="$a"; done
mkdir -p "$out"
if [ -z "${FAKE_NO_MANIFEST:-}" ]; then
  printf 'File,status,reason\n0/a.dcm,ok,\nother.txt,skipped,not DICOM\n' > "$out/manifest.csv"
  printf '{"input": "%s/0/a.dcm", "file": "0/a.dcm", "status": "ok"}\n' "$in" > "$out/records.jsonl"
fi
exit "${FAKE_CLI_RC:-0}"
'''


def _stamp() -> str:
    """The stamp mhub_local.sh expects in its venv (read from the script itself)."""
    head = "\n".join(line for line in MHUB_SCRIPT.read_text().splitlines() if line.startswith(("MHUBIO_REQS=", "STAMP=")))
    return subprocess.run(["bash", "-c", head + '\nprintf %s "$STAMP"'], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def mhub(tmp_path):
    """A copy of the repository's layout for the script, a stand-in mhubio venv, an input."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(MHUB_SCRIPT, repo / "scripts" / "mhub_local.sh")
    (repo / "models" / "cxr_lung_risk" / "config").mkdir(parents=True)
    (repo / "models" / "cxr_lung_risk" / "config" / "default.yml").write_text("general: {}\n")
    (repo / "config").symlink_to("models/cxr_lung_risk/config")
    venv = tmp_path / "mhubvenv"
    (tmp_path / "fake_runner.py").write_text(FAKE_RUNNER)
    _write_exe(venv / "bin" / "python", f"""
        #!/usr/bin/env bash
        # stand-in for the mhubio venv's python
        case "$1" in
          -c) exit 0 ;;                                   # the 'import mhubio.run ...' check
          -) shift; exec {sys.executable} {tmp_path / 'fake_runner.py'} "$@" ;;
          *) exec {sys.executable} "$@" ;;
        esac
        """)
    (venv / ".mhub_stamp").write_text(_stamp() + "\n")
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "a.dcm").write_bytes(b"DICM" * 100)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CXR_LUNG_RISK_CLI", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(CXR_MHUB_VENV=str(venv), TMPDIR=str(tmp), PATH=BASE_PATH, FAKE_LOG=str(tmp_path / "runner.json"))
    return {"root": tmp_path, "repo": repo, "script": repo / "scripts" / "mhub_local.sh", "in": inp,
            "out": tmp_path / "out", "tmp": tmp, "env": env, "log": tmp_path / "runner.json"}


def _mhub(m: dict, *args: str, env: dict | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(m["script"]), "--input", str(m["in"]), "--output", str(m["out"]), *args],
                          capture_output=True, text=True, env={**m["env"], **(env or {})}, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _log(m: dict) -> dict:
    return json.loads(m["log"].read_text())


def test_the_fake_venv_is_accepted_as_is(mhub):
    proc = subprocess.run(["bash", str(mhub["script"]), "--setup-only"], capture_output=True, text=True, env=mhub["env"])
    assert proc.returncode == 0 and "creating" not in proc.stderr, proc.stderr  # not rebuilt


@pytest.mark.parametrize("rc", [0, 1, 3])
def test_exit_status_is_passed_through_and_the_tree_removed(mhub, rc):
    cli = _write_exe(mhub["root"] / "bin" / "mycli", FAKE_CLI)
    proc = _mhub(mhub, "--cli", str(cli), env={"FAKE_RC": str(rc)})
    assert proc.returncode == rc, proc.stderr
    log = _log(mhub)
    work = Path(log["cwd"])
    assert work.parent == mhub["tmp"] and log["data"] == str(work / "data")
    assert not work.exists() and list(mhub["tmp"].iterdir()) == []  # with the sorted copy of the input
    assert (mhub["in"] / "a.dcm").read_bytes() == b"DICM" * 100  # the user's input is untouched (it was linked)


@pytest.mark.parametrize("sig,rc", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_whole_run_and_cleans_up(mhub, sig, rc):
    cli = _write_exe(mhub["root"] / "bin" / "mycli", FAKE_CLI)
    p = subprocess.Popen(["bash", str(mhub["script"]), "--input", str(mhub["in"]), "--output", str(mhub["out"]),
                          "--cli", str(cli)], env={**mhub["env"], "FAKE_MODE": "sleep"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 30
        while not mhub["log"].exists():
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "the fake runner did not start"
            time.sleep(0.05)
        time.sleep(0.2)
        log = _log(mhub)
        assert _alive(log["pid"]) and _alive(log["child"])
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == rc, err
    assert "interrupted" in err
    assert not Path(log["cwd"]).exists() and list(mhub["tmp"].iterdir()) == []
    deadline = time.monotonic() + 10
    while (_alive(log["pid"]) or _alive(log["child"])) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(log["pid"]) and not _alive(log["child"])  # the runner and its child were stopped


def test_the_clis_manifest_and_records_are_collected(mhub):
    cli = _write_exe(mhub["root"] / "bin" / "mycli", FAKE_CLI)
    proc = _mhub(mhub, "--cli", str(cli), env={"FAKE_CLI_RC": "2"})
    assert proc.returncode == 0, proc.stderr
    log = _log(mhub)
    # the runner calls a wrapper (config override) that runs the CLI unchanged
    assert log["cli"] != str(cli) and log["env_cli"] == str(cli)
    assert (log["cli_rc"], log["cli_stdout"]) == (2, f"fake cli {cli}\n")
    assert sorted(p.name for p in mhub["out"].iterdir()) == ["manifest.csv", "records.jsonl"]
    # the runner's staging names (0/a.dcm) become the file's path under mhubio's data folder
    assert (mhub["out"] / "manifest.csv").read_text() == (
        "File,status,reason\nsorted_data/s1/dicom/a.dcm,ok,\nother.txt,skipped,not DICOM\n")
    recs = [json.loads(line) for line in (mhub["out"] / "records.jsonl").read_text().splitlines()]
    assert recs == [{"input": "sorted_data/s1/dicom/a.dcm", "file": "sorted_data/s1/dicom/a.dcm", "status": "ok"}]


def test_no_manifest_when_the_cli_wrote_none(mhub):
    cli = _write_exe(mhub["root"] / "bin" / "mycli", FAKE_CLI)
    proc = _mhub(mhub, "--cli", str(cli), env={"FAKE_NO_MANIFEST": "1"})
    assert proc.returncode == 0, proc.stderr
    assert not mhub["out"].exists() or list(mhub["out"].iterdir()) == []


def test_cli_lookup_order(mhub):
    root = mhub["root"]
    env_cli = _write_exe(root / "envcli" / "cxr-lung-risk", FAKE_CLI)
    opt_cli = _write_exe(root / "optcli" / "cxr-lung-risk", FAKE_CLI)
    repo_cli = _write_exe(mhub["repo"] / ".venv" / "bin" / "cxr-lung-risk", FAKE_CLI)
    path_cli = _write_exe(root / "pathbin" / "cxr-lung-risk", FAKE_CLI)
    path = f"{root / 'pathbin'}:{BASE_PATH}"

    def used(*args: str, **env: str) -> str:
        proc = _mhub(mhub, *args, env=env)
        assert proc.returncode == 0, proc.stderr
        return _log(mhub)["cli_stdout"].strip().removeprefix("fake cli ")

    assert used("--cli", str(opt_cli), CXR_LUNG_RISK_CLI=str(env_cli), PATH=path) == str(opt_cli)
    assert used(CXR_LUNG_RISK_CLI=str(env_cli), PATH=path) == str(env_cli)
    assert used(PATH=path) == str(repo_cli)  # the README's install: bash scripts/install.sh -> .venv
    assert used("--cli", "cxr-lung-risk", PATH=path) == str(path_cli)  # a bare name is looked up on PATH
    repo_cli.unlink()
    assert used(PATH=path) == str(path_cli)
    # a relative --cli is taken relative to where the script was started
    proc = subprocess.run(["bash", str(mhub["script"]), "--input", str(mhub["in"]), "--output", str(mhub["out"]),
                           "--cli", "optcli/cxr-lung-risk"], cwd=root, capture_output=True, text=True, env=mhub["env"])
    assert proc.returncode == 0, proc.stderr
    assert _log(mhub)["env_cli"] == str(opt_cli)
    if shutil.which("cxr-lung-risk", path=BASE_PATH) is None and not os.path.exists("/app/venv/bin/cxr-lung-risk"):
        proc = _mhub(mhub)
        assert proc.returncode == 64
        assert "cxr-lung-risk CLI not found" in proc.stderr and "scripts/install.sh" in proc.stderr


# --------------------------------------------------------------------------- install.sh


@pytest.fixture
def fake_python(tmp_path):
    """A stand-in $PYTHON: `-m venv DIR` makes a venv whose pip only logs its arguments."""
    pip_log = tmp_path / "pip.log"
    venv_python = f"""
        #!/usr/bin/env bash
        case "$1" in
          -c) exit "${{FAKE_TORCH_MISSING:-1}}" ;;   # 'import torch': missing unless told
          -m) shift; [ "$1" = pip ] || exit 99; shift
              echo "$*" >> {pip_log}
              case "$*" in *torch==*) exit "${{FAKE_CPU_BUILD_FAILS:-0}}" ;; esac
              exit 0 ;;
        esac
        exit 99
        """
    cli = """
        #!/usr/bin/env bash
        echo "cxr-lung-risk 9.9.9"
        """
    tpl_python = _write_exe(tmp_path / "tpl" / "python", venv_python)
    tpl_cli = _write_exe(tmp_path / "tpl" / "cxr-lung-risk", cli)
    py = _write_exe(tmp_path / "python3", f"""
        #!/usr/bin/env bash
        [ "$1 $2" = "-m venv" ] || exit 99
        mkdir -p "$3/bin" && cp {tpl_python} {tpl_cli} "$3/bin/"
        """)
    return {"python": py, "pip_log": pip_log, "venv": tmp_path / "v"}


def _install(fp: dict, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(INSTALL_SCRIPT), *args, str(fp["venv"])], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": str(fp["python"]), **env}, timeout=60)


def test_install_prints_progress_and_keeps_pip_quiet(fake_python):
    proc = _install(fake_python, "--test")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    v = fake_python["venv"]
    assert lines[:3] == [f"== creating {v}", "== installing PyTorch (CPU build) ...",
                         "== installing cxr-lung-risk and its dependencies (with the test extras) ..."]
    assert re.fullmatch(rf"== done in \d+ s: {re.escape(str(v))}/bin/cxr-lung-risk", lines[3]), lines
    assert lines[4:] == ["cxr-lung-risk 9.9.9"]  # the last line: the installed CLI's --version
    calls = fake_python["pip_log"].read_text().splitlines()
    assert all("-q" in c.split() and "--disable-pip-version-check" in c.split() for c in calls), calls
    assert [c.split()[-1] for c in calls] == ["pip", "torch==2.13.0", ".[test]"]


def test_install_into_an_existing_venv_with_torch(fake_python):
    assert _install(fake_python).returncode == 0
    fake_python["pip_log"].unlink()
    proc = _install(fake_python, FAKE_TORCH_MISSING="0")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:3] == [f"== using the existing {fake_python['venv']}", "== PyTorch is already installed",
                         "== installing cxr-lung-risk and its dependencies ..."]
    assert lines[-1] == "cxr-lung-risk 9.9.9"
    assert [c.split()[-1] for c in fake_python["pip_log"].read_text().splitlines()] == ["pip", "."]


def test_install_falls_back_to_the_default_torch_build(fake_python):
    proc = _install(fake_python, FAKE_CPU_BUILD_FAILS="1")
    assert proc.returncode == 0, proc.stderr
    assert "== no CPU build here: installing PyTorch's default build ..." in proc.stdout.splitlines()
    assert [c.split()[-1] for c in fake_python["pip_log"].read_text().splitlines()] == ["pip", "torch==2.13.0", "torch>=2.1", "."]


def test_install_help():
    proc = subprocess.run(["bash", str(INSTALL_SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "[--test] [VENV_DIR]" in proc.stdout
