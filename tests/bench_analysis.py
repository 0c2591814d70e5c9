"""Benchmark: the federated treatment-effect analysis next to lifelines on the pooled rows, and what it costs.

For each data set (the synthetic demo regions, whose treatment works only in
``mutation`` carriers; the public GBSG2 breast-cancer study with hormone therapy
``horTh`` as the treatment, split into three sites by tumour grade) it runs a
real Flower simulation in ``mode = "analyse"`` and prints, side by side with
lifelines' ``CoxPHFitter(strata=["site"])`` / ``KaplanMeierFitter`` and
statsmodels' stratified log-rank on all rows in one place:

* every Cox term's HR and its 95 % interval, and the largest coefficient and
  standard-error differences;
* the log-rank statistic, each arm's median survival, each subgroup level's HR;
* the analysis' wall time (describe + Newton iterations, coordinator side) and
  the sites' summed compute for all their messages.

Not a pytest test: ``make bench-analysis`` or ``.venv/bin/python tests/bench_analysis.py``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import typer
from lifelines import CoxPHFitter, KaplanMeierFitter
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_oncology import gbsg2_sites  # noqa: E402  the same GBSG2 sites as the training benchmark

from client import hardware  # noqa: E402
from client.data.demo import TRUE_TREATMENT_LOG_HR, write_demo  # noqa: E402
from client.stats import time_bins  # noqa: E402
from server import runner  # noqa: E402
from server.summary import find_summary  # noqa: E402

APP_DIR = Path(__file__).resolve().parent.parent
BENCH_PORTS = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "39391", "FLWR_LOCAL_CONTROL_API_PORT": "39393"}
CONVERGED = {"precision": 1e-12, "r_precision": 1e-15, "max_steps": 100}
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160, log_path=False)

DATASETS = {
    "demo": ("demo (5 synthetic regions)", lambda root: write_demo(root, 5),
             {"treatment": "treatment", "covariates": "age,stage,ecog", "subgroups": "mutation,sex"}),
    "gbsg2": ("GBSG2 (3 sites by tumour grade)", lambda root: gbsg2_sites(root, 42),
              {"treatment": "horTh", "covariates": "age,tsize,pnodes,progrec,estrec", "subgroups": "menostat"}),
}


def pooled(root: Path) -> pd.DataFrame:
    return pd.concat([pd.read_csv(f / "cohort.csv").assign(site=f.name) for f in sorted(root.iterdir())],
                     ignore_index=True)


def run(env: dict, uri: str, key: str, root: Path) -> tuple[dict, float]:
    title, write, config = DATASETS[key]
    folders = write(root)
    started = time.perf_counter()
    outcome = runner.flwr_run(APP_DIR, env, {"mode": "analyse", **config, "data-root": str(root), "mlflow-uri": uri,
                                             "mlflow-experiment": f"bench-{key}"}, len(folders))
    wall = time.perf_counter() - started
    if not outcome.ok:
        console.out("\n".join(outcome.log.strip().splitlines()[-25:]), highlight=False)
        raise typer.Exit(1)
    summary = find_summary(uri, outcome.run_id)
    result = mlflow.artifacts.load_dict(f"{mlflow.get_run(summary['mlflow_run_id']).info.artifact_uri}/analysis.json")
    return result, wall


def compare(key: str, result: dict, wall: float, root: Path) -> list[str]:
    title, _, config = DATASETS[key]
    frame = pooled(root)
    treatment, covariates = config["treatment"], config["covariates"].split(",")
    reference = CoxPHFitter().fit(frame[["time", "event", treatment, *covariates, "site"]], "time", "event",
                                  strata=["site"], fit_options=CONVERGED)
    table = Table(title=f"{title}: Cox stratified by site, federated vs pooled lifelines")
    for column in ("term", "HR federated (95% CI)", "HR pooled (95% CI)", "|Δ coef|", "|Δ se|"):
        table.add_column(column, justify="left" if column == "term" else "right")
    worst_coef = worst_se = 0.0
    for term, f in result["cox"]["terms"].items():
        row = reference.summary.loc[term]
        d_coef, d_se = abs(f["coef"] - row["coef"]), abs(f["se"] - row["se(coef)"])
        worst_coef, worst_se = max(worst_coef, d_coef), max(worst_se, d_se)
        table.add_row(term, f"{f['hr']:.3f} ({f['hr_low']:.3f}–{f['hr_high']:.3f})",
                      f"{row['exp(coef)']:.3f} ({row['exp(coef) lower 95%']:.3f}–{row['exp(coef) upper 95%']:.3f})",
                      f"{d_coef:.1e}", f"{d_se:.1e}")
    console.print(table)
    from statsmodels.duration.survfunc import survdiff

    chi2, _ = survdiff(frame["time"], frame["event"], frame[treatment], strata=frame["site"])
    rounded = time_bins(frame["time"].to_numpy(float), result["km_bin"]) * result["km_bin"]
    medians = []
    for arm, curve in sorted(result["km"].items()):
        mask = (frame[treatment] == int(arm)).to_numpy()
        km = KaplanMeierFitter().fit(rounded[mask], frame["event"][mask])
        medians.append(f"arm {arm} {curve['median']['value']} (pooled {km.median_survival_time_:g})")
    lines = [f"{title}: {result['patients']} patients at {result['cox']['sites']} sites; "
             f"{result['cox']['iterations']} Newton iterations; max |Δ coef| {worst_coef:.1e}, max |Δ se| {worst_se:.1e}",
             f"  log-rank chi2 {result['logrank']['chi2']:.4f} (pooled statsmodels {chi2:.4f}); medians: "
             + "; ".join(medians)]
    for column, levels in result["subgroups"].items():
        parts = []
        for level, figure in levels.items():
            if level.startswith("interaction"):
                continue
            if not isinstance(figure, dict) or "hr" not in figure:
                parts.append(f"{column}={level}: {figure}")
                continue
            rows = frame[frame[column] == int(level)]
            ref = CoxPHFitter().fit(rows[["time", "event", treatment, *[c for c in covariates if c != column], "site"]],
                                    "time", "event", strata=["site"], fit_options=CONVERGED)
            parts.append(f"{column}={level}: HR {figure['hr']:.3f} ({figure['hr_low']:.2f}–{figure['hr_high']:.2f}, "
                         f"{figure['sites']} sites), pooled over all sites {np.exp(ref.params_[treatment]):.3f}")
        lines.append("  " + "; ".join(parts) + f"; interaction p {levels['interaction_p']:.2g} "
                     f"(Holm {levels['interaction_p_holm']:.2g})")
    if key == "demo":
        lines.append(f"  truth: log HR {TRUE_TREATMENT_LOG_HR[1]} in carriers (HR {np.exp(TRUE_TREATMENT_LOG_HR[1]):.3f}), "
                     f"{TRUE_TREATMENT_LOG_HR[0]} in non-carriers")
    compute = sum(result["site_compute_seconds"].values())
    lines.append(f"  wall: flwr run {wall:.1f} s, of it the analysis {result['wall_seconds']:.1f} s "
                 f"(describe + {result['cox']['iterations']} iterations); the sites' summed compute {compute:.2f} s")
    lines.append(f"  {result['sentence']}")
    return lines


def main(datasets: str = typer.Option("demo,gbsg2", help=f"Comma list of {', '.join(DATASETS)}.")) -> None:
    """The analysis on the demo regions and GBSG2, next to the pooled-data answer."""
    started = time.perf_counter()
    lines = []
    with tempfile.TemporaryDirectory(prefix="fedhosp-bench-analysis-") as tmp_name:
        tmp = Path(tmp_name)
        env, uri = runner.isolated_env(tmp, BENCH_PORTS)
        mlflow.set_tracking_uri(uri)
        with runner.local_superlink(env):
            for key in [d.strip() for d in datasets.split(",") if d.strip()]:
                result, wall = run(env, uri, key, tmp / "data" / key)
                lines += compare(key, result, wall, tmp / "data" / key)
    print("\n".join(lines))
    print(f"nodes: {hardware.describe()}")
    print(f"(benchmark wall time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    typer.run(main)
