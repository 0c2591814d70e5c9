"""Read a finished run's summary back from MLflow and print it for people."""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from rich.console import Console
from rich.table import Table

_SUMMARY = re.compile(r"fedhosp summary: (\{.*\})\s*$", re.M)


def summary_from_log(log_text: str, flwr_run_id: int) -> dict | None:
    """The summary the ServerApp logged as its last act (after closing its MLflow run), if the log has it.

    Reading it from the log spares ``fedhosp run`` importing and opening MLflow
    (seconds); :func:`find_summary` reads the same dict from MLflow.
    """
    for found in reversed(_SUMMARY.findall(log_text)):
        try:
            summary = json.loads(found)
        except ValueError:
            continue
        if summary.get("flwr_run_id") == flwr_run_id:
            return summary
    return None


def find_summary(uri: str, flwr_run_id: int) -> dict | None:
    from mlflow.tracking import MlflowClient

    from server.tracking import FLWR_RUN_TAG

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`{FLWR_RUN_TAG}` = '{flwr_run_id}'", max_results=1)
    if not runs:
        return None
    run = runs[0]
    with tempfile.TemporaryDirectory() as folder:
        path = client.download_artifacts(run.info.run_id, "summary.json", dst_path=folder)
        summary = json.loads(Path(path).read_text(encoding="utf-8"))
    summary["mlflow_status"] = run.info.status
    summary["experiment_id"] = run.info.experiment_id
    return summary


METRICS = {"survival": ["c_index"], "response": ["auc", "accuracy"], "kl-grade": ["auc", "kappa", "accuracy"],
           "referral": ["auc", "sensitivity", "specificity"], "binary": ["auc", "sensitivity", "specificity"]}


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def ui_command(uri: str) -> str:
    if urlparse(uri).scheme in ("http", "https"):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --port 5000"


def _ci(figure: dict | None) -> str:
    figure = figure or {}
    value, low, high = figure.get("value"), figure.get("low"), figure.get("high")
    if value is None:
        return "–"
    return f"{value:.2f} ({low:.2f}–{high:.2f})" if low is not None and high is not None else f"{value:.2f}"


def print_validation(summary: dict, console: Console) -> None:
    colour = {"PASS": "green", "FAIL": "red"}
    table = Table(title=f"fedhosp {summary['mode']} {summary['flwr_run_id']}: {summary['model_uri'] or 'site models'} "
                        f"({summary['task']}/{summary['outcome']}), criteria {summary['criteria']}")
    metrics = summary["metrics"]
    for column in ["site", "n", *metrics, "verdict"]:
        table.add_column(column, justify="left" if column in ("site", "verdict") else "right")
    for name, site in sorted(summary["sites"].items()):
        verdict = site["verdict"]
        table.add_row(name, _fmt(site.get("n")), *[_ci(site["metrics"].get(m)) for m in metrics],
                      f"[{colour.get(verdict, 'yellow')}]{verdict}[/]" + (f" {site['error']}" if site.get("error") else ""))
    console.print(table)
    cross = summary.get("cross_site")
    if cross:
        matrix = Table(title=f"cross-site {cross['metric']}: trained at (rows) x evaluated at (columns)")
        matrix.add_column("trained at")
        for site in cross["sites"]:
            matrix.add_column(site, justify="right")
        for model in cross["models"]:
            matrix.add_row(model, *[_ci(cross["matrix"].get(model, {}).get(site)) for site in cross["sites"]])
        console.print(matrix)
    console.print(f"Verdict         : [bold {colour.get(summary['verdict'], 'yellow')}]{summary['verdict']}[/]")
    for reason in summary["reasons"]:
        console.print(f"  - {reason}")
    for flag in summary.get("drift") or []:
        console.print(f"[yellow]{flag}[/]")
    console.print(f"Report          : {summary['report']}")
    console.print(f"MLflow run      : {summary['mlflow_run_id']} (experiment '{summary['experiment']}', "
                  f"status {summary.get('mlflow_status', '?')})")
    if summary.get("registered_model"):
        console.print(f"Registry        : {summary['registered_model']} tagged fedhosp.validation.verdict="
                      f"{summary['verdict']}")
    console.print(f"Open the UI     : [bold]{ui_command(summary['tracking_uri'])}[/]")


def _p(value) -> str:
    return "–" if value is None or value != value else ("< 0.001" if value < 0.001 else f"{value:.3f}")


def print_analysis(summary: dict, console: Console) -> None:
    """The treatment's effect, every Cox term, the log-rank test and the subgroups (no count below min-cell)."""
    cox = summary["cox"]
    table = Table(title=f"fedhosp analysis {summary['flwr_run_id']}: Cox model stratified by site "
                        f"({cox['sites']} sites, {cox['iterations']} Newton iterations)")
    for column in ("term", "HR", "95% CI", "p"):
        table.add_column(column, justify="left" if column == "term" else "right")
    for name, term in cox["terms"].items():
        table.add_row(name, f"{term['hr']:.3f}", f"{term['hr_low']:.3f}–{term['hr_high']:.3f}", _p(term["p"]))
    console.print(table)
    groups = Table(title="treatment's HR per subgroup level")
    for column in ("subgroup", "HR", "95% CI", "interaction p (LR)", "Holm"):
        groups.add_column(column, justify="left" if column == "subgroup" else "right")
    for column, levels in summary["subgroups"].items():
        for level, figure in levels.items():
            if level.startswith("interaction"):
                continue
            if figure == "suppressed" or "hr" not in figure:
                groups.add_row(f"{column} = {level}", "suppressed" if figure == "suppressed" else "not estimable",
                               "", "", "")
            else:
                groups.add_row(f"{column} = {level}", f"{figure['hr']:.3f}",
                               f"{figure['hr_low']:.3f}–{figure['hr_high']:.3f}", "", "")
        groups.add_row(f"[bold]{column}[/] × treatment", "", "", _p(levels.get("interaction_p")),
                       _p(levels.get("interaction_p_holm")))
    if summary["subgroups"]:
        console.print(groups)
    logrank = summary["logrank"]
    console.print(f"Log-rank        : chi2 {logrank['chi2']:.2f} (1 df, stratified by site), p {_p(logrank['p'])}")
    for arm, median in sorted(summary.get("medians", {}).items()):
        value = "not reached" if median["value"] is None else f"{median['value']:g}"
        console.print(f"Median, arm {arm}  : {value}")
    console.print(f"[bold]{summary['sentence']}[/]")
    console.print(f"Report          : {summary['report']}")
    console.print(f"MLflow run      : {summary['mlflow_run_id']} (experiment '{summary['experiment']}', "
                  f"status {summary.get('mlflow_status', '?')})")
    console.print(f"Open the UI     : [bold]{ui_command(summary['tracking_uri'])}[/]")


def _privacy_cells(site: dict | None) -> list[str]:
    """ε of this run at the site's δ, and the data set's total against its budget (∞: no budget set)."""
    if not site:
        return ["–", "–"]
    budget = f"{site['max_epsilon']:g}" if site.get("max_epsilon") else "∞"
    return [f"{site['epsilon']:.2f} (δ={site['delta']:g})", f"{site.get('epsilon_spent', site['epsilon']):.2f} / {budget}"]


def print_summary(summary: dict, console: Console) -> None:
    if summary.get("mode") == "analyse":
        print_analysis(summary, console)
        return
    if summary.get("mode", "train") != "train":
        print_validation(summary, console)
        return
    metrics = METRICS.get(summary["outcome"], ["auc", "accuracy"])
    unit = "patients" if summary["task"] == "oncology" else "images"
    table = Table(title=f"fedhosp run {summary['flwr_run_id']}: {summary['task']} ({summary['outcome']}), "
                        f"{summary['rounds']} rounds, {summary['strategy']}")
    privacy = summary.get("privacy") or {}
    extra = ["ε (this run)", "ε spent / budget"] if privacy else []
    for column in ["site", f"train {unit}", f"test {unit}", *metrics, "eval loss", *extra]:
        table.add_column(column, justify="left" if column == "site" else "right")
    for name, site in sorted(summary["sites"].items()):
        table.add_row(name, _fmt(site.get("num_train")), _fmt(site.get("num_test")),
                      *[_fmt(site.get(m)) for m in metrics], _fmt(site.get("loss")),
                      *(_privacy_cells(privacy.get(name)) if privacy else []))
    agg = summary.get("aggregate", {})
    table.add_row("[bold]federation[/] (weighted)", _fmt(sum(s.get("num_train", 0) for s in summary["sites"].values())),
                  _fmt(sum(s.get("num_test", 0) for s in summary["sites"].values())),
                  *[f"[bold]{_fmt(agg.get(m))}[/]" for m in metrics], _fmt(agg.get("loss")),
                  *(["", ""] if privacy else []))
    console.print(table)
    if summary.get("failures"):
        console.print(f"[yellow]site failures by round[/]: {summary['failures']}")
    console.print(f"MLflow run      : {summary['mlflow_run_id']} (experiment '{summary['experiment']}', "
                  f"status {summary.get('mlflow_status', '?')})")
    console.print(f"Tracking store  : {summary['tracking_uri']}")
    console.print(f"Saved model     : {summary['model_file']} (sha256 {summary['model_hash'][:16]}…)")
    console.print(f"Registered model: {summary['registered_model']}")
    console.print(f"Open the UI     : [bold]{ui_command(summary['tracking_uri'])}[/]")
