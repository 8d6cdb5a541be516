"""
MHub module: make a failed CXR-Lung-Risk run visible in the exit status.

mhubio logs exceptions raised while processing an instance and still exits 0. The runner
(``CxrLungRiskRunner``) therefore writes every failure to an error file; this module, placed
last in the workflow (after the DataOrganizer, so the results of the other instances are
exported first), logs that file's lines at ERROR level (mhubio's log; nothing is printed) and
ends the run with exit status 1 when it is not empty. The file itself stays in the output
folder (``output_data/cxr_lung_risk_errors.txt``), one line per failed instance.
"""

import os
import sys

from mhubio.core import IO, Module

ERROR_FILE_DEFAULT = "output_data/cxr_lung_risk_errors.txt"


@IO.Config("error_file", str, ERROR_FILE_DEFAULT, the="error file written by CxrLungRiskRunner (relative to general.data_base_dir)")
class CxrLungRiskStatus(Module):

    error_file: str

    def task(self) -> None:
        path = os.path.join(self.config.data.abspath, self.error_file)
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            self.log("CXR-Lung-Risk: no errors", level="NOTICE")
            return
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
        self.log(f"CXR-Lung-Risk: {len(lines)} instance(s) failed, listed in {self.error_file}", level="ERROR")
        for line in lines:
            self.log(line, level="ERROR")
        # SystemExit is not caught by mhubio (it only catches Exception per instance)
        sys.exit(1)
