"""Identifiers planted everywhere a hospital's data can hold them reach no file outside the sites' own data.

Training (oncology and radiology), a radiology validation with subgroups and a
failing run, in real Flower simulations with a real MLflow store; then every
file the coordinator, MLflow (store and artifacts), Flower's state, the logs
and the site ledgers hold is searched. Only the sites' data folders and the
node-private image cache may hold them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from client.data import demo
from client.data.radiology_demo import write_radiology_demo
from server import runner
from tests.conftest import APP_DIR

pytestmark = pytest.mark.timeout(900)
PLANTED = {
    "PatientName": "Hansen^Jens^Planted", "PatientID": "PLANT-PID-", "OtherPatientIDs": "PLANT-OTHER-4711",
    "AccessionNumber": "PLANT-ACC-0815", "InstitutionName": "Planted Olav Hospital, Ward 9",
    "Manufacturer": "St. Olav PACS, J. Hansen 010170-1234",
}


def _plant_dicom(root: Path) -> list[str]:
    """Every image's identifying headers set to planted values; labels.csv keeps its PatientIDs (planted too)."""
    found = []
    for site in sorted(p for p in root.iterdir() if p.is_dir()):
        labels = pd.read_csv(site / "labels.csv")
        mapping = {pid: f"{PLANTED['PatientID']}{site.name[:3]}-{i:04d}" for i, pid in enumerate(labels["PatientID"])}
        labels["PatientID"] = labels["PatientID"].map(mapping)
        labels.to_csv(site / "labels.csv", index=False)
        found += list(mapping.values()) + list(labels["SOPInstanceUID"].astype(str))
        for path in site.rglob("*"):
            if not path.is_file() or path.name == "labels.csv":
                continue
            try:
                ds = pydicom.dcmread(path)
            except Exception:
                continue
            for key, value in PLANTED.items():
                if key == "PatientID":
                    value = mapping.get(str(ds.get("PatientID", "")), f"{value}{site.name[:3]}-x")
                setattr(ds, key, value)
            found += [str(ds.get(k)) for k in ("StudyInstanceUID", "SeriesInstanceUID") if k in ds]
            ds.save_as(path)
    return found


def _files(*roots: Path, skip: tuple[Path, ...]) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("*")
            if p.is_file() and not any(p.is_relative_to(s) for s in skip)]


def test_planted_identifiers_reach_no_coordinator_mlflow_flower_log_or_ledger_file(superlink, tmp_path, mlflow_uri):
    home, flwr_home = Path(superlink["FEDHOSP_HOME"]), Path(superlink["FLWR_HOME"])
    onc = tmp_path / "oncology"
    demo.write_demo(onc, 3)
    planted = []
    for site in sorted(onc.iterdir()):
        frame = pd.read_csv(site / "cohort.csv")
        frame["patient_id"] = [f"CPR-PLANT-{site.name[:3]}-{i:05d}" for i in range(len(frame))]
        frame.to_csv(site / "cohort.csv", index=False)
        planted += list(frame["patient_id"])
    rad = tmp_path / "radiology"
    write_radiology_demo(rad, 3, n_images=100)  # test splits above the policy's 20-image minimum
    planted += _plant_dicom(rad)
    planted += [v for k, v in PLANTED.items() if k != "PatientID"] + ["Hansen", "010170", "Olav"]

    common = {"num-server-rounds": 1, "mlflow-uri": mlflow_uri}
    runs = [runner.flwr_run(APP_DIR, superlink, {**common, "data-root": str(onc)}, num_supernodes=3),
            runner.flwr_run(APP_DIR, superlink, {**common, "task": "radiology", "image-size": 32,
                                                 "data-root": str(rad)}, num_supernodes=3)]
    assert all(r.ok for r in runs), [r.log[-2000:] for r in runs if not r.ok]
    validated = runner.flwr_run(APP_DIR, superlink, {
        "mode": "validate", "model-uri": "models:/fedhosp-radiology-kl-grade/1", "data-root": str(rad),
        "mlflow-uri": mlflow_uri, "bootstrap-samples": 50, "min-nodes": 2}, num_supernodes=3)
    assert validated.ok, validated.log[-3000:]
    import mlflow
    from mlflow.tracking import MlflowClient

    from server.summary import find_summary

    summary = find_summary(mlflow_uri, validated.run_id)
    result = mlflow.artifacts.load_dict(
        f"{MlflowClient(mlflow_uri).get_run(summary['mlflow_run_id']).info.artifact_uri}/validation.json")
    assert all("vendor" in site.get("subgroups", {}) for site in result["sites"].values()), result["sites"]
    # a failing run: a hospital pasted an identifier into a feature column
    broken = tmp_path / "broken"
    shutil.copytree(onc, broken)
    frame = pd.read_csv(broken / "Midtjylland" / "cohort.csv")
    frame["biomarker"] = frame["biomarker"].astype(object)
    frame.loc[3, "biomarker"] = "CPR-PLANT-TEXT-0101701234"
    frame.to_csv(broken / "Midtjylland" / "cohort.csv", index=False)
    planted.append("CPR-PLANT-TEXT-0101701234")
    failed = runner.flwr_run(APP_DIR, superlink, {**common, "data-root": str(broken)}, num_supernodes=3)
    assert not failed.ok and "site Midtjylland: cohort.csv column 'biomarker' is not numeric" in failed.log

    # every file outside the sites' own data and the node-private image cache
    files = _files(home, flwr_home, Path(mlflow_uri.removeprefix("sqlite:///")).parent,
                   skip=(onc, rad, broken, home / "cache", home / "demo"))
    assert any(p.name.endswith(".jsonl") and "site-ledgers" in str(p) for p in files)  # site ledgers searched too
    assert any(p.suffix == ".db" for p in files) and any(p.suffix == ".html" for p in files)
    logs = "".join(r.log for r in [*runs, validated, failed]).encode()
    needles = sorted({str(p) for p in planted if len(str(p)) >= 6}, key=len, reverse=True)
    leaks = {}
    for path in files:
        data = path.read_bytes()
        hits = [n for n in needles if n.encode() in data]
        if hits:
            leaks[str(path)] = hits[:3]
    hits = [n for n in needles if n.encode() in logs]
    if hits:
        leaks["the runs' logs"] = hits[:3]
    assert not leaks, leaks
