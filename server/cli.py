"""``fedhosp``: the project's one command line (run the demo federation, write demo data; ``fedhosp site ...``
for hospitals, ``fedhosp audit ...`` for auditors)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from client.site_check import site_app
from server.audit import audit_app

app = typer.Typer(help="fedhosp: federated learning for hospitals (Flower + MLflow).", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
app.add_typer(site_app, name="site", help="A hospital's commands: check its site folder, make its node key, read "
                                         "its privacy budget, pin apps by hash, run its checked ClientApps.")
app.add_typer(audit_app, name="audit", help="Verify, show, reconcile and export ledgers (for auditors).")
console = Console(width=None if sys.stdout.isatty() else 120)

APP_DIR = Path(__file__).resolve().parent.parent


@app.command("run")
def run(
    sites: int = typer.Option(5, "--sites", "-n", help="Number of simulated hospital nodes."),
    run_config: list[str] = typer.Option([], "--run-config", "-c", help="Run-config overrides, 'k=v k2=v2', or a TOML file."),
    app_dir: Path = typer.Option(APP_DIR, "--app", help="The Flower app folder (this project)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Stream the run's whole log instead of a progress line."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress line; only the outcome."),
    timeout: float = typer.Option(None, "--timeout", min=1, help="Seconds the run may take; past them `flwr run` "
                                  "is stopped and the command fails (default: no limit; Ctrl-C stops it)."),
) -> None:
    """Run a local Flower simulation of the regions and print its outcome. Exit 0 only on success."""
    started = time.monotonic()
    from flwr.common.config import parse_config_args

    from server import runner
    from server.progress import RunProgress

    env = runner.runtime_env()
    overrides = parse_config_args(run_config) if run_config else {}
    uri = str(overrides.get("mlflow-uri") or env.get("MLFLOW_TRACKING_URI")
              or f"sqlite:///{Path(env['FEDHOSP_HOME']) / 'mlflow.db'}")
    overrides["mlflow-uri"] = uri
    Path(env["FEDHOSP_HOME"]).mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]fedhosp[/]: {sites} simulated sites; FEDHOSP_HOME={env['FEDHOSP_HOME']}")
    try:
        with runner.local_superlink(env):
            with RunProgress(console, verbose, quiet, started) as shown:
                outcome = runner.flwr_run(app_dir, env, overrides, sites, echo=shown, timeout=timeout)
            code = _report(outcome, env, uri, verbose)  # before the SuperLink's graceful stop (seconds)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]: the local SuperLink was stopped")
        raise typer.Exit(130)
    except runner.RunTimeout as exc:
        console.print(Text.assemble(("timed out", "red bold"), f": {exc}; the local SuperLink was stopped"))
        raise typer.Exit(1)
    if code:
        raise typer.Exit(code)


def _report(outcome, env: dict[str, str], uri: str, verbose: bool) -> int:
    """Print the run's outcome; the exit code: 0, 1 (did not complete), 3 (a validation's model failed)."""
    from server.summary import find_summary, print_summary, summary_from_log

    log_file = Path(env["FEDHOSP_HOME"]) / "logs" / f"run-{outcome.run_id}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text(outcome.log, encoding="utf-8")
    if not outcome.ok:
        _failure(outcome, shown_log=verbose)
        console.print(f"The run's whole log: {log_file}")
        return 1
    summary = summary_from_log(outcome.log, outcome.run_id) or find_summary(uri, outcome.run_id)
    if summary is None:
        console.print(f"[red]Run {outcome.run_id} finished but no MLflow summary was found in {uri}[/]")
        return 1
    print_summary(summary, console)
    return 3 if summary.get("verdict") == "FAIL" else 0  # a validation completed, and the model did not pass


def _failure(outcome, shown_log: bool) -> None:
    """A run that did not complete: its status and the reason the coordinator recorded in its ledger; without
    one (the app failed before it could say), the log lines that matter, unless the whole log was just shown."""
    from server.progress import relevant_lines

    console.print(Text.assemble((f"Run {outcome.run_id} did not complete", "red bold"), f": status {outcome.status}"))
    if outcome.reason:
        console.print(Text(outcome.reason, style="red"))
    elif not shown_log:
        for line in relevant_lines(outcome.log) or outcome.log.strip().splitlines()[-10:]:
            console.out(f"  | {line}", highlight=False)


@app.command("demo-data")
def demo_data(
    out: Path = typer.Argument(..., help="Folder to write one site folder per region into."),
    sites: int = typer.Option(5, "--sites", "-n"),
    seed: int = typer.Option(42, "--seed"),
    task: str = typer.Option("oncology", "--task", help="oncology (cohort.csv) or radiology (DICOM + labels.csv)."),
    shift: list[str] = typer.Option([], "--shift", help="SITE=AMOUNT: rewrite that site after a change "
                                    "(oncology: a noisier biomarker assay; radiology: a new scanner), to demo drift."),
) -> None:
    """Write the synthetic regional demo sites, usable as run-config data-root."""
    import shutil

    from client.data import demo, radiology_demo

    if task not in ("oncology", "radiology"):
        raise typer.BadParameter("choose oncology or radiology", param_hint="--task")
    shifts = {}
    for item in shift:
        name, _, amount = item.partition("=")
        try:
            shifts[name] = float(amount)
        except ValueError:
            raise typer.BadParameter(f"{item!r}: expected SITE=AMOUNT", param_hint="--shift") from None
    regions = demo.regions(sites, seed) if task == "oncology" else radiology_demo.radiology_regions(sites, seed)
    unknown = set(shifts) - {r.name for r in regions}
    if unknown:
        raise typer.BadParameter(f"no demo site {sorted(unknown)}", param_hint="--shift")
    for region in regions:
        folder = out / region.name
        amount = shifts.get(region.name, 0.0)
        if task == "oncology":
            demo.write_site(folder, region, seed, shift=amount, overwrite=region.name in shifts)
        else:
            if region.name in shifts and folder.exists():
                shutil.rmtree(folder)
            radiology_demo.write_radiology_site(folder, region, seed, scanner_shift=amount)
        console.print(f"wrote {folder}" + (f" (shift {amount:g})" if amount else ""))


@app.command("deploy-local")
def deploy_local_cmd(
    sites: int = typer.Option(3, "--sites", "-n", help="Hospitals (demo regions) to start."),
    rounds: int = typer.Option(3, "--rounds"),
    task: str = typer.Option("oncology", "--task"),
    workdir: Path = typer.Option(None, "--workdir", help="Default: $FEDHOSP_HOME/deploy-local."),
    timeout: float = typer.Option(None, "--timeout", min=1, help="Seconds the run may take; past them every process "
                                  "is stopped and the command fails (default: no limit; Ctrl-C stops it)."),
) -> None:
    """Coordinator + one SuperNode per hospital on 127.0.0.1 with TLS and node auth; run; stop everything."""
    from client.data import demo, radiology_demo
    from server import deploy, runner
    from server.summary import find_summary, print_summary

    env = runner.runtime_env()
    workdir = (workdir or Path(env["FEDHOSP_HOME"]) / "deploy-local").resolve()
    if task == "radiology":
        names = [r.name for r in radiology_demo.radiology_regions(sites)]
        dirs = radiology_demo.write_radiology_demo(workdir / "data", sites)
    else:
        names = [r.name for r in demo.regions(sites)]
        dirs = demo.write_demo(workdir / "data", sites)
    try:
        with deploy.deploy_local(workdir, names, dict(zip(names, dirs))) as d:
            console.print(f"[bold]deploy-local[/]: SuperLink https://127.0.0.1:{d.superlink_port} (TLS, node auth), "
                          f"MLflow {d.mlflow_uri}, {len(names)} SuperNodes; logs in {workdir / 'logs'}")
            outcome = deploy.run_on(d, APP_DIR, {"task": task, "num-server-rounds": rounds}, echo=console.out,
                                    timeout=timeout)
            summary = find_summary(d.mlflow_uri, outcome.run_id) if outcome.ok else None
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]: every process was stopped")
        raise typer.Exit(130)
    except runner.RunTimeout as exc:
        console.print(Text.assemble(("timed out", "red bold"), f": {exc}; every process was stopped"))
        raise typer.Exit(1)
    if not outcome.ok:
        _failure(outcome, shown_log=True)  # echoed line by line above
        console.print(f"The logs of every process: {workdir / 'logs'}")
        raise typer.Exit(1)
    print_summary(summary, console)
    console.print("(the MLflow server was stopped with the deployment; its PostgreSQL database and artifacts remain)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
