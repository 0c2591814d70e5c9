"""The run config, read once into typed fields (kebab-case keys in pyproject)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields

MODES = ("train", "validate", "cross-site", "analyse")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad",
              "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan", "newton")
# What an empty model, lr = 0 or batch-size = 0 in the run config stand for, per task:
# a Cox loss needs large batches (risk sets); the image CNN diverges at the Cox learning rate, and FedAvg
# (Adam restarted every round) fell 0.03 AUC behind pooled training at 0.003 on real images (bench-breastmnist).
TASK_DEFAULTS = {
    "oncology": {"model": "linear", "lr": 0.01, "batch_size": 64},
    "radiology": {"model": "small-cnn", "lr": 0.001, "batch_size": 16},
}
# What secure-update-norm = 0 stands for, per model: above a site's largest update (L2), which for a network with
# BatchNorm is round 1's, where the running statistics leave their initial 0 and 1 (one demo site, 2026-12-06:
# small-cnn 9.6 after 2 local epochs, 10.6 after 10; densenet121 125 after 2; the oncology models below 1). A larger
# bound only coarsens SecAgg+'s quantisation grid (2^22 steps over +-bound).
SECURE_UPDATE_NORM = {"small-cnn": 20.0, "densenet121": 200.0}
SECURE_UPDATE_NORM_OTHERWISE = 10.0


@dataclass(frozen=True)
class RunSettings:
    task: str = "oncology"
    endpoint: str = "survival"
    model: str = ""  # "", 0: the task's default, see TASK_DEFAULTS
    target: str = "kl-grade"
    image_size: int = 64
    strategy: str = "fedavg"
    num_server_rounds: int = 5
    local_epochs: int = 2
    local_steps: int = 0
    batch_size: int = 0
    lr: float = 0.0
    server_lr: float = 0.1
    proximal_mu: float = 0.1
    seed: int = 42
    data_root: str = ""
    mlflow_uri: str = ""
    mlflow_experiment: str = "fedhosp"
    min_nodes: int = 2
    round_timeout: float = 3600.0
    min_train_nodes: int = 2
    trim_beta: float = 0.2
    num_malicious_nodes: int = 0
    num_nodes_to_select: int = 1
    validate_updates: bool = True
    max_update_norm: float = 0.0
    max_update_ratio: float = 10.0
    max_examples: int = 0
    resume_from: str = ""
    mode: str = "train"
    model_uri: str = ""
    criteria: str = ""
    min_cell: int = 10
    bootstrap_samples: int = 1000
    features: str = ""
    treatment: str = "treatment"
    covariates: str = ""
    subgroups: str = ""
    km_bin: float = 30.0
    penalizer: float = 0.01
    dp: bool = False
    dp_noise_multiplier: float = 1.0
    dp_max_grad_norm: float = 1.0
    dp_delta: float = 1e-5
    secure_aggregation: bool = False
    secure_update_norm: float = 0.0  # 0 = the model's (SECURE_UPDATE_NORM)

    @classmethod
    def from_run_config(cls, run_config: dict) -> "RunSettings":
        known = {f.name: f.type for f in fields(cls)}
        values = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name in known:
                default = getattr(cls, name)
                values[name] = type(default)(value)
        for name, default in TASK_DEFAULTS.get(values.get("task", cls.task), {}).items():
            if not values.get(name):
                values[name] = default
        if not values.get("secure_update_norm"):
            values["secure_update_norm"] = SECURE_UPDATE_NORM.get(values.get("model", cls.model),
                                                                  SECURE_UPDATE_NORM_OTHERWISE)
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        from models import oncology, radiology
        from models.builders import TASKS

        if self.task not in TASKS:
            raise ValueError(f"run-config task={self.task!r}; choose one of {TASKS}")
        if self.task == "oncology":
            if self.endpoint not in oncology.ENDPOINTS:
                raise ValueError(f"run-config endpoint={self.endpoint!r}; choose one of {oncology.ENDPOINTS}")
            if self.model not in oncology.MODELS:
                raise ValueError(f"run-config model={self.model!r} for oncology; choose one of {oncology.MODELS}")
        else:
            if self.target not in radiology.TARGETS:
                raise ValueError(f"run-config target={self.target!r}; choose one of {tuple(radiology.TARGETS)}")
            if self.model not in radiology.MODELS:
                raise ValueError(f"run-config model={self.model!r} for radiology; choose one of {radiology.MODELS}")
            if not 16 <= self.image_size <= 1024:
                raise ValueError("run-config image-size must be between 16 and 1024")
        if self.mode not in MODES:
            raise ValueError(f"run-config mode={self.mode!r}; choose one of {MODES}")
        if self.mode == "validate" and not self.model_uri:
            raise ValueError("run-config mode='validate' needs model-uri (models:/<name>/<version> or a model file)")
        if self.mode == "analyse":
            if self.task != "oncology":
                raise ValueError("run-config mode='analyse' is for task='oncology' (a cohort.csv with time and event)")
            if not self.treatment:
                raise ValueError("run-config mode='analyse' needs treatment (the 0/1 column to compare)")
            if self.treatment in self.covariate_list + self.subgroup_list:
                raise ValueError(f"run-config treatment '{self.treatment}' cannot also be a covariate or a subgroup")
            if self.km_bin <= 0:
                raise ValueError("run-config km-bin must be positive (the width of a Kaplan-Meier time bin)")
        if self.strategy == "newton" and self.mode == "train" and (
                self.task, self.endpoint, self.model) != ("oncology", "survival", "linear"):
            raise ValueError("run-config strategy='newton' fits the linear Cox model: it needs task='oncology', "
                             "endpoint='survival', model='linear'")
        if self.dp:
            self._check_dp()
        if self.secure_aggregation:
            self._check_secure()
        if self.penalizer < 0:
            raise ValueError("run-config penalizer must not be negative")
        if self.min_cell < 1:
            raise ValueError("run-config min-cell must be at least 1")
        if self.bootstrap_samples < 0:
            raise ValueError("run-config bootstrap-samples must not be negative")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"run-config strategy={self.strategy!r}; choose one of {STRATEGIES}")
        if self.num_server_rounds < 1:
            raise ValueError("run-config num-server-rounds must be at least 1")
        if self.local_epochs < 1 and self.local_steps < 1:
            raise ValueError("run-config needs local-epochs >= 1 or local-steps >= 1")
        if self.min_train_nodes < 1:
            raise ValueError("run-config min-train-nodes must be at least 1")
        if not 0 <= self.trim_beta < 0.5:
            raise ValueError("run-config trim-beta must be in [0, 0.5)")
        if self.batch_size < 2:
            raise ValueError("run-config batch-size must be at least 2 (a Cox risk set needs pairs)")

    def _check_dp(self) -> None:
        from models.errors import COX_REFUSAL

        if self.mode != "train":
            raise ValueError(f"run-config dp applies to training; mode={self.mode!r} releases aggregates that min-cell "
                             "protects (see the README's privacy section)")
        if self.task == "oncology" and self.endpoint == "survival":
            raise ValueError(f"run-config {COX_REFUSAL}")
        if self.strategy in ("fedprox", "newton"):
            raise ValueError(f"run-config dp with strategy={self.strategy!r}: "
                             + ("Opacus clips per-patient gradients only, so FedProx's proximal term would be "
                                "dropped; use fedavg or a server optimiser" if self.strategy == "fedprox" else
                                "the exact Cox fit is the survival endpoint"))
        if self.dp_noise_multiplier <= 0 or self.dp_max_grad_norm <= 0:
            raise ValueError("run-config dp-noise-multiplier and dp-max-grad-norm must be positive")
        if not 0 < self.dp_delta < 1:
            raise ValueError("run-config dp-delta must be in (0, 1)")

    def _check_secure(self) -> None:
        from server.secure_aggregation import STRATEGIES as SECURE

        if self.mode != "train":
            raise ValueError(f"run-config secure-aggregation applies to training; mode={self.mode!r} sends no updates")
        if self.strategy not in SECURE:
            raise ValueError(f"run-config secure-aggregation with strategy={self.strategy!r}: the coordinator sees only "
                             f"the sum of the updates, and {self.strategy} needs each one; use {' or '.join(SECURE)}")
        if self.secure_update_norm <= 0:
            raise ValueError("run-config secure-update-norm must be positive, or 0 for the model's default (each "
                             "site's update is bounded by it)")

    def privacy_config(self) -> dict[str, object]:
        """The train message's dp keys (data only); empty without dp."""
        if not self.dp:
            return {}
        return {"dp": True, "dp-noise-multiplier": self.dp_noise_multiplier, "dp-max-grad-norm": self.dp_max_grad_norm,
                "dp-delta": self.dp_delta}

    def site_check_config(self) -> dict[str, object]:
        """What a training run's site check tells the nodes: the plan a site's privacy budget is checked against."""
        return {"mode": "train", "num-server-rounds": self.num_server_rounds, "local-epochs": self.local_epochs,
                "local-steps": self.local_steps, "batch-size": self.batch_size, **self.privacy_config()}

    @property
    def covariate_list(self) -> list[str]:
        return [c.strip() for c in self.covariates.split(",") if c.strip()]

    @property
    def subgroup_list(self) -> list[str]:
        return [c.strip() for c in self.subgroups.split(",") if c.strip()]

    def validation(self):
        from server.update_checks import ValidationSettings

        return ValidationSettings(self.validate_updates, self.max_update_norm, self.max_update_ratio,
                                  self.max_examples)

    @property
    def outcome(self) -> str:
        """What the model predicts: the oncology endpoint or the radiology target."""
        return self.endpoint if self.task == "oncology" else self.target

    def build_model(self, num_features: int = 0):
        from models.builders import build_model

        return build_model(self.task, self.model, endpoint=self.endpoint, num_features=num_features,
                           target=self.target, image_size=self.image_size, private=self.dp)

    def as_params(self, redact_paths: bool = False) -> dict[str, object]:
        """The whole run config under its kebab-case keys, for MLflow params.

        ``redact_paths`` replaces the simulation's ``data-root`` by its SHA-256, for
        records that must never hold a path of patient data (the ledgers).
        """
        params = {k.replace("_", "-"): v for k, v in asdict(self).items()}
        if redact_paths and params["data-root"]:
            params["data-root"] = "sha256:" + hashlib.sha256(str(params["data-root"]).encode()).hexdigest()
        return params
