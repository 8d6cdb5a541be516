"""MHub's submission rules (tools/mhub_check.py, re-implemented from MHub's documentation) on
this repository's MHub model folder, and MHub's model import run against a clone of it.

The checker is also shown to reject what MHub rejects (each rule can fail), so that a passing
check means something.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import mhub_check  # noqa: E402

NAME = "cxr_lung_risk"
FOLDER = REPO / "models" / NAME
ROOT_LINKS = {"Dockerfile": "dockerfiles/Dockerfile", "config": "config", "utils": "utils",
              "meta.json": "meta.json", "mhub.toml": "mhub.toml"}


def test_one_source_of_truth_root_entries_are_links_into_the_mhub_folder():
    for name, target in ROOT_LINKS.items():
        p = REPO / name
        assert p.is_symlink(), f"{name} must be a link into models/{NAME}/ (one source of truth)"
        assert p.resolve() == (FOLDER / target).resolve(), name
        assert not (FOLDER / target).is_symlink()


def _placeholder() -> bool:
    return mhub_check.PLACEHOLDER_MARK in (mhub_check.test_url(mhub_check.read_toml(FOLDER / "mhub.toml")) or "")


def _problems_but_the_test_url(folder: Path) -> list[str]:
    """The folder's problems, less the one about the test URL while it is still the placeholder."""
    problems = mhub_check.check_folder(folder)
    if _placeholder():
        assert [p for p in problems if "PLACEHOLDER" in p and "test URL" in p], problems
        problems = [p for p in problems if not ("PLACEHOLDER" in p and "test URL" in p)]
    return problems


def test_the_model_folder_complies():
    """Every rule holds, except that the test URL is an error while it is the placeholder (as in
    MHub's own check, which cannot download it): then the checker says so and exits 1."""
    assert _problems_but_the_test_url(FOLDER) == []
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "mhub_check.py"), str(FOLDER)], capture_output=True, text=True)
    if _placeholder():
        assert proc.returncode == 1, proc.stdout
        lines = proc.stdout.strip().splitlines()
        assert len(lines) == 1 and "test URL is a PLACEHOLDER" in lines[0] and "complies" not in proc.stdout, proc.stdout
    else:
        assert proc.returncode == 0, proc.stdout


def test_model_folder_holds_what_mhub_expects():
    assert (FOLDER / "dockerfiles" / "Dockerfile").is_file()
    workflows = sorted(p.stem for p in (FOLDER / "config").glob("*.yml"))
    assert "default" in workflows
    assert sorted(p.name for p in (FOLDER / "utils").glob("*.py"))
    assert [p for p in FOLDER.rglob("*.py") if p.parent.name != "utils"] == []
    # the package data next to it stays what the package ships
    assert (REPO / "models" / "cxr_lung_risk.json").is_file() and (REPO / "models" / "cxr_age.json").is_file()


DOCKERFILE = (FOLDER / "dockerfiles" / "Dockerfile").read_text()


@pytest.mark.parametrize("mutate, why", [
    (lambda s: "# a comment first\n" + s, "first line"),
    (lambda s: s.replace("LABEL", "COPY . /app\nLABEL", 1), "forbidden instruction"),
    (lambda s: s.replace("LABEL", "ADD x /x\nLABEL", 1), "forbidden instruction"),
    (lambda s: s.replace("LABEL", "WORKDIR /tmp\nLABEL", 1), "forbidden instruction"),
    (lambda s: s.replace("LABEL", "FROM debian:bookworm\nLABEL", 1), "a second FROM"),
    (lambda s: s.replace("ARG MHUB_MODELS_REPO\n", "ARG MHUB_MODELS_REPO=x\n"), "ARG MHUB_MODELS_REPO"),
    (lambda s: s.replace("import_mhub_model.sh cxr_lung_risk", "import_mhub_model.sh other"), "buildutils/import_mhub_model.sh"),
    (lambda s: s + "# trailing comment\n", "last line"),
    (lambda s: s.replace('ENTRYPOINT ["mhub.run"]', 'ENTRYPOINT ["python", "-m", "mhubio.run"]'), "second-to-last"),
    (lambda s: s.replace('CMD ["--workflow", "default"]', 'CMD ["--workflow", "png"]'), "last line"),
])
def test_dockerfile_rules_reject(mutate, why):
    assert mhub_check.check_dockerfile(DOCKERFILE, NAME) == []
    problems = mhub_check.check_dockerfile(mutate(DOCKERFILE), NAME)
    assert any(why in p for p in problems), problems


def test_dockerfile_specifics():
    lines = [line for line in DOCKERFILE.split("\n") if line.strip()]
    assert lines[0] == "FROM mhubai/base:latest"
    assert "ARG MHUB_MODELS_REPO" in lines
    assert "RUN buildutils/import_mhub_model.sh cxr_lung_risk ${MHUB_MODELS_REPO}" in lines
    assert lines[-2:] == ['ENTRYPOINT ["mhub.run"]', 'CMD ["--workflow", "default"]']
    # build arguments: the package from a pinned source, PyTorch, the weights mirror (default Zenodo)
    assert 'ARG CXR_LUNG_RISK_PACKAGE="cxr-lung-risk==' in DOCKERFILE
    assert 'ARG TORCH_SPEC="torch>=2.1"' in DOCKERFILE  # PyPI's torch: the CUDA-capable build
    assert 'ARG CXR_LUNG_RISK_WEIGHTS_URL="https://zenodo.org/records/7941660/' in DOCKERFILE
    # only CXR-Lung-Risk's weights are baked in: no workflow runs CXR-Age
    assert "--model lung-risk" in DOCKERFILE and "--model all" not in DOCKERFILE and "--model age" not in DOCKERFILE
    # (the runner runs the CLI's default model, lung-risk; a workflow that adds `--model age` to
    # its extra_args must come with CXR-Age's weights in the image)
    for wf in (FOLDER / "config").glob("*.yml"):
        assert "--model" not in wf.read_text(), wf
    assert '"--model"' not in (FOLDER / "utils" / "CxrLungRiskRunner.py").read_text()


META = json.loads((FOLDER / "meta.json").read_text())


def _set(path: str, value):
    meta = json.loads(json.dumps(META))
    keys = path.split(".")
    d = meta
    for k in keys[:-1]:
        d = d[int(k)] if isinstance(d, list) else d[k]
    if value is KeyError:
        del d[keys[-1]]
    else:
        d[keys[-1]] = value
    return meta


@pytest.mark.parametrize("path, value, why", [
    ("id", "not-a-uuid", "UUID"),
    ("name", "cxr-lung-risk", "folder name"),
    ("title", KeyError, "missing 'title'"),
    ("summary.description", "x" * 201, "at most 200"),
    ("summary.inputs.0.modality", KeyError, "missing 'modality'"),
    ("summary.outputs.0.type", "Score", "one of"),
    ("summary.model.cmpapproach", "4D", "not an allowed value"),
    ("summary.data.public", "yes", "must be bool"),
    ("details.version", "v1", "digits and dots"),
    ("details.date.pub", "16.05.2023", "YYYY-MM-DD"),
    ("details.github", "github.com/x", "not a URI"),
    ("details.publications", KeyError, "missing 'publications'"),
    ("info.training", KeyError, "missing 'training'"),
    ("info.use.text", "Too short.", "50 to 500"),
    ("info.analyses.text", "word " * 501, "50 to 500"),
])
def test_meta_rules_reject(path, value, why):
    assert mhub_check.check_meta(META, NAME) == []
    problems = mhub_check.check_meta(_set(path, value), NAME)
    assert any(why in p for p in problems), problems


def test_meta_content():
    s = META["summary"]
    assert len(s["description"]) <= 200
    assert sorted(i["modality"] for i in s["inputs"]) == ["CR", "DX"]
    assert all(i["bodypartexamined"].lower() == "chest" for i in s["inputs"])
    assert s["outputs"][0]["type"] == "Prediction" and "years" in s["outputs"][0]["description"]
    for sec in ("use", "analyses", "evaluation", "training"):
        assert 50 <= len(META["info"][sec]["text"].split()) <= 500, sec


def test_mhub_toml_test_url_is_a_zenodo_record_and_marked_placeholder():
    toml = mhub_check.read_toml(FOLDER / "mhub.toml")
    url = mhub_check.test_url(toml)
    assert url.startswith(mhub_check.ZENODO_RECORDS)
    good = "https://zenodo.org/records/7941661/files/cxr_lung_risk_mhub_test.zip"
    assert mhub_check.check_toml({"model": {"deployment": {"test": good}}}) == []
    assert mhub_check.check_toml({"model": {"deployment": {"test": "https://zenodo.org/record/1/x.zip"}}})
    assert mhub_check.check_toml({"model": {}})
    placeholder = mhub_check.check_toml({"model": {"deployment": {"test": good.replace("7941661", "PLACEHOLDER")}}})
    assert len(placeholder) == 1 and "PLACEHOLDER" in placeholder[0], placeholder
    # until the zip is uploaded, the URL says so (README, MHub: how to upload), and is an error
    if mhub_check.PLACEHOLDER_MARK in url:
        assert "PLACEHOLDER" in (FOLDER / "mhub.toml").read_text().split("test =")[0]
        problems = mhub_check.check_toml(toml)
        assert len(problems) == 1 and "test URL is a PLACEHOLDER" in problems[0], problems
    else:
        assert mhub_check.check_toml(toml) == []


# --------------------------------------------------------------------------- MHub's import


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> tuple[Path, str]:
    """A clone of this repository, with the working tree's tracked files committed on a branch."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    src = tmp_path_factory.mktemp("clone") / "repo"
    commit = _git("stash", "create", cwd=REPO).strip() or _git("rev-parse", "HEAD", cwd=REPO).strip()
    _git("init", "-q", str(src), cwd=REPO)
    _git("push", "-q", str(src), f"{commit}:refs/heads/mhub-import", cwd=REPO)
    return src, "mhub-import"


def _tree(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): ("link" if p.is_symlink() else "file")
            for p in sorted(d.rglob("*")) if ".git" not in p.relative_to(d).parts and not p.is_dir()}


def _execute(yml: str) -> list[str]:
    """The module names of a workflow's top-level ``execute:`` list (no YAML library needed)."""
    lines = yml.split("execute:", 1)[1].splitlines()[1:]
    out = []
    for line in lines:
        if not line.startswith("- "):
            break
        out.append(line[2:].strip())
    assert out
    return out


def test_mhub_import_yields_the_model_folder(clone, tmp_path):
    """MHub's documented import, inside an empty /app: git init; git fetch <repo> <branch>;
    git merge FETCH_HEAD; git sparse-checkout set models/<name>."""
    src, branch = clone
    app = tmp_path / "app"
    app.mkdir()
    _git("init", "-q", cwd=app)
    _git("fetch", "-q", str(src), branch, cwd=app)
    _git("merge", "-q", "FETCH_HEAD", cwd=app)
    _git("sparse-checkout", "set", f"models/{NAME}", cwd=app)

    model = app / "models" / NAME
    assert _problems_but_the_test_url(model) == []
    for rel in ("dockerfiles/Dockerfile", "config/default.yml", "meta.json", "mhub.toml"):
        assert (model / rel).is_file() and not (model / rel).is_symlink(), rel
        assert (model / rel).read_bytes() == (FOLDER / rel).read_bytes(), rel
    for p in (FOLDER / "utils").glob("*.py"):
        assert (model / "utils" / p.name).read_bytes() == p.read_bytes()
    # the workflows name only modules that exist: mhubio's own or ours in utils/
    ours = {p.stem for p in (model / "utils").glob("*.py")}
    for wf in (model / "config").glob("*.yml"):
        for module in _execute(wf.read_text()):
            assert module in ours or module in MHUBIO_MODULES, (wf.name, module)
    # nothing of the package's source or tests is checked out (cone mode: top-level files only)
    assert not (app / "src").exists() and not (app / "tests").exists()

    # the stand-in base image's import script does the same, and then what MHub's script does at
    # its end: the merged commit's hash into buildutils/model_commit_hash.txt, /app/.git removed
    app2 = tmp_path / "app2"
    app2.mkdir()
    subprocess.run(["bash", str(REPO / "tools" / "mhub_base" / "import_mhub_model.sh"), NAME, f"{src}::{branch}"],
                   cwd=app2, check=True, capture_output=True, text=True)
    assert not (app2 / ".git").exists()
    merged = _git("rev-parse", "HEAD", cwd=app).strip()
    assert (app2 / "buildutils" / "model_commit_hash.txt").read_text().strip() == merged
    tree2 = _tree(app2)
    del tree2["buildutils/model_commit_hash.txt"]
    assert tree2 == _tree(app)


MHUBIO_MODULES = {"DicomImporter", "FileFilter", "DataOrganizer", "ReportExporter"}
