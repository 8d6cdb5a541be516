"""``cxr-lung-risk report`` (issue 21): R's survival package as the oracle, the simulated HR
recovered, one test per bad input, the HTML in a real headless Chromium, and predict -> report
end to end.

Needs the [report] extra (scripts/test.sh installs it); the oracle tests need Debian's
r-base-core + r-cran-survival, the browser test chromium + chromium-driver.
"""
from __future__ import annotations

import csv
import html
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.report

for _m in ("pandas", "lifelines", "sksurv", "matplotlib", "jinja2"):
    pytest.importorskip(_m, reason="the [report] extra is not installed")

from cxr_lung_risk.cli import main  # noqa: E402
from cxr_lung_risk.report.simulate import simulate, write_simulated  # noqa: E402

RSCRIPT = shutil.which("Rscript")
needs_r = pytest.mark.skipif(RSCRIPT is None, reason="Rscript (Debian r-base-core + r-cran-survival) is not installed")

#: the R comparison's tolerances (README, "Cohort report"): relative for HRs/CIs/chi-square/p,
#: absolute for survival probabilities and the C-index
TOL_REL_HR = 1e-5
TOL_REL_P = 1e-5  # relative, on -log(p) (p-values down to 1e-300 are compared)
TOL_ABS_KM = 1e-8
TOL_ABS_C = 1e-6
HR_PER5, HR_SEX = 1.6, 1.3


def run(*args: str) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    d = tmp_path_factory.mktemp("sim")
    res, out = write_simulated(d, n=4000, hr_per5=HR_PER5, hr_sex=HR_SEX, seed=7)
    return d, res, out


@pytest.fixture(scope="module")
def sim_report(sim):
    d, res, out = sim
    rep = d / "report"
    assert run("report", res, "--outcomes", out, "--out", rep, "--covariates", "age,sex:cat,smoking:cat", "--bootstrap", "30",
               "--horizons", "1,3,5,10", "--also-event", "lung_cancer", "--quiet") == 0
    return rep, json.loads((rep / "report.json").read_text())


R_SCRIPT = r"""
suppressMessages(library(survival))
args <- commandArgs(trailingOnly = TRUE)
r <- read.csv(args[1], stringsAsFactors = FALSE); o <- read.csv(args[2], stringsAsFactors = FALSE)
d <- merge(r, o, by = "PatientID")
d$group <- cut(d$CXR_Lung_Risk, c(-Inf, 65, 75, Inf), right = FALSE, labels = c("< 65", "65 to < 75", ">= 75"))
d$per5 <- d$CXR_Lung_Risk / 5
d$sex <- factor(d$sex); d$smoking <- factor(d$smoking)
out <- list()
put <- function(name, value) out[[name]] <<- value
cx <- function(prefix, fit, term) {
  s <- summary(fit)
  put(paste0(prefix, ":hr"), s$conf.int[term, "exp(coef)"])
  put(paste0(prefix, ":lower"), s$conf.int[term, "lower .95"])
  put(paste0(prefix, ":upper"), s$conf.int[term, "upper .95"])
  put(paste0(prefix, ":p"), s$coefficients[term, "Pr(>|z|)"])
}
f1 <- coxph(Surv(time, event) ~ per5, data = d, ties = "efron")
cx("per5_univariable", f1, "per5")
f2 <- coxph(Surv(time, event) ~ group, data = d, ties = "efron")
cx("group_univariable:65 to < 75", f2, "group65 to < 75")
cx("group_univariable:>= 75", f2, "group>= 75")
f3 <- coxph(Surv(time, event) ~ per5 + age + sex + smoking, data = d, ties = "efron")
cx("per5_multivariable", f3, "per5")
cx("per5_multivariable:age", f3, "age")
f4 <- coxph(Surv(time, event) ~ group + age + sex + smoking, data = d, ties = "efron")
cx("group_multivariable:65 to < 75", f4, "group65 to < 75")
cx("group_multivariable:>= 75", f4, "group>= 75")
f0 <- coxph(Surv(time, event) ~ age + sex + smoking, data = d, ties = "efron")
put("lr:chi2", 2 * (f3$loglik[2] - f0$loglik[2]))
sd <- survdiff(Surv(time, event) ~ group, data = d)
put("logrank:chi2", sd$chisq); put("logrank:p", pchisq(sd$chisq, length(sd$n) - 1, lower.tail = FALSE))
lv <- levels(d$group); ps <- c(); nm <- c()
for (i in 1:(length(lv) - 1)) for (j in (i + 1):length(lv)) {
  s <- survdiff(Surv(time, event) ~ group, data = droplevels(d[d$group %in% c(lv[i], lv[j]), ]))
  p <- pchisq(s$chisq, 1, lower.tail = FALSE); ps <- c(ps, p); nm <- c(nm, paste0(lv[i], "|", lv[j]))
  put(paste0("pair:", lv[i], "|", lv[j], ":chi2"), s$chisq)
}
for (k in seq_along(ps)) { put(paste0("pair:", nm[k], ":p"), ps[k]); put(paste0("pair:", nm[k], ":BH"), p.adjust(ps, "BH")[k]);
  put(paste0("pair:", nm[k], ":holm"), p.adjust(ps, "holm")[k]) }
km <- survfit(Surv(time, event) ~ group, data = d, conf.type = "log-log")
s <- summary(km, times = c(1, 3, 5, 10), extend = TRUE)
for (k in seq_along(s$time)) {
  g <- sub("group=", "", as.character(s$strata[k]))
  put(paste0("km:", g, ":", s$time[k], ":surv"), s$surv[k])
  put(paste0("km:", g, ":", s$time[k], ":lower"), s$lower[k])
  put(paste0("km:", g, ":", s$time[k], ":upper"), s$upper[k])
  put(paste0("km:", g, ":", s$time[k], ":n.risk"), s$n.risk[k])
}
cc <- concordance(Surv(time, event) ~ CXR_Lung_Risk, data = d, reverse = TRUE)
put("harrell", cc$concordance)
write.csv(data.frame(name = names(out), value = sprintf("%.17g", unlist(out))), args[3], row.names = FALSE)
"""


def r_oracle(res: Path, out: Path, tmp: Path) -> dict[str, float]:
    script = tmp / "oracle.R"
    script.write_text(R_SCRIPT)
    dest = tmp / "r.csv"
    p = subprocess.run([RSCRIPT, "--vanilla", str(script), str(res), str(out), str(dest)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    with open(dest, newline="") as f:
        return {row["name"]: float(row["value"]) for row in csv.DictReader(f)}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def _rel_logp(a: float, b: float) -> float:
    """Relative difference of -log(p) (1 or more when p is 1)."""
    la, lb = -math.log(max(a, 1e-320)), -math.log(max(b, 1e-320))
    return abs(la - lb) / max(abs(lb), 1.0)


@needs_r
def test_report_matches_r_survival(sim, sim_report, tmp_path):
    """coxph (Efron), survdiff, survfit (log-log bands), concordance and p.adjust against report.json."""
    _, res, out = sim
    _, rj = sim_report
    R = r_oracle(res, out, tmp_path)
    cox = rj["cox"]
    worst: dict[str, float] = {}

    def check(kind: str, ours: float, theirs: float, tol: float, rel: bool = True) -> None:
        d = (_rel_logp(ours, theirs) if kind == "p" else _rel(ours, theirs)) if rel else abs(ours - theirs)
        worst[kind] = max(worst.get(kind, 0.0), d)
        assert d <= tol, (kind, ours, theirs, d)

    for model, term, rkey in [("per5_univariable", "score_per5", "per5_univariable"), ("per5_multivariable", "score_per5", "per5_multivariable"),
                              ("per5_multivariable", "cov:age", "per5_multivariable:age"),
                              ("group_univariable", "group:65 to < 75", "group_univariable:65 to < 75"),
                              ("group_univariable", "group:>= 75", "group_univariable:>= 75"),
                              ("group_multivariable", "group:65 to < 75", "group_multivariable:65 to < 75"),
                              ("group_multivariable", "group:>= 75", "group_multivariable:>= 75")]:
        t = cox[model]["terms"][term]
        for k in ("hr", "lower", "upper"):
            check("hr", t[k], R[f"{rkey}:{k}"], TOL_REL_HR)
        if R[f"{rkey}:p"] > 1e-290:
            check("p", t["p"], R[f"{rkey}:p"], TOL_REL_P)
    check("chi2", rj["lr_test"]["chi2"], R["lr:chi2"], TOL_REL_HR)
    check("chi2", rj["logrank"]["overall"]["chi2"], R["logrank:chi2"], 1e-8)
    check("p", rj["logrank"]["overall"]["p"], R["logrank:p"], TOL_REL_P)
    for pr in rj["logrank"]["pairwise"]:
        key = f"pair:{pr['a']}|{pr['b']}"
        check("chi2", pr["chi2"], R[f"{key}:chi2"], 1e-8)
        check("p", pr["p"], R[f"{key}:p"], TOL_REL_P)
        check("p", pr["p_adjusted"], R[f"{key}:BH"], TOL_REL_P)
    for g, v in rj["kaplan_meier"]["groups"].items():
        for h in ("1", "3", "5", "10"):
            a = v["at"].get(h)
            if a is None or f"km:{g}:{h}:surv" not in R:
                continue
            check("km", a["survival"], R[f"km:{g}:{h}:surv"], TOL_ABS_KM, rel=False)
            check("km", a["lower"], R[f"km:{g}:{h}:lower"], TOL_ABS_KM, rel=False)
            check("km", a["upper"], R[f"km:{g}:{h}:upper"], TOL_ABS_KM, rel=False)
            assert a["n_risk"] == R[f"km:{g}:{h}:n.risk"]
    check("c", rj["concordance"]["harrell"]["c"], R["harrell"], TOL_ABS_C, rel=False)
    print("max differences vs R:", worst)


@needs_r
def test_holm_adjustment_matches_r(sim, tmp_path):
    _, res, out = sim
    rep = tmp_path / "holm"
    assert run("report", res, "--outcomes", out, "--out", rep, "--p-adjust", "holm", "--bootstrap", "0", "--quiet") == 0
    rj = json.loads((rep / "report.json").read_text())
    R = r_oracle(res, out, tmp_path)
    for pr in rj["logrank"]["pairwise"]:
        assert _rel_logp(pr["p_adjusted"], R[f"pair:{pr['a']}|{pr['b']}:holm"]) < TOL_REL_P
    assert "Holm" in (rep / "report.html").read_text()


def test_simulated_hazard_ratios_are_recovered(sim_report):
    _, rj = sim_report
    uni = rj["cox"]["per5_univariable"]["terms"]["score_per5"]
    assert uni["lower"] < HR_PER5 < uni["upper"], uni
    multi = rj["cox"]["per5_multivariable"]["terms"]
    assert multi["score_per5"]["lower"] < HR_PER5 < multi["score_per5"]["upper"]
    sex = multi["cov:sex=M"] if "cov:sex=M" in multi else None
    if sex is None:  # M is the reference (most frequent): the F term estimates 1/HR
        f = multi["cov:sex=F"]
        assert 1 / f["upper"] < HR_SEX < 1 / f["lower"]
    else:
        assert sex["lower"] < HR_SEX < sex["upper"]
    c = rj["concordance"]
    assert 0.6 < c["harrell"]["c"] < 0.85 and c["harrell"]["lower"] < c["harrell"]["c"] < c["harrell"]["upper"]
    assert c["uno"]["lower"] < c["uno"]["c"] < c["uno"]["upper"]
    assert set(rj["time_dependent_auc"]["auc"]) == {"1", "3", "5", "10"}
    assert rj["lr_test"]["p"] < 1e-10 and rj["proportional_hazards"]["terms"]


def test_report_files(sim_report):
    rep, rj = sim_report
    for name in rj["figures"]:
        assert (rep / "figures" / f"{name}.png").stat().st_size > 1000
        assert (rep / "figures" / f"{name}.svg").read_text().lstrip().startswith("<?xml")
    for name in rj["tables"]:
        assert (rep / "tables" / f"{name}.csv").is_file(), name
    assert {"score_distribution", "kaplan_meier", "forest", "time_dependent_auc"} <= set(rj["figures"])
    page = (rep / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # opens offline
    assert page.count("data:image/png;base64,") == len(rj["figures"])
    assert "Benjamini-Hochberg" in page and "Cohort flow" in page
    assert [s["level"] for s in rj["subgroups"] if s["variable"] == "sex"] == ["F", "M"]
    # the second outcome (lung-cancer death): its own KM, log-rank and Cox
    sec = rj["secondary_outcomes"]["lung_cancer"]
    assert 0 < sec["events"] < rj["flow"]["events"] and sec["logrank"]["overall"]["p"] < 0.05
    assert sec["cox"]["per5_univariable"]["terms"]["score_per5"]["hr"] > 1
    assert "kaplan_meier__lung_cancer" in rj["figures"] and "Second outcome: lung_cancer" in page
    assert {s["level"] for s in rj["subgroups"] if s["variable"] == "age"} == {"< 65", ">= 65"}


# --- bad input: one sentence, exit 1, nothing written


def _bad(tmp_path, capsys, res, out, *extra) -> str:
    rep = tmp_path / "rep"
    rc = run("report", res, "--outcomes", out, "--out", rep, "--bootstrap", "0", "--quiet", *extra)
    err = capsys.readouterr().err.strip()
    assert rc == 1, err
    assert not rep.exists() and not list(tmp_path.glob(".rep.*")), "something was written"
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture()
def small(tmp_path):
    res, out = simulate(n=300, seed=3)
    return tmp_path, res, out


def _write(tmp_path, res, out, name="o.csv"):
    rp, op = tmp_path / "r.csv", tmp_path / name
    res.to_csv(rp, index=False)
    if name.endswith(".parquet"):
        out.to_parquet(op)
    else:
        out.to_csv(op, index=False)
    return rp, op


def test_bad_missing_column(small, capsys):
    tmp, res, out = small
    rp, op = _write(tmp, res, out.rename(columns={"time": "followup"}))
    err = _bad(tmp, capsys, rp, op)
    assert "'time'" in err and "followup" in err and "--time" in err


def test_bad_misnamed_key(small, capsys):
    tmp, res, out = small
    rp, op = _write(tmp, res, out)
    err = _bad(tmp, capsys, rp, op, "--key", "AccessionNumber")
    assert "'AccessionNumber'" in err and "PatientID" in err  # names the column and those found


def test_bad_results_without_linkage_columns(small, capsys):
    tmp, res, out = small
    rp, op = _write(tmp, res.drop(columns=["PatientID"]), out)
    err = _bad(tmp, capsys, rp, op)
    assert "'PatientID'" in err and "--linkage-columns" in err


def test_bad_no_row_joins(small, capsys):
    tmp, res, out = small
    out["PatientID"] = "X" + out["PatientID"]
    rp, op = _write(tmp, res, out)
    err = _bad(tmp, capsys, rp, op)
    assert "no row joins" in err and "'PatientID'" in err
    assert "'SIM000000', 'SIM000001', 'SIM000002'" in err and "'XSIM000000', 'XSIM000001', 'XSIM000002'" in err


def test_bad_negative_time(small, capsys):
    tmp, res, out = small
    out.loc[5, "time"] = -1.0
    rp, op = _write(tmp, res, out, "o.parquet")
    err = _bad(tmp, capsys, rp, op)
    assert "negative" in err and "'time'" in err


def test_bad_non_numeric_time(small, capsys):
    tmp, res, out = small
    out["time"] = out["time"].astype(str)
    out.loc[7, "time"] = "three years"
    rp, op = _write(tmp, res, out)
    err = _bad(tmp, capsys, rp, op)
    assert "non-numeric" in err and "'three years'" in err


def test_bad_all_censored(small, capsys):
    tmp, res, out = small
    out["event"] = 0
    rp, op = _write(tmp, res, out)
    err = _bad(tmp, capsys, rp, op)
    assert "censored" in err and "300" in err


def test_bad_event_types_without_interest(small, capsys):
    tmp, res, out = small
    out["event"] = ["lung" if i % 3 == 0 else ("other" if i % 3 == 1 else "0") for i in range(len(out))]
    rp, op = _write(tmp, res, out)
    err = _bad(tmp, capsys, rp, op)
    assert "--event-of-interest" in err


def test_group_without_events_is_reported_and_the_rest_goes_on(small):
    tmp, res, out = small
    top = set(res.loc[res["CXR_Lung_Risk"] >= 75, "PatientID"])
    assert top
    out.loc[out["PatientID"].isin(top), "event"] = 0
    rp, op = _write(tmp, res, out)
    rep = tmp / "rep"
    assert run("report", rp, "--outcomes", op, "--out", rep, "--bootstrap", "0", "--quiet") == 0
    rj = json.loads((rep / "report.json").read_text())
    assert any(">= 75 has no events" in w for w in rj["warnings"])
    assert set(rj["cox"]["group_univariable"]["terms"]) == {"group:65 to < 75"}
    assert rj["kaplan_meier"]["groups"][">= 75"]["events"] == 0 and rj["logrank"]["overall"]["p"] is not None
    assert ">= 75 has no events" in html.unescape((rep / "report.html").read_text())


def test_unjoined_rows_are_counted_and_listed(small):
    tmp, res, out = small
    out = out.iloc[10:].copy()  # 10 results without an outcome
    extra = out.iloc[:2].copy()
    extra["PatientID"] = ["NOIMG1", "NOIMG2"]
    import pandas as pd

    out = pd.concat([out, extra])
    out.loc[out.index[5], "time"] = None  # excluded: no time
    rp, op = _write(tmp, res, out)
    rep = tmp / "rep"
    assert run("report", rp, "--outcomes", op, "--out", rep, "--bootstrap", "0", "--quiet") == 0
    rj = json.loads((rep / "report.json").read_text())
    f = rj["flow"]
    assert f["unjoined_results_keys"] == 11 and f["unjoined_outcomes_keys"] == 2 and f["patients_analysed"] == 289
    assert f["excluded"]["results: not in the outcomes"] == 11 and f["excluded"]["outcomes: no time"] == 1
    exc = list(csv.DictReader(open(rep / "tables" / "excluded.csv")))
    assert {"NOIMG1", "NOIMG2", "SIM000000"} <= {r["key"] for r in exc}
    assert "NOIMG1" in (rep / "report.html").read_text()


def test_competing_risks_and_custom_cut_points(tmp_path):
    res, out = write_simulated(tmp_path, n=1500, competing=True, seed=5, repeats=0.3)
    rep = tmp_path / "rep"
    assert run("report", res, "--outcomes", out, "--out", rep, "--event-of-interest", "lung", "--cut-points", "60,70",
               "--bootstrap", "0", "--quiet") == 0
    rj = json.loads((rep / "report.json").read_text())
    assert rj["groups"]["labels"] == ["< 60", "60 to < 70", ">= 70"]
    cr = rj["competing_risks"]
    assert cr["event_of_interest"] == "lung" and cr["event_types"] == ["lung", "other"]
    assert {"cumulative_incidence", "trajectories"} <= set(rj["figures"])
    assert rj["trajectories"]["patients"] == rj["flow"]["patients_with_repeat_radiographs"] > 0
    assert rj["flow"]["radiographs_joined"] > rj["flow"]["patients_analysed"]


def test_parquet_and_json_results_and_outcomes(small):
    tmp, res, out = small
    (tmp / "p").mkdir()
    res.iloc[:150].to_parquet(tmp / "p" / "a.parquet")
    res.iloc[150:].to_json(tmp / "p" / "b.json", orient="records")
    out.to_parquet(tmp / "o.parquet")
    rep = tmp / "rep"
    assert run("report", tmp / "p" / "a.parquet", tmp / "p" / "b.json", "--outcomes", tmp / "o.parquet", "--out", rep,
               "--bootstrap", "0", "--quiet") == 0
    rj = json.loads((rep / "report.json").read_text())
    assert rj["flow"]["results_rows_read"] == 300 and rj["flow"]["patients_analysed"] == 300
    # an earlier report in --out is replaced as a whole
    assert run("report", tmp / "p" / "a.parquet", "--outcomes", tmp / "o.parquet", "--out", rep, "--bootstrap", "0", "--quiet") == 0
    assert json.loads((rep / "report.json").read_text())["flow"]["patients_analysed"] == 150


def test_report_refuses_a_foreign_out_folder(small, capsys):
    tmp, res, out = small
    rp, op = _write(tmp, res, out)
    (tmp / "rep").mkdir()
    (tmp / "rep" / "mine.txt").write_text("x")
    assert run("report", rp, "--outcomes", op, "--out", tmp / "rep", "--quiet") == 1
    assert "not empty" in capsys.readouterr().err and (tmp / "rep" / "mine.txt").exists()


# --- a real browser


def test_every_figure_renders_in_headless_chromium(sim_report, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    rep, rj = sim_report
    opts = Options()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(a)
    browser = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    try:
        browser.get((rep / "report.html").resolve().as_uri())
        imgs = browser.execute_script(
            "return Array.from(document.images).map(i => [i.closest('figure').id, i.complete, i.naturalWidth, i.naturalHeight])")
        assert sorted(i[0] for i in imgs) == sorted(f"fig-{n}" for n in rj["figures"])
        assert all(ok and w > 100 and h > 100 for _, ok, w, h in imgs), imgs
        pdf = browser.execute_cdp_cmd("Page.printToPDF", {"printBackground": True})
        import base64

        assert base64.b64decode(pdf["data"])[:5] == b"%PDF-"
    finally:
        browser.quit()


# --- predict --linkage-columns, then report


def test_predict_then_report_end_to_end(tmp_path, synthetic_weights):
    from cohort import cr_copy

    import numpy as np
    import pydicom

    inp = tmp_path / "in"
    ids = []
    for i in range(6):  # the chest CR sample, each copy's pixels changed a little (distinct scores)
        f = cr_copy(inp / f"cr_{i}.dcm", i)
        ds = pydicom.dcmread(f)
        arr = ds.pixel_array.astype(np.int64)
        arr[: arr.shape[0] // (2 + i)] = arr[: arr.shape[0] // (2 + i)] // 2
        ds.set_pixel_data(arr.astype(ds.pixel_array.dtype), ds.PhotometricInterpretation, int(ds.BitsStored))
        ds.save_as(f, enforce_file_format=True)
        ids.append(ds.PatientID)
    out = tmp_path / "pred"
    assert run("predict", inp, "--out", out, "--weights", synthetic_weights, "--device", "cpu", "--linkage-columns",
               "--format", "csv,json", "--quiet") == 0
    rows = list(csv.DictReader(open(out / "cxr_lung_risk.csv")))
    assert all(r["CXR_Lung_Risk_Group"] in ("< 65", "65 to < 75", ">= 75") for r in rows)
    assert list(rows[0])[-2:] == ["CXR_Lung_Risk_Group", "Chronological_Age"]
    # synthetic weights give near-equal scores: cut-points around them so that groups differ
    scores = sorted(float(r["CXR_Lung_Risk"]) for r in rows)
    assert len(set(scores)) == 6, scores
    cuts = f"{(scores[1] + scores[2]) / 2!r},{(scores[3] + scores[4]) / 2!r}"
    oc = tmp_path / "outcomes.csv"
    oc.write_text("PatientID,time,event\n" + "".join(f"{p},{2.0 + i},{i % 2}\n" for i, p in enumerate(ids)) + "NOTSCORED,3.0,1\n")
    rep = tmp_path / "report"
    assert run("report", out, "--outcomes", oc, "--out", rep, "--cut-points", cuts, "--bootstrap", "0", "--horizons", "3",
               "--quiet") == 0
    rj = json.loads((rep / "report.json").read_text())
    assert rj["flow"]["patients_analysed"] == 6 and rj["flow"]["unjoined_outcomes_keys"] == 1
    assert (rep / "report.html").is_file() and (rep / "figures" / "kaplan_meier.png").is_file()
