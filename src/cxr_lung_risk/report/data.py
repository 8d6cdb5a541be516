"""Reading and checking the report's inputs: the scored results and the outcomes table.

Every problem that stops the report is a :class:`~cxr_lung_risk.errors.UsageError` with one plain
sentence, raised before anything is written. Rows that are only unusable (no outcome, a missing
time) are excluded, counted and listed with their reason (the cohort flow).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..errors import UsageError

__all__ = ["Covariate", "Cohort", "read_results", "read_outcomes", "build_cohort", "parse_covariates", "CENSORED_VALUES"]

KEYS = ("PatientID", "AccessionNumber", "StudyInstanceUID")
#: event values that mean "censored" when the event column holds event types
CENSORED_VALUES = {"", "0", "0.0", "censored", "none", "alive", "false"}


@dataclass(frozen=True)
class Covariate:
    name: str
    categorical: bool = False


def parse_covariates(text: str | None) -> list[Covariate]:
    """``age,sex:cat,smoking:cat`` -> covariates (``:cat`` declares a categorical one)."""
    out: list[Covariate] = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, _, kind = part.partition(":")
        kind = kind.strip().lower()
        if kind not in ("", "cat", "categorical", "num", "numeric"):
            raise UsageError(f"--covariates: {part!r} has an unknown kind {kind!r}; write NAME or NAME:cat")
        out.append(Covariate(name.strip(), kind in ("cat", "categorical")))
    return out


def found_columns(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    return ", ".join(cols[:30]) + (f", ... ({len(cols)} in all)" if len(cols) > 30 else "") if cols else "none"


def _read_table(path: Path, what: str) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet" or path.is_dir():
            return pd.read_parquet(path)
        if suffix == ".json":
            return pd.DataFrame(pd.read_json(path, orient="records", dtype=False))
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except ImportError as e:
        raise UsageError(f"reading {path} needs {e.name or 'pyarrow'}: pip install 'cxr-lung-risk[report]'") from None
    except (ValueError, OSError, UnicodeDecodeError) as e:
        if isinstance(e, FileNotFoundError):
            raise UsageError(f"{what} not found: {path}") from None
        raise UsageError(f"{what} {path} cannot be read as {suffix.lstrip('.') or 'CSV'}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _results_file(p: Path) -> Path:
    if p.is_dir():
        for name in ("cxr_lung_risk.csv", "cxr_lung_risk.json"):
            if (p / name).is_file():
                return p / name
        if (p / "parquet").is_dir() and any((p / "parquet").glob("part-*.parquet")):
            return p / "parquet"
        raise UsageError(f"{p} holds no predict results (cxr_lung_risk.csv, cxr_lung_risk.json or parquet/)")
    if not p.exists():
        raise UsageError(f"results not found: {p}")
    return p


def read_results(paths: Sequence[Path]) -> tuple[pd.DataFrame, list[str]]:
    """The rows of every RESULTS argument (folders or CSV/JSON/Parquet tables), one table; and
    the sources read."""
    frames, sources = [], []
    for p in paths:
        f = _results_file(Path(p))
        df = _read_table(f, "results")
        df["_source"] = str(f)
        frames.append(df)
        sources.append(str(f))
    if not frames:
        raise UsageError("no RESULTS given: name predict output folders or their tables")
    cols = [set(f.columns) for f in frames]
    if len({frozenset(c) for c in cols}) > 1:
        common = set.intersection(*cols)
        frames = [f[[c for c in f.columns if c in common]] for f in frames]
    return pd.concat(frames, ignore_index=True), sources


def read_outcomes(path: Path) -> pd.DataFrame:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"outcomes file not found: {p}")
    if p.is_dir():
        raise UsageError(f"--outcomes {p} is a folder; name a CSV or Parquet file")
    return _read_table(p, "outcomes file")


def _need(df: pd.DataFrame, col: str, what: str, option: str) -> None:
    if col not in df.columns:
        raise UsageError(f"the {what} have no column {col!r} (found: {found_columns(df)}); name the right one with {option}")


def _numeric(series: pd.Series, col: str, what: str) -> pd.Series:
    """Numbers of ``series`` (empty cells are NaN); a non-numeric cell is an error naming it."""
    s = series
    num = pd.to_numeric(s, errors="coerce")
    bad = num.isna() & s.notna() & (s.astype(str).str.strip() != "")
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise UsageError(f"column {col!r} of the {what} has non-numeric values ({int(bad.sum())} rows; the first, row {i + 2}: {s.iloc[i]!r})")
    return num.astype(float)


def _key(series: pd.Series) -> pd.Series:
    return series.astype("string").str.strip().fillna("")


@dataclass
class Cohort:
    """The joined cohort: ``baseline`` one row per patient (the analyses), ``all_rows`` every joined
    radiograph (trajectories), and the flow (counts and exclusions with reasons)."""

    baseline: pd.DataFrame
    all_rows: pd.DataFrame
    flow: dict[str, Any]
    excluded: pd.DataFrame  # key, side, reason
    event_types: list[str] = field(default_factory=list)  # competing risks: all event types seen
    event_of_interest: str = "1"
    competing: bool = False


def build_cohort(results: pd.DataFrame, outcomes: pd.DataFrame, *, key: str, time: str, event: str, score: str,
                 covariates: Sequence[Covariate], baseline: str = "earliest", event_of_interest: str | None = None,
                 extra_numeric: Sequence[str] = ()) -> Cohort:
    """Check the columns and values, join results to outcomes on ``key`` and select the baseline
    radiograph per patient (``earliest``/``latest`` by StudyDate, ``first`` in file order)."""
    if key not in KEYS:
        raise UsageError(f"--key {key!r} is not one of {', '.join(KEYS)}")
    _need(results, key, "results", "--key" + ("" if key != "PatientID" else " (or run predict with --linkage-columns)"))
    _need(results, score, "results", "--score")
    _need(outcomes, key, "outcomes", "--key")
    _need(outcomes, time, "outcomes", "--time")
    _need(outcomes, event, "outcomes", "--event")
    for c in covariates:
        if c.name not in outcomes.columns and c.name not in results.columns:
            raise UsageError(f"covariate {c.name!r} is in neither the outcomes (found: {found_columns(outcomes)}) nor the results")
    flow: dict[str, Any] = {"results_rows_read": int(len(results)), "outcomes_rows_read": int(len(outcomes))}
    excluded: list[dict[str, str]] = []

    res = results.copy()
    res["_key"] = _key(res[key])
    res["_score"] = _numeric(res[score], score, "results")
    no_key = res["_key"] == ""
    for k in res.loc[no_key, "File"] if "File" in res.columns else []:
        excluded.append({"key": str(k), "side": "results", "reason": f"no {key} (a PNG/JPEG input, or predict ran without --linkage-columns)"})
    no_score = ~no_key & res["_score"].isna()
    for k in res.loc[no_score, "_key"]:
        excluded.append({"key": k, "side": "results", "reason": f"no {score} value"})
    res = res[~no_key & ~no_score]
    flow["results_rows_usable"] = int(len(res))

    out = outcomes.copy()
    out["_key"] = _key(out[key])
    out["_time"] = _numeric(out[time], time, "outcomes")
    finite = out["_time"].dropna()
    if (finite < 0).any():
        i = int(np.flatnonzero((out["_time"] < 0).to_numpy())[0])
        raise UsageError(f"column {time!r} of the outcomes has negative follow-up times ({int((finite < 0).sum())} rows; the first, row {i + 2}: {out[time].iloc[i]!r})")
    if np.isinf(finite).any():
        raise UsageError(f"column {time!r} of the outcomes has infinite follow-up times")
    raw_event = out[event].astype("string").str.strip().fillna("")
    num_event = pd.to_numeric(raw_event.replace("", np.nan), errors="coerce")
    values = set(raw_event[raw_event != ""].unique())
    competing = False
    if not num_event[raw_event != ""].isna().any() and set(num_event.dropna().unique()) <= {0.0, 1.0} and event_of_interest in (None, "1"):
        ev = num_event
        types = ["1"]
        interest = "1"
    else:
        lowered = raw_event.str.lower()
        kinds = sorted({v for v in values if v.lower() not in CENSORED_VALUES})
        if event_of_interest is None:
            if len(kinds) == 1:
                event_of_interest = kinds[0]
            else:
                raise UsageError(f"column {event!r} of the outcomes holds event types ({', '.join(map(repr, kinds[:6]))}); "
                                 "say which one is the outcome with --event-of-interest (0 or empty means censored)")
        if event_of_interest not in kinds:
            raise UsageError(f"--event-of-interest {event_of_interest!r} is not among the values of column {event!r} "
                             f"({', '.join(map(repr, kinds[:6])) or 'none but censored'})")
        ev = pd.Series(np.where(raw_event == "", np.nan, np.where(lowered.isin(CENSORED_VALUES), 0.0, 1.0)), index=out.index)
        out["_etype"] = np.where(lowered.isin(CENSORED_VALUES), "", raw_event)
        types = kinds
        interest = event_of_interest
        competing = len(kinds) > 1
    out["_event"] = np.where(raw_event == "", np.nan,
                             (out["_etype"] == interest).astype(float) if "_etype" in out.columns else ev)
    missing_key = out["_key"] == ""
    missing_time = ~missing_key & out["_time"].isna()
    missing_event = ~missing_key & ~missing_time & pd.isna(out["_event"])
    for mask, why in ((missing_key, f"no {key}"), (missing_time, f"no {time}"), (missing_event, f"no {event}")):
        for k in out.loc[mask, "_key"]:
            excluded.append({"key": k, "side": "outcomes", "reason": why})
    out = out[~missing_key & ~missing_time & ~missing_event]
    dup = out["_key"].duplicated(keep="first")
    for k in out.loc[dup, "_key"]:
        excluded.append({"key": k, "side": "outcomes", "reason": f"{key} repeated in the outcomes (the first row is used)"})
    out = out[~dup]
    flow["outcomes_rows_usable"] = int(len(out))

    res_keys, out_keys = set(res["_key"]), set(out["_key"])
    if not res_keys & out_keys:
        ex_r = ", ".join(repr(k) for k in sorted(res_keys)[:3]) or "none"
        ex_o = ", ".join(repr(k) for k in sorted(out_keys)[:3]) or "none"
        raise UsageError(f"no row joins: key {key!r} was tried; results have e.g. {ex_r}, outcomes have e.g. {ex_o}")
    for k in sorted(res_keys - out_keys):
        excluded.append({"key": k, "side": "results", "reason": "not in the outcomes"})
    for k in sorted(out_keys - res_keys):
        excluded.append({"key": k, "side": "outcomes", "reason": "not in the results"})
    flow["unjoined_results_keys"] = len(res_keys - out_keys)
    flow["unjoined_outcomes_keys"] = len(out_keys - res_keys)

    drop = [c for c in out.columns if c in res.columns and c != "_key"]
    joined = res.merge(out.drop(columns=drop), on="_key", how="inner")
    joined["_order"] = np.arange(len(joined))
    if "StudyDate" in joined.columns:
        joined["_date"] = pd.to_datetime(joined["StudyDate"].astype("string").str.strip(), format="%Y%m%d", errors="coerce")
    else:
        joined["_date"] = pd.NaT
    flow["radiographs_joined"] = int(len(joined))
    flow["patients_joined"] = int(joined["_key"].nunique())
    if baseline not in ("earliest", "latest", "first"):
        raise UsageError(f"--baseline {baseline!r}: choose earliest, latest or first")
    if baseline == "first":
        order = joined.sort_values(["_key", "_order"])
    else:
        order = joined.sort_values(["_key", "_date", "_order"], ascending=[True, baseline == "earliest", True], na_position="last")
    base = order.drop_duplicates("_key", keep="first").copy()
    flow["baseline_rule"] = baseline + (" StudyDate" if baseline != "first" else " row in file order")
    flow["patients_with_repeat_radiographs"] = int((joined["_key"].value_counts() > 1).sum())

    for c in covariates:
        if c.categorical:
            base[c.name] = base[c.name].astype("string").str.strip().replace("", pd.NA)
        else:
            base[c.name] = _numeric(base[c.name], c.name, "outcomes")
    for c in extra_numeric:
        if c in base.columns:
            base[c] = pd.to_numeric(base[c], errors="coerce")
    base = base.reset_index(drop=True)
    flow["patients_analysed"] = int(len(base))
    flow["events"] = int(base["_event"].sum())
    if flow["events"] == 0:
        raise UsageError(f"all {len(base)} joined patients are censored (no event of interest in column {event!r}); "
                         "there is nothing to analyse")
    exc = pd.DataFrame(excluded, columns=["key", "side", "reason"])
    flow["excluded"] = {f"{s}: {r}": int(n) for (s, r), n in exc.groupby(["side", "reason"]).size().items()} if len(exc) else {}
    return Cohort(baseline=base, all_rows=joined, flow=flow, excluded=exc, event_types=types, event_of_interest=interest,
                  competing=competing)
