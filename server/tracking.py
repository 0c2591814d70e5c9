"""The only module that talks to MLflow.

One MLflow run per federated run, tagged with Flower's run id; the whole run
config as params; aggregated and per-site metrics with ``step = server_round``;
the final model as an artifact, registered in the model registry. On any
exception the run is closed as FAILED, so a broken run never looks finished.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import torch
from mlflow.tracking import MlflowClient

from models.ledger import Ledger
from models.home import fedhosp_home
from models.builders import model_hash
from server.settings import RunSettings
from server.sites import SiteInfo
from server.strategy import SiteRound

FLWR_RUN_TAG = "flwr.run_id"
LEDGER_HEAD_TAG = "fedhosp.ledger_head"
CHECKPOINT_TAG = "fedhosp.checkpoint"


def checkpoint_of_run(settings: RunSettings, mlflow_run_id: str) -> str:
    """The checkpoint path recorded on an MLflow run (for ``resume-from = <mlflow run id>``)."""
    run = MlflowClient(tracking_uri(settings)).get_run(mlflow_run_id)
    if CHECKPOINT_TAG not in run.data.tags:
        raise ValueError(f"MLflow run {mlflow_run_id} has no checkpoint (tag {CHECKPOINT_TAG})")
    return run.data.tags[CHECKPOINT_TAG]


def tracking_uri(settings: RunSettings) -> str:
    """run-config ``mlflow-uri``, else ``$MLFLOW_TRACKING_URI``, else ``$FEDHOSP_HOME/mlflow.db``."""
    return settings.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{fedhosp_home() / 'mlflow.db'}"


def registered_name(settings: RunSettings) -> str:
    return f"fedhosp-{settings.task}-{settings.outcome}"


def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    artifact_location = None
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":  # keep artifacts next to the database, not in the cwd
        db = Path(parsed.path if not parsed.path.startswith("//") else parsed.path[1:])
        artifact_location = (db.parent / "mlartifacts" / name).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:  # created concurrently
        return client.get_experiment_by_name(name).experiment_id


class _OpenRun:
    """What every fedhosp MLflow run does: close as FAILED on an exception (never looking finished),
    carry the ledger as it stands and the summary ``fedhosp run`` prints."""

    ledger: Ledger

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            mlflow.set_tag("fedhosp.error", f"{exc_type.__name__}: {exc}"[:5000])
        mlflow.end_run("FAILED" if exc is not None else "FINISHED")

    def log_ledger(self) -> None:
        """The ledger as it stands as ``audit/ledger.jsonl``; its head hash as a tag."""
        mlflow.log_text(self.ledger.path.read_text(encoding="utf-8"), "audit/ledger.jsonl")
        mlflow.set_tag(LEDGER_HEAD_TAG, self.ledger.head)

    def log_summary(self, summary: dict) -> None:
        mlflow.log_dict(summary, "summary.json")


class Tracker(_OpenRun):
    """Context manager around one MLflow run."""

    def __init__(self, settings: RunSettings, flwr_run_id: int, sites: dict[int, SiteInfo], ledger: Ledger,
                 resume_run_id: str = ""):
        self.settings = settings
        self.flwr_run_id = flwr_run_id
        self.sites = sorted(sites.values(), key=lambda s: s.name)
        self.uri = tracking_uri(settings)
        self.rounds: list[SiteRound] = []
        self.run_id = ""
        self.ledger = ledger
        self.version: str | None = None
        self.resume_run_id = resume_run_id
        self.logged_up_to = 0  # rounds already in MLflow (a resumed run must not log a step twice)
        self.unit = "patients" if settings.task == "oncology" else "images"  # what num-examples counts

    def __enter__(self) -> "Tracker":
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        experiment = _experiment_id(self.client, self.uri, self.settings.mlflow_experiment)
        tags = {
            FLWR_RUN_TAG: str(self.flwr_run_id),
            "fedhosp.task": self.settings.task,
            "fedhosp.outcome": self.settings.outcome,
            "fedhosp.sites": ",".join(s.name for s in self.sites),
        }
        if self.resume_run_id:
            run = mlflow.start_run(run_id=self.resume_run_id)
            history = self.client.get_metric_history(self.resume_run_id, "federation/round_duration_s")
            self.logged_up_to = max((m.step for m in history), default=0)
            mlflow.set_tag("fedhosp.resumed_by", str(self.flwr_run_id))
            self.run_id = run.info.run_id
            return self
        run = mlflow.start_run(
            experiment_id=experiment, run_name=f"flwr-{self.flwr_run_id}-{self.settings.strategy}", tags=tags
        )
        self.run_id = run.info.run_id
        mlflow.log_params(self.settings.as_params())
        mlflow.log_params({"num-sites": len(self.sites)})
        mlflow.log_dict(
            {s.name: {"num_train": s.num_train, "num_test": s.num_test, "skipped_rows": s.skipped_rows,
                      "features": list(s.features)} for s in self.sites},
            "sites.json",
        )
        return self

    def checkpointed(self, checkpoint: Path) -> None:
        """The run's checkpoint file (for ``resume-from = <mlflow run id>``), tagged once it exists."""
        mlflow.set_tag(CHECKPOINT_TAG, str(checkpoint))

    def log_round(self, r: SiteRound) -> None:
        """Aggregated metrics under ``federation/``, each site's under its own name."""
        self.rounds.append(r)
        if r.server_round <= self.logged_up_to:  # replayed after a resume: already in MLflow
            self.log_ledger()
            return
        metrics: dict[str, float] = {
            "federation/round_duration_s": r.duration_s,
            "federation/failed_sites": float(len(r.failures)),
            "federation/rejected_updates": float(len(r.rejected)),
            "federation/round_skipped": 1.0 if r.skipped else 0.0,
            "federation/validation_ms": r.validation_ms,
            f"federation/num_{self.unit}": float(sum(m.get("num-examples", 0) for m in r.train.values())),
        }
        for key, value in r.train_aggregate.items():
            if key != "num-examples" and key not in PRIVACY_METRICS:  # an average of sites' ε means nothing
                metrics[f"federation/{key}"] = value
        if r.epsilon_max is not None:
            metrics["federation/epsilon_max"] = r.epsilon_max
        for key, value in r.evaluate_aggregate.items():
            if key != "num-examples":
                metrics[f"federation/{'eval_loss' if key == 'loss' else key}"] = value
        for name in sorted({s.name for s in self.sites} | set(r.failures)):  # refusing sites fail every round
            metrics[f"{name}/failed"] = 1.0 if name in r.failures else 0.0
            metrics[f"{name}/rejected"] = 1.0 if name in r.rejected else 0.0
            for key, value in r.train.get(name, {}).items():
                metrics[f"{name}/{f'num_{self.unit}' if key == 'num-examples' else key}"] = value
            for key, value in r.evaluate.get(name, {}).items():
                renamed = {"num-examples": f"num_test_{self.unit}", "loss": "eval_loss"}.get(key, key)
                metrics[f"{name}/{renamed}"] = value
        mlflow.log_metrics(metrics, step=r.server_round)
        if r.failures:
            mlflow.log_dict(r.failures, f"failures/round-{r.server_round:04d}.json")
        if r.rejected or r.skipped:
            mlflow.log_dict({"rejected": r.rejected, "skipped": r.skipped}, f"rejected/round-{r.server_round:04d}.json")
        self.log_ledger()

    def log_ledger(self, final: bool = False) -> None:
        """As for every run; at the end also the head hash on the model version."""
        super().log_ledger()
        if final and self.version is not None:
            self.client.set_model_version_tag(registered_name(self.settings), self.version, LEDGER_HEAD_TAG,
                                              self.ledger.head)

    def finish(self, model: torch.nn.Module, features: list[str], input_example) -> dict:
        """Save the final model to disk, log it to MLflow, register it; return the run summary."""
        state = model.state_dict()
        digest = model_hash(state)
        folder = fedhosp_home() / "models" / self.run_id
        folder.mkdir(parents=True, exist_ok=True)
        spec = {
            "task": self.settings.task, "outcome": self.settings.outcome, "model": self.settings.model,
            "features": features, "image_size": self.settings.image_size if self.settings.task == "radiology" else None,
            "threshold": 0.5, "model_hash": digest, "flwr_run_id": self.flwr_run_id, "mlflow_run_id": self.run_id,
            "dp": self.settings.dp, "privacy": self.privacy(),
        }
        torch.save(state, folder / "model.pt")
        (folder / "model.json").write_text(json.dumps(spec, indent=2), encoding="utf-8")
        mlflow.log_artifacts(str(folder), "final_model")
        mlflow.set_tag("fedhosp.model_hash", digest)

        started = time.perf_counter()
        # The registered version's source is final_model/ (state dict + spec): what validation
        # (``model-uri = models:/...``) loads; exporting a pt2 program cost ~10 s per run.
        version = register_version(self.client, registered_name(self.settings), mlflow.get_artifact_uri("final_model"),
                                   self.run_id)
        self.version = version
        if version is not None:
            contributing = sorted(set().union(*(r.train for r in self.rounds)))  # sites whose updates were used
            privacy = {"fedhosp.privacy": json.dumps(spec["privacy"], sort_keys=True)} if spec["privacy"] else {}
            for key, value in {**privacy, "fedhosp.sites": ",".join(contributing),
                               "fedhosp.model_hash": digest, FLWR_RUN_TAG: str(self.flwr_run_id)}.items():
                self.client.set_model_version_tag(registered_name(self.settings), str(version), key, value)
        last = self.rounds[-1] if self.rounds else None
        summary = {
            "flwr_run_id": self.flwr_run_id,
            "mlflow_run_id": self.run_id,
            "tracking_uri": self.uri,
            "experiment": self.settings.mlflow_experiment,
            "rounds": self.rounds[-1].server_round if self.rounds else 0,
            "task": self.settings.task,
            "outcome": self.settings.outcome,
            "strategy": self.settings.strategy,
            "registered_model": f"models:/{registered_name(self.settings)}/{version}" if version else None,
            "model_file": str(folder / "model.pt"),
            "model_hash": digest,
            "register_seconds": round(time.perf_counter() - started, 2),
            "sites": {s.name: {**(last.evaluate.get(s.name, {}) if last else {}),
                               "num_train": s.num_train, "num_test": s.num_test} for s in self.sites},
            "aggregate": last.evaluate_aggregate if last else {},
            "failures": {r.server_round: r.failures for r in self.rounds if r.failures},
            "rejected": {r.server_round: r.rejected for r in self.rounds if r.rejected},
            "skipped_rounds": [r.server_round for r in self.rounds if r.skipped],
            "privacy": spec["privacy"],
        }
        return summary

    def privacy(self) -> dict[str, dict[str, float]]:
        """Each dp site's last reported ε of this run (what the final model reveals about its patients, at δ),
        its data set's total spent, and its budget; empty for a run without dp."""
        out: dict[str, dict[str, float]] = {}
        for r in self.rounds:
            for site, numbers in r.train.items():
                if "epsilon" in numbers:
                    rounds = out.get(site, {}).get("rounds", 0) + 1
                    out[site] = {**{k: numbers[k] for k in ("epsilon", "delta", "epsilon_spent", "max_epsilon",
                                                            "noise_multiplier") if k in numbers}, "rounds": rounds}
        return out


PRIVACY_METRICS = ("epsilon", "epsilon_spent", "delta", "max_epsilon", "noise_multiplier", "sample_rate", "dp_steps")


def register_version(client: MlflowClient, name: str, source: str, run_id: str | None) -> str | None:
    """A new version of ``name`` whose source is a final_model/ folder (model.pt + model.json)."""
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return str(client.create_model_version(name, source, run_id=run_id, await_creation_for=60).version)


# ---------------------------------------------------------------- validation


def mlflow_name(text: str) -> str:
    """A subgroup or site label as MLflow accepts in a metric name (``<50`` -> ``under 50``, ``80+`` -> ``80 plus``)."""
    text = str(text).replace("<", "under ").replace("+", " plus")
    return re.sub(r"[^\w\-. :/]", "_", text)


def download_model(uri: str, tracking: str) -> tuple[Path, tuple[str, str] | None]:
    """The final_model/ folder a ``models:/name/version`` (or ``@alias``) or ``runs:/`` URI points to.

    Returns the local folder and, for a registry URI, (name, version) for tagging the verdict.
    """
    client = MlflowClient(tracking)
    if uri.startswith("models:/"):
        ref = uri.removeprefix("models:/")
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in ref:
            name, number = ref.rsplit("/", 1)
            version = client.get_model_version(name, number)
        else:
            raise ValueError(f"model-uri {uri!r}: expected models:/<name>/<version> or models:/<name>@<alias>")
        source = version.source
        if not source or "final_model" not in source:  # a version logged some other way: its run's final_model/
            if not version.run_id:
                raise ValueError(f"model-uri {uri!r}: the version has no fedhosp final_model/ and no run")
            source = f"runs:/{version.run_id}/final_model"
        folder = mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=tracking)
        return Path(folder), (name, str(version.version))
    folder = mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking)
    return Path(folder), None


class ValidationTracker(_OpenRun):
    """One MLflow run per validation: per-site figures, the verdict, the report, the registry tag."""

    def __init__(self, settings: RunSettings, flwr_run_id: int, model_hash_: str, model_uri: str, ledger: Ledger):
        self.settings, self.flwr_run_id, self.model_hash, self.model_uri = settings, flwr_run_id, model_hash_, model_uri
        self.uri = tracking_uri(settings)
        self.ledger = ledger
        self.run_id = ""

    def __enter__(self) -> "ValidationTracker":
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        self.experiment = _experiment_id(self.client, self.uri, self.settings.mlflow_experiment)
        run = mlflow.start_run(experiment_id=self.experiment, run_name=f"{self.settings.mode}-flwr-{self.flwr_run_id}",
                               tags={FLWR_RUN_TAG: str(self.flwr_run_id), "fedhosp.mode": self.settings.mode,
                                     "fedhosp.task": self.settings.task, "fedhosp.outcome": self.settings.outcome,
                                     "fedhosp.model_hash": self.model_hash, "fedhosp.model_uri": self.model_uri})
        self.run_id = run.info.run_id
        mlflow.log_params(self.settings.as_params())
        return self

    def previous(self) -> dict | None:
        """The newest finished validation of the same weights (by model hash), for drift."""
        runs = self.client.search_runs(
            [self.experiment],
            filter_string=(f"tags.`fedhosp.model_hash` = '{self.model_hash}' and tags.`fedhosp.mode` = 'validate' "
                           "and attributes.status = 'FINISHED'"),
            order_by=["attributes.start_time DESC"], max_results=5)
        for run in runs:
            if run.info.run_id == self.run_id:
                continue
            try:
                path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="validation.json",
                                                           tracking_uri=self.uri)
            except Exception:
                continue
            previous = json.loads(Path(path).read_text(encoding="utf-8"))
            previous["mlflow_run_id"] = run.info.run_id
            return previous
        return None

    def log(self, result: dict, report: Path) -> str:
        """Figures as metrics (suppressed groups have none), the result and report as artifacts; the report URI."""
        metrics: dict[str, float] = {}

        def put(key: str, figure: dict | None) -> None:
            for part, suffix in (("value", ""), ("low", "_low"), ("high", "_high")):
                value = (figure or {}).get(part)
                if value is not None and math.isfinite(value):
                    metrics[mlflow_name(key) + suffix] = float(value)

        for name, site in result["sites"].items():
            metrics[f"{mlflow_name(name)}/passed"] = 1.0 if site.get("verdict") == "PASS" else 0.0
            if site.get("status") != "ok":
                continue
            metrics[f"{mlflow_name(name)}/num_test"] = float(site["n"])
            if math.isfinite(site.get("seconds", float("nan"))):
                metrics[f"{mlflow_name(name)}/validate_seconds"] = site["seconds"]
            for metric, figure in site["metrics"].items():
                put(f"{name}/{metric}", figure)
            for attribute, groups in site.get("subgroups", {}).items():
                for value, group in groups.items():
                    if group.get("suppressed"):
                        continue
                    if "n" in group:
                        metrics[mlflow_name(f"{name}/{attribute} {value}/n")] = float(group["n"])
                    for metric, figure in group.get("metrics", {}).items():
                        put(f"{name}/{attribute} {value}/{metric}", figure)
        for model, row in (result.get("cross_site") or {}).get("matrix", {}).items():
            for site, figure in row.items():
                put(f"cross_site/{model}/{site}/{result['cross_site']['metric']}", figure)
        metrics["federation/passed"] = 1.0 if result["verdict"] == "PASS" else 0.0
        metrics["federation/drift_flags"] = float(len(result["drift"]["flags"]))
        mlflow.log_metrics(metrics, step=0)
        mlflow.set_tags({"fedhosp.verdict": result["verdict"], "fedhosp.criteria": result["criteria"]["name"]})
        mlflow.log_dict(result, "validation.json")
        mlflow.log_artifact(str(report), "report")
        self.log_ledger()
        return mlflow.get_artifact_uri(f"report/{report.name}")

    def tag_version(self, registry: tuple[str, str], result: dict, report_uri: str, report_path: Path) -> None:
        """The verdict on the registered model version: what a hospital checks before switching it on."""
        name, version = registry
        tags = {"fedhosp.validation.verdict": result["verdict"], "fedhosp.validation.report": report_uri,
                "fedhosp.validation.report_file": str(report_path), "fedhosp.validation.run": self.run_id,
                "fedhosp.validation.criteria": result["criteria"]["name"],
                "fedhosp.validation.sites": ",".join(f"{n}={s.get('verdict')}" for n, s in result["sites"].items()),
                "fedhosp.validation.drift": "; ".join(result["drift"]["flags"])[:4000] or "none"}
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, value)


class AnalysisTracker(_OpenRun):
    """One MLflow run per treatment-effect analysis: the headline figures as metrics, analysis.json, the report."""

    def __init__(self, settings: RunSettings, flwr_run_id: int, ledger: Ledger):
        self.settings, self.flwr_run_id, self.ledger = settings, flwr_run_id, ledger
        self.uri = tracking_uri(settings)
        self.run_id = ""

    def __enter__(self) -> "AnalysisTracker":
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        experiment = _experiment_id(self.client, self.uri, self.settings.mlflow_experiment)
        run = mlflow.start_run(experiment_id=experiment, run_name=f"analyse-flwr-{self.flwr_run_id}",
                               tags={FLWR_RUN_TAG: str(self.flwr_run_id), "fedhosp.mode": "analyse",
                                     "fedhosp.task": "oncology", "fedhosp.treatment": self.settings.treatment})
        self.run_id = run.info.run_id
        mlflow.log_params(self.settings.as_params())
        return self

    def log(self, result: dict, report: Path) -> str:
        """``treatment/*``, ``logrank/*``, ``subgroup/<column>/<level>/hr*`` and ``subgroup/<column>/interaction_p``
        (MLflow refuses "=" in a metric name, so a level is a path part); the result and report as artifacts."""
        metrics: dict[str, float] = {}

        def put(key: str, value) -> None:
            if isinstance(value, (int, float)) and math.isfinite(value):
                metrics[mlflow_name(key)] = float(value)

        term = result["cox"]["terms"][result["treatment"]]
        for key in ("hr", "hr_low", "hr_high", "p", "coef", "se"):
            put(f"treatment/{key}", term[key])
        put("treatment/sites", result["cox"]["sites"])
        put("treatment/iterations", result["cox"]["iterations"])
        for key in ("chi2", "p"):
            put(f"logrank/{key}", result["logrank"][key])
        for column, levels in result["subgroups"].items():
            for level, figure in levels.items():
                if isinstance(figure, dict) and "hr" in figure:
                    for key in ("hr", "hr_low", "hr_high"):
                        put(f"subgroup/{column}/{level}/{key}", figure[key])
            put(f"subgroup/{column}/interaction_p", levels.get("interaction_p"))
            put(f"subgroup/{column}/interaction_p_holm", levels.get("interaction_p_holm"))
        mlflow.log_metrics(metrics, step=0)
        mlflow.log_dict(result, "analysis.json")
        mlflow.log_text(report.read_text(encoding="utf-8"), "report/analysis.html")
        self.log_ledger()
        return mlflow.get_artifact_uri("report/analysis.html")
