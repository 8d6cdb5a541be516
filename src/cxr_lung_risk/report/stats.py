"""The survival analyses of the report, with lifelines and scikit-survival (no estimator is
written here): Kaplan-Meier, log-rank (overall and pairwise, adjusted), Cox models (Efron ties),
the proportional-hazards check, Harrell's and Uno's C with bootstrap CIs, time-dependent AUC, the
likelihood-ratio test of added value, cumulative incidence under competing risks, subgroups,
trajectories and the CXR-Age gap.

Each function returns JSON-ready numbers (``report.json``) and, where there is one, a table
(pandas DataFrame, written as CSV).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from .data import Cohort, Covariate

__all__ = ["Analysis", "analyse"]

PER = 5.0  # hazard ratios per 5 years of score


def _f(x: Any) -> float | None:
    """A JSON number (None for NaN/inf)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


@dataclass
class Analysis:
    numbers: dict[str, Any]
    tables: dict[str, pd.DataFrame]
    fitters: dict[str, Any]  # what the figures draw (KM fitters, ...)
    warnings: list[str]


def p_adjust(p: Sequence[float], method: str) -> list[float]:
    """Adjusted p-values: Benjamini-Hochberg (scipy) or Holm (step-down, as R's p.adjust)."""
    from scipy.stats import false_discovery_control

    arr = np.asarray(p, dtype=float)
    if len(arr) == 0:
        return []
    if method == "BH":
        return [float(v) for v in false_discovery_control(arr, method="bh")]
    n = len(arr)
    order = np.argsort(arr)
    adj = np.minimum(1.0, np.maximum.accumulate((n - np.arange(n)) * arr[order]))
    out = np.empty(n)
    out[order] = adj
    return [float(v) for v in out]


def _cox(df: pd.DataFrame, cols: Sequence[str], *, strata_note: str = "") -> tuple[dict[str, Any], Any]:
    """A Cox model (lifelines, Efron ties) of ``_time``/``_event`` on ``cols``."""
    from lifelines import CoxPHFitter

    data = df[["_time", "_event", *cols]].dropna()
    cph = CoxPHFitter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cph.fit(data, duration_col="_time", event_col="_event")
    except Exception as e:  # noqa: BLE001 - lifelines' ConvergenceError and friends: one sentence
        from ..errors import UsageError

        names = ", ".join(c.split(":", 1)[-1] for c in cols)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"the Cox model on {names} ({len(data)} patients) could not be fitted ({first[:200]}); "
                         "a covariate may be constant or separate the outcome perfectly") from None
    s = cph.summary
    terms = {}
    for name in cols:
        r = s.loc[name]
        terms[name] = {
            "coef": _f(r["coef"]), "se": _f(r["se(coef)"]), "hr": _f(r["exp(coef)"]),
            "lower": _f(r["exp(coef) lower 95%"]), "upper": _f(r["exp(coef) upper 95%"]), "z": _f(r["z"]), "p": _f(r["p"]),
        }
    out = {"n": int(len(data)), "events": int(data["_event"].sum()), "loglik": _f(cph.log_likelihood_), "terms": terms,
           "ties": "Efron"}
    return out, cph


def _cox_table(name: str, fit: dict[str, Any], labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
    return [{"model": name, "term": (labels or {}).get(t, t), "hr": v["hr"], "lower": v["lower"], "upper": v["upper"], "p": v["p"],
             "n": fit["n"], "events": fit["events"]} for t, v in fit["terms"].items()]


def _design(df: pd.DataFrame, covariates: Sequence[Covariate]) -> tuple[pd.DataFrame, list[str], dict[str, str]]:
    """Covariate columns for a Cox model: numeric as they are, categorical as indicators against
    their most frequent level. Returns the frame, the column names and their display labels."""
    out = pd.DataFrame(index=df.index)
    cols, labels = [], {}
    for c in covariates:
        if c.categorical:
            s = df[c.name]
            levels = s.dropna().value_counts()
            if len(levels) < 2:
                continue
            ref = levels.index[0]
            for lev in sorted(levels.index[1:], key=str):
                col = f"cov:{c.name}={lev}"
                out[col] = np.where(s.isna(), np.nan, (s == lev).astype(float))
                cols.append(col)
                labels[col] = f"{c.name}: {lev} vs {ref}"
        else:
            col = f"cov:{c.name}"
            out[col] = df[c.name].astype(float)
            cols.append(col)
            labels[col] = c.name
    return out, cols, labels


def analyse(cohort: Cohort, *, groups, covariates: Sequence[Covariate], p_adjust_method: str = "BH", horizons: Sequence[float] = (),
            bootstrap: int = 200, bootstrap_size: int = 4000, seed: int = 20230530, score_name: str = "CXR_Lung_Risk",
            age_gap: pd.Series | None = None, age: pd.Series | None = None,
            progress: Callable[[str], Any] | None = None) -> Analysis:
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test, multivariate_logrank_test

    say = progress or (lambda msg: None)
    df = cohort.baseline.copy()
    if df["_score"].nunique() < 2:
        from ..errors import UsageError

        raise UsageError(f"the score {score_name} has one value ({df['_score'].iloc[0]:g}) for all {len(df)} joined patients; there is nothing to compare")
    labels = list(groups.labels)
    df["_group"] = pd.Categorical([groups.label(s) for s in df["_score"]], categories=labels)
    T, E = df["_time"].to_numpy(float), df["_event"].to_numpy(float)
    numbers: dict[str, Any] = {}
    tables: dict[str, pd.DataFrame] = {}
    fitters: dict[str, Any] = {}
    warn: list[str] = []

    # --- groups and score distribution
    per_group = {}
    for g in labels:
        sub = df[df["_group"] == g]
        per_group[g] = {"n": int(len(sub)), "events": int(sub["_event"].sum()),
                        "score_median": _f(sub["_score"].median()) if len(sub) else None,
                        "score_q1": _f(sub["_score"].quantile(0.25)) if len(sub) else None,
                        "score_q3": _f(sub["_score"].quantile(0.75)) if len(sub) else None,
                        "followup_median": _f(sub["_time"].median()) if len(sub) else None}
        if len(sub) == 0:
            warn.append(f"group {g} has no patients: it is left out of the analyses by group")
        elif per_group[g]["events"] == 0:
            warn.append(f"group {g} has no events: its Kaplan-Meier curve stays at 1 and its hazard ratio is not estimable (left out of the Cox model by group)")
    numbers["groups"] = {"score": score_name, "cut_points": list(groups.cut_points), "labels": labels, "per_group": per_group,
                         "score_median": _f(df["_score"].median()), "score_mean": _f(df["_score"].mean()), "score_sd": _f(df["_score"].std())}
    tables["groups"] = pd.DataFrame([{"group": g, **v} for g, v in per_group.items()])
    present = [g for g in labels if per_group[g]["n"] > 0]

    # --- Kaplan-Meier
    say("Kaplan-Meier")
    tmax = float(np.max(T))
    grid = [float(t) for t in range(0, int(math.floor(tmax)) + 1)]
    km_numbers, km_rows, at_risk = {}, [], []
    for g in present:
        sub = df[df["_group"] == g]
        kmf = KaplanMeierFitter(label=g)
        kmf.fit(sub["_time"], sub["_event"])
        fitters[f"km:{g}"] = kmf
        sf = kmf.survival_function_.iloc[:, 0]
        ci = kmf.confidence_interval_survival_function_
        et = kmf.event_table
        for t in sf.index:
            km_rows.append({"group": g, "time": float(t), "n_risk": int(et.loc[t, "at_risk"]) if t in et.index else None,
                            "n_event": int(et.loc[t, "observed"]) if t in et.index else None, "survival": float(sf.loc[t]),
                            "lower": float(ci.loc[t].iloc[0]), "upper": float(ci.loc[t].iloc[1])})
        st = sub["_time"].to_numpy(float)
        at = {}
        for t in grid + [float(h) for h in horizons]:
            if t > float(st.max()):
                continue
            s = float(kmf.predict(t))
            idx = ci.index.searchsorted(t, side="right") - 1
            lo, hi = (float(ci.iloc[idx, 0]), float(ci.iloc[idx, 1])) if idx >= 0 else (1.0, 1.0)
            at[f"{t:g}"] = {"survival": s, "lower": lo, "upper": hi, "n_risk": int((st >= t).sum())}
        for t in grid:
            at_risk.append({"group": g, "time": t, "n_risk": int((st >= t).sum())})
        km_numbers[g] = {"n": int(len(sub)), "events": int(sub["_event"].sum()), "median_survival": _f(kmf.median_survival_time_),
                         "at": at}
    numbers["kaplan_meier"] = {"confidence": "95 %, log(-log) transform (lifelines' exponential Greenwood; R survfit conf.type='log-log')",
                               "groups": km_numbers}
    tables["kaplan_meier"] = pd.DataFrame(km_rows)
    tables["number_at_risk"] = pd.DataFrame(at_risk).pivot(index="group", columns="time", values="n_risk").reindex(present).reset_index() if at_risk else pd.DataFrame()

    # --- log-rank
    say("log-rank tests")
    lr: dict[str, Any] = {"p_adjust": p_adjust_method}
    if len(present) >= 2:
        sub = df[df["_group"].isin(present)]
        r = multivariate_logrank_test(sub["_time"], sub["_group"].astype(str), sub["_event"])
        lr["overall"] = {"chi2": _f(r.test_statistic), "df": len(present) - 1, "p": _f(r.p_value)}
        pairs = []
        for i, a in enumerate(present):
            for b in present[i + 1:]:
                A, B = df[df["_group"] == a], df[df["_group"] == b]
                r = logrank_test(A["_time"], B["_time"], A["_event"], B["_event"])
                pairs.append({"a": a, "b": b, "chi2": _f(r.test_statistic), "p": _f(r.p_value)})
        for pr, adj in zip(pairs, p_adjust([p["p"] for p in pairs], p_adjust_method)):
            pr["p_adjusted"] = adj
        lr["pairwise"] = pairs
        tables["logrank_pairwise"] = pd.DataFrame(pairs)
    else:
        warn.append("fewer than two groups have patients: no log-rank test")
    numbers["logrank"] = lr

    # --- Cox models
    say("Cox models")
    df["score_per5"] = df["_score"] / PER
    cox: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    ref = labels[0]
    grp_cols, grp_labels = [], {}
    if per_group[ref]["events"] == 0 or per_group[ref]["n"] == 0:
        warn.append(f"the reference group {ref} has no events: no Cox model by group")
    else:
        for g in labels[1:]:
            if per_group[g]["events"] > 0:
                col = f"group:{g}"
                df[col] = (df["_group"] == g).astype(float)
                grp_cols.append(col)
                grp_labels[col] = f"{g} vs {ref}"
    group_rows = df["_group"].isin([ref] + [c.split(":", 1)[1] for c in grp_cols])
    cox["per5_univariable"], cph_uni = _cox(df, ["score_per5"])
    rows += _cox_table("per 5 years, univariable", cox["per5_univariable"], {"score_per5": f"{score_name} per 5 years"})
    fitters["cox:per5_univariable"] = cph_uni
    if grp_cols:
        cox["group_univariable"], _ = _cox(df[group_rows], grp_cols)
        cox["group_univariable"]["labels"] = grp_labels
        rows += _cox_table("by group, univariable", cox["group_univariable"], grp_labels)
    design, cov_cols, cov_labels = _design(df, covariates)
    for c in cov_cols:
        df[c] = design[c]
    if cov_cols:
        cox["per5_multivariable"], _ = _cox(df, ["score_per5", *cov_cols])
        rows += _cox_table("per 5 years, multivariable", cox["per5_multivariable"], {"score_per5": f"{score_name} per 5 years", **cov_labels})
        if grp_cols:
            cox["group_multivariable"], _ = _cox(df[group_rows], [*grp_cols, *cov_cols])
            cox["group_multivariable"]["labels"] = grp_labels
            rows += _cox_table("by group, multivariable", cox["group_multivariable"], {**grp_labels, **cov_labels})
    cox["covariate_labels"] = cov_labels
    numbers["cox"] = cox
    tables["cox"] = pd.DataFrame(rows)

    # --- proportional hazards (Grambsch-Therneau on the rank of time)
    say("proportional-hazards check")
    try:
        from lifelines.statistics import proportional_hazard_test

        base_cols = ["score_per5", *cov_cols]
        data = df[["_time", "_event", *base_cols]].dropna()
        _, cph_ph = _cox(data, base_cols)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ph = proportional_hazard_test(cph_ph, data, time_transform="rank")
        phs = ph.summary
        numbers["proportional_hazards"] = {"transform": "rank", "model": "per 5 years" + (" + covariates" if cov_cols else ""),
                                           "terms": {str(k): {"chi2": _f(v["test_statistic"]), "p": _f(v["p"])} for k, v in phs.iterrows()}}
        tables["proportional_hazards"] = phs.reset_index().rename(columns={"index": "term"})
    except Exception as e:  # noqa: BLE001 - the check is reported as not done, the rest goes on
        warn.append(f"the proportional-hazards check could not be computed ({e})")

    # --- likelihood-ratio test of added value
    say("likelihood-ratio test")
    if cov_cols:
        data = df[["_time", "_event", "score_per5", *cov_cols]].dropna()
        m0, _ = _cox(data, cov_cols)
        m1, _ = _cox(data, ["score_per5", *cov_cols])
        stat = 2.0 * (m1["loglik"] - m0["loglik"])
        from scipy.stats import chi2

        numbers["lr_test"] = {"against": "covariates only", "chi2": _f(stat), "df": 1, "p": _f(chi2.sf(stat, 1)), "n": m1["n"],
                              "loglik_covariates": m0["loglik"], "loglik_covariates_score": m1["loglik"]}
    else:
        t = cph_uni.log_likelihood_ratio_test()
        numbers["lr_test"] = {"against": "the null model (no covariates given)", "chi2": _f(t.test_statistic), "df": 1, "p": _f(t.p_value),
                              "n": cox["per5_univariable"]["n"]}

    # --- concordance, time-dependent AUC
    say("concordance and time-dependent AUC")
    numbers["concordance"], numbers["time_dependent_auc"], tables["time_dependent_auc"] = _discrimination(
        df, horizons, bootstrap, bootstrap_size, seed, warn, progress)

    # --- subgroups
    say("subgroups")
    sub_rows = []
    subgroup_defs: list[tuple[str, str, pd.Series]] = []
    for c in covariates:
        if c.categorical:
            for lev in sorted(df[c.name].dropna().unique(), key=str):
                subgroup_defs.append((c.name, str(lev), df[c.name] == lev))
    if age is not None:
        a = pd.to_numeric(age, errors="coerce")
        subgroup_defs += [("age", "< 65", a < 65), ("age", ">= 65", a >= 65)]
    for var, lev, mask in subgroup_defs:
        sub = df[mask.fillna(False).to_numpy(bool)]
        row = {"variable": var, "level": lev, "n": int(len(sub)), "events": int(sub["_event"].sum())}
        if row["events"] < 2:
            row["note"] = "fewer than 2 events: not estimable"
            sub_rows.append(row)
            continue
        try:
            fit, _ = _cox(sub, ["score_per5"])
        except Exception as e:  # noqa: BLE001 - a subgroup that cannot be fitted is reported, the rest goes on
            row["note"] = f"not estimable: {e}"
            sub_rows.append(row)
            continue
        t = fit["terms"]["score_per5"]
        row.update(hr_per5=t["hr"], lower=t["lower"], upper=t["upper"], p=t["p"])
        sub_cols = [c for c in grp_cols if sub[c].sum() > 0 and sub.loc[sub[c] == 1, "_event"].sum() > 0]
        ref_ok = sub.loc[sub["_group"] == ref, "_event"].sum() > 0
        if sub_cols and ref_ok:
            gs = sub[sub["_group"].isin([ref] + [c.split(":", 1)[1] for c in sub_cols])]
            try:
                gfit, _ = _cox(gs, sub_cols)
            except Exception:  # noqa: BLE001 - per group not estimable in this subgroup
                sub_cols, gfit = [], None
            for col in sub_cols:
                gt = gfit["terms"][col]
                row[f"hr {grp_labels[col]}"] = gt["hr"]
                row[f"lower {grp_labels[col]}"] = gt["lower"]
                row[f"upper {grp_labels[col]}"] = gt["upper"]
        sub_rows.append(row)
    numbers["subgroups"] = sub_rows
    tables["subgroups"] = pd.DataFrame(sub_rows)

    # --- competing risks
    if cohort.competing and "_etype" in df.columns:
        say("cumulative incidence")
        from lifelines import AalenJohansenFitter

        cif, cif_rows = {}, []
        codes = {t: i + 1 for i, t in enumerate(cohort.event_types)}
        ev_code = df["_etype"].map(lambda v: codes.get(v, 0)).fillna(0).astype(int)
        for g in present:
            m = (df["_group"] == g).to_numpy()
            if df.loc[m, "_event"].sum() == 0:
                continue
            ajf = AalenJohansenFitter(seed=seed, calculate_variance=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ajf.fit(df.loc[m, "_time"], ev_code[m], event_of_interest=codes[cohort.event_of_interest], label=g)
            fitters[f"cif:{g}"] = ajf
            ci = ajf.cumulative_density_.iloc[:, 0]
            at = {}
            for t in [float(h) for h in horizons] + grid[1:]:
                idx = ci.index.searchsorted(t, side="right") - 1
                at[f"{t:g}"] = _f(ci.iloc[idx]) if idx >= 0 else 0.0
            cif[g] = {"at": at}
            cif_rows += [{"group": g, "time": float(t), "cumulative_incidence": float(v)} for t, v in ci.items()]
        numbers["competing_risks"] = {"event_of_interest": cohort.event_of_interest, "event_types": cohort.event_types,
                                      "method": "Aalen-Johansen (lifelines)", "groups": cif}
        tables["cumulative_incidence"] = pd.DataFrame(cif_rows)

    # --- trajectories over repeat radiographs
    rows_all = cohort.all_rows
    counts = rows_all["_key"].value_counts()
    multi = rows_all[rows_all["_key"].isin(counts[counts > 1].index) & rows_all["_date"].notna()].copy()
    if len(multi):
        say("trajectories")
        first = multi.groupby("_key")["_date"].transform("min")
        multi["years_from_first"] = (multi["_date"] - first).dt.days / 365.25
        multi = multi.sort_values(["_key", "_date", "_order"])
        g = multi.groupby("_key", sort=True)
        x, y = multi["years_from_first"], multi["_score"]
        xc = x - g["years_from_first"].transform("mean")
        yc = y - g["_score"].transform("mean")
        sxy = (xc * yc).groupby(multi["_key"]).sum()
        sxx = (xc * xc).groupby(multi["_key"]).sum()
        t = pd.DataFrame({"key": sxx.index, "radiographs": g.size().to_numpy(), "years": g["years_from_first"].max().to_numpy(),
                          "first_score": g["_score"].first().to_numpy(), "last_score": g["_score"].last().to_numpy(),
                          # least-squares slope of score on years (numpy.polyfit's, per patient, vectorised)
                          "slope_per_year": np.where(sxx.to_numpy() > 0, sxy.to_numpy() / np.where(sxx.to_numpy() > 0, sxx.to_numpy(), 1.0), np.nan)})
        numbers["trajectories"] = {"patients": int(len(t)), "radiographs": int(len(multi)),
                                   "median_slope_per_year": _f(t["slope_per_year"].dropna().median()) if t["slope_per_year"].notna().any() else None}
        tables["trajectories"] = t
        fitters["trajectories"] = multi[["_key", "years_from_first", "_score"]]

    # --- CXR-Age gap
    if age_gap is not None and pd.to_numeric(age_gap, errors="coerce").notna().sum() > 1:
        say("CXR-Age gap")
        df["age_gap_per5"] = pd.to_numeric(age_gap, errors="coerce").to_numpy() / PER
        gap = df["age_gap_per5"] * PER
        out = {"n": int(gap.notna().sum()), "mean": _f(gap.mean()), "sd": _f(gap.std()), "median": _f(gap.median())}
        if df.loc[gap.notna(), "_event"].sum() > 0:
            fit, _ = _cox(df, ["age_gap_per5"])
            out["cox_per5_univariable"] = fit["terms"]["age_gap_per5"]
            if age is not None:
                df["_age"] = pd.to_numeric(age, errors="coerce").to_numpy()
                fit2, _ = _cox(df, ["age_gap_per5", "_age"])
                out["cox_per5_adjusted_for_age"] = fit2["terms"]["age_gap_per5"]
        numbers["age_gap"] = out
        fitters["age_gap"] = gap.dropna()
    numbers["warnings"] = warn
    return Analysis(numbers=numbers, tables=tables, fitters=fitters, warnings=warn)


def _discrimination(df: pd.DataFrame, horizons: Sequence[float], bootstrap: int, bootstrap_size: int, seed: int,
                    warn: list[str], progress) -> tuple[dict[str, Any], dict[str, Any], pd.DataFrame]:
    """Harrell's C (lifelines), Uno's C and time-dependent AUC (scikit-survival), with bootstrap CIs."""
    from lifelines.utils import concordance_index
    from sksurv.metrics import concordance_index_ipcw, cumulative_dynamic_auc
    from sksurv.util import Surv

    T, E, S = df["_time"].to_numpy(float), df["_event"].to_numpy(bool), df["_score"].to_numpy(float)
    n = len(T)
    event_times = T[E]
    hz = sorted({float(h) for h in horizons if float(h) > 0})
    valid_h = [h for h in hz if event_times.min() <= h < T.max()]
    for h in hz:
        if h not in valid_h:
            warn.append(f"horizon {h:g} years is outside the follow-up with events ({event_times.min():.3g} to {T.max():.3g}): no AUC there")
    tau = max(valid_h) if valid_h else float(np.quantile(T, 0.9))

    def harrell(t, e, s):
        return concordance_index(t, -s, e)

    def uno(t, e, s):
        y = Surv.from_arrays(e, t)
        return concordance_index_ipcw(y, y, s, tau=tau)[0]

    c_h = harrell(T, E, S)
    try:
        c_u = uno(T, E, S)
    except ValueError as ex:
        c_u = float("nan")
        warn.append(f"Uno's C could not be computed ({ex})")
    m = min(n, int(bootstrap_size)) if bootstrap_size else n
    rng = np.random.default_rng(seed)
    bh, bu = [], []
    import sys

    it = range(int(bootstrap))
    tty = progress is not None and bootstrap and sys.stderr.isatty()
    if tty:  # a bar on a terminal; elsewhere (logs, pipes) a line per quarter
        from tqdm import tqdm

        it = tqdm(it, desc="bootstrap", unit="rep", file=sys.stderr, mininterval=1.0, leave=False)
    step = max(1, int(bootstrap) // 4)
    for i in it:
        if progress is not None and not tty and i and i % step == 0:
            progress(f"bootstrap {i}/{int(bootstrap)} (m = {m})")
        idx = rng.integers(0, n, m)
        t, e, s = T[idx], E[idx], S[idx]
        if not e.any():
            continue
        bh.append(harrell(t, e, s))
        if math.isfinite(c_u):
            try:
                bu.append(uno(t, e, s))
            except ValueError:
                pass
    scale = math.sqrt(m / n)

    def ci(est, reps):
        if len(reps) < 10 or not math.isfinite(est):
            return None, None
        d = (np.asarray(reps) - np.mean(reps)) * scale  # m-out-of-n: deviations shrunk by sqrt(m/n)
        lo, hi = np.quantile(d, [0.025, 0.975])
        return _f(est + lo), _f(est + hi)

    lo_h, hi_h = ci(c_h, bh)
    lo_u, hi_u = ci(c_u, bu)
    boot = {"replicates": int(bootstrap), "done": len(bh), "sample_size": m, "seed": seed,
            "method": "percentile bootstrap" if m == n else f"m-out-of-n bootstrap (m={m}, deviations scaled by sqrt(m/n))"}
    conc = {"harrell": {"c": _f(c_h), "lower": lo_h, "upper": hi_h, "library": "lifelines.utils.concordance_index"},
            "uno": {"c": _f(c_u), "lower": lo_u, "upper": hi_u, "tau": tau, "library": "sksurv.metrics.concordance_index_ipcw"},
            "bootstrap": boot}
    auc: dict[str, Any] = {}
    rows = []
    if valid_h:
        y = Surv.from_arrays(E, T)
        aucs, mean_auc = cumulative_dynamic_auc(y, y, S, valid_h)
        for h, a in zip(valid_h, aucs):
            auc[f"{h:g}"] = _f(a)
            rows.append({"horizon_years": h, "auc": float(a)})
    return conc, {"library": "sksurv.metrics.cumulative_dynamic_auc", "auc": auc}, pd.DataFrame(rows)
