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

What a user sees (``docker logs``): the CLI's output is streamed to the console line by line as
it runs (its progress, a line at most every 10 s) and logged (level EXTERNAL); then one line per
image skipped on purpose, with the reason. Images are named by the user's own file, its path
relative to the input folder (``source_dir``), in the console, the CSV/JSON ``File`` column and
the error file, not by mhubio's sorted copy (``<SOPInstanceUID>.dcm``): the runner reads the
header of every file under ``source_dir`` once (SeriesInstanceUID, SOPInstanceUID, Modality),
which also says what was found when nothing could be scored.

Errors are surfaced, because mhubio itself logs exceptions and exits 0: a CLI crash or an
image without a result is logged (mhubio's log, ERROR level) and written, one line per image, to
an error file (``error_file``, default ``output_data/cxr_lung_risk_errors.txt``); when nothing
was scored and nothing failed (empty input folder, no radiograph, only images refused on
purpose) that file holds one sentence saying what was found and why nothing was scored. The
final module ``CxrLungRiskStatus`` prints that file and turns it into exit status 1 after the
DataOrganizer ran. Inputs the CLI refuses on purpose (not a frontal chest radiograph) are a
WARNING, not an error, as long as another image was scored.

Only the mhubio API common to mhubio 0.0.2 (PyPI) and 0.0.3 (mhubai/base) is used.
"""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from mhubio.core import IO, ClassOutput, Instance, InstanceData, DataType, Meta, Module, ValueOutput

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


GROUP_DESCRIPTION = (
    "CXR-Lung-Risk group (Weiss et al., Nat Commun 2023): < 65, 65 to < 75 or >= 75 years; a score equal to a "
    "cut-point belongs to the higher group (cut-points in models/cxr_lung_risk.json)"
)
#: the CLI's CXR_Lung_Risk_Group labels (models/cxr_lung_risk.json, risk_groups.labels) = the class IDs
RISK_GROUPS = ("< 65", "65 to < 75", ">= 75")


@ClassOutput.Name("cxr_lung_risk_group")
@ClassOutput.Label("CXR-Lung-Risk group")
@ClassOutput.Description(GROUP_DESCRIPTION)
@ClassOutput.Class(RISK_GROUPS[0], "CXR-Lung-Risk < 65 years", the="lowest risk group (the paper's reference)")
@ClassOutput.Class(RISK_GROUPS[1], "CXR-Lung-Risk 65 to < 75 years", the="intermediate risk group")
@ClassOutput.Class(RISK_GROUPS[2], "CXR-Lung-Risk >= 75 years", the="highest risk group")
class CxrLungRiskGroupOutput(ClassOutput):
    """The CXR-Lung-Risk group of an instance (class ID = the CLI's CXR_Lung_Risk_Group label)."""


def patient_id(path: str) -> str:
    """PatientID of the DICOM file ``path``, or of the first DICOM file in folder ``path`` ('' if none)."""
    try:
        import pydicom
    except ImportError:
        return ""
    files = [path] if os.path.isfile(path) else [os.path.join(path, n) for n in sorted(os.listdir(path))] if os.path.isdir(path) else []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["PatientID"])
            return str(ds.get("PatientID", "") or "")
        except Exception:
            continue
    return ""


def resolve_cli(configured: str) -> str:
    """Path of our CLI: workflow config ``cli`` > $CXR_LUNG_RISK_CLI > PATH > /app/venv."""
    for cand in (configured, os.environ.get(CLI_ENV, "")):
        if cand:
            return cand
    found = shutil.which("cxr-lung-risk")
    return found or CLI_DOCKER_DEFAULT


def clean_env() -> dict:
    """Environment for the CLI: without the mhubio venv's Python settings (other venv); its
    output unbuffered, so that each line reaches the console when it is written."""
    env = dict(os.environ)
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
        env.pop(key, None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def console(line: str) -> None:
    """One line on the process's real stderr (``docker logs``), whatever mhubio did to sys.stderr."""
    stream = sys.__stderr__ or sys.stderr
    try:
        stream.write(line.rstrip("\n") + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass


def strip_status(reason: str) -> str:
    """The CLI's reason without its leading status word ("skipped: ...", "failed: ...")."""
    for word in ("skipped: ", "failed: "):
        if reason.startswith(word):
            return reason[len(word):]
    return reason


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def scan_inputs(source: str) -> dict:
    """What the input folder holds: its files (relative paths, sorted), what kind each is
    (DICOM modality, PNG/JPEG, not DICOM) and, for DICOM, (series, SOP) -> relative path.
    Headers only (pydicom, from the mhubio environment)."""
    found = {"files": [], "kinds": {}, "by_uid": {}, "kind_of": {}}
    if not os.path.isdir(source):
        return found
    try:
        import pydicom
    except ImportError:  # cannot name the kinds: count the files only
        pydicom = None
    for root, dirs, files in os.walk(source):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, source).replace(os.sep, "/")
            found["files"].append(rel)
            if name.lower().endswith(IMAGE_EXTENSIONS):
                kind = "PNG/JPEG"
            elif pydicom is None:
                kind = "file"
            else:
                try:
                    ds = pydicom.dcmread(path, stop_before_pixels=True,
                                         specific_tags=["SeriesInstanceUID", "SOPInstanceUID", "Modality"])
                    kind = str(ds.get("Modality", "") or "DICOM without Modality")
                    sop = str(ds.get("SOPInstanceUID", "") or "")
                    if sop:
                        found["by_uid"].setdefault((str(ds.get("SeriesInstanceUID", "") or ""), sop), rel)
                        found["by_uid"].setdefault(("", sop), rel)
                except Exception:
                    kind = "not DICOM"
            found["kinds"][kind] = found["kinds"].get(kind, 0) + 1
            found["kind_of"][rel] = kind
    return found


def dicom_key(path: str) -> tuple:
    """(SeriesInstanceUID, SOPInstanceUID) of a DICOM file; ("", "") when unreadable."""
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SOPInstanceUID"])
        return str(ds.get("SeriesInstanceUID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")
    except Exception:
        return "", ""


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
@IO.Config("source_dir", str, "input_data", the="the user's input folder (relative to general.data_base_dir): images are named by their path in it")
class CxrLungRiskRunner(Module):

    cli: str
    weights: str
    device: str
    batch_size: int
    input_query: str
    extra_args: list
    error_file: str
    source_dir: str

    def task(self) -> None:
        self._results = {}  # instance id -> {"status", "reason", "rows", "json", "files"}
        self._errors = []
        self._skipped = []  # (user file, reason)
        self._radiographs = 0  # files given to the CLI
        self._printed = False  # lines printed on the console
        err_path = os.path.join(self.config.data.abspath, self.error_file)
        if os.path.isfile(err_path):
            os.remove(err_path)
        self._source = os.path.join(self.config.data.abspath, self.source_dir)
        self._found = scan_inputs(self._source)

        work = tempfile.mkdtemp(prefix="cxr_lung_risk_", dir=self.config.data.abspath)
        try:
            self.run_once(work)
            # mhubio's progress display redraws itself by erasing its own lines upwards: blank
            # lines for it to erase keep the lines printed above on a terminal
            logger = getattr(self.config, "logger", None)
            if logger is not None and getattr(logger, "showProgress", False) and self._printed:
                console("\n" * (len(getattr(logger, "steps", [])) - 1))
            self.map_instance()
        finally:
            shutil.rmtree(work, ignore_errors=True)

        # instances the per-instance step could not map (it raised: mhubio only logs that)
        for instance in self.config.data.instances:
            res = self._results.get(instance.attr["id"])
            if res is not None and res["status"] == "ok" and not res.get("mapped"):
                self.fail(instance, "its results could not be attached (see the module log)")

        scored = sum(len(r.get("rows", [])) for r in self._results.values() if r.get("status") == "ok" and r.get("mapped"))
        lines = list(self._errors)
        if not scored and not lines:
            lines = [self.nothing_scored()]
            self.log(lines[0], level="ERROR")
        if lines:
            os.makedirs(os.path.dirname(err_path), exist_ok=True)
            with open(err_path, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in lines))

    def nothing_scored(self) -> str:
        """One sentence: what the input folder holds and why nothing was scored."""
        files, kinds = self._found["files"], self._found["kinds"]
        where = os.path.realpath(self._source)
        if not files:
            hint = ""
            if os.path.realpath(self.config.data.abspath) == "/app/data":  # in the container
                hint = (" (mount the folder of your images there: -v /abs/path/in:/app/data/input_data:ro; Docker "
                        "creates an empty folder for a host path that does not exist)")
            return f"nothing scored: the input folder {where} is empty{hint}"
        what = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
        if self._skipped:
            shown = "; ".join(f"{name}: {why}" for name, why in self._skipped[:3])
            more = f"; and {len(self._skipped) - 3} more" if len(self._skipped) > 3 else ""
            return (f"nothing scored: {len(files)} file(s) in {where} ({what}); the {len(self._skipped)} "
                    f"radiograph(s) among them were all skipped: {shown}{more}")
        wanted = "PNG or JPEG image" if not self.input_query.startswith("dicom") else "DICOM radiograph (modality CR or DX)"
        return f"nothing scored: {len(files)} file(s) in {where} ({what}), none of them a {wanted}"

    def user_name(self, instance: Instance, src: str, n_files: int) -> str:
        """The user's name of an input file: its path relative to the input folder."""
        real = os.path.realpath(src)
        source = os.path.realpath(self._source)
        if real.startswith(source + os.sep):
            return os.path.relpath(real, source).replace(os.sep, "/")
        if n_files == 1 and instance.attr.get("source"):
            return str(instance.attr["source"])
        by_uid = self._found["by_uid"]
        if by_uid:
            series, sop = dicom_key(src)
            if sop:
                name = by_uid.get((series, sop)) or by_uid.get(("", sop))
                if name:
                    return name
        return os.path.basename(src)

    # -- the heavy part: once per workflow run ---------------------------------------------

    def run_once(self, work: str) -> None:
        staging = os.path.join(work, "in")
        out = os.path.join(work, "out")
        os.makedirs(staging)

        # collect every instance's input files; stage them as <k>/<name>, k the instance's rank in
        # the order of the user's file names: the CLI then batches the files as `cxr-lung-risk
        # predict` does on the input folder (discovery sorts by path), whatever order mhubio's
        # importer listed the instances in. A score's last float32 bits depend on an image's place
        # in its batch (README, Outputs), so this order makes the module's scores reproducible
        # and equal to the CLI's on the same folder.
        found = []
        for instance in self.config.data.instances:
            items = instance.data.filter(self.input_query)
            if len(items) == 0:
                continue
            files = [p for item in items for p in sorted_files(item.abspath)]
            if not files:
                self.fail(instance, "its input data has no files")
                continue
            users = [self.user_name(instance, src, len(files)) for src in files]
            order = sorted(range(len(files)), key=lambda i: users[i])
            found.append((instance, [files[i] for i in order], [users[i] for i in order]))
        found.sort(key=lambda entry: entry[2])
        width = len(str(max(len(found) - 1, 0)))
        prefixes = {}
        for k, (instance, files, user_list) in enumerate(found):
            prefix = str(k).zfill(width)
            os.makedirs(os.path.join(staging, prefix))
            names = {}
            users = {}
            rank = len(str(len(files) - 1))
            for j, (src, user) in enumerate(zip(files, user_list)):
                # several files: ranked names keep the user's order in the CLI's sorted walk
                name = os.path.basename(src) if len(files) == 1 else f"{j:0{rank}d}_{os.path.basename(src)}"
                names[name] = src
                users[name] = user
                dst = os.path.join(staging, prefix, name)
                try:
                    os.symlink(os.path.abspath(src), dst)
                except OSError:
                    shutil.copyfile(src, dst)
            prefixes[prefix] = (instance, names, users)

        if not prefixes:
            self.log(f"no instance has input data matching '{self.input_query}': nothing to score", level="WARNING")
            return
        self.report_left_out({u for _, _, users in prefixes.values() for u in users.values()})
        self._radiographs = sum(len(names) for _, names, _ in prefixes.values())

        cli = resolve_cli(self.cli)
        cmd = [cli, "predict", staging, "--out", out, "--format", "csv,sr,json", "--deterministic",
               "--device", self.device, "--batch-size", str(self.batch_size)]
        if self.weights:
            cmd += ["--weights", self.weights]
        cmd += [str(a) for a in self.extra_args]
        self.log("running: " + " ".join(cmd), level="NOTICE")
        rename = self.renamer(staging, out, prefixes)
        lines = []
        try:
            # streamed: the CLI's progress reaches the console (docker logs) while it runs
            with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                  env=clean_env(), errors="replace") as proc:
                for line in proc.stdout:
                    line = rename(line.rstrip())
                    if line.strip():
                        lines.append(line)
                        console(line)
                        self._printed = True
                        self.log(line, level="EXTERNAL")
            code = proc.returncode
        except OSError as e:
            code = None
            lines.append(f"cannot run {cli}: {e.strerror or e}")
        cli_msg = (lines or ["(no message)"])[-1]

        records = read_records(os.path.join(out, RECORDS_NAME))
        header, rows = read_csv(os.path.join(out, CSV_NAME))
        json_rows = []
        if os.path.isfile(os.path.join(out, JSON_NAME)):
            with open(os.path.join(out, JSON_NAME), encoding="utf-8") as f:
                json_rows = json.load(f)
        if code not in (0, 1, 2) or not records:
            for instance, names, users in prefixes.values():
                self.fail(instance, f"the cxr-lung-risk CLI failed (exit status {code}): {cli_msg}", sorted(users.values()))
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

        for prefix, (instance, names, users) in prefixes.items():
            got = by_prefix[prefix]
            user = lambda rest: users.get(rest, rest)  # noqa: E731
            statuses = {rest: r.get("status", "") for rest, r in got["records"]}
            missing = sorted(set(names) - set(statuses))
            failed = sorted(n for n, s in statuses.items() if s not in ("ok", "skipped"))
            for rest, r in got["records"]:
                if r.get("status") == "skipped":
                    why = strip_status(r.get("reason", ""))
                    self._skipped.append((user(rest), why))
                    console(f"cxr-lung-risk: {user(rest)}: skipped: {why}")
                    self._printed = True
            if missing or failed:
                for rest, r in got["records"]:
                    if rest in failed:
                        self.fail(instance, strip_status(r.get("reason", "")) or f"status {r.get('status')}", [user(rest)])
                for rest in missing:
                    self.fail(instance, "the CLI gave no result for it", [user(rest)])
                continue
            ok_rows = [(rest, r) for rest, r in got["rows"] if statuses.get(rest) == "ok"]
            if not ok_rows:
                reasons = [f"{user(rest)}: {r.get('reason', '')}" for rest, r in got["records"] if r.get("status") != "ok"]
                self._results[instance.attr["id"]] = {"status": "skipped", "reason": "; ".join(reasons)}
                self.log(f"instance {instance.attr.get('sid', '')} not scored: {'; '.join(reasons)}", level="WARNING")
                continue
            srs = []
            for rest, rec in got["records"]:
                if rec.get("status") != "ok":
                    continue
                written = rec.get("outputs", {}).get("sr", [])
                if rec.get("sop_uid") and not written:
                    self.fail(instance, "no SR was written for it", [user(rest)])
                for rel in written:
                    srs.append((os.path.basename(rel), os.path.join(out, rel)))
            self._results[instance.attr["id"]] = {
                "status": "ok",
                "header": header,
                "rows": [dict(r, File=user(rest)) for rest, r in ok_rows],
                "json": [dict(r, File=user(rest)) for rest, r in got["json"] if statuses.get(rest) == "ok"],
                "srs": srs,
            }

    def report_left_out(self, given: set, at_most: int = 20) -> None:
        """One console line per file of the input folder that never reached the model (mhubio's
        importer and filter left it out: another modality, not DICOM), with why; the first
        ``at_most`` of them, then a count. (When no file reaches the model, the nothing-scored
        sentence says what was found instead.)"""
        dicom = self.input_query.startswith("dicom")
        left = [(rel, kind) for rel, kind in self._found["kind_of"].items() if rel not in given]
        for rel, kind in left[:at_most]:
            if kind == "not DICOM":
                why = "not readable as DICOM" if dicom else "not a PNG or JPEG file"
            elif kind == "PNG/JPEG":
                why = "a PNG/JPEG file (this workflow reads DICOM; --workflow png reads images)" if dicom else "not read"
            elif kind == "DICOM without Modality":
                why = "no Modality in its header (incomplete DICOM?), not a radiograph (CR or DX)"
            elif dicom:
                why = f"modality {kind}, not a radiograph (CR or DX)"
            else:
                why = f"DICOM ({kind}), not a PNG or JPEG file"
            console(f"cxr-lung-risk: {rel}: skipped: {why}")
            self.log(f"{rel}: skipped: {why}", level="WARNING")
        if len(left) > at_most:
            console(f"cxr-lung-risk: ... and {len(left) - at_most} more file(s) that are not {'CR/DX DICOM' if dicom else 'PNG/JPEG'}")
        self._printed = self._printed or bool(left)

    def renamer(self, staging: str, out: str, prefixes: dict):
        """A function rewriting a CLI output line: staged files by the user's names, the
        staging and output folders by what the user knows."""
        table = {}
        for prefix, (_, names, users) in prefixes.items():
            for name in names:
                table[os.path.join(staging, prefix, name)] = users[name]
                table[f"{prefix}/{name}"] = users[name]
        table[out] = os.path.realpath(os.path.join(self.config.data.abspath, "output_data"))
        table[staging] = self._source
        keys = sorted(table, key=len, reverse=True)
        if not keys:
            return lambda line: line
        pattern = re.compile(r"(?<![\w./-])(" + "|".join(re.escape(k) for k in keys) + r")(?![\w.-])")
        return lambda line: pattern.sub(lambda m: table[m.group(1)], line)

    # -- per instance: map the results back (cheap) ----------------------------------------

    @IO.Instance()
    @IO.Input("in_data", lambda self: self.input_query, the="the chest radiograph(s) of this instance")
    @IO.Output("csv_out", CSV_NAME, "csv:model=cxr_lung_risk", data="in_data", bundle="cxr_lung_risk", the="CXR-Lung-Risk table (one row per scored image)")
    @IO.Output("json_out", JSON_NAME, "json:model=cxr_lung_risk", data="in_data", bundle="cxr_lung_risk", the="CXR-Lung-Risk rows as JSON")
    @IO.OutputData("risk", CxrLungRiskOutput, data="in_data", the=RISK_DESCRIPTION)
    @IO.OutputData("group", CxrLungRiskGroupOutput, data="in_data", the=GROUP_DESCRIPTION)
    def map_instance(self, instance: Instance, in_data: InstanceData, csv_out: InstanceData, json_out: InstanceData, risk: CxrLungRiskOutput,
                     group: CxrLungRiskGroupOutput) -> None:
        res = self._results.get(instance.attr["id"])
        risk.value = None
        group.value = None
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
        label = first.get("CXR_Lung_Risk_Group")
        group.value = label if label in RISK_GROUPS else None
        # the per-instance and the cohort-wide reports name the patient (DICOM workflow; PNG: '')
        instance.attr["PatientID"] = patient_id(in_data.abspath)
        res["mapped"] = True

    # -- errors --------------------------------------------------------------------------------

    def fail(self, instance: Instance, reason: str, files: list = ()) -> None:
        """An image (or, without ``files``, an instance) that could not be scored: one line per
        file, named by the user's file, with the instance (series) for reference."""
        sid = instance.attr.get("sid", instance.attr.get("id", "?"))
        self._results[instance.attr["id"]] = {"status": "failed", "reason": reason}
        for name in list(files) or [f"instance {sid}"]:
            msg = f"{name}: failed: {reason} (instance {sid})"
            self._errors.append(msg)
            self.log(msg, level="ERROR")
