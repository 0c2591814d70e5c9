"""`fedhosp run` in analyse mode: a real Flower simulation, a real MLflow store, the report in a real browser.

One analysis (the five demo regions plus a small sixth site whose treated arm is
under min-cell) is shared by the tests that only read it, across xdist workers.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
from lifelines import KaplanMeierFitter
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from client.data import demo
from models.ledger import read_records
from client.stats import time_bins
from server import runner
from server.audit import audit_app
from tests.conftest import APP_DIR, flower_environment, processes_mentioning
from tests.test_analysis import CONVERGED

pytestmark = pytest.mark.timeout(600)
CONFIG = "mode='analyse' treatment='treatment' covariates='age,stage,ecog' subgroups='mutation,sex'"
LARGE = [r.name for r in demo.REGIONS]


def _run_analysis(tmp: Path) -> dict:
    root = tmp / "sites"
    demo.write_demo(root, 5)
    small = demo.cohort(demo.regions(6)[5]).head(60)
    small.loc[small.index[6:], "treatment"] = 0  # 6 treated: an arm under min-cell, sent as "suppressed"
    (root / "Site-06").mkdir()
    small.to_csv(root / "Site-06" / "cohort.csv", index=False)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = flower_environment(tmp)
    done = subprocess.run([sys.executable, "-m", "server.cli", "run", "--sites", "6", "--run-config",
                           f"{CONFIG} data-root='{root}' mlflow-uri='{uri}'"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=APP_DIR)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not processes_mentioning(env["FLWR_HOME"])
    return {"tmp": str(tmp), "root": str(root), "uri": uri, "home": env["FEDHOSP_HOME"], "stdout": done.stdout}


@pytest.fixture(scope="session")
def analysed(tmp_path_factory):
    """One analysis for every reader, whichever pytest-xdist worker asks first (the others wait, then read it):
    the five demo regions plus a small sixth site whose treated arm is under min-cell."""
    import fcntl

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # common to the workers of one session
    done = shared / "analysis.json"
    with open(shared / "analysis.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            (shared / "analysis").mkdir(exist_ok=True)
            done.write_text(json.dumps(_run_analysis(shared / "analysis")), encoding="utf-8")
    facts = json.loads(done.read_text(encoding="utf-8"))
    client = MlflowClient(facts["uri"])
    [run] = client.search_runs([client.get_experiment_by_name("fedhosp").experiment_id])
    result = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/analysis.json")
    root = Path(facts["root"])
    pooled = pd.concat([pd.read_csv(root / s / "cohort.csv").assign(site=s) for s in [*LARGE, "Site-06"]],
                       ignore_index=True)
    return SimpleNamespace(root=root, uri=facts["uri"], stdout=facts["stdout"], client=client, run=run,
                           result=result, pooled=pooled, home=Path(facts["home"]))


def test_an_analysis_prints_the_answer_and_keeps_the_mlflow_contract(analysed):
    run, result = analysed.run, analysed.result
    assert run.info.status == "FINISHED" and run.data.tags["fedhosp.mode"] == "analyse"
    text = analysed.stdout.replace("\n", " ")
    assert f"treatment was associated with a" in text and result["sentence"] in text
    assert "Log-rank" in text and "mutation × treatment" in text.replace(" × ", " × ")
    term = result["cox"]["terms"]["treatment"]
    metrics = run.data.metrics
    assert metrics["treatment/hr"] == pytest.approx(term["hr"]) and metrics["treatment/p"] == pytest.approx(term["p"])
    assert {"treatment/hr_low", "treatment/hr_high", "logrank/chi2", "logrank/p", "subgroup/mutation/1/hr",
            "subgroup/mutation/1/hr_low", "subgroup/mutation/1/hr_high", "subgroup/mutation/interaction_p",
            "subgroup/sex/interaction_p"} <= set(metrics)
    assert set(result) >= {"cox", "logrank", "km_bin", "km", "subgroups"}
    assert result["cox"]["strata"] == "site" and result["cox"]["ties"] == "efron" and result["cox"]["converged"]
    assert set(result["cox"]["terms"]) == {"treatment", "age", "stage", "ecog"}  # every adjusted term
    assert set(result["cox"]["terms"]["age"]) >= {"coef", "se", "hr", "hr_low", "hr_high", "p"}
    assert result["logrank"]["stratified"] is True and result["km_bin"] == 30.0
    assert set(result["km"]) == {"0", "1"} and set(result["km"]["1"]) >= {"time", "survival", "low", "high", "at_risk"}
    assert set(result["subgroups"]["mutation"]) >= {"0", "1", "interaction_p", "interaction_p_holm"}
    report = mlflow.artifacts.download_artifacts(f"{run.info.artifact_uri}/report/analysis.html")
    assert result["sentence"] in Path(report).read_text(encoding="utf-8")


def test_the_federated_figures_are_the_pooled_figures_and_find_the_patients_who_respond(analysed):
    from tests.test_analysis import cox

    result, pooled = analysed.result, analysed.pooled
    large = pooled[pooled["site"].isin(LARGE)]  # Site-06 is left out of the Cox fit: its treated arm is too small
    reference = cox(large[["time", "event", "treatment", "age", "stage", "ecog", "site"]])
    assert result["cox"]["sites"] == 5
    for term, figures in result["cox"]["terms"].items():
        assert figures["coef"] == pytest.approx(reference.params_[term], abs=1e-6)
        assert figures["se"] == pytest.approx(reference.standard_errors_[term], abs=1e-4)
    # Kaplan-Meier: the control curve has all six sites, the treated one five
    rounded = time_bins(pooled["time"].to_numpy(float), 30.0) * 30.0
    for arm, sites in (("0", [*LARGE, "Site-06"]), ("1", LARGE)):
        mask = (pooled["treatment"] == int(arm)) & pooled["site"].isin(sites)
        km = KaplanMeierFitter().fit(rounded[mask.to_numpy()], pooled["event"][mask])
        curve = result["km"][arm]
        np.testing.assert_allclose(curve["survival"], km.survival_function_at_times(curve["time"]).to_numpy(),
                                   atol=1e-12)
        assert curve["sites"] == len(sites) and min(curve["at_risk"]) >= 10
    # the story the demo was built to tell: the drug works in mutation carriers, and only there
    carriers, others = result["subgroups"]["mutation"]["1"], result["subgroups"]["mutation"]["0"]
    assert carriers["hr_low"] <= np.exp(demo.TRUE_TREATMENT_LOG_HR[1]) <= carriers["hr_high"] < 1.0
    assert others["hr_low"] <= 1.0 <= others["hr_high"]
    mutation = result["subgroups"]["mutation"]
    assert mutation["interaction_p"] < 0.01 and mutation["interaction_p_holm"] >= mutation["interaction_p"]
    assert result["subgroups"]["sex"]["interaction_p"] > 0.01  # sex does not modify the effect in the demo
    assert result["cox"]["terms"]["treatment"]["hr"] < 1.0


def _counts(node, path=""):
    """Every count-like figure (n, events, at risk) anywhere in a published structure."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("n", "at_risk", "events", "num_patients"):
                yield f"{path}/{key}", value
            yield from _counts(value, f"{path}/{key}")
    elif isinstance(node, list):
        for item in node:
            yield from _counts(item, path)


def test_ledgers_reconcile_and_no_published_count_is_under_min_cell_nor_any_identifier(analysed, tmp_path):
    home = analysed.home
    flwr_run_id = analysed.run.data.tags["flwr.run_id"]
    coordinator = home / "ledgers" / f"run-{flwr_run_id}.jsonl"
    sites = [home / "site-ledgers" / s / f"run-{flwr_run_id}.jsonl" for s in [*LARGE, "Site-06"]]
    cli = CliRunner()
    result = cli.invoke(audit_app, ["reconcile", str(coordinator), *map(str, sites)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    records = read_records(coordinator)
    events = [r["event"] for r in records]
    assert events.count("analysis-iteration") == analysed.result["cox"]["iterations"] or \
        events.count("analysis-iteration") >= analysed.result["cox"]["iterations"]
    assert events[-1] == "run-end" and "analysis-describe" in events and "analysis-result" in events
    # counts: every published one is at least min-cell; per-bin counts travel only as digests
    for name, value in [*_counts(analysed.result), *_counts([r["data"] for r in records])]:
        values = value if isinstance(value, list) else [value]
        assert all(v >= 10 for v in values if isinstance(v, (int, float))), name
    describe = next(r for r in records if r["event"] == "analysis-describe")["data"]["sites"]
    assert all(set(view) == {"digest", "sums"} for view in describe.values())
    # no patient identifier or data path in any ledger or published file
    ids = list(analysed.pooled["patient_id"])
    text = "".join(p.read_text(encoding="utf-8") for p in [coordinator, *sites])
    text += json.dumps(analysed.result) + analysed.stdout
    assert not [i for i in ids if i in text][:3]
    assert str(analysed.root) not in "".join(p.read_text(encoding="utf-8") for p in [coordinator, *sites])

    # a site that says it sent something else is caught
    tampered = tmp_path / "tampered.jsonl"
    lines = sites[0].read_text(encoding="utf-8").splitlines()
    index = next(i for i, line in enumerate(lines) if '"query-analyse"' in line and '"iteration": 2' in line)
    record = json.loads(lines[index])
    record["data"]["sent"]["digest"] = "0" * 64
    lines[index] = json.dumps(record)
    tampered.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = cli.invoke(audit_app, ["reconcile", str(coordinator), str(tampered), *map(str, sites[1:])],
                        env={"COLUMNS": "200"})
    assert result.exit_code == 1 and "Hovedstaden: the analysis iteration 2 the site sent differs" in result.output


class _Proxy:
    """A proxy Chromium must send every non-local request to: it notes each request's target and answers none."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.targets: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(5)
            try:
                line = conn.recv(4096).split(b"\r\n", 1)[0].decode("latin-1")
            except OSError:
                line = "?"
            target = line.split(" ")[1] if " " in line else line
            self.targets.append(urlsplit(target).netloc or target)  # the host a request went to
            conn.close()


def _chromium(browser: str, profile: Path, proxy: _Proxy, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--proxy-server=http://127.0.0.1:{proxy.port}", "--proxy-bypass-list=<-loopback>",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120)


def test_the_report_renders_in_headless_chromium_without_any_external_request(analysed, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "Chromium is missing: `make test` installs Debian's chromium package (see the README)"
    report = Path(mlflow.artifacts.download_artifacts(f"{analysed.run.info.artifact_uri}/report/analysis.html"))
    html = report.read_text(encoding="utf-8")
    assert "<script" not in html and "http://" not in html and "https://" not in html
    # what the browser itself asks for with a blank page, so that only the report's own requests remain
    blank, proxy = tmp_path / "blank.html", _Proxy()
    blank.write_text("<!DOCTYPE html><html><body>blank</body></html>", encoding="utf-8")
    assert _chromium(browser, tmp_path / "p0", proxy, "--dump-dom", blank.as_uri()).returncode == 0
    browser_own = set(proxy.targets)
    proxy.targets.clear()
    dom = _chromium(browser, tmp_path / "p1", proxy, "--dump-dom", report.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert analysed.result["sentence"].split(" (")[0] in dom.stdout and dom.stdout.count("<img") >= 2
    shot = tmp_path / "report.png"
    done = _chromium(browser, tmp_path / "p2", proxy, f"--screenshot={shot}", "--window-size=1200,2400",
                     report.as_uri())
    assert done.returncode == 0 and shot.stat().st_size > 20_000, done.stderr[-2000:]
    from matplotlib.image import imread

    pixels = imread(shot)
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1])[::50], axis=0)) > 50  # plots drawn, not a blank page
    assert not set(proxy.targets) - browser_own, sorted(set(proxy.targets) - browser_own)


def test_an_unknown_column_fails_the_analysis_naming_every_site_and_the_column(superlink, tmp_path, mlflow_uri):
    root = tmp_path / "sites"
    demo.write_demo(root, 3)
    config = {"mode": "analyse", "treatment": "treatment", "subgroups": "kras", "data-root": str(root),
              "mlflow-uri": mlflow_uri}
    outcome = runner.flwr_run(APP_DIR, superlink, config, num_supernodes=3)
    assert not outcome.ok
    reason = outcome.reason  # from the coordinator's ledger (its run-failed event)
    assert reason.startswith("analysis check failed:"), reason
    for site in LARGE[:3]:
        assert f"site {site}: cohort.csv has no column 'kras' (named as subgroup)" in reason
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("fedhosp")
    assert experiment is None or not [r for r in client.search_runs([experiment.experiment_id])
                                      if r.info.status == "FINISHED"]


def test_the_newton_strategy_trains_the_linear_cox_model_to_lifelines_penalised_fit_and_stops(superlink, tmp_path,
                                                                                                mlflow_uri):
    import torch
    from lifelines import CoxPHFitter

    from client.data.tabular import load_cohort
    from server.summary import find_summary

    root = tmp_path / "sites"
    names = [f.name for f in demo.write_demo(root, 3)]
    config = {"strategy": "newton", "num-server-rounds": 12, "data-root": str(root), "mlflow-uri": mlflow_uri,
              "mlflow-experiment": "newton"}
    outcome = runner.flwr_run(APP_DIR, superlink, config, num_supernodes=3)
    assert outcome.ok, outcome.log[-3000:]
    summary = find_summary(mlflow_uri, outcome.run_id)
    weights = torch.load(summary["model_file"])["net.0.weight"].numpy().reshape(-1)
    # the reference: all sites' training rows in one place, as the model sees them (each site's standardisation)
    cohorts = [load_cohort(root / name, name) for name in names]
    features = cohorts[0].features
    frame = pd.concat([pd.DataFrame(c.train.x.astype(np.float64), columns=features).assign(
        time=c.train.time, event=c.train.event, site=c.site) for c in cohorts], ignore_index=True)
    reference = CoxPHFitter(penalizer=0.01).fit(frame, "time", "event", strata=["site"], fit_options=CONVERGED)
    np.testing.assert_allclose(weights, reference.params_[features].to_numpy(), atol=1e-6)
    client = MlflowClient(mlflow_uri)
    rounds = client.get_metric_history(summary["mlflow_run_id"], "federation/c_index")
    assert 2 <= len(rounds) < 12  # it stopped once converged
    assert summary["registered_model"].startswith("models:/fedhosp-oncology-survival/")
