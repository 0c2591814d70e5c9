"""Read a finished run's summary back from MLflow and print it for people."""

from __future__ import annotations

import json
import math
import re
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
    import mlflow
    from mlflow.tracking import MlflowClient

    from server.tracking import FLWR_RUN_TAG

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`{FLWR_RUN_TAG}` = '{flwr_run_id}'", max_results=1)
    if not runs:
        return None
    run = runs[0]
    mlflow.set_tracking_uri(uri)
    summary = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/summary.json")
    summary["mlflow_status"] = run.info.status
    summary["experiment_id"] = run.info.experiment_id
    return summary


METRICS = {"survival": ["c_index"], "response": ["auc", "accuracy"], "kl-grade": ["auc", "kappa", "accuracy"],
           "referral": ["auc", "sensitivity", "specificity"]}


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


def print_summary(summary: dict, console: Console) -> None:
    if summary.get("mode", "train") != "train":
        print_validation(summary, console)
        return
    metrics = METRICS.get(summary["outcome"], ["auc", "accuracy"])
    unit = "patients" if summary["task"] == "oncology" else "images"
    table = Table(title=f"fedhosp run {summary['flwr_run_id']}: {summary['task']} ({summary['outcome']}), "
                        f"{summary['rounds']} rounds, {summary['strategy']}")
    for column in ["site", f"train {unit}", f"test {unit}", *metrics, "eval loss"]:
        table.add_column(column, justify="left" if column == "site" else "right")
    for name, site in sorted(summary["sites"].items()):
        table.add_row(name, _fmt(site.get("num_train")), _fmt(site.get("num_test")),
                      *[_fmt(site.get(m)) for m in metrics], _fmt(site.get("loss")))
    agg = summary.get("aggregate", {})
    table.add_row("[bold]federation[/] (weighted)", _fmt(sum(s.get("num_train", 0) for s in summary["sites"].values())),
                  _fmt(sum(s.get("num_test", 0) for s in summary["sites"].values())),
                  *[f"[bold]{_fmt(agg.get(m))}[/]" for m in metrics], _fmt(agg.get("loss")))
    console.print(table)
    if summary.get("failures"):
        console.print(f"[yellow]site failures by round[/]: {summary['failures']}")
    console.print(f"MLflow run      : {summary['mlflow_run_id']} (experiment '{summary['experiment']}', "
                  f"status {summary.get('mlflow_status', '?')})")
    console.print(f"Tracking store  : {summary['tracking_uri']}")
    console.print(f"Saved model     : {summary['model_file']} (sha256 {summary['model_hash'][:16]}…)")
    console.print(f"Registered model: {summary['registered_model']}")
    console.print(f"Open the UI     : [bold]{ui_command(summary['tracking_uri'])}[/]")
