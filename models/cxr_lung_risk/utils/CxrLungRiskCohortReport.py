"""
MHub module: the cohort-wide report (one JSON list with a row per scored instance).

mhubio's ``ReportExporter`` with ``globalreport: true`` under a configuration key of its own, so
that the workflow writes both the per-instance ``report.json`` (``ReportExporter``) and this
global one (``CxrLungRiskCohortReport``: PatientID, series, value, unit and risk group of every
scored instance; ``DataOrganizer`` puts it at ``cxr_lung_risk_cohort.json``), as MHub's risk-score
models from the same lab do. Feed it, or the per-instance CSVs, to ``cxr-lung-risk report``.
"""

from mhubio.modules.exporter.ReportExporter import ReportExporter


class CxrLungRiskCohortReport(ReportExporter):
    """``ReportExporter`` configured under ``CxrLungRiskCohortReport`` (globalreport: true); writes
    nothing when no instance was scored (the run then fails visibly, with no result files)."""

    def task(self) -> None:
        if not list(self.config.data.instances):
            self.log("no scored instance: no cohort report", level="NOTICE")
            return
        super().task()
