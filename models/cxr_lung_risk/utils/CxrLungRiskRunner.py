"""
MHub module: CXR-Lung-Risk runner (one subprocess call per workflow run).

The mhubio environment (pydicom 2.x) cannot import our package (pydicom 3, highdicom), so this
module calls our command-line tool, installed in its own virtual environment, as a subprocess:

    <cli> predict <staging dir> --out <dir> --format csv,sr,json --deterministic ...

Design: ``task()`` runs once per workflow step. It first collects the input file(s) of *every*
instance (symlinked into ``<staging>/<k>/`` so that each CLI result row maps back to its
instance through its ``File`` column), runs the CLI *once* (the networks are loaded once per
workflow run, not once per image), and only then maps the results back to each instance with
the per-instance ``@IO.Instance()`` method ``map_instance`` (SR files, a CSV and a JSON per
instance, and the ``ValueOutput`` ``cxr_lung_risk`` that mhubio's ``ReportExporter`` exports).
Which files the CLI wrote for each input is read from its ``records.jsonl``, never re-derived.
Nothing is printed: the CLI's own output is captured and logged (level EXTERNAL).

Errors are surfaced, because mhubio itself logs exceptions and exits 0: a CLI crash or an
instance without a result is logged (mhubio's log, ERROR level) and appended to an error
file (``error_file``, default ``output_data/cxr_lung_risk_errors.txt``); the final module
``CxrLungRiskStatus`` turns that file into a non-zero exit status after the DataOrganizer ran.
Inputs the CLI refuses on purpose (not a frontal chest radiograph) are a WARNING, not an error.

Only the mhubio API common to mhubio 0.0.2 (PyPI) and 0.0.3 (mhubai/base) is used.
"""

import csv
import json
import os
import shutil
import subprocess
import tempfile

from mhubio.core import IO, Instance, InstanceData, DataType, Meta, Module, ValueOutput

ERROR_FILE_DEFAULT = "output_data/cxr_lung_risk_errors.txt"
CLI_ENV = "CXR_LUNG_RISK_CLI"
CLI_DOCKER_DEFAULT = "/app/venv/bin/cxr-lung-risk"
CSV_NAME = "cxr_lung_risk.csv"
JSON_NAME = "cxr_lung_risk.json"
MANIFEST_NAME = "manifest.csv"
RECORDS_NAME = "records.jsonl"


RISK_DESCRIPTION = (
    "CXR-Lung-Risk: lung-disease mortality risk estimated from a frontal chest radiograph, in years "
    "(unit a); higher means higher risk (Weiss et al., Nat Commun 2023)"
)


@ValueOutput.Name("cxr_lung_risk")
@ValueOutput.Meta(Meta(model="cxr_lung_risk", unit="a"))
@ValueOutput.Label("CXR-Lung-Risk")
@ValueOutput.Type(float)
@ValueOutput.Description(RISK_DESCRIPTION)
class CxrLungRiskOutput(ValueOutput):
    """The CXR-Lung-Risk value (years) of an instance, exported by mhubio's ReportExporter."""


def resolve_cli(configured: str) -> str:
    """Path of our CLI: workflow config ``cli`` > $CXR_LUNG_RISK_CLI > PATH > /app/venv."""
    for cand in (configured, os.environ.get(CLI_ENV, "")):
        if cand:
            return cand
    found = shutil.which("cxr-lung-risk")
    return found or CLI_DOCKER_DEFAULT


def clean_env() -> dict:
    """Environment for the CLI: without the mhubio venv's Python settings (other venv)."""
    env = dict(os.environ)
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
        env.pop(key, None)
    return env


def read_csv(path: str) -> tuple:
    """(header, rows as dicts of the CLI's exact text) of a CSV file; ([], []) when absent."""
    if not os.path.isfile(path):
        return [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def read_records(path: str) -> list:
    """The CLI's per-input records (records.jsonl: status, reason, UIDs, files written); [] when absent."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def sorted_files(path: str) -> list:
    """The files of a data item: the file itself, or a folder's files (recursive, sorted)."""
    if os.path.isfile(path):
        return [path]
    found = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            found.append(os.path.join(root, name))
    return found


@IO.Config("cli", str, "", the="path of the cxr-lung-risk CLI in its own venv (default: $CXR_LUNG_RISK_CLI, PATH, /app/venv/bin/cxr-lung-risk)")
@IO.Config("weights", str, "", the="CXR-Lung-Risk weights folder or zip (default: the CLI's fetch-weights cache)")
@IO.Config("device", str, "auto", the="compute device: auto, cpu or cuda")
@IO.Config("batch_size", int, 16, the="images per batch")
@IO.Config("input_query", str, "dicom:mod=cr|dx", the="data type query of the input images (one data item per instance)")
@IO.Config("extra_args", list, [], the="further CLI arguments, e.g. ['--allow-lateral'] or ['--im-version', '6.9.11']")
@IO.Config("error_file", str, ERROR_FILE_DEFAULT, the="error file (relative to general.data_base_dir) listing failed instances")
class CxrLungRiskRunner(Module):

    cli: str
    weights: str
    device: str
    batch_size: int
    input_query: str
    extra_args: list
    error_file: str

    def task(self) -> None:
        self._results = {}  # instance id -> {"status", "reason", "rows", "json", "files"}
        self._errors = []
        err_path = os.path.join(self.config.data.abspath, self.error_file)
        if os.path.isfile(err_path):
            os.remove(err_path)

        work = tempfile.mkdtemp(prefix="cxr_lung_risk_", dir=self.config.data.abspath)
        try:
            self.run_once(work)
            self.map_instance()
        finally:
            shutil.rmtree(work, ignore_errors=True)

        # instances the per-instance step could not map (it raised: mhubio only logs that)
        for instance in self.config.data.instances:
            res = self._results.get(instance.attr["id"])
            if res is not None and res["status"] == "ok" and not res.get("mapped"):
                self.fail(instance, "its results could not be attached (see the module log)")

        if self._errors:
            os.makedirs(os.path.dirname(err_path), exist_ok=True)
            with open(err_path, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in self._errors))

    # -- the heavy part: once per workflow run ---------------------------------------------

    def run_once(self, work: str) -> None:
        staging = os.path.join(work, "in")
        out = os.path.join(work, "out")
        os.makedirs(staging)

        # collect every instance's input files; stage them as <k>/<name> (k = instance index)
        prefixes = {}
        for k, instance in enumerate(self.config.data.instances):
            items = instance.data.filter(self.input_query)
            if len(items) == 0:
                continue
            files = [p for item in items for p in sorted_files(item.abspath)]
            if not files:
                self.fail(instance, "its input data has no files")
                continue
            prefix = str(k)
            os.makedirs(os.path.join(staging, prefix))
            names = {}
            for src in files:
                name = os.path.basename(src)
                while name in names:
                    name = "_" + name
                names[name] = src
                dst = os.path.join(staging, prefix, name)
                try:
                    os.symlink(os.path.abspath(src), dst)
                except OSError:
                    shutil.copyfile(src, dst)
            prefixes[prefix] = (instance, names)

        if not prefixes:
            self.log(f"no instance has input data matching '{self.input_query}': nothing to score", level="WARNING")
            return

        cli = resolve_cli(self.cli)
        cmd = [cli, "predict", staging, "--out", out, "--format", "csv,sr,json", "--deterministic",
               "--device", self.device, "--batch-size", str(self.batch_size)]
        if self.weights:
            cmd += ["--weights", self.weights]
        cmd += [str(a) for a in self.extra_args]
        self.log("running: " + " ".join(cmd), level="NOTICE")
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
            code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except OSError as e:
            code, stdout, stderr = None, "", f"cannot run {cli}: {e.strerror or e}"
        for line in (stdout + stderr).splitlines():
            if line.strip():
                self.log(line.rstrip(), level="EXTERNAL")
        cli_msg = (stderr.strip().splitlines() or ["(no message)"])[-1]

        records = read_records(os.path.join(out, RECORDS_NAME))
        header, rows = read_csv(os.path.join(out, CSV_NAME))
        json_rows = []
        if os.path.isfile(os.path.join(out, JSON_NAME)):
            with open(os.path.join(out, JSON_NAME), encoding="utf-8") as f:
                json_rows = json.load(f)
        if code not in (0, 1, 2) or not records:
            for instance, _ in prefixes.values():
                self.fail(instance, f"the cxr-lung-risk CLI failed (exit status {code}): {cli_msg}")
            return

        # the CLI's records say, per input file, its status and every file written for it
        by_prefix = {p: {"records": [], "rows": [], "json": []} for p in prefixes}
        for rec in records:
            prefix, _, rest = str(rec.get("file", "")).partition("/")
            if prefix in by_prefix:
                by_prefix[prefix]["records"].append((rest, rec))
        for kind, table in (("rows", rows), ("json", json_rows)):
            for row in table:
                prefix, _, rest = str(row.get("File", "")).partition("/")
                if prefix in by_prefix:
                    by_prefix[prefix][kind].append((rest, row))

        for prefix, (instance, names) in prefixes.items():
            got = by_prefix[prefix]
            statuses = {rest: r.get("status", "") for rest, r in got["records"]}
            reasons = [f"{rest}: {r.get('reason', '')}" for rest, r in got["records"] if r.get("status") != "ok"]
            missing = sorted(set(names) - set(statuses))
            failed = sorted(n for n, s in statuses.items() if s not in ("ok", "skipped"))
            if missing or failed:
                why = "; ".join(reasons) or f"no result for {', '.join(missing)}"
                self.fail(instance, why)
                continue
            ok_rows = [(rest, r) for rest, r in got["rows"] if statuses.get(rest) == "ok"]
            if not ok_rows:
                self._results[instance.attr["id"]] = {"status": "skipped", "reason": "; ".join(reasons)}
                self.log(f"instance {instance.attr.get('sid', '')} not scored: {'; '.join(reasons)}", level="WARNING")
                continue
            srs = []
            for rest, rec in got["records"]:
                if rec.get("status") != "ok":
                    continue
                written = rec.get("outputs", {}).get("sr", [])
                if rec.get("sop_uid") and not written:
                    self.fail(instance, f"no SR was written for {rest}")
                for rel in written:
                    srs.append((os.path.basename(rel), os.path.join(out, rel)))
            self._results[instance.attr["id"]] = {
                "status": "ok",
                "header": header,
                "rows": [dict(r, File=rest) for rest, r in ok_rows],
                "json": [dict(r, File=rest) for rest, r in got["json"] if statuses.get(rest) == "ok"],
                "srs": srs,
            }

    # -- per instance: map the results back (cheap) ----------------------------------------

    @IO.Instance()
    @IO.Input("in_data", lambda self: self.input_query, the="the chest radiograph(s) of this instance")
    @IO.Output("csv_out", CSV_NAME, "csv:model=cxr_lung_risk", data="in_data", bundle="cxr_lung_risk", the="CXR-Lung-Risk table (one row per scored image)")
    @IO.Output("json_out", JSON_NAME, "json:model=cxr_lung_risk", data="in_data", bundle="cxr_lung_risk", the="CXR-Lung-Risk rows as JSON")
    @IO.OutputData("risk", CxrLungRiskOutput, data="in_data", the=RISK_DESCRIPTION)
    def map_instance(self, instance: Instance, in_data: InstanceData, csv_out: InstanceData, json_out: InstanceData, risk: CxrLungRiskOutput) -> None:
        res = self._results.get(instance.attr["id"])
        risk.value = None
        if res is None or res["status"] != "ok":
            return  # refused (warning logged) or failed (error logged): no outputs

        with open(csv_out.abspath, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=res["header"], lineterminator="\n")
            writer.writeheader()
            writer.writerows(res["rows"])
        with open(json_out.abspath, "w", encoding="utf-8") as f:
            json.dump(res["json"], f, indent=2)
            f.write("\n")

        bundle = instance.getDataBundle("cxr_lung_risk")
        for name, src in res["srs"]:
            sr_data = InstanceData(os.path.join("sr", name), DataType.fromString("dicom:mod=sr:model=cxr_lung_risk"), instance=instance, bundle=bundle)
            sr_data.dc.makedirs()
            shutil.copyfile(src, sr_data.abspath)
            sr_data.confirm()

        first = res["json"][0] if res["json"] else {}
        value = first.get("CXR_Lung_Risk")
        risk.value = float(value) if isinstance(value, (int, float)) else None
        res["mapped"] = True

    # -- errors --------------------------------------------------------------------------------

    def fail(self, instance: Instance, reason: str) -> None:
        sid = instance.attr.get("sid", instance.attr.get("id", "?"))
        msg = f"CXR-Lung-Risk failed for instance {sid}: {reason}"
        self._results[instance.attr["id"]] = {"status": "failed", "reason": reason}
        self._errors.append(msg)
        self.log(msg, level="ERROR")
