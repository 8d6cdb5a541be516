"""A simulated cohort for the report's tests, benchmark and README figure.

Scores ~ Normal(62, 9) years; hazard ``h0 * exp(log(hr_per5) * (score - 60) / 5 + log(hr_sex) * male)``
(exponential times), uniform administrative censoring, times rounded to ``round_to`` years (ties);
an age covariate, a sex covariate and, optionally, competing event types and repeat radiographs.
Writes a results CSV of the shape ``predict --linkage-columns`` writes and an outcomes CSV.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["simulate", "write_simulated"]


def simulate(n: int = 3000, *, hr_per5: float = 1.6, hr_sex: float = 1.3, seed: int = 1, base_rate: float = 0.02,
             follow_up: float = 12.0, round_to: float = 0.1, competing: bool = False, repeats: float = 0.0):
    """-> (results DataFrame, outcomes DataFrame)."""
    import pandas as pd

    from ..risk_groups import lung_risk_groups

    rng = np.random.default_rng(seed)
    score = np.clip(rng.normal(62.0, 9.0, n), 30, 100).round(4)
    male = rng.integers(0, 2, n)
    age = np.clip(rng.normal(62.0, 6.0, n) + 0.3 * (score - 62.0), 40, 90).round(1)
    rate = base_rate * np.exp(np.log(hr_per5) * (score - 60.0) / 5.0 + np.log(hr_sex) * male)
    t_event = rng.exponential(1.0 / rate)
    t_other = rng.exponential(1.0 / (base_rate * 1.5), n) if competing else np.full(n, np.inf)
    t_cens = rng.uniform(follow_up / 3.0, follow_up, n)
    t = np.minimum(np.minimum(t_event, t_other), t_cens)
    t = np.maximum(round_to, np.round(t / round_to) * round_to).round(6)
    if competing:
        event = np.where(t_cens <= np.minimum(t_event, t_other), "0", np.where(t_event <= t_other, "lung", "other"))
    else:
        event = (t_event < t_cens).astype(int)
    ids = [f"SIM{i:06d}" for i in range(n)]
    groups = lung_risk_groups()
    days = rng.integers(0, 3 * 365, n)
    dates = (pd.Timestamp("2010-01-01") + pd.to_timedelta(days, unit="D")).strftime("%Y%m%d")
    res = pd.DataFrame({
        "File": [f"sim/{i}.dcm" for i in ids],
        "StudyInstanceUID": [f"2.25.{1000 + i}.1" for i in range(n)],
        "SeriesInstanceUID": [f"2.25.{1000 + i}.1.1" for i in range(n)],
        "SOPInstanceUID": [f"2.25.{1000 + i}.1.1.1" for i in range(n)],
        "PatientID": ids, "StudyDate": dates, "AccessionNumber": [f"A{i:07d}" for i in range(n)], "ViewPosition": "PA",
        "CXR_Lung_Risk": score, "Weights": "lung-risk=published",
    })
    res["CXR_Lung_Risk_Group"] = [groups.label(s) for s in score]
    res["Chronological_Age"] = age
    if repeats > 0:
        k = rng.random(n) < repeats
        extra = res[k].copy()
        extra["File"] = extra["File"].str.replace(".dcm", "_2.dcm", regex=False)
        extra["StudyDate"] = (pd.to_datetime(extra["StudyDate"], format="%Y%m%d") + pd.to_timedelta(rng.integers(300, 1500, k.sum()), unit="D")).dt.strftime("%Y%m%d")
        extra["CXR_Lung_Risk"] = (extra["CXR_Lung_Risk"] + rng.normal(1.0, 2.0, k.sum())).round(4)
        extra["CXR_Lung_Risk_Group"] = [groups.label(s) for s in extra["CXR_Lung_Risk"]]
        res = pd.concat([res, extra], ignore_index=True)
    # a second outcome (lung-cancer death): 40 % of the events of interest
    second = ((event == 1) if not competing else (event == "lung")) & (rng.random(n) < 0.4)
    out = pd.DataFrame({"PatientID": ids, "time": t, "event": event, "lung_cancer": second.astype(int), "age": age,
                        "sex": np.where(male == 1, "M", "F"),
                        "smoking": rng.choice(["never", "former", "current"], n, p=[0.4, 0.4, 0.2])})
    return res, out


def write_simulated(folder: Path, **kw) -> tuple[Path, Path]:
    """Write ``folder/cxr_lung_risk.csv`` (results) and ``folder/outcomes.csv``; returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    res, out = simulate(**kw)
    res.to_csv(folder / "cxr_lung_risk.csv", index=False)
    out.to_csv(folder / "outcomes.csv", index=False)
    return folder / "cxr_lung_risk.csv", folder / "outcomes.csv"
