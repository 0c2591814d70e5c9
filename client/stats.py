"""The site side of the treatment-effect analysis (``mode = "analyse"``): sums, never a row.

The coordinator (server/analyse.py) asks each site for two kinds of aggregate:

- ``describe``: patients and events per treatment arm and per subgroup level (the
  word "suppressed" instead, below ``min-cell``); Kaplan–Meier counts per time bin
  and arm, with follow-up rounded up to the end of a ``km-bin``; and the log-rank
  test's observed − expected and variance, computed at the exact event times and
  summed per bin (so the stratified test is exact, yet no time leaves the site).
- ``newton``: for each requested Cox model, the log partial likelihood of this
  site's stratum (Efron's ties), its gradient and Hessian at the coordinator's
  coefficients. Summed over sites they give a Newton step of the Cox model
  stratified by site: the same fit as all rows in one place.

Columns enter in natural units. Each model's columns are centred at this site's
own mean before ``exp(x·β)``: a model stratified by site cannot tell (the
partial likelihood of a stratum is invariant to a shift of its covariates), and
it keeps the exponentials well scaled.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.data.tabular import COHORT_FILE, read_cohort
from models.errors import SiteDataError

log = logging.getLogger(__name__)
MAX_LEVELS = 10  # a subgroup column is a handful of integer codes (mutation 0/1, sex, stage)
ARMS = (0, 1)


@dataclass
class AnalysisData:
    site: str
    treatment: str
    time: np.ndarray  # float64, > 0
    event: np.ndarray  # 0/1
    columns: dict[str, np.ndarray]  # every column the run names (treatment, covariates, subgroups), float64
    skipped: int

    def __len__(self) -> int:
        return len(self.time)

    @property
    def arm(self) -> np.ndarray:
        return self.columns[self.treatment]


def load_analysis_data(folder: Path, site: str, treatment: str, covariates: list[str],
                       subgroups: list[str]) -> AnalysisData:
    """``cohort.csv`` with the columns the analysis names; rows missing any of them are skipped (counted)."""
    import pandas as pd

    frame = read_cohort(folder, site)
    for column in ("time", "event"):
        if column not in frame.columns:
            raise SiteDataError(f"site {site}: {COHORT_FILE} has no column '{column}'")
    named = [(treatment, "treatment")] + [(c, "covariate") for c in covariates] + [(s, "subgroup") for s in subgroups]
    for column, role in named:
        if column in ("time", "event", "patient_id", "split"):
            raise SiteDataError(f"site {site}: column '{column}' cannot be the analysis' {role}")
        if column not in frame.columns:
            raise SiteDataError(f"site {site}: {COHORT_FILE} has no column '{column}' (named as {role})")
        if not pd.api.types.is_numeric_dtype(frame[column]) or pd.api.types.is_bool_dtype(frame[column]):
            raise SiteDataError(f"site {site}: {COHORT_FILE} column '{column}' ({role}) is not numeric")
    columns = list(dict.fromkeys(c for c, _ in named))
    time = pd.to_numeric(frame["time"], errors="coerce").to_numpy(dtype=float)
    event = pd.to_numeric(frame["event"], errors="coerce").to_numpy(dtype=float)
    values = frame[columns].to_numpy(dtype=float)
    keep = (time > 0) & np.isfinite(time) & np.isin(event, (0, 1)) & np.isfinite(values).all(axis=1)
    skipped = int((~keep).sum())
    if skipped:
        log.warning("site %s: %d rows skipped for the analysis (invalid time/event or a missing value)", site, skipped)
    data = {c: values[keep, i] for i, c in enumerate(columns)}
    if not np.isin(data[treatment], ARMS).all():
        raise SiteDataError(f"site {site}: treatment column '{treatment}' must hold 0 (control) or 1 (treated) "
                            "only; it holds other values")
    for column in subgroups:
        levels = np.unique(data[column])
        if not np.all(levels == np.round(levels)):
            raise SiteDataError(f"site {site}: subgroup column '{column}' must hold integer levels")
        if len(levels) > MAX_LEVELS:
            raise SiteDataError(f"site {site}: subgroup column '{column}' has more than {MAX_LEVELS} levels; "
                                "a subgroup needs a few integer codes")
    if keep.sum() == 0:
        raise SiteDataError(f"site {site}: no usable patients for the analysis after skipping invalid rows")
    return AnalysisData(site, treatment, time[keep], event[keep].astype(np.int64), data, skipped)


def time_bins(time: np.ndarray, km_bin: float) -> np.ndarray:
    """Follow-up rounded up to the end of its bin, as a bin number (1 = (0, km_bin])."""
    return np.maximum(np.ceil(time / km_bin), 1).astype(np.int64)


def km_counts(time: np.ndarray, event: np.ndarray, km_bin: float) -> dict[str, list[int]]:
    """Per bin 1..K: at risk at its start, events and censorings in it."""
    k = time_bins(time, km_bin)
    size = int(k.max()) + 1
    events = np.bincount(k[event == 1], minlength=size)[1:]
    censored = np.bincount(k[event == 0], minlength=size)[1:]
    at_risk = len(time) - np.concatenate([[0], np.cumsum(events + censored)[:-1]])
    return {"at_risk": at_risk.tolist(), "events": events.tolist(), "censored": censored.tolist()}


def logrank_bins(time: np.ndarray, event: np.ndarray, arm: np.ndarray, km_bin: float) -> dict[str, list[float]]:
    """Log-rank observed − expected (arm 1) and variance, at the exact event times, summed per bin."""
    order = np.argsort(time, kind="stable")
    t, e, a = time[order], event[order], arm[order]
    times = np.unique(t[e == 1])
    start = np.searchsorted(t, times, side="left")
    n = len(t) - start
    n1 = np.concatenate([np.cumsum(a[::-1])[::-1], [0]])[start]
    dead = (e == 1)
    d = np.bincount(np.searchsorted(times, t[dead]), minlength=len(times))
    d1 = np.bincount(np.searchsorted(times, t[dead & (a == 1)]), minlength=len(times))
    oe = d1 - d * n1 / n
    with np.errstate(invalid="ignore", divide="ignore"):
        v = np.where(n > 1, d * (n1 / n) * (1 - n1 / n) * (n - d) / (n - 1), 0.0)
    size = int(time_bins(time, km_bin).max()) + 1
    k = time_bins(times, km_bin)
    return {"oe": np.bincount(k, weights=oe, minlength=size)[1:].tolist(),
            "v": np.bincount(k, weights=v, minlength=size)[1:].tolist()}


def _enough(arm: np.ndarray, mask: np.ndarray, min_cell: int) -> bool:
    return all(int(((arm == a) & mask).sum()) >= min_cell for a in ARMS)


def describe(data: AnalysisData, subgroups: list[str], km_bin: float, min_cell: int) -> dict:
    """Counts per arm and subgroup level (or suppressed), KM counts per arm, log-rank sums per bin."""
    arm = data.arm
    out: dict = {"num-patients": len(data) if len(data) >= min_cell else 0,
                 "skipped-rows": data.skipped if data.skipped >= min_cell else 0,
                 "skipped-suppressed": int(0 < data.skipped < min_cell)}
    for a in ARMS:
        mask = arm == a
        if int(mask.sum()) < min_cell:
            out[f"arm/{a}/suppressed"] = 1
            continue
        out[f"arm/{a}/n"] = int(mask.sum())
        out[f"arm/{a}/events"] = int(data.event[mask].sum())
        for key, values in km_counts(data.time[mask], data.event[mask], km_bin).items():
            out[f"km/{a}/{key}"] = values
    if _enough(arm, np.ones(len(data), bool), min_cell):
        for key, values in logrank_bins(data.time, data.event, arm, km_bin).items():
            out[f"logrank/{key}"] = values
    for column in subgroups:
        values = data.columns[column]
        for level in np.unique(values):
            mask = values == level
            key = f"level/{column}={int(level)}"
            if not _enough(arm, mask, min_cell):
                out[f"{key}/suppressed"] = 1
                continue
            for a in ARMS:
                out[f"{key}/arm/{a}/n"] = int(((arm == a) & mask).sum())
                out[f"{key}/arm/{a}/events"] = int(data.event[(arm == a) & mask].sum())
    return out


def _factor(data: AnalysisData, name: str) -> np.ndarray:
    if "=" in name:
        column, level = name.split("=", 1)
        return (data.columns[column] == float(level)).astype(float)
    return data.columns[name]


def design(data: AnalysisData, terms: list[str]) -> np.ndarray:
    """One column per term; a term is a column, a level indicator ``col=L``, or a product ``a:b``."""
    columns = []
    for term in terms:
        value = np.ones(len(data))
        for factor in term.split(":"):
            value = value * _factor(data, factor)
        columns.append(value)
    return np.column_stack(columns) if columns else np.zeros((len(data), 0))


def fit_rows(data: AnalysisData, where: dict | None, min_cell: int) -> np.ndarray | None:
    """The rows this site contributes to one model, or None: an arm (within a level) under ``min-cell`` is left out."""
    everyone = np.ones(len(data), bool)
    if not where:
        return everyone if _enough(data.arm, everyone, min_cell) else None
    values = data.columns[where["column"]]
    mask = np.zeros(len(data), bool)
    for level in where["levels"]:
        cell = values == float(level)
        if _enough(data.arm, cell, min_cell):
            mask |= cell
    return mask if mask.any() else None


def efron(x: np.ndarray, time: np.ndarray, event: np.ndarray, beta: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Log partial likelihood, gradient and Hessian of one stratum, Efron's method for ties (float64)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(time, kind="stable")
    x, t, e = x[order], time[order], event[order]
    eta = x @ beta
    shift = float(eta.max()) if len(eta) else 0.0  # cancels exactly: as many log-sum terms as events
    w = np.exp(eta - shift)
    p = x.shape[1]
    r0 = np.cumsum(w[::-1])[::-1]
    r1 = np.cumsum((w[:, None] * x)[::-1], axis=0)[::-1]
    r2 = np.cumsum((w[:, None, None] * x[:, :, None] * x[:, None, :])[::-1], axis=0)[::-1]
    dead = e == 1
    times, group = np.unique(t[dead], return_inverse=True)
    if len(times) == 0:
        return 0.0, np.zeros(p), np.zeros((p, p))
    start = np.searchsorted(t, times, side="left")
    d = np.bincount(group, minlength=len(times))
    wd, xd = w[dead], x[dead]
    d0 = np.bincount(group, weights=wd, minlength=len(times))
    d1 = np.zeros((len(times), p))
    np.add.at(d1, group, wd[:, None] * xd)
    d2 = np.zeros((len(times), p, p))
    np.add.at(d2, group, wd[:, None, None] * xd[:, :, None] * xd[:, None, :])
    g = np.repeat(np.arange(len(times)), d)  # one Efron term per event
    a = (np.arange(len(g)) - np.repeat(np.cumsum(d) - d, d)) / d[g]
    s0 = r0[start][g] - a * d0[g]
    s1 = r1[start][g] - a[:, None] * d1[g]
    s2 = r2[start][g] - a[:, None, None] * d2[g]
    loglik = float((eta[dead] - shift).sum() - np.log(s0).sum())
    gradient = xd.sum(axis=0) - (s1 / s0[:, None]).sum(axis=0)
    mean = s1 / s0[:, None]
    hessian = -((s2 / s0[:, None, None]).sum(axis=0) - np.einsum("ki,kj->ij", mean, mean))
    return loglik, gradient, hessian


def newton_sums(cohort, weights: np.ndarray) -> dict[str, np.ndarray]:
    """For ``strategy = "newton"``: the training split's Efron log-likelihood, gradient and Hessian at the linear
    model's weights, and the sums of x and x² (with n) that scale lifelines' penalty on the coordinator."""
    beta = np.asarray(weights, dtype=np.float64).reshape(-1)
    x = cohort.train.x.astype(np.float64)
    if x.shape[1] != len(beta):
        raise SiteDataError(f"site {cohort.site}: the linear Cox model has {len(beta)} weights; the site has "
                            f"{x.shape[1]} features")
    loglik, gradient, hessian = efron(x, cohort.train.time, cohort.train.event, beta)
    return {"gradient": gradient, "hessian": hessian, "loglik": np.array([loglik]), "sum_x": x.sum(axis=0),
            "sum_x2": (x ** 2).sum(axis=0), "n": np.array([float(len(x))])}


def cox_sums(data: AnalysisData, fits: dict[str, dict], min_cell: int) -> dict:
    """Per requested model: this stratum's log-likelihood, gradient and Hessian at its coefficients."""
    out: dict = {}
    for name, fit in fits.items():
        rows = fit_rows(data, fit.get("where"), min_cell)
        if rows is None:
            out[f"cox/{name}/excluded"] = 1
            continue
        x = design(data, fit["terms"])[rows]
        x = x - x.mean(axis=0)  # invisible to a model stratified by site; see the module docstring
        beta = np.asarray(fit["beta"], dtype=np.float64)
        loglik, gradient, hessian = efron(x, data.time[rows], data.event[rows], beta)
        out[f"cox/{name}/loglik"] = loglik
        out[f"cox/{name}/gradient"] = gradient.tolist()
        out[f"cox/{name}/hessian"] = hessian.reshape(-1).tolist()
        out[f"cox/{name}/n"] = int(rows.sum())
    return out


def digest(metrics: dict) -> str:
    """SHA-256 of a reply's numbers, the same on both sides of the wire: what both ledgers record."""
    def plain(v):
        return [float(x) for x in v] if isinstance(v, (list, tuple)) else float(v)

    text = json.dumps({k: plain(v) for k, v in sorted(metrics.items())}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def ledger_view(metrics: dict) -> dict:
    """What a ledger keeps of an analysis reply: its digest, and the Cox sums (coefficient-space numbers,
    no counts). Per-bin counts can be below ``min-cell``, so only their digest is kept."""
    sums = {k: v for k, v in metrics.items() if k.startswith("cox/") and k.rsplit("/", 1)[1] in
            ("loglik", "gradient", "hessian", "excluded")}
    return {"digest": digest(metrics), "sums": sums}
