"""MHub's submission rules for a model folder, re-implemented from MHub's documentation.

    python tools/mhub_check.py [models/cxr_lung_risk]

Prints one line per problem and exits 1 when there is any (0 when the folder complies). The
rules (MHub documentation: "model folder structure", "the MHub Dockerfile", "model meta json",
"testing phase"; and what MHub's pull-request check enforces):

* folder ``models/<name>/``: ``dockerfiles/Dockerfile``, ``config/default.yml``, ``meta.json``,
  ``mhub.toml``; Python modules only under ``utils/``.
* Dockerfile (blank lines ignored, comments are lines like any other): the first line is exactly
  ``FROM mhubai/base:latest`` and no other line starts with ``FROM``; no line starts with
  ``ADD``, ``COPY`` or ``WORKDIR``; the lines ``ARG MHUB_MODELS_REPO`` and
  ``RUN buildutils/import_mhub_model.sh <name> ${MHUB_MODELS_REPO}`` are present; the
  second-to-last line is ``ENTRYPOINT ["mhub.run"]``, the last ``CMD ["--workflow", "default"]``
  (or ``CMD ["--config", "/app/models/<name>/config/default.yml"]``).
* meta.json: the schema's required fields and types (see :func:`check_meta`), ``name`` equal to
  the folder name, and the prose rules: summary description at most 200 characters, 50 to 500
  words in each info section's text.
* mhub.toml: ``[model.deployment] test`` is a Zenodo record URL (``https://zenodo.org/records/...``)
  of a published record: a URL still marked ``PLACEHOLDER`` is an error (MHub's own check cannot
  download the test data and ends in ``CHECK DISRUPTED``).

Only the standard library is used (tomllib: Python >= 3.11; on 3.10 mhub.toml is read by a
minimal parser for the one table MHub reads).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

FROM_LINE = "FROM mhubai/base:latest"
ENTRYPOINT_LINE = 'ENTRYPOINT ["mhub.run"]'
ZENODO_RECORDS = "https://zenodo.org/records/"
PLACEHOLDER_MARK = "PLACEHOLDER"
_UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$", re.I)
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_URI = re.compile(r"^[a-z][a-z0-9+.-]*://\S+$", re.I)
_INPUT_KEYS = {"label": str, "description": str, "format": str, "modality": str, "bodypartexamined": str,
               "slicethickness": str, "non-contrast": bool, "contrast": bool}


# --------------------------------------------------------------------------- Dockerfile


def check_dockerfile(text: str, name: str) -> list[str]:
    """Problems of an MHub model Dockerfile (empty list: compliant)."""
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return ["Dockerfile is empty"]
    problems = []
    if lines[0].strip() != FROM_LINE:
        problems.append(f"first line must be exactly '{FROM_LINE}', not '{lines[0]}'")
    for i, line in enumerate(lines):
        for word in ("ADD", "COPY", "WORKDIR"):
            if line.startswith(word):
                problems.append(f"forbidden instruction: '{line}'")
        if line.startswith("FROM") and i > 0:
            problems.append(f"a second FROM: '{line}'")
    if "ARG MHUB_MODELS_REPO" not in lines:
        problems.append("missing the line 'ARG MHUB_MODELS_REPO'")
    run = f"RUN buildutils/import_mhub_model.sh {name} ${{MHUB_MODELS_REPO}}"
    if run not in lines:
        problems.append(f"missing the line '{run}'")
    if len(lines) < 2 or lines[-2].strip() != ENTRYPOINT_LINE:
        problems.append(f"second-to-last line must be '{ENTRYPOINT_LINE}', not '{lines[-2] if len(lines) > 1 else ''}'")
    cmds = ('CMD ["--workflow", "default"]', f'CMD ["--config", "/app/models/{name}/config/default.yml"]')
    if lines[-1].strip() not in cmds:
        problems.append(f"last line must be '{cmds[0]}', not '{lines[-1]}'")
    return problems


# --------------------------------------------------------------------------- meta.json


def _typed(obj: Any, key: str, typ: type, where: str, problems: list[str]) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        problems.append(f"{where}: missing '{key}'")
        return None
    value = obj[key]
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        problems.append(f"{where}.{key}: must be {typ.__name__}, not {type(value).__name__}")
        return None
    return value


def _uri(value: Any, where: str, problems: list[str]) -> None:
    if not isinstance(value, str) or not _URI.match(value):
        problems.append(f"{where}: not a URI: {value!r}")


def _words(text: str) -> int:
    return len(text.split())


def check_meta(meta: Any, name: str) -> list[str]:
    """Problems of an MHub meta.json (already parsed): schema and prose rules."""
    p: list[str] = []
    if not isinstance(meta, dict):
        return ["meta.json: not an object"]
    mid = _typed(meta, "id", str, "meta", p)
    if mid is not None and not _UUID4.match(mid):
        p.append(f"meta.id: not a version-4 UUID: {mid!r}")
    mname = _typed(meta, "name", str, "meta", p)
    if mname is not None:
        if not re.fullmatch(r"[a-z0-9_]+", mname):
            p.append(f"meta.name: only lower-case letters, digits and '_': {mname!r}")
        if mname != name:
            p.append(f"meta.name {mname!r} differs from the folder name {name!r}")
    _typed(meta, "title", str, "meta", p)

    summary = _typed(meta, "summary", dict, "meta", p) or {}
    desc = _typed(summary, "description", str, "summary", p)
    if desc is not None and len(desc) > 200:
        p.append(f"summary.description: {len(desc)} characters, at most 200")
    inputs = _typed(summary, "inputs", list, "summary", p) or []
    for k, item in enumerate(inputs):
        for key, typ in _INPUT_KEYS.items():
            _typed(item, key, typ, f"summary.inputs[{k}]", p)
        if isinstance(item, dict) and isinstance(item.get("description"), str) and len(item["description"]) > 200:
            p.append(f"summary.inputs[{k}].description: more than 200 characters")
    outputs = _typed(summary, "outputs", list, "summary", p) or []
    for k, item in enumerate(outputs):
        kind = item.get("type") if isinstance(item, dict) else None
        need = {"Segmentation": {"classes": list}, "Classification": {"classes": list},
                "Prediction": {"valueType": str, "label": str, "description": str}}.get(kind)
        if need is None:
            p.append(f"summary.outputs[{k}].type: one of Segmentation, Prediction, Classification, not {kind!r}")
            continue
        for key, typ in need.items():
            _typed(item, key, typ, f"summary.outputs[{k}]", p)
    model = _typed(summary, "model", dict, "summary", p) or {}
    _typed(model, "architecture", str, "summary.model", p)
    if _typed(model, "training", str, "summary.model", p) not in (None, "supervised", "semi-supervised", "unsupervised", "other"):
        p.append(f"summary.model.training: not an allowed value: {model['training']!r}")
    if _typed(model, "cmpapproach", str, "summary.model", p) not in (None, "2D", "3D", "ensemble"):
        p.append(f"summary.model.cmpapproach: not an allowed value: {model['cmpapproach']!r}")
    data = _typed(summary, "data", dict, "summary", p) or {}
    for part in ("training", "evaluation"):
        sub = _typed(data, part, dict, "summary.data", p)
        if sub and "vol_samples" in sub:
            _typed(sub, "vol_samples", int, f"summary.data.{part}", p)
    _typed(data, "public", bool, "summary.data", p)
    _typed(data, "external", bool, "summary.data", p)

    details = _typed(meta, "details", dict, "meta", p) or {}
    for key in ("name", "devteam", "type", "cite"):
        _typed(details, key, str, "details", p)
    version = _typed(details, "version", str, "details", p)
    if version is not None and not re.fullmatch(r"\d+(\.\d+)*", version):
        p.append(f"details.version: digits and dots only: {version!r}")
    dates = _typed(details, "date", dict, "details", p) or {}
    for key, value in dates.items():
        if key in ("weights", "code", "pub") and not (isinstance(value, str) and _DATE.match(value)):
            p.append(f"details.date.{key}: not a date YYYY-MM-DD: {value!r}")
    lic = _typed(details, "license", dict, "details", p) or {}
    for key in ("code", "weights"):
        if key in lic and not isinstance(lic[key], str):
            p.append(f"details.license.{key}: must be a string")
    pubs = _typed(details, "publications", list, "details", p) or []
    for k, pub in enumerate(pubs):
        _typed(pub, "title", str, f"details.publications[{k}]", p)
        _uri(pub.get("uri") if isinstance(pub, dict) else None, f"details.publications[{k}].uri", p)
    _uri(_typed(details, "github", str, "details", p), "details.github", p)
    for key in ("zenodo", "colab"):
        if key in details:
            _uri(details[key], f"details.{key}", p)
    if "slicer" in details and not isinstance(details["slicer"], bool):
        p.append("details.slicer: must be a boolean")

    info = _typed(meta, "info", dict, "meta", p) or {}
    for section in ("use", "analyses", "evaluation", "training", "ethics", "limitations"):
        required = section in ("use", "analyses", "evaluation", "training")
        if section not in info:
            if required:
                p.append(f"info: missing '{section}'")
            continue
        sec = info[section]
        _typed(sec, "title", str, f"info.{section}", p)
        text = _typed(sec, "text", str, f"info.{section}", p)
        if text is not None and not 50 <= _words(text) <= 500:
            p.append(f"info.{section}.text: {_words(text)} words, 50 to 500 expected")
        for k, ref in enumerate(sec.get("references", []) if isinstance(sec, dict) else []):
            _typed(ref, "label", str, f"info.{section}.references[{k}]", p)
            _uri(ref.get("uri") if isinstance(ref, dict) else None, f"info.{section}.references[{k}].uri", p)
        for k, table in enumerate(sec.get("tables", []) if isinstance(sec, dict) else []):
            _typed(table, "label", str, f"info.{section}.tables[{k}]", p)
            entries = _typed(table, "entries", dict, f"info.{section}.tables[{k}]", p) or {}
            if not all(isinstance(v, str) for v in entries.values()):
                p.append(f"info.{section}.tables[{k}].entries: values must be strings")
    return p


# --------------------------------------------------------------------------- mhub.toml


def read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10: the one table MHub reads, key = "string" lines only
        out: dict[str, Any] = {}
        table: dict[str, Any] = out
        for line in path.read_text("utf-8").splitlines():
            line = line.strip()
            if line.startswith("#"):
                continue
            if line.startswith("[") and line.endswith("]"):
                table = out
                for part in line[1:-1].split("."):
                    table = table.setdefault(part.strip(), {})
            elif "=" in line:
                key, value = line.split("=", 1)
                table[key.strip()] = value.strip().strip('"')
        return out
    with open(path, "rb") as f:
        return tomllib.load(f)


def test_url(toml: dict[str, Any]) -> Any:
    return toml.get("model", {}).get("deployment", {}).get("test")


def check_toml(toml: dict[str, Any]) -> list[str]:
    url = test_url(toml)
    if not isinstance(url, str):
        return ["mhub.toml: missing [model.deployment] test"]
    if not url.startswith(ZENODO_RECORDS) or not _URI.match(url):
        return [f"mhub.toml: the test URL must be a Zenodo record ({ZENODO_RECORDS}...), not {url!r}"]
    if PLACEHOLDER_MARK in url:
        return [f"mhub.toml: the test URL is a {PLACEHOLDER_MARK}, not an uploaded Zenodo record ({url!r}): "
                "MHub cannot test the model until the test data zip is uploaded (README, MHub test data)"]
    return []


# --------------------------------------------------------------------------- the folder


def check_folder(folder: Path) -> list[str]:
    """Every problem of an MHub model folder ``models/<name>``."""
    folder = Path(folder)
    name = folder.name
    p = []
    for rel in ("dockerfiles/Dockerfile", "config/default.yml", "meta.json", "mhub.toml"):
        if not (folder / rel).is_file():
            p.append(f"missing {rel}")
    for py in folder.rglob("*.py"):
        if py.relative_to(folder).parts[0] != "utils":
            p.append(f"Python module outside utils/: {py.relative_to(folder)}")
    if (folder / "dockerfiles/Dockerfile").is_file():
        p += check_dockerfile((folder / "dockerfiles/Dockerfile").read_text("utf-8"), name)
    if (folder / "meta.json").is_file():
        try:
            meta = json.loads((folder / "meta.json").read_text("utf-8"))
        except ValueError as e:
            p.append(f"meta.json is not JSON: {e}")
        else:
            p += check_meta(meta, name)
    if (folder / "mhub.toml").is_file():
        p += check_toml(read_toml(folder / "mhub.toml"))
    return p


def main(argv: list[str]) -> int:
    folder = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "models" / "cxr_lung_risk"
    problems = check_folder(folder)
    for line in problems:
        print(f"{folder}: {line}")
    if not problems:
        print(f"{folder}: complies with MHub's model rules")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
