"""
MHub module: keep only the instances CxrLungRiskRunner scored.

Instances the runner refused (not a frontal chest radiograph) or could not score have no
``json:model=cxr_lung_risk`` output; this filter (mhubio's ``FileFilter`` with its own
configuration key) drops them, so that mhubio's ``ReportExporter`` writes a report only for
scored instances (it would log an error for a missing value) and the output holds nothing for
the others. Failures are not lost: the runner has already logged them and written the error file
that ``CxrLungRiskStatus`` turns into the exit status.
"""

from typing import List

from mhubio.core import IO, Instance
from mhubio.modules.filter.FileFilter import FileFilter


@IO.Config("requires", list, ["json:model=cxr_lung_risk"], the="data type queries an instance must match to be kept (default: has CXR-Lung-Risk results)")
class CxrLungRiskScored(FileFilter):

    requires: list

    def filter(self, instances: List[Instance]) -> List[Instance]:
        # only files really written count (FileFilter also counts data a module announced but did
        # not write, as the runner's outputs of a failed instance)
        return [i for i in instances if all(len(i.data.filter(q, confirmed_only=True)) > 0 for q in self.requires)]
