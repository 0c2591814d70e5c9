"""The MLflow model registry: fedhosp's registered models, their versions and the tags on them.

A training run registers its final model as a new version of ``fedhosp-<task>-<outcome>``
(:func:`registered_name`), whose source is the run's ``final_model/`` folder (``model.pt``,
the state dict, with ``model.json``, its spec); the version is tagged with the run
(``flwr.run_id``, ``fedhosp.sites``, ``fedhosp.model_hash``, ``fedhosp.privacy``,
``fedhosp.ledger_head``). A validation resolves ``model-uri = models:/...`` with
:func:`download_model` and tags the version it judged with its verdict
(:func:`tag_validation_verdict`, ``fedhosp.validation.*``): what a hospital checks
before switching a model on.

Run tracking (runs, params, metrics, artifacts) is server/tracking.py. Every function
here takes an :class:`MlflowClient` or a tracking URI: no MLflow global state.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from server.settings import RunSettings


def registered_name(settings: RunSettings) -> str:
    """The registered model a training run adds a version to: ``fedhosp-<task>-<outcome>``."""
    return f"fedhosp-{settings.task}-{settings.outcome}"


def register_version(client: MlflowClient, name: str, source: str, run_id: str | None) -> str:
    """A new version of ``name`` (created if new) whose source is a final_model/ folder (model.pt + model.json)."""
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return str(client.create_model_version(name, source, run_id=run_id, await_creation_for=60).version)


def tag_version(client: MlflowClient, name: str, version: str, tags: dict[str, str]) -> None:
    """Set ``tags`` on version ``version`` of registered model ``name``."""
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)


def tag_validation_verdict(client: MlflowClient, registry: tuple[str, str], result: dict, report_uri: str,
                           report_path: Path, validation_run_id: str) -> None:
    """The verdict on the registered model version: what a hospital checks before switching it on."""
    name, version = registry
    tag_version(client, name, version, {
        "fedhosp.validation.verdict": result["verdict"], "fedhosp.validation.report": report_uri,
        "fedhosp.validation.report_file": str(report_path), "fedhosp.validation.run": validation_run_id,
        "fedhosp.validation.criteria": result["criteria"]["name"],
        "fedhosp.validation.sites": ",".join(f"{n}={s.get('verdict')}" for n, s in result["sites"].items()),
        "fedhosp.validation.drift": "; ".join(result["drift"]["flags"])[:4000] or "none"})


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
