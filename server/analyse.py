"""``mode = "analyse"``: does the treatment work, and for whom? Exact federated survival analysis.

The clinician's question, answered on every region's patients while each row
stays in its hospital:

1. the treatment's hazard ratio from a Cox model stratified by site (each
   hospital keeps its own baseline hazard), adjusted for ``covariates``, fitted
   by Newton–Raphson on the sites' summed gradients and Hessians (server/newton.py);
2. Kaplan–Meier curves per arm from per-bin counts (follow-up rounded up to the
   end of a ``km-bin``), with exponential-Greenwood bands, numbers at risk and
   median survival;
3. the log-rank test stratified by site, from each site's observed − expected
   and variance, computed at the exact times and summed per bin;
4. per ``subgroups`` column: the treatment's HR inside each level and the
   likelihood-ratio test of the treatment × subgroup interaction, with
   Holm-adjusted p-values across the columns.

``min-cell`` holds everywhere: a site's arm or subgroup level below it is sent as
"suppressed" and left out of that figure; a pooled level with fewer patients or
events than it in an arm is published as "suppressed"; a KM curve ends where
fewer than ``min-cell`` remain at risk. All Newton fits run in lockstep, so the
whole analysis costs one describe message and a handful of iterations per site.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from dataclasses import dataclass
from logging import INFO

import numpy as np
from flwr.app import ConfigRecord, Context, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from models.ledger import Ledger
from models.home import fedhosp_home
from client.stats import ARMS, ledger_view
from server import progress
from server.newton import MAX_ITERATIONS, FitError, NewtonFit
from server.settings import RunSettings
from server.ledgers import failure_recorded
from server.sites import FederationError, Refusal, exchange, wait_for_nodes

ANALYSE = f"{MessageType.QUERY}.analyse"


@dataclass(frozen=True)
class Request:
    """What the analysis asks the sites, from the run config (names and numbers only)."""

    treatment: str
    covariates: list[str]
    subgroups: list[str]
    km_bin: float
    min_cell: int

    @classmethod
    def from_settings(cls, settings: RunSettings) -> "Request":
        return cls(settings.treatment, settings.covariate_list, settings.subgroup_list, settings.km_bin,
                   settings.min_cell)

    def config(self, step: str, **extra) -> ConfigRecord:
        return ConfigRecord({"step": step, "treatment": self.treatment, "covariates": ",".join(self.covariates),
                             "subgroups": ",".join(self.subgroups), "km-bin": self.km_bin,
                             "min-cell": self.min_cell, **extra})


def _ask(grid: Grid, nodes: list[int], config: ConfigRecord, timeout: float
         ) -> tuple[dict[int, dict], dict[int, str], dict[int, Refusal]]:
    """One analysis message per node: the replies' numbers (and site name) by node, why the others gave none,
    and the refusals."""
    replies, failed, refused = exchange(grid, {node: RecordDict({"config": config}) for node in nodes}, ANALYSE,
                                        timeout)
    ok = {node: {"site": str(reply.content["site"]["site-name"]), **dict(reply.content["metrics"])}
          for node, reply in replies.items()}
    return ok, failed, refused


def _view(reply: dict) -> dict:
    """What the ledger keeps of a site's reply (the same digest the site's own ledger holds)."""
    return ledger_view({k: v for k, v in reply.items() if k != "site"})


def _describe(grid: Grid, settings: RunSettings, request: Request, ledger: Ledger):
    """Who takes part, and what each site has: refusals are the hospital's right; broken data stops the run."""
    nodes = wait_for_nodes(grid, settings.min_nodes, settings.round_timeout)
    ok, failed, refused = _ask(grid, nodes, request.config("describe"), settings.round_timeout)
    problems = [reason if reason.startswith("site ") else f"node {node}: {reason}" for node, reason in failed.items()]
    if problems:
        raise FederationError("analysis check failed:\n  - " + "\n  - ".join(problems))
    if not ok:
        raise FederationError("every site's policy refuses this analysis:\n  - " + "\n  - ".join(r.reason for r in refused.values()))
    names = [d["site"] for d in ok.values()]
    if len(set(names)) != len(names):
        raise FederationError(f"two nodes claim the same site name: {sorted(names)}")
    for arm in ARMS:
        if not any(f"arm/{arm}/n" in d for d in ok.values()):
            raise FederationError(f"treatment arm {arm} of '{request.treatment}' has fewer than min-cell = "
                                  f"{request.min_cell} patients at every site (or is empty): no comparison possible")
    return ok, {r.site: r.reason for r in refused.values()}


def _levels(described: dict[int, dict], column: str) -> list[int]:
    prefix = f"level/{column}="
    found = {int(k[len(prefix):].split("/", 1)[0]) for d in described.values() for k in d if k.startswith(prefix)}
    return sorted(found)


def _pooled_cells(described: dict[int, dict], column: str, level: int) -> dict:
    """Per arm: patients and events summed over the sites that did not suppress the level; which sites."""
    key = f"level/{column}={level}"
    sites = sorted(d["site"] for d in described.values() if f"{key}/arm/0/n" in d)
    cells = {a: {"n": sum(int(d.get(f"{key}/arm/{a}/n", 0)) for d in described.values()),
                 "events": sum(int(d.get(f"{key}/arm/{a}/events", 0)) for d in described.values())} for a in ARMS}
    return {"sites": sites, "cells": cells}


def plan_fits(request: Request, described: dict[int, dict]) -> tuple[dict[str, NewtonFit], dict]:
    """The Cox models: overall; per subgroup level; per subgroup column the interaction model and its reduction."""
    t, covariates = request.treatment, request.covariates
    fits = {"overall": NewtonFit("overall", [t, *covariates])}
    levels: dict = {}
    for column in request.subgroups:
        others = [c for c in covariates if c != column]
        levels[column] = {}
        estimable = []
        for level in _levels(described, column):
            pooled = _pooled_cells(described, column, level)
            small = any(c["n"] < request.min_cell or c["events"] < request.min_cell for c in pooled["cells"].values())
            levels[column][level] = {**pooled, "suppressed": small or not pooled["sites"]}
            if not levels[column][level]["suppressed"]:
                estimable.append(level)
                fits[f"{column}={level}"] = NewtonFit(f"{column}={level}", [t, *others],
                                                      {"column": column, "levels": [level]})
        if len(estimable) >= 2:
            dummies = [f"{column}={level}" for level in estimable[1:]]
            where = {"column": column, "levels": estimable}
            fits[f"{column}:main"] = NewtonFit(f"{column}:main", [t, *others, *dummies], where)
            fits[f"{column}:interaction"] = NewtonFit(f"{column}:interaction",
                                                      [t, *others, *dummies, *[f"{t}:{d}" for d in dummies]], where)
    return fits, levels


def newton_fits(grid: Grid, settings: RunSettings, request: Request, fits: dict[str, NewtonFit],
                nodes: dict[int, str], ledger: Ledger, seconds: dict[str, float]
                ) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Iterate every model to convergence in lockstep; the models that cannot be estimated, and who each rests on.

    A site that fails mid-fit stops the analysis: a sum without it is a different, wrong answer.
    """
    gaps: dict[str, str] = {}
    contributors: dict[str, list[str]] = {}
    active = dict(fits)
    for iteration in range(1, MAX_ITERATIONS + 1):
        if not active:
            break
        requests = {name: fit.request() for name, fit in active.items()}
        config = request.config("newton", iteration=iteration, fits=json.dumps(requests))
        progress.emit("analysis", iteration=iteration, models=len(active))
        ok, failed, refused = _ask(grid, list(nodes), config, settings.round_timeout)
        failed.update({node: refusal.reason for node, refusal in refused.items()})  # a refusal mid-fit stops it too
        if failed:
            node, reason = next(iter(failed.items()))
            raise FederationError(f"site {nodes[node]} failed during the Cox fit (iteration {iteration}): {reason}; "
                                  "the fit stops, since a sum without that site would be a wrong answer")
        for d in ok.values():
            seconds[d["site"]] = seconds.get(d["site"], 0.0) + float(d.get("compute-seconds", 0.0))
        ledger.append("analysis-iteration", {"iteration": iteration, "coefficients": {
            n: r["beta"] for n, r in requests.items()}, "sites": {d["site"]: _view(d) for d in ok.values()}})
        for name, fit in list(active.items()):
            sites = sorted(d["site"] for d in ok.values() if f"cox/{name}/loglik" in d)
            if contributors.setdefault(name, sites) != sites:
                raise FederationError(f"Cox model '{name}': the sites taking part changed between iterations")
            try:
                if not sites:
                    raise FitError(f"Cox model '{name}': no site has enough patients in both arms")
                p = len(fit.terms)
                total = [0.0, np.zeros(p), np.zeros((p, p))]
                for d in ok.values():
                    if f"cox/{name}/loglik" in d:
                        total[0] += float(d[f"cox/{name}/loglik"])
                        total[1] = total[1] + np.asarray(d[f"cox/{name}/gradient"], dtype=float)
                        total[2] = total[2] + np.asarray(d[f"cox/{name}/hessian"], dtype=float).reshape(p, p)
                fit.update(*total)
            except FitError as exc:
                if name == "overall":
                    raise
                gaps[name] = str(exc)
                del active[name]
                continue
            if fit.converged:
                del active[name]
    for name, fit in active.items():
        try:
            fit.check_converged()
        except FitError as exc:
            if name == "overall":
                raise
            gaps[name] = str(exc)
    return gaps, contributors


def _padded(arrays: list[list[float]]) -> np.ndarray:
    size = max((len(a) for a in arrays), default=0)
    out = np.zeros(size)
    for a in arrays:
        out[: len(a)] += np.asarray(a, dtype=float)
    return out


def kaplan_meier(described: dict[int, dict], arm: int, km_bin: float, min_cell: int) -> dict | None:
    """The pooled curve of one arm from the sites' per-bin counts; it ends where fewer than min-cell are at risk."""
    sites = [d for d in described.values() if f"km/{arm}/at_risk" in d]
    if not sites:
        return None
    at_risk = _padded([d[f"km/{arm}/at_risk"] for d in sites])
    events = _padded([d[f"km/{arm}/events"] for d in sites])
    low_risk = np.flatnonzero(at_risk < min_cell)
    last = int(low_risk[0]) if len(low_risk) else len(at_risk)  # bins 1..last are published
    n, d = at_risk[:last], events[:last]
    survival = np.cumprod(1 - d / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        greenwood = np.cumsum(np.where(n > d, d / (n * (n - d)), 0.0))
        v = np.log(survival)
        se = np.sqrt(greenwood) / v
        low = np.exp(-np.exp(np.log(-v) - 1.959963984540054 * se))
        high = np.exp(-np.exp(np.log(-v) + 1.959963984540054 * se))
    low, high = np.nan_to_num(low, nan=1.0), np.nan_to_num(high, nan=1.0)  # as lifelines: no events yet
    curve = {"time": [0.0, *[km_bin * (k + 1) for k in range(last)]],
             "survival": [1.0, *survival.tolist()], "low": [1.0, *low.tolist()], "high": [1.0, *high.tolist()],
             "at_risk": [int(at_risk[0]) if len(at_risk) else 0, *[int(x) for x in n]],
             "sites": len(sites), "ends_at": km_bin * last}
    curve["median"] = {key: _first_below(curve["time"], curve[series])
                       for key, series in (("value", "survival"), ("low", "low"), ("high", "high"))}
    return curve


def _first_below(times: list[float], values: list[float], q: float = 0.5) -> float | None:
    """The first time the curve is at or below q (lifelines' median rule); None: not reached."""
    return next((t for t, v in zip(times, values) if v <= q), None)


def logrank(described: dict[int, dict]) -> dict:
    from scipy.stats import chi2

    sites = [d for d in described.values() if "logrank/oe" in d]
    oe = float(_padded([d["logrank/oe"] for d in sites]).sum())
    variance = float(_padded([d["logrank/v"] for d in sites]).sum())
    statistic = oe * oe / variance if variance > 0 else float("nan")
    return {"chi2": statistic, "p": float(chi2.sf(statistic, 1)) if variance > 0 else float("nan"),
            "stratified": True, "observed_minus_expected": oe, "variance": variance, "sites": len(sites)}


def subgroup_results(request: Request, fits: dict[str, NewtonFit], levels: dict, gaps: dict[str, str],
                     contributors: dict[str, list[str]]) -> dict:
    """Per column: each level's treatment HR (or "suppressed", or why not estimable) and the interaction test."""
    from scipy.stats import chi2
    from statsmodels.stats.multitest import multipletests

    out: dict = {}
    for column in request.subgroups:
        entry: dict = {}
        for level, info in levels[column].items():
            name = f"{column}={level}"
            if info["suppressed"]:
                entry[str(level)] = "suppressed"
            elif name in gaps:
                entry[str(level)] = {"not_estimable": gaps[name]}
            else:
                term = fits[name].table()[request.treatment]
                entry[str(level)] = {"hr": term["hr"], "hr_low": term["hr_low"], "hr_high": term["hr_high"],
                                     "p": term["p"], "coef": term["coef"], "se": term["se"],
                                     "n": sum(c["n"] for c in info["cells"].values()),
                                     "sites": len(contributors.get(name, []))}
        full, reduced = fits.get(f"{column}:interaction"), fits.get(f"{column}:main")
        entry["interaction_p"] = None
        entry["interaction_test"] = "likelihood ratio"
        if full is None:
            entry["interaction_note"] = "fewer than two levels can be estimated"
        elif f"{column}:interaction" in gaps or f"{column}:main" in gaps:
            entry["interaction_note"] = gaps.get(f"{column}:interaction") or gaps.get(f"{column}:main")
        else:
            df = len(full.terms) - len(reduced.terms)
            statistic = max(0.0, 2 * (full.loglik - reduced.loglik))
            entry.update({"interaction_p": float(chi2.sf(statistic, df)), "interaction_chi2": statistic,
                          "interaction_df": df, "interaction_sites": len(contributors.get(f"{column}:interaction", []))})
        out[column] = entry
    tested = [c for c in out if out[c]["interaction_p"] is not None]
    adjusted = multipletests([out[c]["interaction_p"] for c in tested], method="holm")[1] if tested else []
    for column in out:
        out[column]["interaction_p_holm"] = None
    for column, p in zip(tested, adjusted):
        out[column]["interaction_p_holm"] = float(p)
    return out


def sentence(result: dict) -> str:
    """The plain-language line of the report."""
    term = result["cox"]["terms"][result["treatment"]]
    change = (1 - term["hr"]) * 100
    direction = f"a {abs(change):.0f} % {'lower' if change >= 0 else 'higher'} hazard of death"
    return (f"In {result['patients']} patients at {result['cox']['sites']} sites, treatment was associated with "
            f"{direction} (HR {term['hr']:.2f}, 95 % CI {term['hr_low']:.2f}–{term['hr_high']:.2f}).")


def run_analysis(grid: Grid, context: Context, settings: RunSettings, ledger: Ledger) -> dict:
    """The whole analysis; its summary (also logged to MLflow). Any failure is ``run-failed`` in the ledger."""
    from server.report_analysis import write_analysis_report
    from server.tracking import AnalysisTracker

    request = Request.from_settings(settings)
    started = time.perf_counter()
    with failure_recorded(ledger, context.run_id):
        described, refused = _describe(grid, settings, request, ledger)
        ledger.append("run-start", {
            "mode": "analyse", "run_config": settings.as_params(redact_paths=True), "app": {"fab_hash": grid.run.fab_hash},
            "sites": sorted(d["site"] for d in described.values()), "refused": refused})
        ledger.append("analysis-describe", {"sites": {d["site"]: _view(d) for d in described.values()}})
    nodes = {node: d["site"] for node, d in described.items()}
    log(INFO, "fedhosp: analysis of '%s' at %d sites: %s", request.treatment, len(nodes), ", ".join(sorted(nodes.values())))
    progress.emit("sites", sites=len(nodes), task="oncology", mode="analyse")
    with AnalysisTracker(settings, context.run_id, ledger) as tracker:
        with failure_recorded(ledger, context.run_id):
            fits, levels = plan_fits(request, described)
            seconds = {d["site"]: float(d.get("compute-seconds", 0.0)) for d in described.values()}
            gaps, contributors = newton_fits(grid, settings, request, fits, nodes, ledger, seconds)
            overall = fits["overall"]
            result = {
                "title": f"Treatment-effect analysis of '{request.treatment}'",
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "flwr_run_id": context.run_id, "mlflow_run_id": tracker.run_id, "treatment": request.treatment,
                "covariates": request.covariates, "subgroups_requested": request.subgroups,
                "min_cell": request.min_cell, "sites": sorted(nodes.values()), "refused": refused,
                "patients": sum(int(d.get(f"arm/{a}/n", 0)) for d in described.values() for a in ARMS
                                if d["site"] in contributors["overall"]),
                "cox": {"terms": overall.table(), "strata": "site", "ties": "efron", "iterations": overall.iterations,
                        "converged": overall.converged, "sites": len(contributors["overall"]),
                        "loglik": overall.loglik},
                "logrank": logrank(described), "km_bin": request.km_bin,
                "km": {str(a): curve for a in ARMS if (curve := kaplan_meier(described, a, request.km_bin,
                                                                             request.min_cell))},
                "subgroups": subgroup_results(request, fits, levels, gaps, contributors),
            }
            result["sentence"] = sentence(result)
            result["site_compute_seconds"] = seconds  # what the sites spent computing, all messages together
            result["wall_seconds"] = time.perf_counter() - started
            report = write_analysis_report(result, fedhosp_home() / "reports" / f"analysis-flwr-{context.run_id}.html")
            ledger.append("analysis-result", {"cox": result["cox"], "logrank": result["logrank"],
                                              "subgroups": result["subgroups"], "sentence": result["sentence"],
                                              "report_sha256": hashlib.sha256(report.read_bytes()).hexdigest()})
            report_uri = tracker.log(result, report)
        summary = {"mode": "analyse", "flwr_run_id": context.run_id, "mlflow_run_id": tracker.run_id,
                   "tracking_uri": tracker.uri, "experiment": settings.mlflow_experiment, "task": "oncology",
                   "treatment": request.treatment, "sentence": result["sentence"], "cox": result["cox"],
                   "logrank": {k: result["logrank"][k] for k in ("chi2", "p", "sites")},
                   "subgroups": result["subgroups"],
                   "medians": {a: c["median"] for a, c in result["km"].items()},
                   "report": str(report), "report_uri": report_uri}
        ledger.append("run-end", {"mlflow_run_id": tracker.run_id, "report": report.name})
        summary["ledger"], summary["ledger_head"] = str(ledger.path), ledger.head
        tracker.log_ledger()
        tracker.log_summary(summary)
    return summary
