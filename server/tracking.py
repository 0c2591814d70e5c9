"""Run tracking: the only module that writes MLflow runs (the model registry is server/registry.py).

One MLflow run per federated run, tagged with Flower's run id; the whole run
config as params (``data-root`` as its SHA-256, as in the ledger); aggregated and
per-site metrics with ``step = server_round``; the final model as an artifact,
registered in the model registry. On any exception the run is closed as FAILED
(tag ``fedhosp.error``), so a broken run never looks finished.

The coordinator's ledger goes up as it grows: each call of ``log_ledger`` uploads
the records new since the last as ``audit/ledger/part-<first seq>-<last seq>.jsonl``
(the parts, in name order, are the ledger so far, even if the coordinator dies)
and sets ``fedhosp.ledger_head``; closing the run uploads the whole file as
``audit/ledger.jsonl``.

Everything goes through an :class:`MlflowClient` with explicit run ids: no fluent
API, no MLflow global state (a process may hold several runs, or none).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from logging import INFO, WARNING
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import torch
from flwr.common import log
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.tracking.context import registry as run_context
from mlflow.utils.time import get_current_time_millis
from mlflow.utils.uri import append_to_uri_path
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

from models.ledger import Ledger
from models.home import fedhosp_home
from models.builders import model_hash
from server.registry import register_version, registered_name, tag_version
from server.settings import RunSettings
from server.sites import SiteInfo
from server.round_report import SiteRound

FLWR_RUN_TAG = "flwr.run_id"
LEDGER_HEAD_TAG = "fedhosp.ledger_head"
CHECKPOINT_TAG = "fedhosp.checkpoint"
ERROR_TAG = "fedhosp.error"
LEDGER_ARTIFACT = "audit/ledger.jsonl"  # the whole ledger, uploaded when the run closes
LEDGER_PARTS = "audit/ledger"  # part-<first seq>-<last seq>.jsonl, uploaded as the ledger grows
_PART = re.compile(r"part-(\d+)-(\d+)\.jsonl$")


def checkpoint_of_run(settings: RunSettings, mlflow_run_id: str) -> str:
    """The checkpoint path recorded on an MLflow run (for ``resume-from = <mlflow run id>``)."""
    run = MlflowClient(tracking_uri(settings)).get_run(mlflow_run_id)
    if CHECKPOINT_TAG not in run.data.tags:
        raise ValueError(f"MLflow run {mlflow_run_id} has no checkpoint (tag {CHECKPOINT_TAG})")
    return run.data.tags[CHECKPOINT_TAG]


def tracking_uri(settings: RunSettings) -> str:
    """run-config ``mlflow-uri``, else ``$MLFLOW_TRACKING_URI``, else ``$FEDHOSP_HOME/mlflow.db``."""
    return settings.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{fedhosp_home() / 'mlflow.db'}"


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


def ledger_part_name(first: int, last: int) -> str:
    """The artifact path of the ledger records ``first`` to ``last`` (their ``seq``), both included."""
    return f"{LEDGER_PARTS}/part-{first:06d}-{last:06d}.jsonl"


class _OpenRun:
    """What every fedhosp MLflow run does: close as FAILED on an exception (never looking finished),
    carry the ledger as it grows and, once closed, whole, and the summary ``fedhosp run`` prints."""

    ledger: Ledger
    client: MlflowClient
    uri: str
    run_id: str = ""
    artifact_uri: str = ""
    _ledger_offset: int = 0  # bytes of the ledger file already in MLflow as parts

    def _start(self, experiment_id: str, run_name: str, tags: dict[str, str]) -> None:
        """A new run; the context tags (user, source) as the fluent API would set them."""
        run = self.client.create_run(experiment_id, tags=run_context.resolve_tags(tags), run_name=run_name)
        self._attach(run)

    def _attach(self, run) -> None:
        self.run_id, self.artifact_uri = run.info.run_id, run.info.artifact_uri

    def _fail_on_error(self, step):
        """Run ``step`` (the logging that follows creating the run); an exception closes the run as FAILED."""
        try:
            step()
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self._close_failed(exc)
            return
        try:
            self._log_whole_ledger()
        except Exception as failure:  # a run whose ledger MLflow lacks must not look finished
            self._close_failed(failure)
            raise
        self.client.set_terminated(self.run_id, "FINISHED")

    def _close_failed(self, exc: BaseException) -> None:
        """FAILED, with the error as tag ``fedhosp.error`` and the ledger as it stands. The run's own exception
        is what propagates: a failure to record it here (the store unreachable) is logged, not raised."""
        for step in (lambda: self.client.set_tag(self.run_id, ERROR_TAG, f"{type(exc).__name__}: {exc}"[:5000]),
                     self._log_whole_ledger, lambda: self.client.set_terminated(self.run_id, "FAILED")):
            try:
                step()
            except Exception as failure:
                log(WARNING, "fedhosp: MLflow run %s: cannot record its failure (%s: %s)", self.run_id,
                    type(failure).__name__, failure)

    def log_batch(self, metrics: dict[str, float] | None = None, params: dict[str, object] | None = None,
                  tags: dict[str, str] | None = None, step: int = 0) -> None:
        """Metrics (at ``step``), params and tags, in as many calls as MLflow's batch limits need."""
        now = get_current_time_millis()
        batch = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()]
        named = [Param(k, str(v)) for k, v in (params or {}).items()]
        labels = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for i in range(0, len(named), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=named[i:i + MAX_PARAMS_TAGS_PER_BATCH])
        for i in range(0, len(labels), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=labels[i:i + MAX_PARAMS_TAGS_PER_BATCH])
        for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i:i + MAX_METRICS_PER_BATCH])

    def artifact(self, path: str) -> str:
        """The URI of one of this run's artifacts."""
        return append_to_uri_path(self.artifact_uri, path)

    def log_ledger(self) -> None:
        """The ledger records appended since the last call as ``audit/ledger/part-<first>-<last>.jsonl``;
        the ledger's head hash as a tag."""
        with open(self.ledger.path, "rb") as fh:
            fh.seek(self._ledger_offset)
            new = fh.read()
        new = new[:new.rfind(b"\n") + 1]  # whole records only
        if not new:  # nothing appended since: MLflow has it all, head tag included
            return
        text = new.decode("utf-8")
        lines = text.splitlines()
        first, last = json.loads(lines[0])["seq"], json.loads(lines[-1])["seq"]
        self.client.log_text(self.run_id, text, ledger_part_name(first, last))
        self._ledger_offset += len(new)
        self.client.set_tag(self.run_id, LEDGER_HEAD_TAG, self.ledger.head)

    def _log_whole_ledger(self) -> None:
        """What is left as a part, then the whole ledger as ``audit/ledger.jsonl`` (the run is closing)."""
        self.log_ledger()
        self.client.log_text(self.run_id, self.ledger.path.read_text(encoding="utf-8"), LEDGER_ARTIFACT)

    def _uploaded_ledger_offset(self) -> int:
        """For a resumed run: the bytes of the ledger file its parts in MLflow already hold."""
        seqs = [int(m.group(2)) for f in self.client.list_artifacts(self.run_id, LEDGER_PARTS)
                if (m := _PART.search(f.path))]
        if not seqs:
            return 0
        offset = 0
        with open(self.ledger.path, "rb") as fh:
            for line in fh:
                offset += len(line)
                if json.loads(line)["seq"] == max(seqs):
                    return offset
        raise RuntimeError(f"MLflow run {self.run_id} holds ledger records up to seq {max(seqs)}, "
                           f"which {self.ledger.path} does not have")

    def log_summary(self, summary: dict) -> None:
        self.client.log_dict(self.run_id, summary, "summary.json")


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
        self.client = MlflowClient(self.uri)
        if self.resume_run_id:
            run = self.client.get_run(self.resume_run_id)
            self.client.update_run(run.info.run_id, status="RUNNING")
            self._attach(run)
            self._fail_on_error(self._resume)
            return self
        experiment = _experiment_id(self.client, self.uri, self.settings.mlflow_experiment)
        self._start(experiment, f"flwr-{self.flwr_run_id}-{self.settings.strategy}", {
            FLWR_RUN_TAG: str(self.flwr_run_id),
            "fedhosp.task": self.settings.task,
            "fedhosp.outcome": self.settings.outcome,
            "fedhosp.sites": ",".join(s.name for s in self.sites),
        })
        self._fail_on_error(self._describe)
        return self

    def _describe(self) -> None:
        """A new run's params (the ledger's: ``data-root`` redacted) and sites.json."""
        self.log_batch(params={**self.settings.as_params(redact_paths=True), "num-sites": len(self.sites)})
        self.client.log_dict(self.run_id, {
            s.name: {"num_train": s.num_train, "num_test": s.num_test, "skipped_rows": s.skipped_rows,
                     "features": list(s.features)} for s in self.sites}, "sites.json")

    def _resume(self) -> None:
        """A resumed run: which rounds and which ledger records MLflow already has."""
        history = self.client.get_metric_history(self.run_id, "federation/round_duration_s")
        self.logged_up_to = max((m.step for m in history), default=0)
        self._ledger_offset = self._uploaded_ledger_offset()
        self.client.set_tag(self.run_id, "fedhosp.resumed_by", str(self.flwr_run_id))

    def checkpointed(self, checkpoint: Path) -> None:
        """The run's checkpoint file (for ``resume-from = <mlflow run id>``), tagged once it exists."""
        self.client.set_tag(self.run_id, CHECKPOINT_TAG, str(checkpoint))

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
        if r.secure:
            metrics["federation/sites_in_secure_sum"] = float(len(r.secure["in_sum"]))
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
        self.log_batch(metrics, step=r.server_round)
        if r.failures:
            self.client.log_dict(self.run_id, r.failures, f"failures/round-{r.server_round:04d}.json")
        if r.secure:  # who is in the secure sum and who was left out, and why
            self.client.log_dict(self.run_id, r.secure, f"secure_aggregation/round-{r.server_round:04d}.json")
        if r.rejected or r.skipped:
            self.client.log_dict(self.run_id, {"rejected": r.rejected, "skipped": r.skipped},
                                 f"rejected/round-{r.server_round:04d}.json")
        self.log_ledger()

    def log_ledger(self, final: bool = False) -> None:
        """As for every run; at the end also the head hash on the model version."""
        super().log_ledger()
        if final and self.version is not None:
            tag_version(self.client, registered_name(self.settings), self.version, {LEDGER_HEAD_TAG: self.ledger.head})

    def finish(self, model: torch.nn.Module, features: list[str]) -> dict:
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
        self.client.log_artifacts(self.run_id, str(folder), "final_model")
        self.client.set_tag(self.run_id, "fedhosp.model_hash", digest)

        started = time.perf_counter()
        # The registered version's source is final_model/ (state dict + spec): what validation
        # (``model-uri = models:/...``) loads; exporting a pt2 program cost ~10 s per run.
        version = register_version(self.client, registered_name(self.settings), self.artifact("final_model"),
                                   self.run_id)
        self.version = version
        contributing = sorted(set().union(*(r.train for r in self.rounds)))  # sites whose updates were used
        privacy = {"fedhosp.privacy": json.dumps(spec["privacy"], sort_keys=True)} if spec["privacy"] else {}
        tag_version(self.client, registered_name(self.settings), version, {
            **privacy, "fedhosp.sites": ",".join(contributing), "fedhosp.model_hash": digest,
            FLWR_RUN_TAG: str(self.flwr_run_id)})
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


# ---------------------------------------------------------------- validation


def mlflow_name(text: str) -> str:
    """A subgroup or site label as MLflow accepts in a metric name (``<50`` -> ``under 50``, ``80+`` -> ``80 plus``)."""
    text = str(text).replace("<", "under ").replace("+", " plus")
    return re.sub(r"[^\w\-. :/]", "_", text)


class ValidationTracker(_OpenRun):
    """One MLflow run per validation: per-site figures, the verdict, the report, the registry tag."""

    def __init__(self, settings: RunSettings, flwr_run_id: int, model_hash_: str, model_uri: str, ledger: Ledger):
        self.settings, self.flwr_run_id, self.model_hash, self.model_uri = settings, flwr_run_id, model_hash_, model_uri
        self.uri = tracking_uri(settings)
        self.ledger = ledger
        self.run_id = ""

    def __enter__(self) -> "ValidationTracker":
        self.client = MlflowClient(self.uri)
        self.experiment = _experiment_id(self.client, self.uri, self.settings.mlflow_experiment)
        self._start(self.experiment, f"{self.settings.mode}-flwr-{self.flwr_run_id}", {
            FLWR_RUN_TAG: str(self.flwr_run_id), "fedhosp.mode": self.settings.mode,
            "fedhosp.task": self.settings.task, "fedhosp.outcome": self.settings.outcome,
            "fedhosp.model_hash": self.model_hash, "fedhosp.model_uri": self.model_uri})
        self._fail_on_error(lambda: self.log_batch(params=self.settings.as_params(redact_paths=True)))
        return self

    def previous(self) -> dict | None:
        """The newest finished validation of the same weights (by model hash), for drift.

        A finished validation without ``validation.json`` is passed over (and the log says so); any other
        failure to read one (the store unreachable, the run's artifacts gone, a corrupt file) raises, naming
        the MLflow run: drift must not quietly compare with an older validation, or with none.
        """
        runs = self.client.search_runs(
            [self.experiment],
            filter_string=(f"tags.`fedhosp.model_hash` = '{self.model_hash}' and tags.`fedhosp.mode` = 'validate' "
                           "and attributes.status = 'FINISHED'"),
            order_by=["attributes.start_time DESC"], max_results=5)
        for run in runs:
            if run.info.run_id == self.run_id:
                continue
            where = (f"the previous validation of these weights, MLflow run {run.info.run_id} (experiment "
                     f"{self.settings.mlflow_experiment!r} at {self.uri})")
            try:
                listed = {f.path for f in self.client.list_artifacts(run.info.run_id)}
            except Exception as exc:
                raise RuntimeError(f"drift: cannot list the artifacts of {where}: {type(exc).__name__}: {exc}") \
                    from exc
            if not listed:  # a finished validation always has its ledger and summary: the store lost them
                raise RuntimeError(f"drift: {where} has no artifacts at all (its artifact store unreachable, "
                                   f"or emptied)")
            if "validation.json" not in listed:
                log(INFO, "fedhosp: drift: MLflow run %s, a finished validation of these weights, has no "
                    "validation.json; skipped", run.info.run_id)
                continue
            with tempfile.TemporaryDirectory() as folder:
                try:
                    path = self.client.download_artifacts(run.info.run_id, "validation.json", dst_path=folder)
                    previous = json.loads(Path(path).read_text(encoding="utf-8"))
                except Exception as exc:
                    raise RuntimeError(f"drift: cannot read validation.json of {where}: "
                                       f"{type(exc).__name__}: {exc}") from exc
            if not isinstance(previous, dict):
                raise RuntimeError(f"drift: validation.json of {where} is not a JSON object")
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
        self.log_batch(metrics, tags={"fedhosp.verdict": result["verdict"],
                                      "fedhosp.criteria": result["criteria"]["name"]}, step=0)
        self.client.log_dict(self.run_id, result, "validation.json")
        self.client.log_artifact(self.run_id, str(report), "report")
        self.log_ledger()
        return self.artifact(f"report/{report.name}")


class AnalysisTracker(_OpenRun):
    """One MLflow run per treatment-effect analysis: the headline figures as metrics, analysis.json, the report."""

    def __init__(self, settings: RunSettings, flwr_run_id: int, ledger: Ledger):
        self.settings, self.flwr_run_id, self.ledger = settings, flwr_run_id, ledger
        self.uri = tracking_uri(settings)
        self.run_id = ""

    def __enter__(self) -> "AnalysisTracker":
        self.client = MlflowClient(self.uri)
        experiment = _experiment_id(self.client, self.uri, self.settings.mlflow_experiment)
        self._start(experiment, f"analyse-flwr-{self.flwr_run_id}", {
            FLWR_RUN_TAG: str(self.flwr_run_id), "fedhosp.mode": "analyse", "fedhosp.task": "oncology",
            "fedhosp.treatment": self.settings.treatment})
        self._fail_on_error(lambda: self.log_batch(params=self.settings.as_params(redact_paths=True)))
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
        self.log_batch(metrics, step=0)
        self.client.log_dict(self.run_id, result, "analysis.json")
        self.client.log_text(self.run_id, report.read_text(encoding="utf-8"), "report/analysis.html")
        self.log_ledger()
        return self.artifact("report/analysis.html")
