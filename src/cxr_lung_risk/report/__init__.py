"""``cxr-lung-risk report``: the paper's survival analysis on the user's own cohort.

RESULTS (``predict``/``merge`` output folders or their CSV/JSON/Parquet tables) are joined to an
outcomes table (CSV or Parquet: a key, follow-up time in years, an event 0/1 or an event type)
and analysed per risk group (:mod:`.stats`); the output folder gets ``report.html`` (one
self-contained file, figures embedded), ``report.json`` (every number by name), ``tables/*.csv``,
``figures/*.png`` and ``*.svg``. The folder is built aside and moved into place at the end, so a
run that stops on bad input leaves nothing half-written. Needs the ``[report]`` extra.
"""
from __future__ import annotations

import base64
import datetime
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import UsageError

__all__ = ["ReportOptions", "run_report", "REPORT_JSON", "REPORT_HTML", "missing_extra"]

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
_NEEDS = ("pandas", "lifelines", "sksurv", "matplotlib", "jinja2", "scipy")


def missing_extra() -> str | None:
    """The first module of the ``[report]`` extra that is not installed, else None."""
    import importlib.util

    for m in _NEEDS:
        if importlib.util.find_spec(m) is None:
            return m
    return None


@dataclass
class ReportOptions:
    results: Sequence[Path]
    outcomes: Path
    out: Path
    key: str = "PatientID"
    time: str = "time"
    event: str = "event"
    event_of_interest: str | None = None
    also_events: Sequence[str] = ()  # second outcomes (e.g. lung-cancer death): KM, log-rank, Cox, C
    covariates: str = ""
    score: str = "CXR_Lung_Risk"
    cut_points: Sequence[float] | None = None
    p_adjust: str = "BH"
    horizons: Sequence[float] = (1.0, 3.0, 5.0, 10.0)
    bootstrap: int = 200
    bootstrap_size: int = 4000
    baseline: str = "earliest"
    seed: int = 20230530
    title: str = "CXR-Lung-Risk cohort report"
    quiet: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


_T0 = [0.0]


def _say(opts: ReportOptions, msg: str) -> None:
    import time

    if not opts.quiet:
        print(f"report: {time.perf_counter() - _T0[0]:6.1f} s: {msg} ...", file=sys.stderr, flush=True)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; name a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / REPORT_JSON).is_file():
        raise UsageError(f"--out {out} is not empty and holds no earlier report; name a new or empty folder")


def _groups(opts: ReportOptions):
    from ..risk_groups import RiskGroups, lung_risk_groups

    if opts.cut_points:
        try:
            return RiskGroups.custom(opts.cut_points)
        except ValueError as e:
            raise UsageError(f"--cut-points: {e}") from None
    return lung_risk_groups()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name, dist in (("lifelines", "lifelines"), ("sksurv", "scikit-survival"), ("scipy", "scipy"), ("matplotlib", "matplotlib"),
                       ("pandas", "pandas"), ("jinja2", "jinja2")):
        try:
            out[name] = version(dist)
        except PackageNotFoundError:
            out[name] = "?"
    return out


def run_report(opts: ReportOptions) -> dict[str, Any]:
    """Build the report into ``opts.out``; returns the numbers (what ``report.json`` holds)."""
    import time

    _T0[0] = time.perf_counter()
    missing = missing_extra()
    if missing:
        raise UsageError(f"report needs the [report] extra ({missing} is missing): pip install 'cxr-lung-risk[report]'")
    if opts.p_adjust not in ("BH", "holm"):
        raise UsageError(f"--p-adjust {opts.p_adjust!r}: choose BH (Benjamini-Hochberg, survminer's default) or holm")
    out = Path(opts.out)
    _check_out(out)
    import pandas as pd

    from .. import __version__
    from .data import build_cohort, parse_covariates, read_outcomes, read_results
    from .stats import analyse

    groups = _groups(opts)
    covariates = parse_covariates(opts.covariates)
    _say(opts, "reading the results and the outcomes")
    results, sources = read_results(opts.results)
    outcomes = read_outcomes(opts.outcomes)
    cohort = build_cohort(results, outcomes, key=opts.key, time=opts.time, event=opts.event, score=opts.score,
                          covariates=covariates, baseline=opts.baseline, event_of_interest=opts.event_of_interest,
                          extra_numeric=("CXR_Age", "CXR_Age_Gap", "Chronological_Age"))
    for col in opts.also_events:  # checked before any analysis runs
        if col not in outcomes.columns:
            from .data import found_columns

            raise UsageError(f"the outcomes have no column {col!r} for --also-event (found: {found_columns(outcomes)})")
    base = cohort.baseline
    age = base["Chronological_Age"] if "Chronological_Age" in base.columns and base["Chronological_Age"].notna().any() else None
    if age is None:
        for c in covariates:
            if not c.categorical and c.name.lower() in ("age", "age_years", "chronological_age"):
                age = base[c.name]
    gap = None
    if "CXR_Age_Gap" in base.columns and base["CXR_Age_Gap"].notna().any():
        gap = base["CXR_Age_Gap"]
    elif "CXR_Age" in base.columns and age is not None:
        gap = base["CXR_Age"] - pd.to_numeric(age, errors="coerce")
    an = analyse(cohort, groups=groups, covariates=covariates, p_adjust_method=opts.p_adjust, horizons=opts.horizons,
                 bootstrap=opts.bootstrap, bootstrap_size=opts.bootstrap_size, seed=opts.seed, score_name=opts.score,
                 age_gap=gap, age=age, progress=None if opts.quiet else (lambda m: _say(opts, m)))
    from .figures import make_figures

    secondary: dict[str, Any] = {}
    sec_figs = []
    for col in opts.also_events:
        if col == opts.event:
            continue
        _say(opts, f"second outcome {col}")
        c2 = build_cohort(results, outcomes, key=opts.key, time=opts.time, event=col, score=opts.score, covariates=covariates,
                          baseline=opts.baseline, event_of_interest=None)
        a2 = analyse(c2, groups=groups, covariates=covariates, p_adjust_method=opts.p_adjust, horizons=opts.horizons, bootstrap=0,
                     seed=opts.seed, score_name=opts.score)
        secondary[col] = {k: a2.numbers[k] for k in ("groups", "kaplan_meier", "logrank", "cox", "concordance", "time_dependent_auc",
                                                     "lr_test", "warnings") if k in a2.numbers}
        secondary[col]["events"] = c2.flow["events"]
        for name in ("kaplan_meier", "cox", "logrank_pairwise"):
            if name in a2.tables:
                an.tables[f"{name}__{_safe(col)}"] = a2.tables[name]
        for f in make_figures(a2, c2, groups, opts.score, only=("kaplan_meier",)):
            f.name, f.title = f"kaplan_meier__{_safe(col)}", f"Kaplan-Meier curves per risk group: {col}"
            sec_figs.append((col, f))
    _say(opts, "figures")
    figs = make_figures(an, cohort, groups, opts.score) + [f for _, f in sec_figs]
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    numbers = {
        "software": {"cxr_lung_risk": __version__, **_versions()},
        "created": created,
        "inputs": {"results": sources, "outcomes": str(opts.outcomes)},
        "options": {k: (list(v) if isinstance(v, (tuple, list)) else (str(v) if isinstance(v, Path) else v))
                    for k, v in asdict(opts).items() if k not in ("results", "outcomes", "out", "quiet", "extra")},
        "flow": cohort.flow,
        **an.numbers,
        **({"secondary_outcomes": secondary} if secondary else {}),
        "figures": [f.name for f in figs],
        "tables": sorted(list(an.tables) + ["excluded"]),
    }
    numbers["options"]["event_of_interest"] = cohort.event_of_interest
    numbers["options"]["p_adjust_name"] = "Benjamini-Hochberg" if opts.p_adjust == "BH" else "Holm"
    _say(opts, "writing")
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        (tmp / "tables").mkdir()
        for name, t in an.tables.items():
            t.to_csv(tmp / "tables" / f"{name}.csv", index=False)
        cohort.excluded.to_csv(tmp / "tables" / "excluded.csv", index=False)
        from .figures import write_figures

        write_figures(figs, tmp / "figures")
        (tmp / REPORT_JSON).write_text(json.dumps(numbers, indent=1, allow_nan=False, default=str) + "\n", encoding="utf-8")
        (tmp / REPORT_HTML).write_text(_html(numbers, an, cohort, figs, opts, sources, created), encoding="utf-8")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return numbers


def _safe(name: str) -> str:
    """A column name as part of a file name."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))[:60] or "outcome"


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.0f}"
    return str(x)


def _fmtp(p: Any) -> str:
    if p is None:
        return "-"
    return "< 1e-300" if p == 0 else (f"{p:.2g}" if p < 0.001 else f"{p:.3f}")


def _html(numbers, an, cohort, figs, opts, sources, created) -> str:
    import jinja2
    import pandas as pd
    from markupsafe import Markup

    def table(df: pd.DataFrame | None, pcols=("p", "p_adjusted")) -> Markup:
        if df is None or len(df) == 0:
            return Markup("")
        d = df.copy()
        for c in d.columns:
            if c in pcols:
                d[c] = d[c].map(lambda v: _fmtp(None if pd.isna(v) else float(v)))
            elif pd.api.types.is_float_dtype(d[c]):
                d[c] = d[c].map(lambda v: "-" if pd.isna(v) else _fmt(float(v), 4))
        return Markup(d.to_html(index=False, escape=True, border=0, na_rep="-"))

    def figure(f) -> Markup:
        b64 = base64.b64encode(f.png).decode("ascii")
        return Markup('<figure id="fig-{0}"><img alt="{1}" src="data:image/png;base64,{2}"><figcaption><b>{1}.</b> {3}</figcaption></figure>').format(
            f.name, f.title, Markup(b64), f.caption)

    n = numbers
    km = n["kaplan_meier"]["groups"]
    hz = [f"{h:g}" for h in opts.horizons]
    km_rows = []
    for g, v in km.items():
        r = {"group": g, "n": v["n"], "events": v["events"], "median survival": v["median_survival"]}
        for h in hz:
            a = v["at"].get(h)
            r[f"S({h} y)"] = f"{a['survival']:.3f} ({a['lower']:.3f}-{a['upper']:.3f})" if a else "-"
        km_rows.append(r)
    conc = n["concordance"]
    conc_rows = [{"measure": "Harrell's C", "C": conc["harrell"]["c"], "lower": conc["harrell"]["lower"], "upper": conc["harrell"]["upper"]},
                 {"measure": f"Uno's C (tau {conc['uno']['tau']:.3g} y)", "C": conc["uno"]["c"], "lower": conc["uno"]["lower"], "upper": conc["uno"]["upper"]}]
    tables = {k: table(v) for k, v in an.tables.items() if k not in ("kaplan_meier", "cumulative_incidence", "trajectories")
              and not k.startswith("kaplan_meier__")}
    secondary = []
    for col, s in n.get("secondary_outcomes", {}).items():
        lr = s.get("logrank", {}).get("overall")
        secondary.append({"name": col, "events": s["events"], "figure": next((figure(f) for f in figs if f.name == f"kaplan_meier__{_safe(col)}"), ""),
                          "cox": tables.get(f"cox__{_safe(col)}", ""), "pairwise": tables.get(f"logrank_pairwise__{_safe(col)}", ""),
                          "logrank": f"overall log-rank chi-square {lr['chi2']:.2f} on {lr['df']} df, p = {_fmtp(lr['p'])}" if lr else "",
                          "harrell": s["concordance"]["harrell"]["c"], "warnings": s.get("warnings", [])})
    tables["km_summary"] = table(pd.DataFrame(km_rows))
    tables["concordance"] = table(pd.DataFrame(conc_rows))
    if "competing_risks" in n:
        rows = [{"group": g, **{f"CIF({h} y)": v["at"].get(h) for h in hz}} for g, v in n["competing_risks"]["groups"].items()]
        tables["cif_summary"] = table(pd.DataFrame(rows))
    flow = n["flow"]
    flow_rows = [(k.replace("_", " "), v) for k, v in flow.items() if k != "excluded"]
    flow_rows += [(f"excluded - {k}", v) for k, v in flow.get("excluded", {}).items()]
    exc = cohort.excluded
    env = jinja2.Environment(loader=jinja2.PackageLoader("cxr_lung_risk.report", "templates"), autoescape=True,
                             undefined=jinja2.ChainableUndefined)
    tpl = env.get_template("report.html.j2")
    return tpl.render(
        title=opts.title, created=created, version=n["software"]["cxr_lung_risk"], sources=sources, outcomes=str(opts.outcomes),
        score=opts.score, options=n["options"], warnings=n.get("warnings", []), flow_rows=flow_rows,
        excluded_rows=exc.head(200).to_dict("records"), n_excluded=len(exc), cut_points=", ".join(f"{c:g}" for c in n["groups"]["cut_points"]),
        tables=tables, figures={f.name: figure(f) for f in figs}, logrank=n["logrank"], p_adjust_name=n["options"]["p_adjust_name"],
        reference=n["groups"]["labels"][0], lr_test=n["lr_test"], concordance=conc, trajectories=n.get("trajectories", {}),
        age_gap=n.get("age_gap"), versions=n["software"], fmt=_fmt, fmtp=_fmtp, secondary=secondary,
    )
