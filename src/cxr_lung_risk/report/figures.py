"""The report's figures (matplotlib, lifelines' plotting helpers), each saved as PNG and SVG."""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Figure", "make_figures"]

COLORS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02"]


@dataclass
class Figure:
    name: str
    title: str
    caption: str
    png: bytes
    svg: bytes


def _save(fig, name: str, title: str, caption: str) -> Figure:
    import matplotlib.pyplot as plt

    png, svg = io.BytesIO(), io.BytesIO()
    fig.savefig(png, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(svg, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return Figure(name, title, caption, png.getvalue(), svg.getvalue())


def make_figures(an, cohort, groups, score_name: str, only: tuple[str, ...] | None = None) -> list[Figure]:
    """The figures of an analysis (``only``: just these names)."""
    figs = _make_figures(an, cohort, groups, score_name)
    return [f for f in figs if only is None or f.name in only]


def _make_figures(an, cohort, groups, score_name: str) -> list[Figure]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "svg.hashsalt": "cxr-lung-risk", "svg.fonttype": "none"})
    figs: list[Figure] = []
    num = an.numbers
    labels = list(groups.labels)
    df = cohort.baseline
    grp = [groups.label(s) for s in df["_score"]]

    # score distribution per group
    fig, ax = plt.subplots(figsize=(7, 3.2))
    s = df["_score"].to_numpy(float)
    bins = np.linspace(np.floor(s.min()), np.ceil(s.max()) + 1e-9, 41)
    for i, g in enumerate(labels):
        v = s[np.asarray(grp) == g]
        if len(v):
            ax.hist(v, bins=bins, color=COLORS[i % len(COLORS)], alpha=0.8, label=f"{g} (n={len(v)})")
    for c in groups.cut_points:
        ax.axvline(c, color="k", lw=0.8, ls="--")
    ax.set_xlabel(f"{score_name} (years)")
    ax.set_ylabel("patients")
    ax.legend(frameon=False)
    figs.append(_save(fig, "score_distribution", "Score distribution per risk group",
                      f"Baseline {score_name} of the {len(s)} patients; dashed lines: the cut-points {', '.join(f'{c:g}' for c in groups.cut_points)}."))

    # Kaplan-Meier with 95 % bands and number at risk
    kms = [an.fitters[f"km:{g}"] for g in labels if f"km:{g}" in an.fitters]
    if kms:
        from lifelines.plotting import add_at_risk_counts

        fig, ax = plt.subplots(figsize=(7, 4.6))
        for i, g in enumerate(labels):
            k = an.fitters.get(f"km:{g}")
            if k is not None:
                k.plot_survival_function(ax=ax, ci_show=True, color=COLORS[i % len(COLORS)], show_censors=False)
        ax.set_xlabel("years of follow-up")
        ax.set_ylabel("survival free of the outcome")
        ax.set_ylim(max(0.0, ax.get_ylim()[0]), 1.01)
        lr = num.get("logrank", {}).get("overall")
        if lr:
            ax.set_title(f"log-rank p = {lr['p']:.3g}" if lr["p"] is not None and lr["p"] > 0 else "log-rank p < 1e-300", fontsize=9)
        tmax = max(float(k.timeline.max()) for k in kms)
        step = max(1, int(math.ceil(tmax / 8)))
        ax.set_xticks(np.arange(0, tmax + 1e-9, step))
        add_at_risk_counts(*kms, ax=ax, rows_to_show=["At risk"])
        figs.append(_save(fig, "kaplan_meier", "Kaplan-Meier curves per risk group",
                          "Kaplan-Meier estimates with 95 % confidence bands (log(-log)); number at risk below."))

    # forest plot of the Cox models
    rows = []
    for key, title in (("per5_univariable", "per 5 y, univariable"), ("group_univariable", "univariable"),
                       ("per5_multivariable", "per 5 y, multivariable"), ("group_multivariable", "multivariable")):
        fit = num["cox"].get(key)
        if not fit:
            continue
        terms = [t for t in fit["terms"] if t == "score_per5" or t.startswith("group:")]
        for t in terms:
            v = fit["terms"][t]
            lab = f"{score_name} per 5 years" if t == "score_per5" else fit.get("labels", {}).get(t, t)
            rows.append((f"{lab} ({title.split(',')[-1].strip()})", v["hr"], v["lower"], v["upper"]))
    for r in num.get("subgroups", []):
        if r.get("hr_per5") is not None:
            rows.append((f"{r['variable']} {r['level']}: per 5 years (n={r['n']})", r["hr_per5"], r["lower"], r["upper"]))
    rows = [r for r in rows if None not in r[1:] and r[2] > 0]
    if rows:
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.0))
        y = np.arange(len(rows))[::-1]
        hr = np.array([r[1] for r in rows])
        lo = np.array([r[2] for r in rows])
        hi = np.array([r[3] for r in rows])
        ax.errorbar(hr, y, xerr=[hr - lo, hi - hr], fmt="s", color="#333", ecolor="#333", capsize=2, ms=4)
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

        lo_x, hi_x = float(np.min(lo)), float(np.max(hi))
        ticks = [v for v in (0.125, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128) if lo_x / 2 <= v <= hi_x * 2] or [1]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.set_xticklabels([f"{v:g}" for v in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks(y)
        ax.set_yticklabels([r[0] for r in rows])
        ax.set_xlabel("hazard ratio (95 % CI, log scale)")
        for yi, (h, l_, u) in zip(y, zip(hr, lo, hi)):
            ax.annotate(f"{h:.2f} ({l_:.2f}-{u:.2f})", (1.0, yi), xycoords=("axes fraction", "data"), xytext=(6, 0),
                        textcoords="offset points", va="center", fontsize=8)
        figs.append(_save(fig, "forest", "Hazard ratios (Cox models, subgroups)",
                          f"Hazard ratios of {score_name} per 5 years and of each risk group against {labels[0]}; subgroups per 5 years."))

    # time-dependent AUC
    auc = num.get("time_dependent_auc", {}).get("auc", {})
    if auc:
        fig, ax = plt.subplots(figsize=(5, 3))
        xs = [float(k) for k in auc]
        ax.plot(xs, list(auc.values()), "o-", color=COLORS[2])
        ax.set_ylim(0.5, 1.0)
        ax.set_xlabel("horizon (years)")
        ax.set_ylabel("cumulative/dynamic AUC")
        figs.append(_save(fig, "time_dependent_auc", "Time-dependent AUC", "Cumulative/dynamic AUC of the score at each horizon (scikit-survival)."))

    # cumulative incidence (competing risks)
    cifs = [(g, an.fitters[f"cif:{g}"]) for g in labels if f"cif:{g}" in an.fitters]
    if cifs:
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, (g, a) in enumerate(cifs):
            c = a.cumulative_density_.iloc[:, 0]
            ax.step(c.index, c.to_numpy(), where="post", color=COLORS[labels.index(g) % len(COLORS)], label=g)
        ax.set_xlabel("years of follow-up")
        ax.set_ylabel(f"cumulative incidence of {num['competing_risks']['event_of_interest']}")
        ax.legend(frameon=False)
        figs.append(_save(fig, "cumulative_incidence", "Cumulative incidence per risk group (competing risks)",
                          "Aalen-Johansen cumulative incidence of the event of interest, other event types competing."))

    # trajectories
    tr = an.fitters.get("trajectories")
    if tr is not None and len(tr):
        fig, ax = plt.subplots(figsize=(7, 3.6))
        keys = list(dict.fromkeys(tr["_key"]))[:200]
        for k in keys:
            g = tr[tr["_key"] == k].sort_values("years_from_first")
            ax.plot(g["years_from_first"], g["_score"], "-", color="#555", alpha=0.35, lw=0.8, marker=".", ms=3)
        for c in groups.cut_points:
            ax.axhline(c, color="k", lw=0.8, ls="--")
        ax.set_xlabel("years since the first radiograph")
        ax.set_ylabel(f"{score_name} (years)")
        figs.append(_save(fig, "trajectories", "Score trajectories over repeat radiographs",
                          f"{len(keys)} of {tr['_key'].nunique()} patients with several dated radiographs."))

    gap = an.fitters.get("age_gap")
    if gap is not None and len(gap):
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.hist(gap, bins=40, color=COLORS[1])
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel("CXR-Age minus chronological age (years)")
        ax.set_ylabel("patients")
        figs.append(_save(fig, "age_gap", "CXR-Age gap", "Distribution of the CXR-Age gap at baseline."))
    return figs


def write_figures(figs: list[Figure], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in figs:
        (folder / f"{f.name}.png").write_bytes(f.png)
        (folder / f"{f.name}.svg").write_bytes(f.svg)
