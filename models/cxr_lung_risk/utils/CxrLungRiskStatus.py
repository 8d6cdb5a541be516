"""
MHub module: make a failed or empty CXR-Lung-Risk run visible, on the console and in the exit status.

mhubio logs exceptions raised while processing an instance and still exits 0. The runner
(``CxrLungRiskRunner``) therefore writes every failed image, or, when nothing was scored, one
sentence saying what was found and why, to an error file; this module, placed last in the
workflow (after the DataOrganizer, so the results of the other instances are exported first),
prints that file's lines on the console (stderr: ``docker logs``), logs them at ERROR level and
ends the run with exit status 1 when it is not empty. The file itself stays in the output
folder (``output_data/cxr_lung_risk_errors.txt``).

Output ownership: when the run is root's (``docker run`` without ``--user``), what it wrote in
the output folder is given to the owner of that folder (the user who made the folder mounted
at /app/data/output_data), so that the user can remove the results.
"""

import os
import sys

from mhubio.core import IO, Module

ERROR_FILE_DEFAULT = "output_data/cxr_lung_risk_errors.txt"


def console(line: str) -> None:
    """One line on the process's real stderr (``docker logs``), whatever mhubio did to sys.stderr."""
    stream = sys.__stderr__ or sys.stderr
    try:
        stream.write(line.rstrip("\n") + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass


def give_to_folder_owner(folder: str) -> int:
    """Root only: hand every entry under ``folder`` owned by root to the folder's owner (when
    that is not root). Returns the number of entries changed."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not os.path.isdir(folder):
        return 0
    st = os.stat(folder)
    if st.st_uid == 0:
        return 0
    changed = 0
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            try:
                if os.lstat(path).st_uid == 0:
                    os.lchown(path, st.st_uid, st.st_gid)
                    changed += 1
            except OSError:
                pass
    return changed


@IO.Config("error_file", str, ERROR_FILE_DEFAULT, the="error file written by CxrLungRiskRunner (relative to general.data_base_dir)")
@IO.Config("output_dir", str, "output_data", the="the output folder (relative to general.data_base_dir) whose owner gets the results")
class CxrLungRiskStatus(Module):

    error_file: str
    output_dir: str

    def task(self) -> None:
        changed = give_to_folder_owner(os.path.join(self.config.data.abspath, self.output_dir))
        if changed:
            self.log(f"{changed} output file(s) and folder(s) given to the output folder's owner", level="NOTICE")
        path = os.path.join(self.config.data.abspath, self.error_file)
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            self.log("CXR-Lung-Risk: no errors", level="NOTICE")
            return
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
        if len(lines) == 1 and lines[0].startswith("nothing scored"):
            console(f"cxr-lung-risk: {lines[0]}")
        else:
            for line in lines:
                console(f"cxr-lung-risk: {line}")
            console(f"cxr-lung-risk: {len(lines)} image(s) failed, listed in {self.error_file}")
        self.log(f"CXR-Lung-Risk: {len(lines)} error line(s), in {self.error_file}", level="ERROR")
        for line in lines:
            self.log(line, level="ERROR")
        # SystemExit is not caught by mhubio (it only catches Exception per instance)
        sys.exit(1)
